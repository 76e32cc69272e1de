"""Score a checkpoint: on a corpus (mean next-token loss, perplexity and bits per byte, one JSON line; which files
were scored goes to stderr), and on tasks (accuracy, scored as lm-evaluation-harness scores them, a JSON line each):

python -m accel_gpt.evaluate --checkpoint RUN_OR_CHECKPOINT_DIR --data PATH [--split NAME] [--stride N] [--batch_size N]
python -m accel_gpt.evaluate --checkpoint RUN_OR_CHECKPOINT_DIR --tasks PATH[,PATH...] [--limit N]
"""

from __future__ import annotations

import json
import math
import sys

from accel_gpt.cli import CommandLineParser, add_checkpoint_arguments, run_command, summary
from accel_gpt.data.cache import DEFAULT_DIR as DEFAULT_CACHE_DIR
from accel_gpt.data.mixture import is_short_form
from accel_gpt.errors import UserError
from accel_gpt.inference import (
    Checkpoint,
    default_stride,
    loss_in_bits_per_byte,
    open_checkpoint,
    resolve_device,
    scored_corpus,
    sliding_window_loss,
    target_bytes,
)
from accel_gpt.tasks import evaluate_task, load_tasks
from accel_gpt.tokenizer import get_tokenizer


def build_parser() -> CommandLineParser:
    parser = CommandLineParser(prog="python -m accel_gpt.evaluate", description=summary(__doc__))
    add_checkpoint_arguments(parser)
    parser.add_argument(
        "--data",
        help="text to score, in any form training takes: a .txt/.jsonl/.parquet file, a folder written by datasets' "
        "save_to_disk, a directory, a glob, or a bundled corpus name",
    )
    parser.add_argument(
        "--split",
        help="of a folder laid out in hub splits (train-*.parquet, validation-*.jsonl, ...), the split to score "
        "(default: validation; the others are never scored with it)",
    )
    parser.add_argument(
        "--stride",
        type=int,
        help="tokens between window starts, 1..context_len; each token is scored once, so a shorter stride gives "
        "each more context (default: context_len / 2, as accel_gpt.analysis.perplexity)",
    )
    parser.add_argument("--batch_size", type=int, default=4, help="windows per forward pass (default: 4)")
    parser.add_argument(
        "--text_column", help="the column or .jsonl field holding the text (default: the one the checkpoint trained on)"
    )
    parser.add_argument("--data_cache_dir", help=f"where tokenized corpora are cached (default: {DEFAULT_CACHE_DIR})")
    parser.add_argument(
        "--tasks",
        help="task files to score, PATH[,PATH...] (NAME=PATH names one; its file's stem otherwise): JSONL in the forms "
        "of docs/evaluation.md (HellaSwag, LAMBADA, multiple choice, completion)",
    )
    parser.add_argument("--limit", type=int, help="score each task's first N examples (default: all)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.data is None and args.tasks is None:
        raise UserError("pass --data PATH (a corpus to score), --tasks PATH[,PATH...] (tasks to score), or both")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"limit must be positive, got {args.limit}")
    if args.data is not None and is_short_form(args.data):
        raise UserError(
            f"--data {args.data} is a mixture: evaluate scores one corpus, so pass one source's path (a mixture's run "
            "logs each source's val_loss/<name>)"
        )
    tasks = load_tasks(args.tasks) if args.tasks is not None else []  # bad task files stop here, before any model
    checkpoint = open_checkpoint(args.checkpoint, args.step, resolve_device(args.device))
    if args.data is not None:
        print(json.dumps(score_corpus(checkpoint, args)), flush=True)
    settings = checkpoint.train_config
    tokenizer = get_tokenizer(checkpoint.tokenizer)
    eot = settings.get("special_token_id")
    for task in tasks:
        scores = evaluate_task(
            checkpoint.model, task, tokenizer, tokenizer.eot_token if eot is None else eot, args.limit
        )
        print(json.dumps({"checkpoint": str(checkpoint.path), **scores}), flush=True)


def score_corpus(checkpoint: Checkpoint, args) -> dict:
    """--data's loss, perplexity and bits per byte; which files they are goes to stderr."""
    settings = checkpoint.train_config
    tokenizer = checkpoint.tokenizer
    # The corpus is tokenized as the checkpoint's run tokenized its own: same tokenizer, same end-of-text id.
    column = args.text_column or settings.get("text_column", "text")
    corpus = scored_corpus(
        args.data, tokenizer, settings.get("special_token_id"), args.data_cache_dir, column, args.split
    )
    print(f"evaluate: {corpus.note}", file=sys.stderr, flush=True)
    stride = default_stride(checkpoint.model) if args.stride is None else args.stride
    loss, scored = sliding_window_loss(checkpoint.model, corpus.tokens, stride, args.batch_size)
    bpb = loss_in_bits_per_byte(loss, scored, target_bytes(corpus.tokens, tokenizer))
    return {
        "checkpoint": str(checkpoint.path), "data": args.data, "split": corpus.split, "files": len(corpus.files),
        "tokens": scored, "context_len": checkpoint.model.config.context_len, "stride": stride, "loss": loss,
        "perplexity": math.exp(loss), "bpb": bpb,
    }  # fmt: skip


if __name__ == "__main__":
    run_command(main)
