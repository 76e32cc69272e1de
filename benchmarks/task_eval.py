"""Task evaluation's speed beside lm-evaluation-harness, and what `--eval_tasks` costs a training run:

    python benchmarks/task_eval.py [--examples 200] [--rounds 3] [--train-steps 100]

(a) Examples per second on one HellaSwag-form file (four endings each, built from Tiny Shakespeare's lines) and one
    model (`mini`, random weights, fp32: speed does not depend on them), end to end (reading the task included):
    accel_gpt's evaluator (`evaluate --tasks`' code) against lm-evaluation-harness's own `hf` model on the same
    checkpoint exported to Hugging Face, at batch size 8 (the evaluator's groups are 8 examples, 32 sequences), and
    the harness's default batch size 1. The variants alternate round by round; each figure is the median round.
(b) The same `mini` training run on Tiny Shakespeare with and without `--eval_tasks` of that file at the default
    `--eval_task_limit` (evaluations every half of the run and at its end), wall time of the whole command.
Needs the `eval` extra (lm-eval).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from accel_gpt.checkpoint import full_state_dicts, save_checkpoint
from accel_gpt.config import DEFAULT_EVAL_TASK_LIMIT, TrainConfig
from accel_gpt.data.sources import resolve_files
from accel_gpt.hf import export_to_hf
from accel_gpt.model import GPTModel
from accel_gpt.optim import build_optimizer
from accel_gpt.tasks import evaluate_task, load_task
from accel_gpt.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parents[1]


def hellaswag_file(path: Path, count: int) -> Path:
    lines = [line for line in resolve_files("tinyshakespeare")[0].read_text().splitlines() if len(line.split()) > 4]
    rows = [
        {"activity_label": "Play", "ctx_a": lines[i], "ctx_b": "then", "endings": lines[i + 1 : i + 5], "label": i % 4}
        for i in range(0, 5 * count, 5)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=100)
    args = parser.parse_args()
    import lm_eval
    from lm_eval.tasks import TaskManager

    root = Path(tempfile.mkdtemp(prefix="task-eval-"))
    task_path = hellaswag_file(root / "hs.jsonl", max(args.examples, DEFAULT_EVAL_TASK_LIMIT))
    torch.manual_seed(0)
    model = GPTModel(TrainConfig(model="mini").model_config(50257)).eval()
    checkpoint = save_checkpoint(
        root / "ckpts", 1, model.config, full_state_dicts(model, build_optimizer(model, TrainConfig())), {}, {}
    )
    export_to_hf(model, root / "hf")
    configs = root / "configs"
    configs.mkdir()
    (configs / "hs_local.yaml").write_text(
        f"include: {lm_eval.__path__[0]}/tasks/hellaswag/hellaswag.yaml\ntask: hs_local\ndataset_path: json\n"
        f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    validation: {task_path}\ntraining_split: null\n"
        "validation_split: validation\n"
    )
    manager = TaskManager(include_path=str(configs))
    tokenizer = get_tokenizer()

    def ours() -> float:
        began = time.perf_counter()
        evaluate_task(model, load_task(str(task_path)), tokenizer, 50256, args.examples)
        return time.perf_counter() - began

    def harness(batch: int):
        def run() -> float:
            began = time.perf_counter()
            lm_eval.simple_evaluate(
                model="hf", model_args=f"pretrained={root / 'hf'},dtype=float32", tasks=["hs_local"],
                task_manager=manager, limit=args.examples, batch_size=batch, device="cpu",
            )  # fmt: skip
            return time.perf_counter() - began

        return run

    variants = {"accel_gpt evaluator (groups of 8 examples)": ours, "lm-eval hf, batch_size 8": harness(8),
                "lm-eval hf, batch_size 1": harness(1)}  # fmt: skip
    seconds = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            seconds[name].append(variants[name]())
    ours_rate = args.examples / statistics.median(seconds[names[0]])
    print(
        f"(a) {args.examples} HellaSwag-form examples, mini (random weights), fp32, {torch.get_num_threads()} threads\n"
    )
    print("| scorer | median s | examples/s | evaluator's speed vs it |")
    print("| --- | ---: | ---: | ---: |")
    for name in names:
        median = statistics.median(seconds[name])
        print(f"| {name} | {median:.1f} | {args.examples / median:.1f} | {ours_rate / (args.examples / median):.2f}x |")
    print(f"\ncheckpoint {checkpoint}")

    base = [sys.executable, "-m", "accel_gpt.train", "--data_cache_dir", str(root / "cache"), "--max_steps",
            str(args.train_steps), "--eval_freq", str(args.train_steps // 2), "--save_freq", str(10 * args.train_steps),
            "--peak_flops", "1e11"]  # fmt: skip
    runs = {
        "without --eval_tasks": [],
        f"with --eval_tasks (limit {DEFAULT_EVAL_TASK_LIMIT})": ["--eval_tasks", str(task_path)],
    }
    wall = {name: [] for name in runs}
    for r in range(2):
        for name, extra in list(runs.items())[:: 1 if r % 2 == 0 else -1]:
            out = root / f"run-{len(wall[name])}-{'tasks' if extra else 'plain'}"
            began = time.perf_counter()
            subprocess.run([*base, "--output_dir", str(out), *extra], check=True, capture_output=True, cwd=REPO)
            wall[name].append(time.perf_counter() - began)
    print(f"\n(b) mini on Tiny Shakespeare, {args.train_steps} steps, evaluations at {args.train_steps // 2} and "
          f"{args.train_steps}\n")  # fmt: skip
    print("| run | wall time (s), each | mean |")
    print("| --- | --- | ---: |")
    for name, times in wall.items():
        print(f"| {name} | {', '.join(f'{t:.1f}' for t in times)} | {statistics.mean(times):.1f} |")


if __name__ == "__main__":
    main()
