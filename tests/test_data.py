import codecs
import difflib
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from accelerate.data_loader import prepare_data_loader
from conftest import REPO

from accel_gpt.data import sources, tokens
from accel_gpt.data.sources import resolve_files
from accel_gpt.data.tokens import (
    RECORD_BATCH_TOKENS,
    TokenStream,
    build_shards,
    open_corpus,
    plan_corpus,
    share_out,
    tokenize_corpus,
)
from accel_gpt.data.windows import GlobalBatchSampler, WindowDataset, make_loader
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
    with pytest.raises(UserError, match=r"empty\*? matches only directories .*empty.*pattern that matches files"):
        resolve_files(str(tmp_path / "empty*"))
    with pytest.raises(UserError, match="the data path is empty"):
        resolve_files("")  # an unset $DATA must not mean "every file under the working directory"


def test_hidden_files_and_folders_are_skipped(tmp_path):
    root = write_corpus(tmp_path / "h", "txt")
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "doc0-checkpoint.txt").write_text(DOCS[0])  # a duplicate
    (root / "._doc0.txt").write_bytes(b"\x00\x05\x16\x07\x00\x02\xff\xfe")  # a macOS sidecar, not UTF-8
    expected = [root / f"doc{i}.txt" for i in range(3)]
    assert resolve_files(str(root)) == expected
    assert resolve_files(str(root / "**" / "*.txt")) == expected
    assert resolve_files(str(root / "._doc0.txt")) == [root / "._doc0.txt"]  # named explicitly, it is read


def test_byte_order_marks(tmp_path, cache_dir):
    (tmp_path / "bom").mkdir()
    (tmp_path / "bom" / "a.txt").write_bytes(codecs.BOM_UTF8 + DOCS[2].encode())
    (tmp_path / "bom.jsonl").write_bytes(codecs.BOM_UTF8 + json.dumps({"text": DOCS[2]}).encode() + b"\n")
    for spec in (tmp_path / "bom", tmp_path / "bom.jsonl"):
        stream, _ = tokenize_corpus(str(spec), "gpt2", EOS, cache_dir)
        assert stream.read(0, len(stream)).tolist() == expected_stream(DOCS[2:])  # the mark is not text
    (tmp_path / "utf16.txt").write_text(DOCS[0], encoding="utf-16")
    with pytest.raises(UserError, match="utf16.txt is not valid UTF-8: .* UTF-16 byte-order mark: .*iconv -f UTF-16"):
        tokenize_corpus(str(tmp_path / "utf16.txt"), "gpt2", EOS, cache_dir)


def write_parquet_shards(root, *columns):
    root.mkdir()
    for i, column in enumerate(columns):
        pq.write_table(pa.table({"text": pa.array(column, pa.string())}), root / f"shard{i}.parquet")
    return root


def test_errors_name_the_role_the_file_and_the_line(tmp_path, cache_dir):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(999)) + "[1, 2]\n")
    with pytest.raises(UserError, match=r"^validation data: .*rows.jsonl line 1000 is a JSON array, not an object"):
        tokenize_corpus(str(rows), "gpt2", EOS, cache_dir, role="validation")
    rows.write_text('{"text": "fine"}\n\n{"text": "cut off\n')
    with pytest.raises(UserError, match=r"^train data: .*rows.jsonl line 3 is not valid JSON: Unterminated string"):
        tokenize_corpus(str(rows), "gpt2", EOS, cache_dir)
    rows.write_text('{"text": "fine"}\n{"text": 7}\n')
    with pytest.raises(UserError, match=r"rows.jsonl line 2 has a 'text' number, not a string"):
        tokenize_corpus(str(rows), "gpt2", EOS, cache_dir)
    shards = write_parquet_shards(tmp_path / "shards", ["a"], ["b", None, None])
    with pytest.raises(
        UserError, match=r"shard1.parquet: 2 rows have no 'text' value \(null\), the first at row index 1"
    ):
        tokenize_corpus(str(shards), "gpt2", EOS, cache_dir)


def test_empty_parquet_shards_add_nothing(tmp_path, cache_dir):
    shards = write_parquet_shards(tmp_path / "shards", [], DOCS)
    stream, _ = tokenize_corpus(str(shards), "gpt2", EOS, cache_dir)
    assert stream.read(0, len(stream)).tolist() == expected_stream(DOCS)
    with pytest.raises(UserError, match=r"^train data: data path .*shard0.parquet contains no text"):
        tokenize_corpus(str(shards / "shard0.parquet"), "gpt2", EOS, cache_dir)


def random_text(seed: int, words: list[str], separators: list[str], n: int = 2000) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(words) + rng.choice(separators) for _ in range(n))


WORDS = ["the", "Cat", "a", "123", "don't", "!!", "é", "漢字", "'s", "x\u3000y"]
LARGE_TEXTS = {
    "LF lines and paragraphs": random_text(0, WORDS, [" ", " ", "\n", "\n\n", "  \n", ". ", "\n    "]),
    "CRLF and CR lines": random_text(1, WORDS, [" ", "\r\n", "\r\n\r\n", "\t", "\r"]),
    "Chinese, ideographic-space indents": random_text(2, ["悟空道：", "你好。", "，", "“好！”"], ["", "", "\n　　"]),
}


@pytest.mark.parametrize("kind", LARGE_TEXTS)
def test_a_large_file_is_tokenized_in_pieces_with_the_tokens_of_the_whole(tmp_path, cache_dir, monkeypatch, kind):
    monkeypatch.setattr(sources, "PIECE_CHARS", 300)  # ~40 pieces, read in 300-byte blocks that split characters
    text = LARGE_TEXTS[kind]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "big.txt").write_text(text, encoding="utf-8", newline="")
    (tmp_path / "c" / "small.txt").write_text(DOCS[0], encoding="utf-8")
    stream, _ = tokenize_corpus(str(tmp_path / "c"), "gpt2", EOS, cache_dir)
    enc = get_tokenizer("gpt2")
    as_read = text.replace("\r\n", "\n").replace("\r", "\n")  # line ends as in Python's text mode
    assert stream.read(0, len(stream)).tolist() == enc.encode_ordinary(as_read) + [EOS] + expected_stream(DOCS[:1])


def test_text_without_whitespace_differs_only_at_the_cuts(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr(sources, "PIECE_CHARS", 300)
    text = random_text(3, ["漢字", "abc", "!!", "123", "é"], [""], n=3000)  # nowhere to cut between pre-tokens
    (tmp_path / "blob.txt").write_text(text, encoding="utf-8")
    stream, _ = tokenize_corpus(str(tmp_path / "blob.txt"), "gpt2", EOS, cache_dir)
    enc = get_tokenizer("gpt2")
    got, whole = stream.read(0, len(stream)).tolist(), enc.encode_ordinary(text) + [EOS]
    assert enc.decode(got[:-1]) == text and got[-1] == EOS and got.count(EOS) == 1
    cuts = len(text) // 300
    opcodes = difflib.SequenceMatcher(a=whole, b=got, autojunk=False).get_opcodes()
    differing = sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in opcodes if tag != "equal")
    assert 0 < differing <= 2 * cuts, (differing, cuts)  # docs/data.md states the measured figure


@pytest.mark.slow
def test_tokenizing_a_large_file_keeps_memory_bounded(tmp_path):
    """Peak RSS growth while tokenizing one 16 MB file, in a fresh process: the whole file read at once would
    cost its text and ~5M tokens (as Python ints ~180 MB); pieces cost a few MiB each."""
    text = (REPO / "accel_gpt" / "assets" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    big = tmp_path / "big.txt"
    with open(big, "w", encoding="utf-8") as f:
        for i in range(15):
            f.write(f"Part {i}.\n{text}")
    child = f"""
import json
from accel_gpt.data.tokens import tokenize_corpus
def status(key):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key + ':')) // 1024
tokenize_corpus('the-verdict', 'gpt2', {EOS}, {str(tmp_path / "cache")!r})  # warm: imports, tokenizer, threads
base = status('VmRSS')
open('/proc/self/clear_refs', 'w').write('5')  # restart the peak (VmHWM) from here
stream, _ = tokenize_corpus({str(big)!r}, 'gpt2', {EOS}, {str(tmp_path / "cache")!r})
print(json.dumps({{'tokens': len(stream), 'growth_mib': status('VmHWM') - base}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", child],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout)
    assert measured["tokens"] > 5_000_000
    assert measured["growth_mib"] < 64, measured


def test_second_run_hits_the_cache_and_a_changed_file_misses(tmp_path, cache_dir):
    root = write_corpus(tmp_path / "c", "txt")
    first, hit1 = tokenize_corpus(str(root), "gpt2", EOS, cache_dir)
    second, hit2 = tokenize_corpus(str(root), "gpt2", EOS, cache_dir)
    assert (hit1, hit2) == (False, True) and first.paths == second.paths
    (root / "doc0.txt").write_text("Edited.", encoding="utf-8")
    os.utime(root / "doc0.txt", ns=(1, 1))
    third, hit3 = tokenize_corpus(str(root), "gpt2", EOS, cache_dir)
    assert not hit3 and third.read(0, len(third)).tolist() == expected_stream(["Edited."] + DOCS[1:])


def test_worker_processes_give_the_tokens_of_one_process(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr(tokens, "BATCH_CHARS", 20_000)  # Tiny Shakespeare in ~56 batches: the pool is used
    one, _ = tokenize_corpus("tinyshakespeare", "gpt2", EOS, cache_dir / "one", num_proc=1)
    two, _ = tokenize_corpus("tinyshakespeare", "gpt2", EOS, cache_dir / "two", num_proc=2)
    assert np.array_equal(one.read(0, len(one)), two.read(0, len(two))) and len(two) == 338_025 + 1


def test_a_corpus_in_shards_reads_as_the_whole_and_changing_a_file_retokenizes_its_shard(tmp_path, cache_dir):
    root = write_corpus(tmp_path / "c", "txt")
    for i in range(3, 7):
        (root / f"doc{i}.txt").write_text(f"Document number {i}. " * (i * 30), encoding="utf-8")
    files = sorted(root.iterdir())
    planned = plan_corpus(str(root), "gpt2", EOS, shard_bytes=1500)  # consecutive files up to 1.5 kB a shard
    assert [len(s) for s in planned.shards] == [3, 1, 1, 1, 1] and sum(planned.shards, []) == files
    sharded = open_corpus(planned, build_shards(planned, range(5), cache_dir).entries)
    whole, _ = tokenize_corpus(str(root), "gpt2", EOS, cache_dir / "whole")  # one shard
    assert np.array_equal(sharded.read(0, len(sharded)), whole.read(0, len(whole)))
    assert len(sharded.view(10, 2000).read(0, 1990)) == 1990  # reads across the shards' files
    (root / "doc5.txt").write_text("Changed.", encoding="utf-8")
    again = build_shards(plan_corpus(str(root), "gpt2", EOS, shard_bytes=1500), range(5), cache_dir)
    assert list(again.tokenized) == [3]  # only the changed file's shard is tokenized again


def test_machines_get_shares_of_about_equal_size():
    sizes = [500, 100, 400, 300, 200, 100, 100]
    owner = share_out(sizes, 3)
    loads = [sum(s for s, m in zip(sizes, owner) if m == machine) for machine in range(3)]
    assert sorted(loads) == [500, 600, 600] and share_out(sizes, 3) == owner  # deterministic
    assert share_out([7, 7], 1) == [0, 0]


def test_cache_is_keyed_on_content_not_size_or_time(tmp_path, cache_dir):
    root = write_corpus(tmp_path / "c", "txt")
    tokenize_corpus(str(root), "gpt2", EOS, cache_dir)
    doc = root / "doc1.txt"
    stat = doc.stat()
    doc.write_text(DOCS[1].replace("longer", "LONGER"), encoding="utf-8")  # same size; then the time is put back,
    os.utime(doc, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as cp -p, rsync -t and tar do
    stream, hit = tokenize_corpus(str(root), "gpt2", EOS, cache_dir)
    assert not hit and stream.read(0, len(stream)).tolist() == expected_stream([DOCS[0], doc.read_text(), DOCS[2]])
    moved = tmp_path / "elsewhere"
    shutil.copytree(root, moved)  # same contents under new paths and times: nothing to tokenize again
    assert tokenize_corpus(str(moved), "gpt2", EOS, cache_dir)[1]


def arange_stream(tmp_path, n: int) -> TokenStream:
    """A token file whose token at position p is p: window contents then reveal their position."""
    path = tmp_path / f"arange{n}.arrow"
    schema = pa.schema([("tokens", pa.uint32())])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for start in range(0, n, RECORD_BATCH_TOKENS):
            chunk = pa.array(np.arange(start, min(n, start + RECORD_BATCH_TOKENS), dtype=np.uint32))
            writer.write_batch(pa.record_batch([chunk], schema=schema))
    return TokenStream([path])


def test_windows_are_shifted_pairs_with_stride_and_cross_chunk_reads(tmp_path):
    stream = arange_stream(tmp_path, RECORD_BATCH_TOKENS + 500)
    ds = WindowDataset(stream, context_len=16, stride=8)
    assert len(ds) == (len(stream) - 17) // 8 + 1
    x, y = ds[3]
    assert x.tolist() == list(range(24, 40)) and y.tolist() == list(range(25, 41))
    i = RECORD_BATCH_TOKENS // 8 - 1  # straddles the record-batch boundary
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
    n = 24 * RECORD_BATCH_TOKENS  # 96 MiB of uint32 tokens on disk
    stream = arange_stream(tmp_path, n)
    before = rss_anon_bytes()
    reopened = TokenStream(stream.paths)
    ds = WindowDataset(reopened, context_len=128, stride=128)
    sampler = GlobalBatchSampler(len(ds), batch_size=8, global_batch_size=8, seed=0)
    for i, _ in enumerate(make_loader(ds, sampler)):
        if i == 2000:
            break
    grown = rss_anon_bytes() - before
    assert grown < 16 * 2**20, f"heap grew by {grown / 2**20:.1f} MiB while streaming a 96 MiB token file"


@pytest.mark.parametrize("document", ['[\n  {"text": "a"},\n  {"text": "b"}\n]\n', '{\n  "text": "a"\n}\n'])
def test_a_json_document_over_several_lines_is_named_as_such(tmp_path, cache_dir, document):
    """A pretty-printed .json file is valid JSON: 'line 1 is not valid JSON' alone would send the user to a
    validator that finds nothing wrong. What is wrong is the layout: one object per line."""
    (tmp_path / "data.json").write_text(document)
    with pytest.raises(
        UserError,
        match=r"data.json line 1 is not valid JSON: .* at column 2 \(one JSON document over "
        r"several lines\? .*one JSON object per line",
    ):
        tokenize_corpus(str(tmp_path / "data.json"), "gpt2", EOS, cache_dir)
