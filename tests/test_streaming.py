"""Streaming mode: readers share a corpus out exactly, the evaluation slices are fixed and held out, the stream's
state resumes the very stream, and through `accelerate launch` a SIGKILLed run resumes with the uninterrupted losses.
"""

import itertools
import json
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    REPO,
    assert_one_line_error,
    kill_all,
    launch,
    launch_command,
    launch_env,
    one_thread,
    read_metrics,
    start,
    steps_logged,
    wait_for,
)

from accel_gpt.data.streaming import FileSource, ReaderDataset, Readers, StreamBatches, read_chunks, read_slice
from accel_gpt.errors import UserError
from accel_gpt.tokenizer import get_tokenizer

EOS = 50256


def documents(n: int, tag: str = "doc") -> list[str]:
    return [f"{tag} {i}: " + " ".join(f"w{(i * 7 + j) % 101}" for j in range(5 + i % 17)) for i in range(n)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture
def shards(tmp_path) -> list[Path]:
    """Five .jsonl shards of 12 documents each."""
    docs = documents(60)
    return [write_jsonl(tmp_path / "shards" / f"part-{i}.jsonl", docs[i * 12 : (i + 1) * 12]) for i in range(5)]


def decoded_documents(chunks) -> list[str]:
    text = "".join(get_tokenizer().decode(list(map(int, c))) for c in chunks)
    return [d for d in text.split("<|endoftext|>") if d]


def one_epoch(source, readers: Readers) -> list[list[str]]:
    """The documents each reader reads in epoch 0."""
    out = []
    for reader in range(readers.count):
        chunks = []
        for tokens, (epoch, *_) in read_chunks(source, readers, reader, (0, 0, 0, 0), "gpt2", EOS):
            if epoch > 0:
                break
            chunks.append(tokens)
        out.append(decoded_documents(chunks))
    return out


@pytest.mark.parametrize("count", [2, 3, 8])  # fewer readers than shards (by shard), more (by document)
def test_readers_share_an_epoch_out_with_every_document_once(shards, count):
    source = FileSource(shards, "text")
    readers = Readers(count=count, seed=5)
    read = one_epoch(source, readers)
    assert Counter(d for per_reader in read for d in per_reader) == Counter(documents(60))
    assert all(read)  # every reader has work


def test_the_held_out_slice_is_never_trained_on(shards):
    source = FileSource(shards, "text")
    held, end = read_slice(source, (0, 0, 0), 301, "gpt2", EOS)
    assert len(held) == 301 and held[-1] != EOS  # the slice ends inside a document
    train_eval, _ = read_slice(source, end, 50, "gpt2", EOS)
    whole, _ = read_slice(source, (0, 0, 0), 351, "gpt2", EOS)
    assert np.array_equal(np.concatenate([held, train_eval]), whole)  # the next slice starts where it ended
    readers = Readers(count=2, seed=5, start=end)
    read = [t for per_reader in one_epoch(source, readers) for t in per_reader]
    cut_document = decoded_documents([held])[-1]  # the document the slice ends in: its rest is trained on
    assert not set(read) & (set(decoded_documents([held])) - {cut_document})
    assert len(read) == 60 - len(decoded_documents([held])) + 1


def batches_after(tmp_path, shards, workers, steps, state=None):
    readers = ReaderDataset(FileSource(shards, "text"), Readers(count=max(1, workers), seed=3), 0, workers, "gpt2", EOS)
    stream = StreamBatches(readers, workers, batch_size=4, context_len=16, stride=16, buffer_size=32, device="cpu")
    if state is not None:
        stream.load_state_dict(state)
    return stream, [stream.next_batch()[0] for _ in range(steps)]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_restored_from_its_state_continues_the_same_stream(tmp_path, shards, workers):
    _, reference = batches_after(tmp_path, shards, workers, 30)
    first, _ = batches_after(tmp_path, shards, workers, 11)
    state = json.loads(json.dumps(first.state_dict()["meta"]))  # what a checkpoint keeps: JSON, and arrays
    resumed, rest = batches_after(
        tmp_path, shards, workers, 19, {"arrays": first.state_dict()["arrays"], "meta": state}
    )
    for expected, got in zip(reference[11:], rest, strict=True):
        assert np.array_equal(expected, got)


def test_streaming_needs_max_steps(train_here):
    assert_one_line_error(
        train_here("--streaming", "true"), "streaming reads a corpus of unknown length: set max_steps"
    )


def hub_folder(root: Path) -> Path:
    """A hub-layout parquet dataset: 4 train shards, a validation shard, a test shard, text in `content`."""
    data = root / "hub" / "data"
    data.mkdir(parents=True)
    docs = documents(400)
    for i in range(4):
        table = pa.table({"content": docs[i * 90 : (i + 1) * 90]})
        pq.write_table(table, data / f"train-0000{i}-of-00004.parquet", row_group_size=16)
    pq.write_table(pa.table({"content": docs[360:390]}), data / "validation-00000-of-00001.parquet")
    pq.write_table(pa.table({"content": ["test only"] * 10}), data / "test-00000-of-00001.parquet")
    return root / "hub"


def test_a_dataset_streams_the_documents_of_its_files(tmp_path):
    """`--dataset FOLDER --streaming true` reads what `--train_data_path FOLDER --streaming true` reads: the train
    split's shards, row groups as shards where there are too few files for the readers, the validation split."""
    from accel_gpt.data.streaming import open_dataset_source

    hub = hub_folder(tmp_path)
    files = FileSource(sorted((hub / "data").glob("train-*")), "content")
    dataset = open_dataset_source(str(hub), None, "train", "content", readers=2)
    assert dataset.num_shards == 4 and dataset.split_names == ["train", "validation", "test"]
    for readers in (Readers(count=2, seed=1), Readers(count=3, seed=1, start=(1, 5, 3))):
        assert one_epoch(dataset, readers) == one_epoch(files, readers)
    assert open_dataset_source(str(hub), None, "train", "content", readers=8).num_shards == 24  # 6 groups a file
    val = open_dataset_source(str(hub), None, "validation", "content", readers=1)
    validation_file = FileSource([hub / "data" / "validation-00000-of-00001.parquet"], "content")
    assert np.array_equal(
        read_slice(val, (0, 0, 0), 40, "gpt2", EOS)[0], read_slice(validation_file, (0, 0, 0), 40, "gpt2", EOS)[0]
    )
    with pytest.raises(UserError, match=r"has no split 'dev' \(splits: train, validation, test\)"):
        open_dataset_source(str(hub), None, "dev", "content", readers=1)


def test_dataset_documents_are_its_rows_even_when_some_are_empty(tmp_path):
    from accel_gpt.data.streaming import open_dataset_source

    texts = ["" if i % 7 == 0 else f"row {i}" for i in range(600)]  # more than one 256-row table
    (tmp_path / "d" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": texts}), tmp_path / "d" / "data" / "train-00000-of-00001.parquet")
    source = open_dataset_source(str(tmp_path / "d"), None, "train", "text", readers=1)
    ends = [(index, piece) for index, piece, end in source.documents(0, 0) if end]
    assert ends == [(i, t) for i, t in enumerate(texts) if t]
    assert next(source.documents(0, 300))[:2] == (300, "row 300")
    chunks = [t for t, _ in itertools.islice(read_chunks(source, Readers(1, 0), 0, (0, 0, 0, 0), "gpt2", EOS), 1)]
    held, end = read_slice(source, (0, 0, 0), 301, "gpt2", EOS)
    rest, _ = read_slice(source, end, 100, "gpt2", EOS)
    assert np.array_equal(np.concatenate([held, rest]), read_slice(source, (0, 0, 0), 401, "gpt2", EOS)[0])
    assert decoded_documents(chunks)[:3] == ["row 1", "row 2", "row 3"]


def test_a_long_document_streams_in_chunks_and_resumes_inside_it(tmp_path, monkeypatch):
    from accel_gpt.data import sources, streaming

    monkeypatch.setattr(sources, "PIECE_CHARS", 2000)
    monkeypatch.setattr(streaming, "READER_CHUNK_TOKENS", 1000)
    book = tmp_path / "book.txt"
    book.write_text("\n".join(f"Line {i} of one long document, said the reader." for i in range(4000)))
    source, readers = FileSource([book], "text"), Readers(1, 0)
    chunks = list(itertools.islice(read_chunks(source, readers, 0, (0, 0, 0, 0), "gpt2", EOS), 6))
    assert all(len(tokens) < 1600 for tokens, _ in chunks)  # bounded by a chunk and a piece, not the document
    assert chunks[2][1][1:3] == (0, 0) and chunks[2][1][3] > 0  # mid-document: tokens into document 0
    resumed = list(itertools.islice(read_chunks(source, readers, 0, chunks[2][1], "gpt2", EOS), 3))
    for (expected, _), (got, _) in zip(chunks[3:], resumed, strict=True):
        assert np.array_equal(expected, got)


@pytest.mark.parametrize("stride", [16, 40])  # a stride beyond the window leaves tokens out between windows
def test_windows_start_every_stride_tokens(shards, stride):
    readers = ReaderDataset(FileSource(shards, "text"), Readers(count=1, seed=3), 0, 0, "gpt2", EOS)
    stream = StreamBatches(readers, 0, batch_size=1, context_len=16, stride=stride, buffer_size=0, device="cpu")
    windows = [[t.tolist() for t in stream.next_batch()] for _ in range(30)]
    epoch = itertools.islice(read_chunks(FileSource(shards, "text"), Readers(1, 3), 0, (0, 0, 0, 0), "gpt2", EOS), 5)
    whole = np.concatenate([tokens for tokens, _ in epoch]).tolist()
    for i, (inputs, targets) in enumerate(windows):
        assert inputs[0] == whole[i * stride : i * stride + 16] and targets[0][-1] == whole[i * stride + 16]


def test_a_bad_stream_is_one_line(tmp_path, train_here):
    bad = write_jsonl(tmp_path / "bad" / "a.jsonl", documents(5))
    bad.write_text(bad.read_text() + '{"content": "no text field"}\n')
    result = train_here(
        "--train_data_path", bad.parent, "--streaming", "true", "--max_steps", "3", "--warmup_steps", "1",
        "--model", "tiny", "--context_len", "16", "--output_dir", tmp_path / "run", "--stream_workers", "1",
        "--eval_iter", "1", "--batch_size", "2",
    )  # fmt: skip
    assert_one_line_error(result, "a.jsonl line 6 has no 'text' value")


def test_streaming_settings_that_cannot_work_are_one_line(tmp_path, train_here, shards):
    base = ["--streaming", "true", "--max_steps", "6", "--warmup_steps", "1", "--model", "tiny", "--context_len", "16",
            "--batch_size", "2", "--stream_workers", "0", "--eval_iter", "1", "--save_freq", "3", "--eval_freq", "3",
            "--sample_tokens", "2", "--data_cache_dir", tmp_path / "cache"]  # fmt: skip
    small = write_jsonl(tmp_path / "small" / "a.jsonl", ["A short document."] * 3)
    cases = {
        "whole": ([*base, "--train_data_path", small.parent, "--output_dir", tmp_path / "r1"],
                  "is no longer than one evaluation"),
        "empty": ([*base, "--train_data_path", write_jsonl(tmp_path / "e" / "e.jsonl", [""]).parent,
                   "--output_dir", tmp_path / "r2"], "train data: data path"),
        "train eval": ([*base, "--train_data_path", small.parent, "--val_data_path", shards[0],
                        "--output_dir", tmp_path / "r3"], "training data has 0 windows of 17 tokens; an evaluation"),
        "same split": ([*base, "--dataset", hub_folder(tmp_path), "--text_column", "content", "--val_split", "train",
                        "--output_dir", tmp_path / "r4"], "train_split and val_split are both 'train'"),
    }  # fmt: skip
    for args, message in cases.values():
        assert_one_line_error(train_here(*args), message)
    run = [*base, "--train_data_path", shards[0].parent, "--output_dir", tmp_path / "run"]
    assert train_here(*run).returncode == 0
    moved = train_here(*run, "--checkpoint", "3", "--eval_iter", "2")  # the held-out slice would grow into trained text
    assert_one_line_error(moved, "the data order would change (held_out")
    lines = shards[2].read_text().splitlines(keepends=True)
    shards[2].write_text("".join(lines[:-3]))  # edited in place: the saved positions would point into other text
    edited = train_here(*run, "--checkpoint", "3")
    sizes = f"{len(''.join(lines).encode()):,} -> {shards[2].stat().st_size:,}"
    assert_one_line_error(edited, f"the stream's file {shards[2]} changed since the checkpoint (its size: {sizes}")
    shards[4].unlink()
    assert_one_line_error(train_here(*run, "--checkpoint", "3"), "the stream had 5 files and has 4 now")


def test_readers_error_when_a_reader_would_get_nothing(tmp_path):
    source = FileSource([write_jsonl(tmp_path / "one.jsonl", documents(2))], "text")
    with pytest.raises(UserError, match="stream reader 2 of 3 found no text"):
        next(read_chunks(source, Readers(count=3, seed=0), 2, (0, 0, 0, 0), "gpt2", EOS))


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_stream_and_other_processes_are_refused(tmp_path, train_here):
    """2 gloo processes x 2 stream workers on a hub-layout parquet folder: killed once after a checkpoint, the same
    command with `--checkpoint auto` gives the uninterrupted run's per-step losses. Under Muon: its momentum, too,
    survives a SIGKILL through the checkpoint (test_faults.py kills AdamW runs)."""
    args = [
        "--model", "tiny", "--train_data_path", hub_folder(tmp_path), "--text_column", "content", "--streaming", "true",
        "--context_len", "32", "--batch_size", "2", "--max_steps", "8", "--save_freq", "3", "--eval_freq", "4",
        "--eval_iter", "1", "--warmup_steps", "2", "--dropout", "0.1", "--shuffle_buffer", "64",
        "--sample_tokens", "3", "--seed", "7", "--data_cache_dir", tmp_path / "cache", "--peak_flops", "1e11",
        "--optimizer", "muon", "--learning_rate", "3e-3", "--muon_learning_rate", "4e-3",
    ]  # fmt: skip
    first = launch([*args, "--output_dir", tmp_path / "ref"], num_processes=2)
    assert "training on its 4 train files, validating on its 1 validation file (1 test file not used)" in first.stdout
    reference = read_metrics(tmp_path / "ref")
    losses = [reference[s]["loss"] for s in range(1, 9)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2  # it learns

    out = tmp_path / "killed"
    command = [*args, "--output_dir", out, "--checkpoint", "auto"]
    proc = start(command, num_processes=2)
    caught = wait_for(lambda: steps_logged(out) >= 5, proc)  # past the checkpoint at step 3
    kill_all(proc)
    proc.communicate()
    assert caught
    result = launch(command, num_processes=2)
    assert "resumed at step" in result.stdout
    final = read_metrics(out)
    assert sorted(final) == sorted(reference)
    for step in reference:
        assert final[step]["loss"] == pytest.approx(reference[step]["loss"], abs=1e-6), step
    assert final[8]["val_loss"] == pytest.approx(reference[8]["val_loss"], abs=1e-6)

    one = train_here(*args, "--output_dir", out, "--checkpoint", "latest", "--max_steps", "12")
    assert_one_line_error(one, "on 1 processes: its stream was read by 2 processes x 2 stream_workers")


@pytest.mark.slow
def test_bad_data_met_by_one_process_stops_every_process_with_its_line(tmp_path):
    data = tmp_path / "data"
    for i in range(7):
        write_jsonl(data / f"p{i}.jsonl", documents(12, tag=f"file {i}"))
    with open(data / "p3.jsonl", "a") as f:
        f.write('{"text": 5}\n')
    args = ["--model", "tiny", "--context_len", "32", "--batch_size", "2", "--streaming", "true", "--warmup_steps", "1",
            "--eval_iter", "1", "--max_steps", "40", "--stream_workers", "1", "--shuffle_buffer", "0",
            "--train_data_path", data, "--output_dir", tmp_path / "run",
            "--data_cache_dir", tmp_path / "cache"]  # fmt: skip
    cmd = launch_command(2, launcher_args=("-q",)) + one_thread(args)  # -q: the launcher's summary, no traceback
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=launch_env(), cwd=REPO)
    line = "accel_gpt: error: train data: " + str(data / "p3.jsonl") + " line 13 has a 'text' number, not a string"
    assert result.returncode != 0 and result.stderr.count(line + "\n") == 2, result.stderr[-3000:]  # each rank's
    assert "[rank" not in result.stderr  # no rank's traceback, only the launcher's report that they stopped
    assert "Traceback" not in result.stderr and "accel_gpt.train FAILED" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
