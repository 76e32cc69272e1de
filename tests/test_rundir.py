"""Run directories through the CLI: a new run never lands on an old one, `--overwrite true` moves it aside,
`--checkpoint auto` on a finished run says so, and unusable directories stop the run before any work."""

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, VERDICT, assert_one_line_error, one_thread, train_cli

from accel_gpt.checkpoint import verify_checkpoint
from accel_gpt.config import parse_config
from accel_gpt.errors import UserError
from accel_gpt.metrics import append_whole, open_on_a_new_line
from accel_gpt.rundir import LOCK_FILE, DirLock, new_run_dir, set_aside_run
from accel_gpt.train import train


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file of a run by its path, but the lock file that a run (refused or not) holds while it lives."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_FILE
    }


def command(out, cache):  # issue 10's first reproduction, on the small bundled corpus with smaller batches
    return [
        "--model",
        "tiny",
        "--train_data_path",
        VERDICT,
        "--data_cache_dir",
        cache,
        "--max_steps",
        "4",
        "--warmup_steps",
        "1",
        "--eval_freq",
        "2",
        "--save_freq",
        "2",
        "--output_dir",
        out,
        "--batch_size",
        "4",
        "--eval_iter",
        "1",
        "--sample_tokens",
        "4",
        "--peak_flops",
        "1e11",
    ]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("rundir")
    train(parse_config(one_thread(command(root / "same", root / "cache"))))
    return {"root": root, "out": root / "same", "cache": root / "cache", "files": snapshot(root / "same")}


@pytest.mark.slow
def test_a_second_new_run_is_refused_and_the_first_stays_byte_identical(finished, train_here):
    result = train_here(*command(finished["out"], finished["cache"]), "--seed", "5")
    assert_one_line_error(
        result,
        f"{finished['out']} already holds a run (metrics.jsonl, checkpoint_000002",
        "--checkpoint auto|latest|N",
        "another --output_dir",
        "--overwrite true",
    )
    # A fresh output_dir does not make it a new run when its checkpoint_dir holds the first run's checkpoints.
    elsewhere = finished["root"] / "elsewhere"
    result = train_here(*command(elsewhere, finished["cache"]), "--checkpoint_dir", finished["out"] / "checkpoints")
    assert_one_line_error(result, "already holds a run (checkpoint_000002", "--overwrite true")
    assert snapshot(finished["out"]) == finished["files"] and not (elsewhere / "metrics.jsonl").exists()


@pytest.mark.slow
def test_rerunning_a_finished_run_with_checkpoint_auto_says_it_is_complete(finished, train_here):
    args = command(finished["out"], finished["cache"]) + ["--checkpoint", "auto"]
    result = train_here(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = result.stdout.splitlines()  # that line alone: no header, no step
    assert line.startswith("accel_gpt: run already complete: ") and line.endswith(
        "at step 4 of 4; nothing left to train"
    )
    assert_one_line_error(
        train_here(*args, "--max_steps", "3"), "checkpoint_000004 is at step 4, beyond this run's 3 steps"
    )
    assert snapshot(finished["out"]) == finished["files"]


@pytest.mark.slow
def test_overwrite_moves_the_earlier_run_aside_and_deletes_nothing(finished, tmp_path, train_here):
    out = tmp_path / "same"
    shutil.copytree(finished["out"], out)
    result = train_here(*command(out, finished["cache"]), "--seed", "5", "--overwrite", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    [aside] = [p for p in out.iterdir() if p.name.startswith("overwritten-")]
    assert f"moved the earlier run in {out} to {aside} (nothing deleted)" in result.stdout
    assert snapshot(aside) == finished["files"]  # a whole run directory, checkpoints included, byte for byte
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert "seed: 5" in (out / "config.yaml").read_text()


@pytest.mark.slow
def test_overwrite_moves_nothing_when_the_new_run_is_refused_for_its_data(finished, tmp_path, train_here):
    """Everything that can be checked is checked before the earlier run moves: a new run that cannot train leaves it
    in place, so the next `--checkpoint auto` still continues it (issue 25: it started again from step 0)."""
    out = tmp_path / "same"
    shutil.copytree(finished["out"], out)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Too short to make one batch of windows.")
    result = train_here(*command(out, finished["cache"]), "--overwrite", "true", "--train_data_path", tiny)
    assert_one_line_error(result, "training data has 0 windows of 65 tokens")
    assert "moved the earlier run" not in result.stdout
    assert snapshot(out) == finished["files"]


def test_overwrite_with_checkpoints_kept_elsewhere(tmp_path, train_here):
    out, ckpts = tmp_path / "run", tmp_path / "ckpts"
    for path in (out / "metrics.jsonl", ckpts / "checkpoint_000002" / "manifest.json", ckpts / "notes.txt"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(path.name)
    moved = set_aside_run(out, ckpts)
    assert [p.parent for p in moved] == [out, ckpts] and moved[0].name == moved[1].name
    assert (moved[0] / "metrics.jsonl").exists() and (moved[1] / "checkpoint_000002" / "manifest.json").exists()
    assert (ckpts / "notes.txt").exists()  # not a run's file: left where it was


def drop_dac_override(*args):  # root writes through permission bits unless it gives up this capability
    caps = "-dac_override,-dac_read_search"
    cmd = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", sys.executable, "-m", "accel_gpt.train"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.mark.slow
@pytest.mark.parametrize("option", ["output_dir", "checkpoint_dir", "data_cache_dir", "read-only output_dir"])
def test_unusable_directories_stop_the_run_before_any_work(tmp_path, option):
    (tmp_path / "a_file").write_text("a file where a directory should go")
    dirs = {"output_dir": tmp_path / "out", "data_cache_dir": tmp_path / "cache"}
    if option == "read-only output_dir":
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv to drop root's permission override")
        (tmp_path / "ro").mkdir(mode=0o555)
        dirs["output_dir"] = bad = tmp_path / "ro" / "out"
        result = drop_dac_override(*[a for k, v in dirs.items() for a in (f"--{k}", v)], "--model", "tiny")
        assert_one_line_error(result, f"output_dir {bad} cannot be created in {tmp_path / 'ro'}: Permission denied")
    else:
        dirs[option] = bad = tmp_path / "a_file" / "sub"
        result = train_cli(*[a for k, v in dirs.items() for a in (f"--{k}", v)], "--model", "tiny")
        assert_one_line_error(result, f"{option} {bad} cannot be created: {tmp_path / 'a_file'} is a file")
    # Found before tokenizing (no token cache) and before anything was written.
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_overwrite_with_checkpoints_in_the_output_dir_itself(tmp_path, train_here):
    """--checkpoint_dir equal to --output_dir: one folder set aside, named once in the note."""
    out = tmp_path / "run"
    for path in (out / "metrics.jsonl", out / "checkpoint_000002" / "manifest.json"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(path.name)
    [moved] = set_aside_run(out, out)
    assert (moved / "metrics.jsonl").exists() and (moved / "checkpoint_000002" / "manifest.json").exists()


def test_runs_started_in_one_second_get_a_directory_each(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    made = {new_run_dir("tiny") for _ in range(3)}  # within a second, as a sweep or an array job starts them
    assert len(made) == 3 and all(p.is_dir() for p in made)
    assert sorted(p.name.rsplit("-", 1)[-1] for p in made if p.name.count("-") == 3) == ["2", "3"]


def test_a_live_run_keeps_its_directories_to_itself(tmp_path, train_here):
    out = tmp_path / "run"
    held = DirLock(out)  # as a live run's main process holds it
    held.claim()
    try:
        result = train_here(*command(out, tmp_path / "cache"), "--checkpoint", "auto")
        assert_one_line_error(result, f"{out} is in use by a live run (process {os.getpid()} on ")
        assert not (out / "checkpoints").exists()
    finally:
        held.release()
    assert train_here(*command(out, tmp_path / "cache"), "--checkpoint", "auto").returncode == 0  # free again


def test_a_lock_is_exclusive_not_inherited_and_leaves_no_empty_folder(tmp_path):
    made = tmp_path / "new" / "checkpoints"
    held = DirLock(made)
    with pytest.raises(UserError, match="is in use by a live run"):
        DirLock(made)  # a second run naming the folder, a run directory's checkpoint folder included
    worker = os.fork()
    if worker == 0:  # a forked DataLoader or tokenizer worker that outlives the run's release
        time.sleep(2)
        os._exit(0)
    try:
        held.release()
        assert not made.exists()  # made for the run and left empty: removed again
        DirLock(made).release()  # free at once, the worker still alive: it did not keep the claim
    finally:
        os.waitpid(worker, 0)
    kept = tmp_path / "kept"
    kept.mkdir()
    DirLock(kept).release()
    assert kept.is_dir()  # there before the run: not the run's to remove
    gone = DirLock(tmp_path / "gone")
    shutil.rmtree(tmp_path / "gone")
    gone.release()  # a folder removed by hand while the run lived: released without an error


@pytest.mark.slow
def test_ten_runs_started_at_once_each_get_their_own_directory(tmp_path, train_here):
    """Issue 21's reproduction, ten times over: no --output_dir, all started within the same few milliseconds. They
    are forked from one process that has imported the trainer (ten Python starts would cost a minute and spread the
    starts out); each is the train command's entry point in a process of its own."""
    args = ["--model", "tiny", "--train_data_path", VERDICT, "--data_cache_dir", tmp_path / "cache", "--max_steps", "2",
            "--warmup_steps", "1", "--eval_freq", "0", "--save_freq", "1", "--val_fraction", "0.6",
            "--peak_flops", "1e11"]  # fmt: skip
    assert train_here(*args, "--output_dir", tmp_path / "warm").returncode == 0  # tokenized: the ten start together
    ten = """if True:
        import os, sys
        import torch._dynamo  # torch's optimizers import it when first built: once here, not in each of ten children
        from accel_gpt.train import main
        children = []
        for i in range(1, 11):
            if (pid := os.fork()) == 0:
                try:
                    main([*sys.argv[1:], "--learning_rate", f"{i}e-4"])
                except SystemExit as stop:
                    os._exit(stop.code or 0)
                os._exit(0)
            children.append(pid)
        sys.exit(max(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children))
    """
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    started = subprocess.run([sys.executable, "-c", ten, *one_thread(args)], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert started.returncode == 0, started.stderr[-3000:]
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 10
    rates = set()
    for run in runs:
        config = yaml.safe_load((run / "config.yaml").read_text())
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2] and config["output_dir"] == str(run.relative_to(tmp_path))
        assert sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")) == [
            "checkpoint_000001", "checkpoint_000002"]  # fmt: skip
        rates.add(config["learning_rate"])
    assert len(rates) == 10  # one run's config in each
    rate = yaml.safe_load((runs[0] / "config.yaml").read_text())["learning_rate"]
    resumed = train_here(*args, "--output_dir", runs[0], "--checkpoint", "1", "--learning_rate", rate)
    assert resumed.returncode == 0 and "resumed at step 1" in resumed.stdout, resumed.stderr[-2000:]


def test_a_full_disk_while_logging_is_one_line_after_a_last_checkpoint(tmp_path, train_here):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to("/dev/full")  # every write there fails: No space left on device
    result = train_here(*command(out, tmp_path / "cache"))
    assert_one_line_error(result, f"could not write {out / 'metrics.jsonl'}: No space left on device; saved a "
                                  "checkpoint of step 1. Resume with the same command plus")  # fmt: skip
    verify_checkpoint(out / "checkpoints" / "checkpoint_000001")  # saved as soon as the first record failed


def test_a_failed_append_leaves_no_torn_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n')

    class FullAfter:  # writes part of what it is given, then fails as a full disk does
        def __init__(self, file):
            self.file, self.calls = file, 0

        def fileno(self):
            return self.file.fileno()

        def write(self, data):
            self.calls += 1
            if self.calls > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data[:5])

    with open_on_a_new_line(path) as file, pytest.raises(UserError, match="No space left on device"):
        append_whole(FullAfter(file), b'{"step": 2, "loss": 1.0}\n', path)
    assert path.read_text() == '{"step": 1}\n'
