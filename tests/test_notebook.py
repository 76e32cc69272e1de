"""examples/analysis.py runs headless as a notebook on two real tiny runs and writes its figures."""

import os
import subprocess
import sys

import pytest
from conftest import REPO
from test_launch import common_args

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")


def test_example_notebook_executes_and_writes_pngs(tmp_path, monkeypatch):
    runs = []
    for name, lr in (("run_a", "1.5e-3"), ("run_b", "3e-3")):
        args = common_args(tmp_path / name, tmp_path / "cache") + [
            "--max_steps",
            "4",
            "--eval_freq",
            "2",
            "--learning_rate",
            lr,
        ]
        result = subprocess.run(
            [sys.executable, "-m", "accel_gpt.train", *args], capture_output=True, text=True, cwd=REPO, timeout=300
        )
        assert result.returncode == 0, result.stderr[-2000:]
        runs.append(tmp_path / name)
    monkeypatch.setenv("ACCEL_GPT_RUN", str(runs[0]))
    monkeypatch.setenv("ACCEL_GPT_COMPARE", str(runs[1]))
    monkeypatch.setenv("ACCEL_GPT_FIGURES", str(tmp_path / "figures"))
    # The kernel runs in tmp_path: without this it would import whichever accel_gpt is installed, not this checkout.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    notebook = jupytext.read(REPO / "examples" / "analysis.py")
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "run_a | 4 steps" in outputs and "perplexity on The Verdict" in outputs
    for name in ("losses.png", "lr.png", "compare.png"):
        data = (tmp_path / "figures" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
