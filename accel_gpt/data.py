"""Text -> token stream on disk (Arrow, cached) -> (input, target) windows -> world-size-independent batches.

Corpora are read with `datasets`, tokenized once by a batched `map`, and kept as a memory-mapped Arrow file, so
RAM does not grow with the corpus. `GlobalBatchSampler` fixes which windows form each optimizer step; Accelerate's
`prepare` is the single place that deals those batches out to ranks.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import uuid
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, Dataset

from accel_gpt.errors import UserError
from accel_gpt.tokenizer import get_tokenizer

BUNDLED_CORPORA = {"the-verdict": "the-verdict.txt", "tinyshakespeare": "tinyshakespeare.txt", "xiyouji": "xiyouji.txt"}
FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
CHUNK_TOKENS = 1 << 20  # tokens per Arrow record batch: bounds memory while writing and reading
CACHE_VERSION = 1  # bump when the on-disk token format changes


# ----------------------------------------------------------------------------------------------- corpus files
def resolve_files(spec: str) -> list[Path]:
    """A file, a directory (searched recursively), a glob, or a bundled corpus name -> sorted data files."""
    if spec in BUNDLED_CORPORA and not Path(spec).exists():
        return [Path(str(resources.files("accel_gpt") / "assets" / BUNDLED_CORPORA[spec]))]
    path = Path(spec).expanduser()
    if path.is_file():
        candidates = [path]
    elif path.is_dir():
        candidates = [p for p in path.rglob("*") if p.is_file()]
    else:
        candidates = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
        if not candidates:
            raise UserError(f"data path not found: {spec}")
    files = sorted(p for p in candidates if p.suffix.lower() in FORMATS)
    if not files:
        raise UserError(f"no .txt, .jsonl or .parquet files in {spec}")
    if len({FORMATS[p.suffix.lower()] for p in files}) > 1:
        raise UserError(f"{spec} mixes file formats; use one of .txt, .jsonl or .parquet per data path")
    return files


def corpus_fingerprint(files: list[Path], tokenizer: str, special_token_id: int) -> str:
    """Changes when any file's path, size or mtime changes, or when the tokenization settings do."""
    parts = [CACHE_VERSION, tokenizer, special_token_id]
    for f in files:
        st = f.stat()
        parts.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------------------------- token stream
class TokenStream:
    """Read-only view `[start, stop)` of a token file memory-mapped from Arrow; slicing copies only what it reads."""

    def __init__(self, path: str | Path, start: int = 0, stop: int | None = None, _chunks=None):
        self.path = Path(path)
        if _chunks is None:
            reader = pa.ipc.open_file(pa.memory_map(str(self.path), "r"))
            _chunks = [reader.get_batch(i).column(0).to_numpy() for i in range(reader.num_record_batches)]
        self._chunks = _chunks
        total = sum(len(c) for c in _chunks)
        self.start, self.stop = start, total if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def view(self, start: int, stop: int) -> "TokenStream":
        return TokenStream(self.path, self.start + start, self.start + stop, _chunks=self._chunks)

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Tokens `[start, stop)` of this view as int64, in `out` if given, else in a new array."""
        begin, end = self.start + start, self.start + stop
        out = np.empty(end - begin, dtype=np.int64) if out is None else out
        pos = begin
        while pos < end:
            chunk, offset = divmod(pos, CHUNK_TOKENS)
            piece = self._chunks[chunk][offset : offset + (end - pos)]
            out[pos - begin : pos - begin + len(piece)] = piece
            pos += len(piece)
        return out


def check_utf8(path: Path) -> None:
    """Raise UserError naming the first byte offset at which `path` stops being valid UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            pending = len(decoder.getstate()[0])  # bytes of a character split across chunks
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                raise UserError(
                    f"{path} is not valid UTF-8: {err.reason} at byte offset {offset - pending + err.start} "
                    "(convert it, e.g. iconv -f GB18030 -t UTF-8)"
                ) from None
            if not chunk:
                return
            offset += len(chunk)


def _encode_batch(batch: pa.Table, tokenizer: str, special_token_id: int) -> pa.Table:
    """Each non-empty document's tokens plus the end-of-text id, as one Arrow list per document."""
    texts = batch.column("text").to_pylist()
    encoded = [ids for ids in get_tokenizer(tokenizer).encode_ordinary_batch(texts, num_threads=1) if ids]
    # Built through numpy, which converts each document's list in C: handing Arrow (or datasets) millions of
    # Python ints to convert one by one costs almost as much as tokenizing them.
    # 64-bit offsets: a batch of large documents (one per text file) can exceed 2**31 tokens.
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(ids) + 1 for ids in encoded], out=offsets[1:])
    values = np.empty(offsets[-1], dtype=np.uint32)
    for ids, end in zip(encoded, offsets[1:]):
        values[end - 1 - len(ids) : end - 1] = ids
        values[end - 1] = special_token_id
    return pa.table({"ids": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))})


def _load_documents(files: list[Path], cache_dir: Path):
    from datasets import load_dataset  # heavy import, only needed on a cache miss

    fmt = FORMATS[files[0].suffix.lower()]
    kwargs = {"sample_by": "document"} if fmt == "text" else {}
    try:
        ds = load_dataset(
            fmt, data_files=[str(f) for f in files], split="train", cache_dir=str(cache_dir / "hf"), **kwargs
        )
    except Exception as err:  # datasets wraps decode and parse errors; name the cause in one line
        cause = err.__cause__ or err
        raise UserError(f"could not read {files[0].parent}: {type(cause).__name__}: {cause}") from None
    if "text" not in ds.column_names:
        raise UserError(f"{files[0]} has no 'text' field (columns: {', '.join(ds.column_names)})")
    text = ds.data.column("text")
    if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type)):
        raise UserError(f"the 'text' field in {files[0].parent} holds {text.type}, not strings")
    if text.null_count:
        raise UserError(f"{text.null_count} documents in {files[0].parent} have no 'text' value (missing or null)")
    return ds


def _write_stream(ds, out_file: Path, dtype: pa.DataType) -> int:
    """Flatten the per-document token lists into fixed-size record batches; memory is one chunk at most."""
    schema = pa.schema([("tokens", dtype)])
    pending: list[pa.Array] = []
    pending_len = total = 0
    with pa.OSFile(str(out_file), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:

        def flush(final: bool):
            nonlocal pending, pending_len
            merged = pa.concat_arrays(pending) if pending else pa.array([], dtype)
            while len(merged) >= CHUNK_TOKENS or (final and len(merged)):
                writer.write_batch(pa.record_batch([merged.slice(0, CHUNK_TOKENS)], schema=schema))
                merged = merged.slice(CHUNK_TOKENS)
            pending, pending_len = [merged], len(merged)

        for table in ds.with_format("arrow").iter(batch_size=1000):
            values = pc.list_flatten(table.column("ids")).combine_chunks().cast(dtype)
            pending.append(values)
            pending_len += len(values)
            total += len(values)
            if pending_len >= CHUNK_TOKENS:
                flush(final=False)
        flush(final=True)
    return total


def tokenize_corpus(
    spec: str, tokenizer: str, special_token_id: int, cache_dir: str | Path, num_proc: int | None = None
) -> tuple[TokenStream, bool]:
    """Tokenize the corpus at `spec` into a cached Arrow token file. Returns (stream, whether the cache was hit)."""
    files = resolve_files(spec)
    cache_dir = Path(cache_dir).expanduser()
    out_dir = cache_dir / f"tokens-{corpus_fingerprint(files, tokenizer, special_token_id)}"
    tokens_file = out_dir / "tokens.arrow"
    if tokens_file.exists():
        return TokenStream(tokens_file), True

    if FORMATS[files[0].suffix.lower()] != "parquet":  # parquet stores strings already validated
        for f in files:
            check_utf8(f)
    vocab = get_tokenizer(tokenizer).n_vocab  # loaded before the map, so forked workers inherit it ready-made
    ds = _load_documents(files, cache_dir)
    if num_proc is None:  # worker start-up only pays off on big corpora
        num_proc = min(os.cpu_count() or 1, 8) if sum(f.stat().st_size for f in files) > 64 * 2**20 else 1
    num_proc = max(1, min(num_proc, len(ds)))
    ds = ds.with_format("arrow").map(
        _encode_batch,
        fn_kwargs={"tokenizer": tokenizer, "special_token_id": special_token_id},
        batched=True,
        batch_size=64,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=ds.column_names,
        desc=f"tokenizing {spec}",
    )
    dtype = pa.uint16() if vocab <= 2**16 else pa.uint32()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Write under a unique name and rename: concurrent builders (several nodes) and crashes never leave a torn file.
    tmp = out_dir / f".tokens-{uuid.uuid4().hex}.arrow"
    try:
        num_tokens = _write_stream(ds, tmp, dtype)
        if num_tokens == 0:
            raise UserError(f"data path {spec} contains no text")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        ds.cleanup_cache_files()
    meta = {"files": [str(f) for f in files], "tokenizer": tokenizer, "num_tokens": num_tokens, "num_documents": len(ds)}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    os.replace(tmp, tokens_file)
    return TokenStream(tokens_file), False


# ----------------------------------------------------------------------------------------------- windows
class WindowDataset(Dataset):
    """Window i is tokens `[i*stride, i*stride + context_len + 1)`, returned as (input, target) shifted by one."""

    def __init__(self, stream: TokenStream, context_len: int, stride: int):
        self.stream, self.context_len, self.stride = stream, context_len, stride
        span = len(stream) - (context_len + 1)
        self.num_windows = 0 if span < 0 else span // stride + 1

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.__getitems__([i])
        return inputs[0], targets[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows `indices` as one batch `([n, context_len], [n, context_len])`, read into one buffer: the
        DataLoader calls this once per micro-batch, which costs a fraction of reading and stacking window by window
        (the host's share of a small model's step on a GPU)."""
        span = self.context_len + 1
        windows = np.empty((len(indices), span), dtype=np.int64)
        for row, i in enumerate(indices):
            if not 0 <= i < self.num_windows:
                raise IndexError(i)
            self.stream.read(i * self.stride, i * self.stride + span, out=windows[row])
        batch = torch.from_numpy(windows)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


class GlobalBatchSampler:
    """Micro-batches of window indices whose grouping into optimizer steps ignores the world size.

    Each epoch is a seeded permutation of the windows cut into steps of `global_batch_size` windows, each step into
    micro-batches of `batch_size`. Accelerate hands micro-batch k to rank k % world_size, so 1 process x batch 8 and
    2 processes x batch 4 train on the same 8 windows at every step. Incomplete final steps are dropped, so every
    rank gets the same number of batches (DDP never waits on a rank that ran out).
    """

    drop_last = True  # read by Accelerate's BatchSamplerShard

    def __init__(
        self,
        num_windows: int,
        batch_size: int,
        global_batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        max_steps_per_epoch: int | None = None,
    ):
        if global_batch_size % batch_size:
            raise ValueError("global_batch_size must be a multiple of batch_size")
        self.num_windows, self.batch_size, self.global_batch_size = num_windows, batch_size, global_batch_size
        self.seed, self.shuffle = seed, shuffle
        self.steps_per_epoch = num_windows // global_batch_size
        if max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, max_steps_per_epoch)
        self.epoch = 0
        self.start_step = 0

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        """Where the next iteration begins: resume lands here without reading the skipped windows."""
        self.epoch, self.start_step = epoch, start_step

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_windows)
        return torch.randperm(self.num_windows, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * (self.global_batch_size // self.batch_size)

    def __iter__(self):
        order = self.epoch_order(self.epoch)
        for step in range(self.start_step, self.steps_per_epoch):
            base = step * self.global_batch_size
            for offset in range(base, base + self.global_batch_size, self.batch_size):
                yield order[offset : offset + self.batch_size].tolist()


def _already_collated(batch):
    return batch  # WindowDataset.__getitems__ returns whole batches


def make_loader(dataset: WindowDataset, sampler: GlobalBatchSampler) -> DataLoader:
    # Reading a window is a memory-mapped slice, far faster than a training step: no worker processes needed.
    # A private generator: creating an iterator then draws nothing from the global RNG that dropout uses,
    # so a resumed run's dropout stream continues exactly where the checkpoint left it. Pinned batches copy to a
    # GPU without making the host wait.
    return DataLoader(dataset, batch_sampler=sampler, num_workers=0, generator=torch.Generator(),
                      collate_fn=_already_collated, pin_memory=torch.cuda.is_available())
