"""Bad input gets one clear line on stderr and a non-zero exit, never a traceback or a damaged checkpoint."""

import json
import shutil
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import (
    REPO,
    VERDICT,
    assert_one_line_error,
    assert_only_line_error,
    common_args,
    launch_command,
    launch_env,
    train_cli,
    without_read_override,
)

from accel_gpt.checkpoint import list_checkpoints


def test_missing_and_empty_data_paths(tmp_path, train_here):
    assert_only_line_error(train_here("--train_data_path", tmp_path / "nope.txt"), "data path not found", "nope.txt")
    (tmp_path / "empty").mkdir()
    assert_only_line_error(train_here("--train_data_path", tmp_path / "empty"), "no .txt, .jsonl or .parquet files")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    assert_only_line_error(
        train_here("--train_data_path", tmp_path / "blank", "--data_cache_dir", tmp_path / "c"), "contains no text"
    )


def test_a_model_that_cannot_fit_stops_before_it_exists(tmp_path, train_here):
    result = train_here("--model", "gpt2-xl", "--output_dir", tmp_path / "run", "--data_cache_dir", tmp_path / "c")
    assert_one_line_error(result, "model gpt2-xl needs about", "GiB a process (weights 6.1, gradients 6.1, optimizer",
                          "pass --memory_check false to try anyway")  # fmt: skip
    assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists()  # before any work


def test_an_unknown_tokenizer_is_one_line(train_here):
    assert_one_line_error(
        train_here("--tokenizer", "no_such_encoding"),
        "unknown tokenizer 'no_such_encoding': no folder of that name, and not one of tiktoken's encodings (gpt2,",
    )


def test_empty_data_paths_are_refused_not_searched_from_the_working_directory(tmp_path, train_here):
    assert_only_line_error(train_here("--train_data_path", ""), "train data: the data path is empty")
    assert_only_line_error(
        train_here("--train_data_path", VERDICT, "--val_data_path", "", "--data_cache_dir", tmp_path / "c"),
        "validation data: the data path is empty",
    )


@pytest.mark.slow
def test_unreadable_files_and_folders_are_one_line(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("Readable text. " * 50)
    (corpus / "sub" / "b.txt").write_text("Text in a folder that cannot be listed. " * 50)
    for name, text in [("locked.jsonl", '{"text": "unreadable"}\n'), ("locked.txt", "unreadable")]:
        (corpus / name).write_text(text)
        (corpus / name).chmod(0)
        prefix = without_read_override(corpus / name)
        result = train_cli("--train_data_path", corpus / name, "--data_cache_dir", tmp_path / "c", prefix=prefix)
        assert_only_line_error(result, "train data: cannot read", f"{name}: Permission denied")
        (corpus / name).unlink()
    (corpus / "sub").chmod(0)
    try:  # a folder that cannot be listed must stop the run, not leave half the corpus out
        result = train_cli("--train_data_path", corpus, "--data_cache_dir", tmp_path / "c", prefix=prefix)
    finally:
        (corpus / "sub").chmod(0o755)
    assert_only_line_error(result, "train data: cannot read directory", "corpus/sub: Permission denied")


def test_parquet_strings_that_are_not_utf8(tmp_path, train_here):
    # Arrow trusts the writer; this one wrote the bytes of "ok" and then two that are not UTF-8.
    offsets, values = pa.py_buffer(bytes([0, 0, 0, 0, 2, 0, 0, 0, 6, 0, 0, 0])), pa.py_buffer(b"ok" + b"ab\xff\xfe")
    texts = pa.Array.from_buffers(pa.string(), 2, [None, offsets, values])
    pq.write_table(pa.table({"text": texts}), tmp_path / "bad.parquet")
    result = train_here("--train_data_path", tmp_path / "bad.parquet", "--data_cache_dir", tmp_path / "c")
    assert_only_line_error(result, "train data:", "bad.parquet row index 1: 'text' is not valid UTF-8")


def test_invalid_utf8_names_the_file_and_byte_offset(tmp_path, train_here):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Ein schönes Haus".encode() + " und ein schönes Boot".encode("latin-1"))
    result = train_here("--train_data_path", bad, "--data_cache_dir", tmp_path / "c")
    offset = len("Ein schönes Haus".encode()) + len(" und ein sch")  # the latin-1 'ö'
    assert_only_line_error(result, "latin1.txt is not valid UTF-8", f"byte offset {offset}")


def test_jsonl_rows_without_text(tmp_path, train_here):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    result = train_here("--train_data_path", tmp_path / "d", "--data_cache_dir", tmp_path / "c")
    assert_only_line_error(result, "train data:", "a.jsonl line 2 has no 'text' value")


def test_corpus_too_short_for_one_step_and_val_without_batches(tmp_path, train_here):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here. " * 20)
    result = train_here("--train_data_path", short, "--data_cache_dir", tmp_path / "c", "--model", "tiny")
    assert_one_line_error(result, "training data has", "one optimizer step needs 8")
    result = train_here(
        "--train_data_path", VERDICT, "--data_cache_dir", tmp_path / "c", "--model", "tiny", "--val_fraction", "0.05"
    )
    assert_one_line_error(
        result, "validation data has 4 windows of 65 tokens; an evaluation needs one global batch of 8"
    )


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--learning_rat", "1"], ["unrecognized arguments: --learning_rat"]),
        (["--batch_size", "1.5"], ["batch_size expects an integer, got '1.5'"]),
        (
            ["--warmup_steps", "500", "--max_steps", "100"],
            ["warmup_steps (500) must be shorter than the run (100 steps)"],
        ),
        (["--min_lr", "0.01", "--learning_rate", "0.001"], ["min_lr (0.01) is larger than learning_rate (0.001)"]),
        (["--special_token_id", "60000"], ["special_token_id 60000 is outside the gpt2 vocabulary"]),
        pytest.param(
            ["--cuda_graph", "true"],
            ["cuda_graph needs a CUDA GPU; this run is on cpu"],
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs it"),
        ),
    ],
)
def test_bad_settings(tmp_path, args, fragments, train_here):
    base = ["--model", "tiny", "--train_data_path", VERDICT, "--data_cache_dir", tmp_path / "c"]
    assert_one_line_error(train_here(*base, *args), *fragments)


@pytest.mark.slow
def test_under_accelerate_launch_quiet_the_line_is_all_there_is():
    """One process under `accelerate launch` adds the launcher's traceback after our line; `-q` (as
    docs/configuration.md says) leaves our line alone. Several processes: test_streaming.py's bad-data launch."""
    cmd = launch_command(1, launcher_args=("-q",)) + ["--learning_rat", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=launch_env(), cwd=REPO)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "accel_gpt: error: command line: unrecognized arguments: --learning_rat 1"
    ], result.stderr[-3000:]


@pytest.mark.slow
def test_checkpoint_that_does_not_exist(tiny_run, train_here):
    args = common_args(tiny_run.out, tiny_run.cache) + ["--checkpoint", "3", "--max_steps", "6"]
    assert_one_line_error(train_here(*args), "checkpoint 3 not found", "available: 2, 4")


@pytest.mark.slow
def test_corrupt_weights_of_the_requested_checkpoint(tiny_run, tmp_path, train_here):
    out = tmp_path / "run"
    shutil.copytree(tiny_run.out, out)
    weights = out / "checkpoints" / "checkpoint_000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    args = common_args(out, tiny_run.cache) + ["--max_steps", "6"]
    assert_one_line_error(train_here(*args, "--checkpoint", "4"), "checkpoint_000004 is corrupt: model.safetensors has")
    fallback = train_cli(*args, "--checkpoint", "latest")  # 'latest' falls back to step 2 with a warning on stderr
    assert fallback.returncode == 0, fallback.stderr[-2000:]
    assert "resumed at step 2" in fallback.stdout and "falling back to the previous checkpoint" in fallback.stderr


@pytest.mark.slow
def test_checkpoint_from_a_different_model(tiny_run, train_here):
    args = common_args(tiny_run.out, tiny_run.cache) + ["--checkpoint", "4", "--max_steps", "6"]
    assert_one_line_error(
        train_here(*args, "--embedding_dim", "32"),
        "was trained with a different model config",
        "'embedding_dim': {'checkpoint': 64, 'requested': 32}",
    )
    assert_one_line_error(
        train_here(*args, "--context_len", "128"), "context_len 128 exceeds the position table", "(64 tokens)"
    )


@pytest.mark.slow
def test_resume_that_would_change_the_data_order(tiny_run, train_here):
    args = common_args(tiny_run.out, tiny_run.cache) + ["--checkpoint", "4", "--max_steps", "6"]
    assert_one_line_error(train_here(*args, "--seed", "99"), "the data order would change (seed 11 -> 99)")
    assert_one_line_error(train_here(*args, "--batch_size", "4"), "global_batch_size 8 -> 4")


@pytest.mark.slow
def test_branching_from_an_earlier_checkpoint_sets_later_ones_aside(tiny_run, tmp_path, train_here):
    out = tmp_path / "run"
    shutil.copytree(tiny_run.out, out)
    result = train_here(*common_args(out, tiny_run.cache), "--checkpoint", "2", "--max_steps", "3", "--save_freq", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "later checkpoints of the abandoned run moved to" in result.stdout
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2, 3]
    aside = [p for p in (out / "checkpoints").iterdir() if p.name.startswith("abandoned-after-000002")]
    assert len(aside) == 1 and (aside[0] / "checkpoint_000004" / "manifest.json").exists()
    assert (
        json.loads((out / "checkpoints" / "checkpoint_000003" / "trainer_state.json").read_text())["global_step"] == 3
    )
