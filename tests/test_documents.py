"""Windows that start at a document (`--align_documents`: best-fit packing, the end-of-text first) and attention
that stops at a document's end (`--document_mask`)."""

import json
import random
import shutil

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, in_process, one_thread, read_metrics

from accel_gpt.batches import main as batches_main
from accel_gpt.data.packing import document_spans, pack_documents
from accel_gpt.data.tokens import TokenStream
from accel_gpt.export import main as export_main
from accel_gpt.inference import generate
from accel_gpt.model import PRESETS, GPTConfig, GPTModel
from accel_gpt.tokenizer import get_tokenizer

EOT = 50256


@pytest.fixture
def documents(tmp_path):
    """150 documents of 3 to 45 words (each shorter than a window of 64 tokens), as JSON lines, and their texts."""
    rng = random.Random(7)
    words = (
        "the a river mountain monkey king travels west with a monk and three friends to fetch the scriptures".split()
    )
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 45))) for _ in range(150)]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return corpus, texts


def test_packing_fills_every_window_from_document_starts_best_fit_first():
    lengths = np.array([5, 3, 9, 2, 30, 4, 4, 7])
    starts = np.concatenate([[-1], np.cumsum(lengths)[:-1] - 1])  # each document's end-of-text first
    piece_starts, piece_lengths, offsets = pack_documents(starts, lengths, 10)
    windows = [list(zip(piece_starts[a:b], piece_lengths[a:b])) for a, b in zip(offsets, offsets[1:])]
    assert all(sum(length for _, length in window) == 10 for window in windows)  # every window full
    # The 30-token document fills three windows of its own, one after another: nothing of it is lost.
    assert windows[:3] == [[(18, 10)], [(28, 10)], [(38, 10)]]
    # Then the longest waiting document that fits what is left, again and again; when none fits, the shortest is
    # cut to fill the window: 9 + 1 of the 2-token one.
    assert windows[3] == [(7, 9), (16, 1)]
    assert all(start in starts for window in windows[3:] for start, _ in window)  # each starts at a document
    assert sum(piece_lengths) == 60 and sum(lengths) == 64  # what was cut off: 1 + 3 tokens


def test_document_spans_put_the_end_of_text_first():
    stream = TokenStream.of(np.array([1, 2, EOT, 3, EOT, EOT, 4, 5, EOT], dtype=np.uint16))
    starts, lengths = document_spans(stream, EOT)
    assert starts.tolist() == [-1, 2, 5] and lengths.tolist() == [3, 2, 3]  # the empty document and the last EOT


def test_every_window_batches_shows_begins_at_a_document(documents, tmp_path, capfd):
    corpus, texts = documents
    args = [
        "--model",
        "tiny",
        "--train_data_path",
        corpus,
        "--data_cache_dir",
        tmp_path / "cache",
        "--context_len",
        "64",
        "--batch_size",
        "4",
        "--align_documents",
        "true",
        "--steps",
        "3",
        "--json",
        "--warmup_steps",
        "1",
    ]
    batches_main([str(a) for a in one_thread(args)])
    out, err = capfd.readouterr()
    assert "align_documents: train data's" in err and "% of its tokens dropped" in err
    tokenizer = get_tokenizer()
    starts = [tokenizer.encode_ordinary(t) for t in texts]
    windows = [json.loads(line) for line in out.splitlines()]
    assert len(windows) == 12
    for window in windows:
        tokens = window["tokens"]
        assert len(tokens) == 65 and tokens[0] == EOT
        following = tokens[1 : tokens.index(EOT, 1)] if EOT in tokens[1:] else tokens[1:]
        assert any(doc[: len(following)] == following for doc in starts)  # a document's start


def test_a_later_documents_logits_do_not_change_with_an_earlier_one_in_its_window():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(**PRESETS["tiny"] | {"position": "rotary"}, vocabulary_size=EOT + 1)).eval()
    model.document_boundary = EOT
    first = torch.randint(0, EOT, (2, 20))
    first[:, 9] = EOT  # the second document starts at position 9
    changed = first.clone()
    changed[:, :9] = torch.randint(0, EOT, (2, 9))
    with torch.no_grad():
        a, b = model(first), model(changed)
        assert torch.equal(a[:, 9:], b[:, 9:]) and not torch.allclose(a[:, :9], b[:, :9])
        model.document_boundary = None
        assert not torch.allclose(model(changed)[:, 9:], b[:, 9:])  # without the mask, it sees the first document
    # Generation (the KV cache) is unaffected: a prompt of one document decodes alike with the mask on or off.
    off = generate(model, "the monkey king", 8)
    model.document_boundary = EOT
    assert generate(model, "the monkey king", 8) == off


def test_aligned_and_masked_training_learns_and_resumes_exactly(documents, tmp_path, train_here, capfd):
    corpus, _ = documents
    args = ["--model", "tiny", "--train_data_path", corpus, "--data_cache_dir", tmp_path / "cache",
            "--context_len", "64", "--batch_size", "4", "--max_steps", "8", "--warmup_steps", "1", "--eval_freq",
            "4", "--eval_iter", "1", "--save_freq", "4", "--dropout", "0.0", "--learning_rate", "3e-3",
            "--align_documents", "true", "--document_mask", "true", "--peak_flops", "1e11"]  # fmt: skip
    whole = train_here(*args, "--output_dir", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "align_documents: train data's" in whole.stdout
    first = read_metrics(tmp_path / "whole")
    assert first[8]["val_loss"] < first[4]["val_loss"] < first[1]["loss"]
    shutil.copytree(tmp_path / "whole", tmp_path / "half")
    resumed = train_here(*args, "--output_dir", tmp_path / "half", "--checkpoint", "4")
    assert resumed.returncode == 0 and "resumed at step 4" in resumed.stdout
    again = read_metrics(tmp_path / "half")
    assert [again[s]["loss"] for s in range(5, 9)] == [first[s]["loss"] for s in range(5, 9)]
    # Export has no mask to carry: it says so (GPT2LMHeadModel attends across end-of-text).
    exported = in_process(export_main, ["--checkpoint", str(tmp_path / "whole"), "--out", str(tmp_path / "hf")], capfd)
    assert exported.returncode == 0 and "note: trained with --document_mask" in exported.stderr


def test_streamed_windows_start_at_documents_and_resume_exactly(documents, tmp_path, train_here, capfd):
    corpus, texts = documents
    args = ["--model", "tiny", "--train_data_path", corpus, "--data_cache_dir", tmp_path / "cache",
            "--context_len", "64", "--batch_size", "4", "--max_steps", "8", "--warmup_steps", "1", "--eval_freq",
            "4", "--eval_iter", "1", "--save_freq", "4", "--dropout", "0.0", "--align_documents", "true",
            "--streaming", "true", "--stream_workers", "0", "--shuffle_buffer", "8", "--val_fraction", "0.2",
            "--peak_flops", "1e11"]  # fmt: skip
    batches_main([str(a) for a in one_thread([*args, "--steps", "3", "--json"])])
    tokenizer = get_tokenizer()
    starts = [tokenizer.encode_ordinary(t) for t in texts]
    for window in [json.loads(line) for line in capfd.readouterr().out.splitlines()]:
        tokens = window["tokens"]
        following = tokens[1 : tokens.index(EOT, 1)] if EOT in tokens[1:] else tokens[1:]
        assert tokens[0] == EOT and any(doc[: len(following)] == following for doc in starts)
    whole = train_here(*args, "--output_dir", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    shutil.copytree(tmp_path / "whole", tmp_path / "again")
    resumed = train_here(*args, "--output_dir", tmp_path / "again", "--checkpoint", "4")
    assert resumed.returncode == 0 and "resumed at step 4" in resumed.stdout
    first, again = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "again")
    assert [again[s]["loss"] for s in range(5, 9)] == [first[s]["loss"] for s in range(5, 9)]
    unaligned = train_here(*args, "--output_dir", tmp_path / "again", "--checkpoint", "4", "--align_documents", "false")
    assert_one_line_error(unaligned, "the data order would change (align_documents True -> False)")


def test_alignment_refuses_what_it_cannot_do_in_one_line(train_here):
    assert_one_line_error(train_here("--align_documents", "true", "--stride", "64", "--context_len", "128"),
                          "align_documents packs windows that never overlap: drop stride")  # fmt: skip
