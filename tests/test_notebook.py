"""examples/analysis.py runs headless as a notebook on two real tiny runs and writes its figures."""

import os

import pytest
from conftest import REPO, common_args

from accel_gpt.train import main as train_main

pytestmark = pytest.mark.slow  # every test here starts processes or trains

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")


def test_example_notebook_executes_and_writes_pngs(tmp_path, monkeypatch, tiny_run):
    # Two 4-step runs evaluated at 2 and 4 that differ in learning rate: the session's, and one trained here.
    compare = tmp_path / "run_b"
    train_main([*map(str, common_args(compare, tiny_run.cache)), "--max_steps", "4", "--save_freq", "2",
                "--eval_freq", "2", "--learning_rate", "3e-3"])  # fmt: skip
    runs = [tiny_run.out, compare]
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
    assert f"{tiny_run.out.name} | 4 steps" in outputs and "perplexity on The Verdict" in outputs
    for name in ("losses.png", "lr.png", "compare.png"):
        data = (tmp_path / "figures" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
