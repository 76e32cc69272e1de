"""Weak and strong scaling of the real trainer through `accelerate launch` at several world sizes.

    python benchmarks/scaling.py [--world-sizes 1 2 4 8] [--model tiny] [--batch-size 4] [--steps 30]

For each world size N (capped at what the machine has: GPUs if any, else CPU cores) it launches
`accel_gpt.train` twice: weak scaling keeps the per-rank batch (global = batch x N), strong scaling keeps the
global batch (batch x max N, split over N ranks). From `metrics.jsonl` it takes steady-state steps (the first
`--skip` dropped: warm-up, compilation) and reports tokens/s, step time (median, p90), the main rank's peak
memory and scaling efficiency tput(N) / (N x tput(1)). Writes `benchmarks/results/scaling-<time>.json`, a
markdown table beside it and a PNG plot (if matplotlib is installed).

On a GPU machine the same command uses accelerate_configs/gpu_N.yaml (DDP over NCCL, bf16); on CPU it uses one
process with all cores for N = 1 and N gloo processes with cores / N threads each otherwise. With --fsdp, N > 1
shards with FSDP2 (gpu_8_fsdp.yaml or cpu_2proc_fsdp.yaml, --num_processes N); N = 1 stays one plain process. On several machines,
run it with --launch-args naming your multi-node settings, e.g.
    --launch-args "--num_machines 2 --machine_rank 0 --main_process_ip 10.0.0.1 --main_process_port 29500"
on each machine (rank 1 on the second), with --world-sizes counting all processes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def launch_command(world_size: int, on_gpu: bool, extra: str, fsdp: bool) -> list[str]:
    base = [sys.executable, "-m", "accelerate.commands.launch"]
    configs = REPO / "accelerate_configs"
    if world_size == 1:  # the baseline is always one plain process: what N processes are measured against
        base += ["--config_file", str(configs / ("gpu_1.yaml" if on_gpu else "cpu_1proc.yaml"))]
    elif fsdp:
        fsdp_config = "gpu_8_fsdp.yaml" if on_gpu else "cpu_2proc_fsdp.yaml"
        base += ["--config_file", str(configs / fsdp_config), "--num_processes", str(world_size)]
    elif on_gpu:
        base += ["--config_file", str(configs / f"gpu_{world_size}.yaml")]
    else:  # MULTI_GPU without GPUs starts real gloo processes (see accelerate_configs/cpu_2proc_gloo.yaml)
        base += [
            "--multi_gpu",
            "--num_processes",
            str(world_size),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ]
    return base + shlex.split(extra) + ["-m", "accel_gpt.train"]


def run(world_size: int, batch_size: int, args, on_gpu: bool, workdir: Path) -> dict:
    out = workdir / f"n{world_size}-b{batch_size}"
    cmd = launch_command(world_size, on_gpu, args.launch_args, args.fsdp) + [
        "--model",
        args.model,
        "--batch_size",
        str(batch_size),
        "--max_steps",
        str(args.steps),
        "--warmup_steps",
        "2",
        "--eval_freq",
        str(10**6),
        "--save_freq",
        str(10**6),
        "--output_dir",
        str(out),
        "--train_data_path",
        args.data,
        "--data_cache_dir",
        str(workdir / "cache"),
        *shlex.split(args.train_args),
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"world size {world_size} failed:\n{result.stderr[-3000:]}")
    records = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        records[r["step"]] = r
    steady = [r for s, r in sorted(records.items()) if s > args.skip]
    times = sorted(r["step_time"] for r in steady)
    return {
        "world_size": world_size,
        "batch_size": batch_size,
        "global_batch": batch_size * world_size,
        "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in steady),
        "step_time_median": statistics.median(times),
        "step_time_p90": times[int(0.9 * (len(times) - 1))],
        "peak_memory_mib_rank0": max(r["peak_memory_mib"] for r in steady),
        "mfu": statistics.median(r["mfu"] for r in steady) if "mfu" in steady[0] else None,
    }


def table(mode: str, rows: list[dict]) -> str:
    lines = [
        f"### {mode} scaling",
        "",
        "| processes | batch/rank | global batch | tokens/s | step median (s) | step p90 (s) | peak MiB (rank 0) | efficiency |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['world_size']} | {r['batch_size']} | {r['global_batch']} | {r['tokens_per_sec']:,.0f} | "
            f"{r['step_time_median']:.3f} | {r['step_time_p90']:.3f} | {r['peak_memory_mib_rank0']:,.0f} | "
            f"{r['efficiency']:.2f} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode, rows in results.items():
        sizes = [r["world_size"] for r in rows]
        axes[0].plot(sizes, [r["tokens_per_sec"] for r in rows], "o-", label=mode)
        axes[1].plot(sizes, [r["efficiency"] for r in rows], "o-", label=mode)
    axes[0].set(xlabel="processes", ylabel="tokens/s", title="throughput")
    axes[1].set(xlabel="processes", ylabel="tput(N) / (N x tput(1))", title="scaling efficiency", ylim=(0, 1.1))
    for ax in axes:
        ax.set_xticks(sizes)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch-size", type=int, default=4, help="per-rank batch for weak scaling")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5, help="steps dropped as warm-up")
    parser.add_argument("--data", default="tinyshakespeare")
    parser.add_argument("--launch-args", default="", help="extra `accelerate launch` arguments")
    parser.add_argument("--train-args", default="", help="extra trainer flags, e.g. '--compile true'")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (the *_fsdp.yaml configs) for N > 1")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()
    available = torch.cuda.device_count() if on_gpu else (os.cpu_count() or 1)
    sizes = [n for n in args.world_sizes if n <= available] or [1]
    largest = max(sizes)
    workdir = Path(tempfile.mkdtemp(prefix="accel_gpt_scaling_"))
    results = {"weak": [], "strong": []}
    for n in sizes:
        results["weak"].append(run(n, args.batch_size, args, on_gpu, workdir))
        strong_batch = args.batch_size * largest // n
        results["strong"].append(run(n, strong_batch, args, on_gpu, workdir))
    shutil.rmtree(workdir)  # runs and their checkpoints: the numbers are extracted
    for rows in results.values():
        base = rows[0]["tokens_per_sec"] / rows[0]["world_size"]
        for r in rows:
            r["efficiency"] = r["tokens_per_sec"] / (r["world_size"] * base)

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    device = torch.cuda.get_device_name(0) if on_gpu else f"CPU, {available} cores"
    meta = {
        "date": stamp,
        "device": device,
        "strategy": "FSDP" if args.fsdp else "DDP",
        "model": args.model,
        "steps": args.steps,
        "skip": args.skip,
        "torch": torch.__version__,
        "command": " ".join(shlex.quote(a) for a in sys.argv),
    }
    (args.out / f"scaling-{stamp}.json").write_text(json.dumps({"meta": meta, **results}, indent=1))
    report = "\n\n".join(table(mode, rows) for mode, rows in results.items())
    header = f"{meta['strategy']} scaling on {device}, model {args.model}, {args.steps} steps ({args.skip} skipped), {stamp}\n\n"
    (args.out / f"scaling-{stamp}.md").write_text(header + report + "\n")
    print(header + report)
    if plot(results, args.out / f"scaling-{stamp}.png"):
        print(f"plot: {args.out / f'scaling-{stamp}.png'}")


if __name__ == "__main__":
    main()
