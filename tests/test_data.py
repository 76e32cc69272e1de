import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from accelerate.data_loader import prepare_data_loader

from accel_gpt.data import (
    CHUNK_TOKENS,
    GlobalBatchSampler,
    TokenStream,
    WindowDataset,
    make_loader,
    resolve_files,
    tokenize_corpus,
)
from accel_gpt.errors import UserError
from accel_gpt.tokenizer import get_tokenizer

DOCS = ["The first document.", "Second one, a little longer than the first.", "第三个文件：西游记。"]
EOS = 50256


def expected_stream(docs):
    enc = get_tokenizer("gpt2")
    return [t for d in docs for t in enc.encode_ordinary(d) + [EOS]]


def write_corpus(root, fmt):
    root.mkdir(parents=True)
    if fmt == "txt":
        for i, d in enumerate(DOCS):
            (root / f"doc{i}.txt").write_text(d, encoding="utf-8")
    elif fmt == "jsonl":
        (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    else:
        pq.write_table(pa.table({"text": DOCS, "id": [1, 2, 3]}), root / "docs.parquet")
    return root


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
def test_every_format_gives_documents_each_followed_by_eos(tmp_path, cache_dir, fmt):
    root = write_corpus(tmp_path / fmt, fmt)
    stream, hit = tokenize_corpus(str(root), "gpt2", EOS, cache_dir)
    assert not hit
    assert stream.read(0, len(stream)).tolist() == expected_stream(DOCS)


def test_glob_and_bundled_names_resolve(tmp_path):
    root = write_corpus(tmp_path / "g", "txt")
    assert len(resolve_files(str(root / "doc*.txt"))) == 3
    assert resolve_files("the-verdict")[0].name == "the-verdict.txt"


def test_missing_or_empty_paths_are_clear_errors(tmp_path, cache_dir):
    with pytest.raises(UserError, match="data path not found"):
        resolve_files(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .txt, .jsonl or .parquet files"):
        resolve_files(str(tmp_path / "empty"))


def test_second_run_hits_the_cache_and_a_changed_file_misses(tmp_path, cache_dir):
    root = write_corpus(tmp_path / "c", "txt")
    first, hit1 = tokenize_corpus(str(root), "gpt2", EOS, cache_dir)
    second, hit2 = tokenize_corpus(str(root), "gpt2", EOS, cache_dir)
    assert (hit1, hit2) == (False, True) and first.path == second.path
    (root / "doc0.txt").write_text("Edited.", encoding="utf-8")
    os.utime(root / "doc0.txt", ns=(1, 1))
    third, hit3 = tokenize_corpus(str(root), "gpt2", EOS, cache_dir)
    assert not hit3 and third.read(0, len(third)).tolist() == expected_stream(["Edited."] + DOCS[1:])


def arange_stream(tmp_path, n: int) -> TokenStream:
    """A token file whose token at position p is p: window contents then reveal their position."""
    path = tmp_path / f"arange{n}.arrow"
    schema = pa.schema([("tokens", pa.uint32())])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for start in range(0, n, CHUNK_TOKENS):
            chunk = pa.array(np.arange(start, min(n, start + CHUNK_TOKENS), dtype=np.uint32))
            writer.write_batch(pa.record_batch([chunk], schema=schema))
    return TokenStream(path)


def test_windows_are_shifted_pairs_with_stride_and_cross_chunk_reads(tmp_path):
    stream = arange_stream(tmp_path, CHUNK_TOKENS + 500)
    ds = WindowDataset(stream, context_len=16, stride=8)
    assert len(ds) == (len(stream) - 17) // 8 + 1
    x, y = ds[3]
    assert x.tolist() == list(range(24, 40)) and y.tolist() == list(range(25, 41))
    i = CHUNK_TOKENS // 8 - 1  # straddles the record-batch boundary
    x, _ = ds[i]
    assert x.tolist() == list(range(i * 8, i * 8 + 16))
    tail = stream.view(100, 140)
    assert WindowDataset(tail, 16, 16)[1][0].tolist() == list(range(116, 132))
    assert len(WindowDataset(stream.view(0, 16), 16, 16)) == 0  # needs context_len + 1 tokens


def rank_windows(ds, sampler, world_size):
    """Window start tokens each rank sees, through Accelerate's own sharding (what `prepare` does)."""
    seen = []
    for rank in range(world_size):
        loader = prepare_data_loader(make_loader(ds, sampler), num_processes=world_size, process_index=rank)
        seen.append([x[:, 0].tolist() for x, _ in loader])
    return seen


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_get_equal_batches_and_together_every_window_once(tmp_path, world_size):
    ds = WindowDataset(arange_stream(tmp_path, 16 * 48 + 1), context_len=16, stride=16)  # 48 windows
    sampler = GlobalBatchSampler(len(ds), batch_size=2, global_batch_size=2 * world_size * 2, seed=7)
    seen = rank_windows(ds, sampler, world_size)
    assert len({len(batches) for batches in seen}) == 1  # equal batch counts: DDP cannot hang
    starts = [s for batches in seen for batch in batches for s in batch]
    expected = sorted(w * 16 for w in range(48))
    assert sorted(starts) == expected  # every window exactly once: no double sharding, no loss


def test_uneven_corpus_drops_only_the_incomplete_last_step(tmp_path):
    ds = WindowDataset(arange_stream(tmp_path, 16 * 50 + 1), context_len=16, stride=16)  # 50 windows
    sampler = GlobalBatchSampler(len(ds), batch_size=3, global_batch_size=12, seed=1)
    seen = rank_windows(ds, sampler, 2)
    assert len(seen[0]) == len(seen[1]) == 8  # 4 steps x 2 micro-batches per rank
    starts = [s for batches in seen for batch in batches for s in batch]
    assert len(starts) == len(set(starts)) == 48


def test_global_batches_do_not_depend_on_world_size(tmp_path):
    ds = WindowDataset(arange_stream(tmp_path, 16 * 40 + 1), context_len=16, stride=16)

    def steps(world_size, batch_size):
        sampler = GlobalBatchSampler(len(ds), batch_size, 8, seed=3)
        per_rank = rank_windows(ds, sampler, world_size)
        micro = 8 // (batch_size * world_size)
        return [
            sorted(s for r in range(world_size) for b in per_rank[r][k * micro : (k + 1) * micro] for s in b)
            for k in range(len(per_rank[0]) // micro)
        ]

    reference = steps(1, 8)
    assert steps(2, 4) == reference and steps(2, 2) == reference and steps(1, 2) == reference


def test_shuffle_is_seeded_per_epoch_and_resume_skips_exactly(tmp_path):
    sampler = GlobalBatchSampler(40, batch_size=4, global_batch_size=8, seed=5)
    epoch0 = list(sampler)
    sampler.set_position(1)
    epoch1 = list(sampler)
    assert epoch0 != epoch1 and sorted(sum(epoch0, [])) == sorted(sum(epoch1, []))
    assert list(GlobalBatchSampler(40, 4, 8, seed=5)) == epoch0
    sampler.set_position(1, start_step=3)
    assert list(sampler) == epoch1[6:] and len(sampler) == len(epoch1) - 6


def rss_anon_bytes() -> int:
    """Anonymous (heap) memory of this process; memory-mapped file pages are not counted, as they are evictable."""
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    pytest.skip("needs Linux /proc")


def test_reading_windows_does_not_load_the_corpus_into_ram(tmp_path):
    n = 24 * CHUNK_TOKENS  # 96 MiB of uint32 tokens on disk
    stream = arange_stream(tmp_path, n)
    before = rss_anon_bytes()
    reopened = TokenStream(stream.path)
    ds = WindowDataset(reopened, context_len=128, stride=128)
    sampler = GlobalBatchSampler(len(ds), batch_size=8, global_batch_size=8, seed=0)
    for i, (x, _) in enumerate(make_loader(ds, sampler)):
        if i == 2000:
            break
    grown = rss_anon_bytes() - before
    assert grown < 16 * 2**20, f"heap grew by {grown / 2**20:.1f} MiB while streaming a 96 MiB token file"
