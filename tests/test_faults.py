"""Faults a long run meets: pre-emption signals, SIGKILL at any moment (mid-save too), non-finite steps."""

import itertools
import json
import os
import random
import signal

import psutil
import pytest
import torch
from conftest import common_args, kill_all, launch, read_metrics, start, steps_logged, wait_for
from safetensors.torch import load_file

from accel_gpt.checkpoint import list_checkpoints
from accel_gpt.model import GPTModel
from accel_gpt.rundir import LOCK_FILE
from accel_gpt.tokenizer import get_tokenizer

pytestmark = pytest.mark.slow  # every test here starts processes or trains


def test_sigterm_stops_every_rank_at_a_step_boundary_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = common_args(out, tmp_path / "cache") + ["--batch_size", "2", "--max_steps", "500", "--save_freq", "1000"]
    proc = start(args, num_processes=2)
    assert wait_for(lambda: steps_logged(out) >= 3, proc)
    for worker in psutil.Process(proc.pid).children(recursive=True):  # what a scheduler's SIGTERM reaches
        worker.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    stopped_at = max(read_metrics(out))
    assert f"received SIGTERM: stopped after step {stopped_at} with a checkpoint" in stdout
    assert f"--output_dir {out} --checkpoint latest" in stdout
    assert (out / "checkpoints" / f"checkpoint_{stopped_at:06d}" / "manifest.json").exists()


def test_sigint_without_a_launcher_also_stops_cleanly_and_ends_a_long_sample(tmp_path):
    """Without a launcher too; and a stop signal that comes while a long sample is being generated ends it (issue
    25: the run went on sampling, deaf to SIGTERM), the steps before it saved."""
    out = tmp_path / "run"
    long_sample = ["--model", "mini", "--eval_freq", "2", "--sample_tokens", "1024"]
    proc = start(common_args(out, tmp_path / "cache") + ["--max_steps", "500", "--save_freq", "1000", *long_sample], 1)
    assert wait_for(lambda: steps_logged(out) >= 2, proc)  # step 2's record is written: its sample comes next
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "received SIGINT" in stdout and "Traceback" not in stderr
    (sample,) = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sample["step"] == 2 and len(get_tokenizer().encode(sample["text"])) < 1024  # cut short
    stopped_at = max(read_metrics(out))
    assert stopped_at <= 3 and list_checkpoints(out / "checkpoints")[-1][0] == stopped_at


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_losses(tmp_path, train_here):
    """One command with `--checkpoint auto`, run again unchanged after each kill, as a requeued job is. The
    uninterrupted run is one process at the same global batch, in this process (2 processes = 1: test_launch.py);
    the ranks' dropout streams surviving a SIGKILL are test_streaming.py's."""
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    args = common_args(tmp_path / "ref", tmp_path / "cache") + ["--max_steps", "12", "--save_freq", "2",
                                                                 "--eval_freq", "6"]  # fmt: skip
    assert train_here(*args, "--batch_size", "4").returncode == 0
    reference = read_metrics(tmp_path / "ref")

    out = tmp_path / "killed"
    command = [a if a != str(tmp_path / "ref") else str(out) for a in args] + ["--batch_size", "2", "--checkpoint",
                                                                               "auto"]  # fmt: skip
    ckpts = out / "checkpoints"

    def in_save():  # a writer's hidden temporary directory exists
        return ckpts.is_dir() and any(".tmp-" in p.name for p in ckpts.iterdir())

    kills = [("during a save", in_save), ("after a random step", None)]  # then a resume from what each left
    for attempt, (what, condition) in enumerate(kills):
        proc = start(command, num_processes=2)
        if condition is None:
            target = steps_logged(out) + rng.randint(3, 5)  # at least one save completes first

            def condition(target=target):
                return steps_logged(out) >= target

        caught = wait_for(condition, proc)
        if caught:
            kill_all(proc)
        stdout, stderr = proc.communicate()
        assert caught, f"(seed {seed}) never reached the moment to kill: {what}\n{stdout[-1500:]}\n{stderr[-3000:]}"
        if attempt == 0:
            assert f"--checkpoint auto: no checkpoint in {ckpts}; starting a new run" in stdout
    assert list_checkpoints(ckpts), f"(seed {seed}) no checkpoint survived to resume from"
    result = launch(command, num_processes=2)
    assert "resumed at step" in result.stdout
    final = read_metrics(out)
    assert sorted(final) == sorted(reference)
    for step in reference:
        assert final[step]["loss"] == pytest.approx(reference[step]["loss"], abs=1e-5), (seed, step)
    assert [p.name for p in ckpts.iterdir() if p.name.startswith(".")] == [LOCK_FILE]  # temporaries cleaned up


def test_sigusr1_ahead_of_a_time_limit_saves_and_stops_every_rank(tmp_path):
    """Slurm's `--signal=USR1@N` signals every process of the job step, the launcher as well as the workers. Told
    to handle USR1 (PET_SIGNALS_TO_HANDLE, as the job script in docs/checkpoints.md sets), the launcher forwards
    it and waits instead of dying at once; every rank stops at the same step boundary, with a checkpoint."""
    out = tmp_path / "run"
    args = common_args(out, tmp_path / "cache") + ["--batch_size", "2", "--max_steps", "500", "--save_freq", "1000"]
    proc = start(args, num_processes=2, env_extra={"PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"})
    assert wait_for(lambda: steps_logged(out) >= 3, proc)
    for pid in [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]:
        os.kill(pid, signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=120)
    stopped_at = max(read_metrics(out))
    assert f"received SIGUSR1: stopped after step {stopped_at} with a checkpoint" in stdout, stderr[-3000:]
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [stopped_at]
    assert steps_logged(out) == stopped_at  # no rank went on past the stop


def test_non_finite_steps_are_skipped_then_stop_with_a_clear_error(tmp_path, train_here, monkeypatch):
    """From the fifth training step on the loss is NaN (as an exploding run's becomes), so every gradient is: each
    such step is skipped, and the third in a row stops the run with one line naming the last good checkpoint."""
    forward, training_calls = GPTModel.forward, itertools.count()

    def poisoned(model, idx, targets=None, cache=None):
        loss = forward(model, idx, targets, cache)
        if targets is not None and model.training and next(training_calls) >= 4:
            loss = loss * float("nan")
        return loss

    monkeypatch.setattr(GPTModel, "forward", poisoned)
    out = tmp_path / "run"
    args = common_args(out, tmp_path / "cache") + [
        "--max_nonfinite_steps", "3", "--save_freq", "1", "--max_steps", "20", "--keep_last", "0",
    ]  # fmt: skip
    result = train_here(*args)
    stderr = result.stderr
    assert result.returncode == 2
    assert "Traceback" not in stderr
    assert "stopping: 3 steps in a row had a non-finite gradient norm (last at step 7)" in stderr
    metrics = read_metrics(out)
    skipped = [s for s, r in metrics.items() if r.get("skipped")]
    assert skipped == [5, 6, 7]
    assert f"the last good checkpoint is {out / 'checkpoints'}" in stderr
    # A skipped step changes nothing: weights after it equal the weights before it, and stay finite.
    before = load_file(str(out / "checkpoints" / f"checkpoint_{skipped[0] - 1:06d}" / "model.safetensors"))
    after = load_file(str(out / "checkpoints" / f"checkpoint_{skipped[1]:06d}" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) and torch.isfinite(after[k]).all() for k in before)
