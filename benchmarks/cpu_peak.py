"""How stable is a CPU's fp32 matmul rate, the peak that CPU MFU is measured against? In fresh processes:

    python benchmarks/cpu_peak.py [--processes 3] [--seconds 2]

Each process measures the trainer's start-up peak (`measured_cpu_peak_flops`: the best of short bursts within
0.3 s), then the best over `--seconds`, then the start-up measurement again. On a shared VM the first can be far
below the others: why the trainer keeps the best measurement across runs (`metrics.best_cpu_peak_flops`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

MEASURE = """
import torch
from accel_gpt.metrics import measured_cpu_peak_flops as peak
first, long, again = peak(), peak(seconds={seconds}, bursts=10**6), peak()
print(f"{{torch.get_num_threads()}} threads: start-up {{first / 1e9:.1f}} | best over {seconds} s {{long / 1e9:.1f}} | "
      f"start-up again {{again / 1e9:.1f}} GFLOP/s | first / best {{first / long:.2f}}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    for _ in range(args.processes):
        time.sleep(5)  # idle between processes, as between runs
        subprocess.run([sys.executable, "-c", MEASURE.format(seconds=args.seconds)], check=True)


if __name__ == "__main__":
    main()
