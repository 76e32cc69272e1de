"""Which speed options help where, on this machine: bf16 autocast and activation checkpointing vs plain fp32.

    python benchmarks/precision_memory.py [--model mini] [--rounds 5]

Same model, batch and weights; the variants take turns each round. Reports median step time, tokens/s relative
to fp32, and peak memory of the step (CUDA: max allocated; CPU: growth of peak RSS, measured in a fresh process
per variant so one variant's peak cannot hide another's; it includes the first step's optimizer state).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from accel_gpt.config import TrainConfig
from accel_gpt.model import GPTModel
from accel_gpt.optim import build_optimizer

VARIANTS = {"fp32": {}, "bf16 autocast": {"bf16": True}, "activation checkpointing": {"checkpointing": True}}


def measure(variant: str, model_name: str, rounds: int, device: str) -> dict:
    import resource

    opts = VARIANTS[variant]
    torch.manual_seed(0)
    model = GPTModel(TrainConfig(model=model_name).model_config(50257)).to(device)
    model.activation_checkpointing = opts.get("checkpointing", False)
    optimizer = build_optimizer(model, TrainConfig())
    ctx = model.config.context_len
    x = torch.randint(0, 50257, (8, ctx), device=device)
    y = torch.randint(0, 50257, (8, ctx), device=device)

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=opts.get("bf16", False)):
            loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up, counted in the peak: it allocates the optimizer state and the activations
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    )
    return {"variant": variant, "step_s": statistics.median(times), "tokens": x.numel(), "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mini")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per variant, alternating")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.model, args.rounds, args.device)))
        return
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for variant in VARIANTS:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    variant,
                    "--model",
                    args.model,
                    "--rounds",
                    str(args.rounds),
                    "--device",
                    args.device,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            results[variant].append(json.loads(out.stdout))
    base = statistics.median(r["step_s"] for r in results["fp32"])
    print(
        f"model {args.model}, batch 8, device {args.device}, {args.repeats} processes x {args.rounds} steps per variant"
    )
    print("| variant | median step (s) | speed vs fp32 | peak memory growth over the model and batch (MiB) |")
    print("| --- | ---: | ---: | ---: |")
    for variant, rows in results.items():
        step_s = statistics.median(r["step_s"] for r in rows)
        print(
            f"| {variant} | {step_s:.3f} | {base / step_s:.2f}x | {statistics.median(r['peak_mib'] for r in rows):.0f} |"
        )


if __name__ == "__main__":
    main()
