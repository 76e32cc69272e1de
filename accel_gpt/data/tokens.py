"""Corpora tokenized once into the content-keyed token cache (`cache.py`) and read back memory-mapped.

A corpus is cut into shards of consecutive files (about `shard_bytes` each; the unit the cache keeps and that
machines share out), each tokenized by worker processes into an Arrow token file. Training memory-maps the shards'
files one after another (`TokenStream`): RAM grows with neither the corpus nor its largest file.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from accel_gpt.data import cache
from accel_gpt.data.sources import compression_of, dataset_shards, one_format, read_pieces, resolve_files
from accel_gpt.errors import UserError
from accel_gpt.tokenizer import get_tokenizer, tokenizer_id

log = logging.getLogger(__name__)

RECORD_BATCH_TOKENS = 1 << 20  # tokens per Arrow record batch: bounds memory while writing and reading
BATCH_CHARS = 1 << 20  # characters per batch of pieces that a worker tokenizes at once
SHARD_BYTES = 256 << 20  # corpus bytes per shard: few enough entries to map at once, enough to share out
MAX_TOKENIZER_PROCESSES = 12  # see cores_for_tokenizing
# Set by another thread (the one a tokenizing thread runs for) to stop tokenizing: the shard being written is
# removed, as when reading fails.
CANCEL = threading.Event()


# ----------------------------------------------------------------------------------------------- token stream
def as_numpy(column: pa.Array) -> np.ndarray:
    """A token column (integers, no nulls) as a read-only numpy view of its memory: Arrow's own `to_numpy` would
    import pandas, a large import, in every process that reads tokens."""
    dtype = np.dtype(str(column.type))
    return np.frombuffer(column.buffers()[1], dtype=dtype, count=len(column), offset=column.offset * dtype.itemsize)


class TokenStream:
    """Read-only view `[start, stop)` of token files memory-mapped from Arrow and read one after another (a corpus's
    shards), or of arrays in memory; slicing copies only what it reads."""

    def __init__(self, paths: Iterable[str | Path], start: int = 0, stop: int | None = None, _chunks=None):
        self.paths = [Path(p) for p in paths]
        if _chunks is None:
            _chunks = []
            for path in self.paths:
                reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
                _chunks += [as_numpy(reader.get_batch(i).column(0)) for i in range(reader.num_record_batches)]
        self._chunks = [c for c in _chunks if len(c)]
        self._starts = [0]  # where each chunk begins: a list, as bisect on it beats numpy for one position
        for c in self._chunks:
            self._starts.append(self._starts[-1] + len(c))
        self.start, self.stop = start, self._starts[-1] if stop is None else stop

    @classmethod
    def of(cls, tokens: np.ndarray) -> TokenStream:
        """A stream over tokens held in memory."""
        return cls([], _chunks=[tokens])

    def __len__(self) -> int:
        return self.stop - self.start

    def view(self, start: int, stop: int) -> TokenStream:
        return TokenStream(self.paths, self.start + start, self.start + stop, _chunks=self._chunks)

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Tokens `[start, stop)` of this view as int64, in `out` if given, else in a new array."""
        begin, end = self.start + start, self.start + stop
        out = np.empty(end - begin, dtype=np.int64) if out is None else out
        pos = begin
        while pos < end:
            chunk = bisect.bisect_right(self._starts, pos) - 1
            offset = pos - self._starts[chunk]
            piece = self._chunks[chunk][offset : offset + (end - pos)]
            out[pos - begin : pos - begin + len(piece)] = piece
            pos += len(piece)
        return out


# ----------------------------------------------------------------------------------------------- shards
@dataclass
class Corpus:
    """A corpus ready to tokenize: its files in shards, each the unit that the cache keeps and machines share out."""

    spec: str  # the data path as given, for messages
    role: str  # "train" or "validation", for messages
    fmt: str  # the reader: text, json, parquet, arrow (datasets' cache files) or dataset (a save_to_disk folder)
    settings: dict  # what, besides the files' bytes, keys the cache: format, tokenizer, end-of-text id, column
    column: str
    shards: list[list[Path]]
    sizes: list[int] = field(default_factory=list)  # bytes per shard: how the work is shared out
    tokenizer: str = "gpt2"  # as the config names it (the settings hold what identifies its tokens)


def plan_corpus(
    spec: str,
    tokenizer: str,
    special_token_id: int,
    role: str = "train",
    text_column: str = "text",
    files: list[Path] | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> Corpus:
    """The corpus at `spec` (or its `files`, as `resolve_data` chose them) in shards: consecutive files grouped up to
    `shard_bytes`, a larger file alone, a saved dataset folder whole. Reads no file's content."""
    try:
        files = resolve_files(spec) if files is None else files
        fmt = one_format(spec, files)
        sizes = [sum(_size(f) for f in (dataset_shards(f) if fmt == "dataset" else [f])) for f in files]
    except UserError as err:
        raise UserError(f"{role} data: {err}") from None
    # A tokenizer folder is keyed by its content: two tokenizers, two entries; the same one moved, the same entries.
    settings = {"format": fmt, "tokenizer": tokenizer_id(tokenizer), "special_token_id": special_token_id}
    if fmt != "text" and text_column != "text":  # the default stays out of the key: entries made before it still hit
        settings["text_column"] = text_column
    corpus = Corpus(spec, role, fmt, settings, text_column, [], tokenizer=tokenizer)
    for path, size in zip(files, sizes):
        if not corpus.shards or corpus.sizes[-1] + size > shard_bytes:
            corpus.shards.append([])
            corpus.sizes.append(0)
        corpus.shards[-1].append(path)
        corpus.sizes[-1] += size
    return corpus


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None


def share_out(sizes: list[int], machines: int) -> list[int]:
    """Which machine tokenizes each shard: the largest shard first, each to the machine with the fewest bytes so far
    (ties to the lowest index), so the machines finish at about the same time."""
    load, owner = [0] * machines, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owner[i] = min(range(machines), key=lambda m: (load[m], m))
        load[owner[i]] += sizes[i]
    return owner


def shard_entry(corpus: Corpus, index: int, cache_dir: str | Path | None) -> Path:
    """The cache folder of a shard's tokens: keyed on its files' bytes (hashed here), how each is read (a `.gz`
    name is decompressed: the same bytes named `a.txt` and `a.txt.gz` are not the same text) and the corpus's
    settings."""
    files = corpus.shards[index]
    settings = corpus.settings
    if any(compression_of(f) for f in files):  # absent when none: the keys of earlier versions still hit
        settings = settings | {"compression": [compression_of(f) for f in files]}
    return cache.entry_for(cache_dir, dataset_shards(files[0]) if corpus.fmt == "dataset" else files, settings)


@dataclass
class Built:
    entries: dict[int, Path]  # shard index -> its cache folder, usable
    tokenized: dict[int, int]  # shard index -> tokens, for the shards tokenized now (not found in the cache)
    seconds: float = 0.0

    def line(self, corpus: Corpus) -> str:
        """What tokenizing cost, for the console."""
        tokens = sum(self.tokenized.values())
        rate = f", {tokens / self.seconds:,.0f} tokens/s" if self.seconds > 0 else ""
        shards = f"{len(self.tokenized)} of {len(corpus.shards)} shards" if len(corpus.shards) > 1 else corpus.spec
        return f"tokenized {corpus.role} data: {shards}, {tokens:,} tokens in {self.seconds:.1f} s{rate}"


def build_shards(
    corpus: Corpus, indices: Iterable[int], cache_dir: str | Path | None = None, num_proc: int | None = None
) -> Built:
    """Make sure shards `indices` of `corpus` are in the cache: each is used if its entry checks out, else tokenized
    on `num_proc` worker processes (default: this machine's cores). A damaged entry is reported and rebuilt."""
    built, began = Built({}, {}), time.perf_counter()
    encoder = Encoder(corpus.tokenizer, corpus.settings["special_token_id"], num_proc)
    # On a terminal only, and cleared when done: for bad input the error is the only line.
    progress = tqdm(
        unit="char", unit_scale=True, desc=f"tokenizing {corpus.role} data", leave=False,
        disable=not sys.stderr.isatty(),
    )  # fmt: skip
    try:
        with encoder, progress:
            for index in indices:
                entry = shard_entry(corpus, index, cache_dir)
                problem = cache.check(entry)
                if problem is None:
                    cache.mark_used(entry)
                else:
                    if problem != "missing":
                        log.warning(
                            "%s data: the token cache %s is damaged (%s); rebuilding it", corpus.role, entry, problem
                        )
                    built.tokenized[index] = _tokenize_shard(corpus, index, entry, encoder, progress)
                built.entries[index] = entry
    except UserError as err:
        raise UserError(f"{corpus.role} data: {err}") from None
    if built.tokenized:
        built.seconds = time.perf_counter() - began
    return built


def open_corpus(corpus: Corpus, entries: dict[int, Path]) -> TokenStream:
    """The corpus's tokens: its shards' token files one after another."""
    stream = TokenStream(entries[i] / cache.TOKENS for i in range(len(corpus.shards)))
    if not len(stream):
        raise UserError(f"{corpus.role} data: data path {corpus.spec} contains no text")
    return stream


def tokenize_corpus(
    spec: str,
    tokenizer: str,
    special_token_id: int,
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
    role: str = "train",
    text_column: str = "text",
    files: list[Path] | None = None,
) -> tuple[TokenStream, bool]:
    """Tokenize the corpus at `spec` (or its `files`) into the cache (default ~/.cache/accel_gpt), all of it here,
    unless its tokens are there and check out. Returns (stream, whether the cache held every shard). Errors name
    `role` ("train", "validation") and the file."""
    corpus = plan_corpus(spec, tokenizer, special_token_id, role, text_column, files)
    built = build_shards(corpus, range(len(corpus.shards)), cache_dir, num_proc)
    return open_corpus(corpus, built.entries), not built.tokenized


# ----------------------------------------------------------------------------------------------- tokenizing
def _batches(files: list[Path], fmt: str, column: str, progress: tqdm) -> Iterator[list[tuple[str, bool]]]:
    """Pieces of every document in corpus order, grouped into batches of about BATCH_CHARS characters."""
    batch, size = [], 0
    for path in files:
        for piece in read_pieces(path, fmt, column):
            if CANCEL.is_set():
                raise KeyboardInterrupt
            batch.append(piece)
            size += len(piece[0])
            if size >= BATCH_CHARS:
                progress.update(size)
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def encode(encoding, text: str) -> np.ndarray:
    try:
        return encoding.encode_to_numpy(text, disallowed_special=())  # no special tokens: ordinary encoding
    except UnicodeEncodeError:  # lone surrogates (JSON escapes): replaced, as tiktoken's encode_ordinary does
        return encoding.encode_to_numpy(
            text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"), disallowed_special=()
        )


def token_dtype(tokenizer: str) -> type:
    return np.uint16 if get_tokenizer(tokenizer).n_vocab <= 2**16 else np.uint32


def piece_tokens(encoding, text: str, ends_document: bool, eot_id: int) -> np.ndarray:
    """A piece of a document's tokens, and the end-of-text id after it where it ends the document, as GPT-2 saw
    documents: the one rule of both modes."""
    ids = encode(encoding, text)
    return np.append(ids, np.array(eot_id, dtype=ids.dtype)) if ends_document else ids


def encode_batch(tokenizer: str, batch: list[tuple[str, bool]], eot_id: int) -> np.ndarray:
    """A batch of pieces' tokens (`piece_tokens`). Takes the tokenizer's name, not the tokenizer: in a worker process
    `get_tokenizer` finds the one it inherited (or builds it once)."""
    encoding = get_tokenizer(tokenizer)
    parts = [piece_tokens(encoding, text, ends_document, eot_id) for text, ends_document in batch]
    return np.concatenate(parts).astype(token_dtype(tokenizer))


def cores_for_tokenizing() -> int:
    """The cores this process may run on, at most MAX_TOKENIZER_PROCESSES: beyond that this process, which reads
    and writes for all of them, could not keep the workers busy (benchmarks/RESULTS.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, MAX_TOKENIZER_PROCESSES)


def _quiet_worker() -> None:
    # Ctrl-C reaches the whole process group: the worker leaves it to this process, which shuts the pool down,
    # instead of printing a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Encoder:
    """Encodes batches of pieces in order on `workers` processes, at most two batches per worker in flight, so
    memory is bounded whatever the corpus size. Processes, not threads: tiktoken releases the GIL, but the batches'
    Python work does not, and threads stop scaling first (benchmarks/RESULTS.md). They are forked (so they inherit
    the tokenizer) when a second batch shows that there is work to share; where fork is not safe, threads."""

    def __init__(self, tokenizer: str, eot_id: int, workers: int | None = None):
        self.tokenizer, self.eot_id, self.workers = tokenizer, eot_id, workers or cores_for_tokenizing()
        self.pool: Executor | None = None

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=exc[0] is None, cancel_futures=True)
            self.pool = None

    def _start(self) -> Executor:
        if sys.platform == "linux":
            fork = multiprocessing.get_context("fork")
            return ProcessPoolExecutor(self.workers, mp_context=fork, initializer=_quiet_worker)
        return ThreadPoolExecutor(self.workers)

    def map(self, batches: Iterable[list[tuple[str, bool]]]) -> Iterator[np.ndarray]:
        batches = iter(batches)
        head = list(itertools.islice(batches, 2))
        if self.workers == 1 or len(head) < 2:  # one batch (a small corpus): no workers to start
            for batch in itertools.chain(head, batches):
                yield encode_batch(self.tokenizer, batch, self.eot_id)
            return
        self.pool = self.pool or self._start()
        pending = deque()
        for batch in itertools.chain(head, batches):
            pending.append(self.pool.submit(encode_batch, self.tokenizer, batch, self.eot_id))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _write_tokens(arrays: Iterator[np.ndarray], out_file: Path, dtype) -> int:
    """Write the token arrays as Arrow record batches of RECORD_BATCH_TOKENS tokens; memory is one chunk."""
    schema = pa.schema([("tokens", pa.from_numpy_dtype(dtype))])
    chunk, filled, total = np.empty(RECORD_BATCH_TOKENS, dtype=dtype), 0, 0
    with pa.OSFile(str(out_file), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for tokens in arrays:
            total += len(tokens)
            while len(tokens):
                n = min(len(tokens), RECORD_BATCH_TOKENS - filled)
                chunk[filled : filled + n] = tokens[:n]
                filled, tokens = filled + n, tokens[n:]
                if filled == RECORD_BATCH_TOKENS:
                    writer.write_batch(pa.record_batch([pa.array(chunk)], schema=schema))
                    filled = 0
        if filled:
            writer.write_batch(pa.record_batch([pa.array(chunk[:filled])], schema=schema))
    return total


def _tokenize_shard(corpus: Corpus, index: int, entry: Path, encoder: Encoder, progress: tqdm) -> int:
    """Tokenize one shard into a temporary file and install it as `entry`; returns its token count. A failure
    leaves nothing behind (a concurrent builder's temporary file stays)."""
    files = corpus.shards[index]
    tmp = cache.temp_tokens(entry)
    try:
        batches = _batches(files, corpus.fmt, corpus.column, progress)
        num_tokens = _write_tokens(encoder.map(batches), tmp, token_dtype(corpus.tokenizer))
        built_by = {"host": socket.gethostname(), "pid": os.getpid()}
        meta = {**corpus.settings, "files": [str(f) for f in files], "num_tokens": num_tokens, "built_by": built_by}
        cache.install(entry, tmp, meta)
    except BaseException:
        tmp.unlink(missing_ok=True)
        try:  # a failed first build leaves no empty tokens-* folder behind; a concurrent builder's stays
            entry.rmdir()
        except OSError:
            pass
        raise
    return num_tokens


def __getattr__(name: str):  # names of earlier releases (accel_gpt/compat.py)
    from accel_gpt.compat import old_name

    return old_name(__name__, name)
