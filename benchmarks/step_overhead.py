"""What accel_gpt's training step costs on top of a plain PyTorch loop, for the same model and batch.

    python benchmarks/step_overhead.py [--model mini] [--rounds 15] [--steps 3]

(a) plain: `loss = model(x, y); loss.backward(); clip_grad_norm_; opt.step(); opt.zero_grad(); loss.item()`.
(b) accel_gpt: the trainer's own pieces on an Accelerate-prepared model and optimizer: the LR schedule, the
    `optimizer_step` of accel_gpt/step.py (accumulate context, clipping, device-side non-finite skip), the
    cross-rank reduce of loss and stop flag, and a metrics record written by `RunLogger` (console to /dev/null).
Both use the same fused AdamW and identical starting weights; rounds alternate which goes first. Prints medians
and the median of per-round ratios (b / a).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from accel_gpt.config import TrainConfig
from accel_gpt.metrics import RunLogger
from accel_gpt.model import GPTModel
from accel_gpt.optim import build_optimizer
from accel_gpt.schedule import learning_rate_at
from accel_gpt.step import optimizer_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mini")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=3, help="steps per round and side")
    args = parser.parse_args()
    cfg = TrainConfig(model=args.model, batch_size=args.batch_size)
    torch.manual_seed(0)
    plain_model = GPTModel(cfg.model_config(50257))
    ctx = plain_model.config.context_len
    accel_model = copy.deepcopy(plain_model)
    plain_opt = build_optimizer(plain_model, cfg)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model, optimizer = accelerator.prepare(accel_model, build_optimizer(accel_model, cfg))
    x = torch.randint(0, 50257, (args.batch_size, ctx), device=accelerator.device)
    y = torch.randint(0, 50257, (args.batch_size, ctx), device=accelerator.device)
    plain_model.to(accelerator.device)
    batches = itertools.repeat((x, y))
    logger = RunLogger(Path(tempfile.mkdtemp()), True, total_steps=10**9)
    step_no = itertools.count()

    def plain_step():
        loss = plain_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain_model.parameters(), 1.0)
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        loss.item()

    def accel_gpt_step():
        step = next(step_no)
        lr = learning_rate_at(
            step, total_steps=10**6, warmup_steps=10, initial_lr=1e-5, learning_rate=1e-3, min_lr=1e-4
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        loss, grad_norm = optimizer_step(model, optimizer, batches, accelerator, 1, 1.0)
        stop_flag = torch.tensor(0.0, device=accelerator.device)
        loss_sum, _ = accelerator.reduce(torch.stack([loss, stop_flag]), reduction="sum").tolist()
        record = {
            "step": step,
            "epoch": 0,
            "tokens_seen": step * x.numel(),
            "lr": lr,
            "loss": loss_sum,
            "grad_norm": grad_norm.item(),
            "tokens_per_sec": x.numel() / (time.perf_counter() - started),
        }
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            logger.log_step(record, 10**9)

    for fn in (plain_step, accel_gpt_step):
        fn()
        fn()
    times = {"plain": [], "accel_gpt": []}
    for r in range(args.rounds):
        sides = [("plain", plain_step), ("accel_gpt", accel_gpt_step)]
        for name, fn in sides if r % 2 == 0 else sides[::-1]:
            start = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[name].append((time.perf_counter() - start) / args.steps)
    ratios = [a / p for p, a in zip(times["plain"], times["accel_gpt"])]
    print(
        f"model {args.model}, batch {args.batch_size} x {ctx}, device {accelerator.device}, "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps"
    )
    print(f"plain PyTorch step : {statistics.median(times['plain']) * 1000:.1f} ms (median)")
    print(f"accel_gpt step     : {statistics.median(times['accel_gpt']) * 1000:.1f} ms (median)")
    print(f"overhead           : {statistics.median(ratios) - 1:+.1%} (median of per-round ratios; goal <= +3%)")
    print(f"per-round ratios   : {[round(r, 3) for r in ratios]}")
    logger.close()


if __name__ == "__main__":
    main()
