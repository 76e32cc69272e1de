import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

# Tests never touch the network: transformers must work from local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
VERDICT = Path(str(resources.files("accel_gpt") / "assets" / "the-verdict.txt"))


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


def launch(
    args: list[str],
    num_processes: int,
    timeout: int = 300,
    config: str | None = None,
    launcher_args: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """Run the real trainer through `accelerate launch`, with 1 CPU process or 2 gloo processes (or `config`,
    with `launcher_args` such as `--mixed_precision bf16` on top)."""
    config = config or {1: "cpu_1proc.yaml", 2: "cpu_2proc_gloo.yaml"}[num_processes]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_configs" / config),
    ]
    cmd += launcher_args
    cmd += ["-m", "accel_gpt.train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if result.returncode != 0:
        raise AssertionError(f"launch failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result
