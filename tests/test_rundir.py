"""Run directories through the CLI: a new run never lands on an old one, `--overwrite true` moves it aside,
`--checkpoint auto` on a finished run says so, and unusable directories stop the run before any work."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, VERDICT, assert_one_line_error, train_cli

from accel_gpt.config import parse_config
from accel_gpt.rundir import set_aside_run
from accel_gpt.train import train


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


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
    ]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("rundir")
    train(parse_config([str(a) for a in command(root / "same", root / "cache")]))
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
