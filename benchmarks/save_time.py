"""How long a checkpoint takes to write (what a stop signal must wait for) and to verify (what every start with
`--checkpoint auto` pays), per model preset, on this machine's CPU and disk.

    python benchmarks/save_time.py --models tiny mini gpt2-small gpt2-medium --dir /tmp/save_time

One process, fp32 weights plus AdamW moments (12 bytes per parameter), written by `save_checkpoint` exactly as
training does: safetensors, fsync, sha256 manifest, atomic rename. Prints seconds and GB/s per round.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from accel_gpt.checkpoint import find_checkpoint, full_state_dicts, save_checkpoint
from accel_gpt.config import TrainConfig
from accel_gpt.model import GPTModel
from accel_gpt.optim import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "mini", "gpt2-small"])
    parser.add_argument("--dir", default="/tmp/save_time", help="where checkpoints are written (removed after)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    root = Path(args.dir)
    for preset in args.models:
        cfg = TrainConfig(model=preset)
        model = GPTModel(cfg.model_config(50257))
        optimizer = build_optimizer(model, cfg)
        model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long)).backward()
        optimizer.step()  # creates the AdamW moments a real checkpoint holds
        for round_ in range(args.rounds):
            shutil.rmtree(root, ignore_errors=True)
            start = time.perf_counter()
            path = save_checkpoint(root, 1, model.config, full_state_dicts(model, optimizer), {"global_step": 1}, {})
            saved = time.perf_counter() - start
            size = sum(f.stat().st_size for f in path.iterdir()) / 1e9
            start = time.perf_counter()
            find_checkpoint(root, "latest")
            verified = time.perf_counter() - start
            print(
                f"{preset:12s} round {round_} | {model.num_parameters() / 1e6:7.1f}M params | {size:6.2f} GB | "
                f"save {saved:6.2f} s ({size / saved:5.2f} GB/s) | verify {verified:6.2f} s ({size / verified:5.2f} GB/s)",
                flush=True,
            )
        del model, optimizer
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
