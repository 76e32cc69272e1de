"""Bad input gets one clear line on stderr and a non-zero exit, never a traceback or a damaged checkpoint."""

import json
import shutil
import subprocess
import sys

import pytest

from accel_gpt.checkpoint import list_checkpoints
from conftest import REPO, VERDICT
from test_launch import common_args


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "accel_gpt.train", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("accel_gpt: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny finished run with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("errors")
    out = root / "run"
    result = run_cli(*common_args(out, root / "cache"), "--max_steps", "4", "--save_freq", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "out": out, "cache": root / "cache"}


def test_missing_and_empty_data_paths(tmp_path):
    assert_one_line_error(run_cli("--train_data_path", tmp_path / "nope.txt"), "data path not found", "nope.txt")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("--train_data_path", tmp_path / "empty"), "no .txt, .jsonl or .parquet files")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    assert_one_line_error(
        run_cli("--train_data_path", tmp_path / "blank", "--data_cache_dir", tmp_path / "c"), "contains no text"
    )


def test_invalid_utf8_names_the_file_and_byte_offset(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Ein schönes Haus".encode("utf-8") + " und ein schönes Boot".encode("latin-1"))
    result = run_cli("--train_data_path", bad, "--data_cache_dir", tmp_path / "c")
    offset = len("Ein schönes Haus".encode("utf-8")) + len(" und ein sch")  # the latin-1 'ö'
    assert_one_line_error(result, "latin1.txt is not valid UTF-8", f"byte offset {offset}")


def test_jsonl_rows_without_text(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    result = run_cli("--train_data_path", tmp_path / "d", "--data_cache_dir", tmp_path / "c")
    assert_one_line_error(result, "1 documents in", "have no 'text' value")


def test_corpus_too_short_for_one_step_and_val_without_batches(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here. " * 20)
    result = run_cli("--train_data_path", short, "--data_cache_dir", tmp_path / "c", "--model", "tiny")
    assert_one_line_error(result, "training data has", "one optimizer step needs 8")
    result = run_cli("--train_data_path", VERDICT, "--data_cache_dir", tmp_path / "c", "--model", "tiny",
                     "--val_fraction", "0.05")
    assert_one_line_error(result, "validation data has 4 windows of 65 tokens; an evaluation needs one global batch of 8")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--learning_rat", "1"], ["unrecognized arguments: --learning_rat"]),
        (["--batch_size", "1.5"], ["batch_size expects an integer, got '1.5'"]),
        (["--warmup_steps", "500", "--max_steps", "100"], ["warmup_steps (500) must be shorter than the run (100 steps)"]),
        (["--min_lr", "0.01", "--learning_rate", "0.001"], ["min_lr (0.01) is larger than learning_rate (0.001)"]),
        (["--special_token_id", "60000"], ["special_token_id 60000 is outside the gpt2 vocabulary"]),
    ],
)
def test_bad_settings(tmp_path, args, fragments):
    base = ["--model", "tiny", "--train_data_path", VERDICT, "--data_cache_dir", tmp_path / "c"]
    assert_one_line_error(run_cli(*base, *args), *fragments)


def test_checkpoint_that_does_not_exist(trained_run):
    args = common_args(trained_run["out"], trained_run["cache"]) + ["--checkpoint", "3", "--max_steps", "6"]
    assert_one_line_error(run_cli(*args), "checkpoint 3 not found", "available: 2, 4")


def test_corrupt_weights_of_the_requested_checkpoint(trained_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained_run["out"], out)
    weights = out / "checkpoints" / "checkpoint_000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    args = common_args(out, trained_run["cache"]) + ["--max_steps", "6"]
    assert_one_line_error(run_cli(*args, "--checkpoint", "4"), "checkpoint_000004 is corrupt: model.safetensors has")
    fallback = run_cli(*args, "--checkpoint", "latest")  # 'latest' falls back to step 2 with a warning
    assert fallback.returncode == 0, fallback.stderr[-2000:]
    assert "resumed at step 2" in fallback.stdout and "falling back to the previous checkpoint" in fallback.stderr


def test_checkpoint_from_a_different_model(trained_run):
    args = common_args(trained_run["out"], trained_run["cache"]) + ["--checkpoint", "4", "--max_steps", "6"]
    assert_one_line_error(run_cli(*args, "--embedding_dim", "32"), "was trained with a different model config",
                          "'embedding_dim': {'checkpoint': 64, 'requested': 32}")
    assert_one_line_error(run_cli(*args, "--context_len", "128"), "context_len 128 exceeds the position table",
                          "(64 positions)")


def test_resume_that_would_change_the_data_order(trained_run):
    args = common_args(trained_run["out"], trained_run["cache"]) + ["--checkpoint", "4", "--max_steps", "6"]
    assert_one_line_error(run_cli(*args, "--seed", "99"), "the data order would change (seed 11 -> 99)")
    assert_one_line_error(run_cli(*args, "--batch_size", "4"), "global_batch_size 8 -> 4")


def test_branching_from_an_earlier_checkpoint_sets_later_ones_aside(trained_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained_run["out"], out)
    result = run_cli(*common_args(out, trained_run["cache"]), "--checkpoint", "2", "--max_steps", "3",
                     "--save_freq", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "later checkpoints of the abandoned run moved to" in result.stdout
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2, 3]
    aside = [p for p in (out / "checkpoints").iterdir() if p.name.startswith("abandoned-after-000002")]
    assert len(aside) == 1 and (aside[0] / "checkpoint_000004" / "manifest.json").exists()
    assert json.loads((out / "checkpoints" / "checkpoint_000003" / "trainer_state.json").read_text())["global_step"] == 3
