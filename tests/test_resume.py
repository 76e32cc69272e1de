"""Exact resume mid-epoch, with dropout and accumulation: the same losses and weights, bit for bit, as a run that was
never interrupted. (Resumes across world sizes and through `accelerate launch`: test_launch.py, test_faults.py.)"""

import shutil

import pytest
import torch
from conftest import common_args, read_metrics
from safetensors.torch import load_file

from accel_gpt.rundir import LOCK_FILE

pytestmark = pytest.mark.slow  # every test here starts processes or trains


def weights(run_dir, step):
    return load_file(str(run_dir / "checkpoints" / f"checkpoint_{step:06d}" / "model.safetensors"))


def test_resume_mid_epoch_with_dropout_and_accumulation_is_bit_identical(tmp_path, train_here):
    # 40 training windows / global batch 4 = 10 steps per epoch; checkpoints at 3, 6, 9, 12, keeping the last 2.
    args = common_args(tmp_path / "full", tmp_path / "cache") + [
        "--dropout",
        "0.1",
        "--batch_size",
        "2",
        "--global_batch_size",
        "4",
        "--val_fraction",
        "0.5",
        "--max_steps",
        "12",
        "--save_freq",
        "3",
        "--keep_last",
        "2",
        "--eval_freq",
        "4",
    ]
    assert train_here(*args).returncode == 0
    full = read_metrics(tmp_path / "full")
    kept = sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir() if p.name != LOCK_FILE)
    assert kept == ["checkpoint_000009", "checkpoint_000012"]  # keep_last pruned 3 and 6

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "checkpoint_000012")
    (resumed_dir / "metrics.jsonl").unlink()
    out = train_here(*[a if a != str(tmp_path / "full") else str(resumed_dir) for a in args], "--checkpoint", "latest")
    assert "resumed at step 9" in out.stdout
    resumed = read_metrics(resumed_dir)
    assert sorted(resumed) == [10, 11, 12]
    for step in (10, 11, 12):  # crosses into epoch 1 at step 11
        assert resumed[step]["loss"] == full[step]["loss"], step
        assert resumed[step]["epoch"] == full[step]["epoch"]
    assert resumed[12]["val_loss"] == full[12]["val_loss"]
    final_full, final_resumed = weights(tmp_path / "full", 12), weights(resumed_dir, 12)
    assert all(torch.equal(final_full[k], final_resumed[k]) for k in final_full)
