"""The training loss's chunk size, side by side: plain cross-entropy on full logits vs chunked fused loss.

    python benchmarks/loss_chunk.py [--model mini] [--batch-size 8] [--chunks 32 64 128 256] [--bf16]

Same model, weights and batch; one training step (forward, backward, fused AdamW) per variant per round, the
order rotating every round; each variant is the model's own training path (`model(x, targets)` with
`loss_chunk` set, 0 = plain). Prints median step time and speed relative to the plain loss. Used to pick the
default chunk per device and model width in `accel_gpt/model.py`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from accel_gpt.config import TrainConfig
from accel_gpt.model import GPTModel
from accel_gpt.optim import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mini")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chunks", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast, as the GPU configs use")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPTModel(TrainConfig(model=args.model).model_config(50257)).to(device)
    optimizer = build_optimizer(model, TrainConfig())
    ctx = model.config.context_len
    x = torch.randint(0, 50257, (args.batch_size, ctx), device=device)
    y = torch.randint(0, 50257, (args.batch_size, ctx), device=device)

    def make_step(chunk):
        def step():
            model.loss_chunk = chunk
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                loss = model(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()

        return step

    variants = {"plain": make_step(0)} | {f"chunk {c}": make_step(c) for c in args.chunks}
    for step in variants.values():
        step()
    times = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            variants[name]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["plain"])
    print(
        f"model {args.model}, batch {args.batch_size} x {ctx}, {device}, {'bf16 autocast' if args.bf16 else 'fp32'}, "
        f"{args.rounds} rounds"
    )
    print("| loss | median step (ms) | speed vs plain |")
    print("| --- | ---: | ---: |")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t) * 1000:.1f} | {base / statistics.median(t):.2f}x |")


if __name__ == "__main__":
    main()
