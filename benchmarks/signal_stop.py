"""What SIGUSR1 does to a 2-process `accelerate launch` run: who receives it, whether every rank saves, how long
the stop takes. The cases a Slurm job meets: `--signal=USR1@N` (every process of the job step) and
`--signal=B:USR1@N` forwarded by srun (the launcher only), with and without torchrun told to handle USR1.

    python benchmarks/signal_stop.py            (tiny model, CPU gloo processes; about a minute)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
HANDLE_USR1 = {"PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"}
CASES = [  # (name, who gets the signal, extra environment)
    ("every process, launcher not told", "all", {}),
    ("every process, PET_SIGNALS_TO_HANDLE", "all", HANDLE_USR1),
    ("launcher only, PET_SIGNALS_TO_HANDLE", "launcher", HANDLE_USR1),
    ("launcher only, launcher not told", "launcher", {}),
    ("every process, handled, PET_SHUTDOWN_TIMEOUT=0", "all", HANDLE_USR1 | {"PET_SHUTDOWN_TIMEOUT": "0"}),
]


def run_case(work: Path, who: str, env_extra: dict) -> dict:
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    args = [
        "--model",
        "tiny",
        "--train_data_path",
        "the-verdict",
        "--data_cache_dir",
        str(work / "cache"),
        "--output_dir",
        str(out),
        "--max_steps",
        "500",
        "--save_freq",
        "1000",
        "--eval_freq",
        "1000",
        "--warmup_steps",
        "2",
        "--batch_size",
        "2",
        "--val_fraction",
        "0.6",
        "--eval_iter",
        "2",
    ]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_configs" / "cpu_2proc_gloo.yaml"),
        "-m",
        "accel_gpt.train",
        *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **env_extra)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.01)
    workers = psutil.Process(proc.pid).children(recursive=True)
    sent = time.monotonic()
    for pid in [proc.pid] + ([w.pid for w in workers] if who == "all" else []):
        os.kill(pid, signal.SIGUSR1)
    launcher_rc = proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=30)
    for worker in alive:  # orphans that never got the signal: they would train on; stop them
        worker.kill()
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("checkpoint_*")) if out.exists() else []
    return {
        "launcher exit": launcher_rc,
        "workers still training 30 s later": len(alive),
        "stop took (s)": round(time.monotonic() - sent, 1) if not alive else None,
        "checkpoint": checkpoints[-1] if checkpoints else "none",
    }


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="signal_stop-"))
    try:
        print("| case | launcher exit | workers still training 30 s later | stop took (s) | checkpoint |")
        print("| --- | ---: | ---: | ---: | --- |")
        for name, who, env_extra in CASES:
            result = run_case(work, who, env_extra)
            print(f"| {name} | " + " | ".join(str(v) for v in result.values()) + " |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
