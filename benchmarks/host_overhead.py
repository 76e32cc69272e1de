"""Host time of one optimizer update through Accelerate's optimizer wrapper vs torch's optimizer underneath.

    python benchmarks/host_overhead.py [--model mini] [--rounds 20] [--calls 200]

In alternating rounds on the same prepared model and fused AdamW: (a) torch's `step()` +
`zero_grad(set_to_none=True)` of the wrapped optimizer, which `accel_gpt.step.update` calls when there is no fp16
loss scaler; (b) Accelerate's `AcceleratedOptimizer.step()` + `zero_grad(set_to_none=True)`, which the trainer
called before. The parameters hold no gradients, so neither does any arithmetic: what is timed is the Python each
path runs per update, which on a GPU (where the arithmetic is only launched) a host-bound step waits for. Prints
the median microseconds per update of each and their difference.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from accelerate import Accelerator

from accel_gpt.config import TrainConfig
from accel_gpt.model import GPTModel
from accel_gpt.optim import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mini")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=200, help="updates per round and side")
    args = parser.parse_args()
    cfg = TrainConfig(model=args.model)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = GPTModel(cfg.model_config(50257))
    model, optimizer = accelerator.prepare(model, build_optimizer(model, cfg))
    sides = {
        "torch": lambda: (optimizer.optimizer.step(), optimizer.optimizer.zero_grad(set_to_none=True)),
        "accelerate": lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    for round_no in range(args.rounds):
        for name in sorted(sides, reverse=round_no % 2 == 1):
            for _ in range(args.calls):
                start = time.perf_counter()
                sides[name]()
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) * 1e6 for name, t in times.items()}
    print(f"{args.model} on {accelerator.device.type}, {args.rounds} x {args.calls} updates per side (median us):")
    for name, us in medians.items():
        print(f"  {name:<11} {us:8.1f}")
    print(f"  difference  {medians['accelerate'] - medians['torch']:8.1f} us per update")


if __name__ == "__main__":
    main()
