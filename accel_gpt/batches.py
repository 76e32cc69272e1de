"""What each process would train on, without training: the windows of a run's first optimizer steps, decoded.

[accelerate launch ...] python -m accel_gpt.batches [--config FILE] [--key value ...] [--steps N] [--json]

The train command's options and data path (tokenized into the same cache, or streamed), dealt out to the processes
of the launch as training deals them, and no model: the quickest way to see a corpus, a split or a stream at work.
"""

from __future__ import annotations

import contextlib
import json
import sys

from accelerate.utils import gather_object

from accel_gpt.cli import CommandLineParser, run_command, summary
from accel_gpt.config import parse_config
from accel_gpt.data.run_data import load_training_data
from accel_gpt.errors import UserError
from accel_gpt.launch import launch_world_size, start_accelerator
from accel_gpt.plan import plan_run
from accel_gpt.tokenizer import get_tokenizer
from accel_gpt.train import TrainerState


def main(argv: list[str] | None = None) -> None:
    parser = CommandLineParser(
        prog="python -m accel_gpt.batches", description=summary(__doc__),
        epilog="Every other option is the train command's: python -m accel_gpt.train --help",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps to show (default: 1)")
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per window: step, rank, micro_batch, source, tokens, text"
    )
    args, train_argv = parser.parse_known_args(argv)
    if args.steps < 1:
        raise UserError(f"steps must be positive, got {args.steps}")
    cfg = parse_config(train_argv)
    if cfg.checkpoint is not None:
        raise UserError("batches shows a run's first steps: drop --checkpoint (a resumed run continues the same order)")
    plan = plan_run(cfg, launch_world_size())
    accelerator = start_accelerator(plan.cfg, plan.gradient_accumulation_steps)
    with contextlib.redirect_stdout(sys.stderr):  # what tokenizing says: standard output is the windows alone
        data = load_training_data(plan, accelerator)
    plan = data.plan
    data.prepare(accelerator)
    state, mine = TrainerState(), []
    rank, world_size = accelerator.process_index, accelerator.num_processes
    for batches in data.steps(state, min(args.steps, plan.total_steps)):
        sources = data.window_sources(state.global_step)
        # As a training step takes them: gradient_accumulation_steps micro-batches from this step's iterator.
        for micro_batch, (inputs, targets) in zip(range(plan.gradient_accumulation_steps), batches):
            for row in range(len(inputs)):
                tokens = [*inputs[row].tolist(), int(targets[row, -1])]
                source = sources[micro_batch * world_size + rank][row] if sources else data.source_name
                mine.append((state.global_step + 1, rank, micro_batch, row, source, tokens))
        state.advance(plan.tokens_per_step, plan.steps_per_epoch)
    windows = sorted(gather_object(mine))  # every process's, in step, rank and micro-batch order
    accelerator.end_training()
    if not accelerator.is_main_process:
        return
    tokenizer = get_tokenizer(plan.cfg.tokenizer)
    for step, rank, micro_batch, _, source, tokens in windows:
        text = tokenizer.decode(tokens)  # a window's edges may cut a character: shown as U+FFFD
        if args.json:
            record = {"step": step, "rank": rank, "micro_batch": micro_batch, "source": source, "tokens": tokens}
            print(json.dumps(record | {"text": text}, ensure_ascii=False))
            continue
        ends = [i for i, token in enumerate(tokens) if token == plan.eot_id]
        where = f"documents end at tokens {', '.join(map(str, ends))}" if ends else "inside one document"
        print(f"step {step} | rank {rank} | micro-batch {micro_batch} | {source} | {len(tokens)} tokens, {where}")
        print(text)
        print()


if __name__ == "__main__":
    run_command(main)
