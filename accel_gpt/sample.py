"""Sample text from a checkpoint, printed as it is generated:

python -m accel_gpt.sample --checkpoint RUN_OR_CHECKPOINT_DIR [--prompt TEXT] [--max_new_tokens N] ...
"""

from __future__ import annotations

import argparse
import sys

import torch

from accel_gpt.cli import CommandLineParser, add_checkpoint_arguments, run_command, summary
from accel_gpt.errors import UserError
from accel_gpt.inference import check_sampling, encode_prompt, open_checkpoint, resolve_device
from accel_gpt.model import stream_tokens
from accel_gpt.tokenizer import TextStream, get_tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="python -m accel_gpt.sample", description=summary(__doc__))
    add_checkpoint_arguments(parser)
    parser.add_argument("--prompt", help="text to continue (default: read from stdin; empty: start a new document)")
    parser.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate per sample (default: 200)")
    parser.add_argument(
        "--temperature", type=float, default=0.8, help="softmax temperature; 0 is greedy (default: 0.8)"
    )
    parser.add_argument("--top_k", type=int, default=200, help="sample from the k most likely tokens (default: 200)")
    parser.add_argument(
        "--top_p",
        type=float,
        help="sample from the smallest set of tokens holding this much "
        "probability, after top_k (nucleus sampling; default: off)",
    )
    parser.add_argument("--seed", type=int, help="seed for reproducible samples (default: a fresh one each run)")
    parser.add_argument("--num_samples", type=int, default=1, help="samples to print, one after another (default: 1)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    return parser


def check_options(args: argparse.Namespace) -> None:
    if args.max_new_tokens <= 0 or args.num_samples <= 0:
        raise UserError("max_new_tokens and num_samples must be positive")
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if sys.stdin.isatty():
        print("reading the prompt from stdin (end it with Ctrl-D)", file=sys.stderr)
    prompt = sys.stdin.read()
    return prompt[:-1] if prompt.endswith("\n") else prompt  # the newline `echo` adds is not part of the prompt


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    check_options(args)
    device = resolve_device(args.device)
    checkpoint = open_checkpoint(args.checkpoint, args.step, device)
    tokenizer = get_tokenizer(checkpoint.tokenizer)
    eot = checkpoint.train_config.get("special_token_id")
    eot = tokenizer.eot_token if eot is None else eot
    prompt = read_prompt(args)
    idx = torch.tensor([encode_prompt(tokenizer, prompt, eot)], device=device)
    generator = torch.Generator(device=device)
    if args.seed is None:
        generator.seed()
    else:
        generator.manual_seed(args.seed)
    out = sys.stdout
    for sample in range(args.num_samples):
        if sample:
            out.write("---\n")
        out.write(prompt)
        text = TextStream(tokenizer)
        # Generation stops early at the end-of-text token: the model has finished a document.
        for next_id in stream_tokens(
            model=checkpoint.model,
            idx=idx,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_id=eot,
            generator=generator,
        ):
            out.write(text.push(next_id.item()))
            out.flush()
        out.write(text.flush() + "\n")
        out.flush()


if __name__ == "__main__":
    run_command(main)
