"""Streaming mode (`--streaming true`): documents read while training runs, for corpora too large to tokenize ahead.

Readers in DataLoader workers read their shards of the corpus and tokenize them; the training process packs the
tokens into windows, shuffles them through a seeded buffer and cuts micro-batches. Everything that says where the
stream is (each reader's position, the tokens not yet in a window, the buffer, its generator) is small and saved
with every checkpoint, so a resumed run continues the very stream it left. docs/data.md#streaming has the rules.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from accel_gpt.data.packing import BEST_FIT_DOCUMENTS, BestFit
from accel_gpt.data.sources import (
    TABLE_ROWS,
    check_split,
    check_text_column,
    dataset_errors,
    dataset_shards,
    format_of,
    pieces,
    read_pieces,
    text_values,
)
from accel_gpt.data.tokens import piece_tokens, token_dtype
from accel_gpt.data.windows import already_collated
from accel_gpt.errors import UserError
from accel_gpt.tokenizer import get_tokenizer

READER_CHUNK_TOKENS = 1 << 16  # tokens a reader hands over at once (whole documents: a chunk ends at a document's end)


# ----------------------------------------------------------------------------------------------- sources
class FileSource:
    """Corpus files as a stream: each file a shard (a saved dataset: each of its Arrow files), read by the same
    readers as the token cache uses, so the documents are the same."""

    def __init__(self, files: list[Path], column: str):
        self.column = column
        self.files = [s for f in files for s in (dataset_shards(f) if f.is_dir() else [f])]
        self.formats = [format_of(f) for f in self.files]
        self.num_shards = len(self.files)

    def fingerprint(self) -> list[list]:
        return files_fingerprint(self.files)

    def documents(self, shard: int, start: int) -> Iterator[tuple[int, str, bool]]:
        """(document index, piece, ends_document) for the documents of `shard` from index `start` on."""
        index = 0
        for piece, ends in read_pieces(self.files[shard], self.formats[shard], self.column):
            if index >= start:
                yield index, piece, ends
            index += ends


def files_fingerprint(files: list) -> list[list]:
    """What identifies a stream's files for a resume: each local file's name, size and modification time (a file
    edited or truncated in place between a checkpoint and its resume changes them); a remote file's address, which
    names the revision it comes from."""
    prints = []
    for file in files:
        try:
            stat = os.stat(file)
        except (OSError, TypeError, ValueError):
            prints.append([str(file)])
            continue
        prints.append([str(file), stat.st_size, stat.st_mtime_ns])
    return prints


class DatasetSource:
    """A Hugging Face dataset loaded with `load_dataset(..., streaming=True)`: its shards (data files, or row groups
    of parquet files where there are too few files for the readers) read as Arrow tables."""

    def __init__(self, dataset, name: str, column: str, split_names: list[str], files: list[str]):
        self.dataset, self.name, self.column, self.split_names = dataset, name, column, split_names
        self.num_shards = dataset.num_shards
        self.files = files  # the split's data files, as `datasets` resolved them (local paths or hf:// addresses)

    def fingerprint(self) -> list[list]:
        return files_fingerprint(self.files)

    def documents(self, shard: int, start: int) -> Iterator[tuple[int, str, bool]]:
        part = self.dataset.shard(num_shards=self.num_shards, index=shard, contiguous=True)
        where, row = Path(f"{self.name} shard {shard}"), 0
        try:
            for table in part.with_format("arrow").iter(batch_size=TABLE_ROWS):
                if row + len(table) > start:  # rows before `start` are skipped without being decoded
                    skip = max(0, start - row)
                    check_text_column(where, table.schema, self.column)
                    column = table.column(self.column).slice(skip)
                    for texts in text_values(where, [column], self.column, first_row=row + skip):
                        for index, text in enumerate(texts, row + skip):  # a document is a row, empty or not
                            for piece, ends in pieces([text]):
                                yield index, piece, ends
                row += len(table)
        except (OSError, pa.ArrowException) as err:  # a file that cannot be read, or the network gone
            raise UserError(f"could not read {where} at row {row}: {err}") from None


def open_dataset_source(name: str, config: str | None, split: str, column: str, readers: int) -> DatasetSource:
    """Dataset `name`'s `split` streamed, in at least `readers` shards where it can be."""
    import datasets  # here only: importing it takes seconds

    with dataset_errors(name, "cannot be streamed: the Hub cannot be reached ({err})"):
        split_names = datasets.get_dataset_split_names(name, config)
        check_split(name, split, split_names)
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
    if stream.num_shards < readers:  # parquet files split into their row groups
        stream = stream.reshard()
    try:
        data_files = datasets.load_dataset_builder(name, config).config.data_files or {}
    except Exception:  # a loading script or builder without data files: nothing to fingerprint (the name is kept)
        data_files = {}
    return DatasetSource(stream, name, column, split_names, [str(f) for f in data_files.get(split, [])])


Source = FileSource | DatasetSource


# ----------------------------------------------------------------------------------------------- readers
@dataclass(frozen=True)
class Readers:
    """How a stream is shared out: `count` readers (processes x workers per process), each reading every `count`-th
    shard of each epoch's seeded shard order or, with fewer shards than readers, every `count`-th document of
    every shard. What comes before `start` (shard, document, tokens into it) in the corpus's own order is the
    held-out validation slice, never trained on."""

    count: int
    seed: int
    start: tuple[int, int, int] = (0, 0, 0)

    def shard_order(self, num_shards: int, epoch: int) -> list[int]:
        return np.random.default_rng([self.seed, epoch]).permutation(num_shards).tolist()

    def shard_start(self, shard: int) -> tuple[int, int] | None:
        """Where reading `shard` begins, (document, tokens into it); None for a shard wholly held out."""
        held_shard, document, tokens = self.start
        return None if shard < held_shard else (document, tokens) if shard == held_shard else (0, 0)


def document_tokens(
    source, shard: int, start: int, skip: int, tokenizer: str, eot_id: int, keep=None
) -> Iterator[tuple[int, np.ndarray, bool, int]]:
    """(document, tokens, ends_document, the document's tokens so far) for each piece of `shard`'s documents from
    `start` on, end-of-text after each document; the first `skip` tokens of document `start` left out (but counted),
    documents that `keep` refuses not tokenized."""
    encoding = get_tokenizer(tokenizer)
    current, so_far = None, 0
    for document, piece, ends in source.documents(shard, start):
        if keep is not None and not keep(document):
            continue
        if document != current:
            current, so_far = document, 0
        ids = piece_tokens(encoding, piece, ends, eot_id)
        so_far += len(ids)
        if skip and document == start:
            dropped = min(skip, len(ids))
            ids, skip = ids[dropped:], skip - dropped
        yield document, ids, ends, so_far


def after(shard_or_k: int, document: int, ends: bool, so_far: int) -> tuple[int, int, int]:
    """The position after a piece: the next document's start, or this document's token count so far."""
    return (shard_or_k, document + 1, 0) if ends else (shard_or_k, document, so_far)


def read_chunks(
    source, readers: Readers, reader: int, position: tuple[int, int, int, int], tokenizer: str, eot_id: int
) -> Iterator[tuple[np.ndarray, tuple[int, int, int, int]]]:
    """Reader `reader`'s endless stream from `position` = (epoch, index in its shard list, document, tokens into
    it): chunks of about READER_CHUNK_TOKENS tokens (a long document in several), each with the position after it.
    Epoch after epoch."""
    by_document = source.num_shards < readers.count
    keep = (lambda document: document % readers.count == reader) if by_document else None
    epoch, first, document, offset = position
    empty_epochs = 0  # whole epochs in a row that gave this reader nothing
    while True:
        order = readers.shard_order(source.num_shards, epoch)
        mine = order if by_document else order[reader :: readers.count]
        produced, whole = False, (first, document, offset) == (0, 0, 0)
        for k in range(first, len(mine)):
            if (begin := readers.shard_start(mine[k])) is None:
                continue
            if k == first and (document, offset) > begin:  # resuming past the shard's start
                begin = (document, offset)
            parts, size = [], 0
            for index, ids, ends, so_far in document_tokens(source, mine[k], *begin, tokenizer, eot_id, keep):
                parts.append(ids)
                size += len(ids)
                if size >= READER_CHUNK_TOKENS:
                    yield np.concatenate(parts), (epoch, *after(k, index, ends, so_far))
                    parts, size, produced = [], 0, True
            if parts:
                yield np.concatenate(parts), (epoch, k + 1, 0, 0)
                produced = True
        empty_epochs = empty_epochs + 1 if whole and not produced else 0
        # Reading by document, every epoch reads the same documents; by shard, another epoch deals other shards.
        if empty_epochs >= (1 if by_document else 16):
            raise UserError(
                f"stream reader {reader} of {readers.count} found no text in a whole epoch: the corpus has fewer "
                "documents (or shards with text) than processes x stream_workers; lower stream_workers"
            )
        epoch, first, document, offset = epoch + 1, 0, 0, 0


def _ignore_stop_signals(worker_id: int) -> None:
    # A scheduler's SIGTERM (and Ctrl-C's SIGINT) reach the workers too: they keep serving the training process,
    # which finishes its step, saves and shuts them down.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class ReaderDataset(IterableDataset):
    """What a DataLoader worker runs: one reader of this process, its chunks tagged with the reader's slot and the
    position after them. Worker i plays slot (rotation + i) % workers, so that after a resume the DataLoader's
    round-robin (worker 0 first) continues with the slot that was next. A UserError comes through as its line."""

    def __init__(self, source, readers: Readers, rank: int, workers: int, tokenizer: str, eot_id: int):
        self.source, self.readers, self.rank, self.slots = source, readers, rank, max(1, workers)
        self.tokenizer, self.eot_id = tokenizer, eot_id
        self.positions = [(0, 0, 0, 0)] * self.slots
        self.rotation = 0

    def __iter__(self):
        info = get_worker_info()
        slot = (self.rotation + (info.id if info else 0)) % self.slots
        reader = self.rank * self.slots + slot
        try:
            for tokens, position in read_chunks(
                self.source, self.readers, reader, self.positions[slot], self.tokenizer, self.eot_id
            ):
                yield slot, tokens, position
        except UserError as err:
            yield slot, None, str(err)


# ----------------------------------------------------------------------------------------------- batches
def documents_of(tokens: np.ndarray, eot_id: int) -> list[np.ndarray]:
    """A chunk's documents, each with its end-of-text moved to its front (as `packing.document_spans` reads the
    cache's); a document the chunk cuts off (no end-of-text yet) as it is. The end-of-text alone is no document."""
    ends = np.flatnonzero(tokens == eot_id)
    documents = [np.roll(tokens[a + 1 : b + 1], 1) for a, b in zip(np.concatenate([[-1], ends[:-1]]), ends)]
    if len(tokens) > (last := ends[-1] + 1 if len(ends) else 0):
        documents.append(tokens[last:])
    return [d for d in documents if len(d) > 1]


def to_device(windows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows as (inputs, targets) on `device`."""
    windows = torch.from_numpy(windows)
    if device.type == "cuda":  # pinned: the copy to the GPU does not make the host wait
        windows = windows.pin_memory()
    inputs, targets = windows[:, :-1], windows[:, 1:]
    return inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)


class StreamBatches:
    """This process's micro-batches: its readers' chunks, consumed in the DataLoader's round-robin order, packed
    into windows of context_len + 1 tokens every `stride` tokens, drawn at random from a buffer of `buffer_size`
    windows (each draw refilled from the stream) and stacked `batch_size` at a time."""

    def __init__(
        self, readers: ReaderDataset, workers: int, batch_size: int, context_len: int, stride: int, buffer_size: int,
        device: torch.device | str, processes: int = 1, align_documents: bool = False,
    ):  # fmt: skip
        self.readers, self.workers, self.batch_size, self.processes = readers, workers, batch_size, processes
        self.span, self.stride, self.device = context_len + 1, stride, torch.device(device)
        dtype = token_dtype(readers.tokenizer)
        # align_documents: the documents read, best-fit packed into windows that each start at one (packing.py)
        self.packer = BestFit(self.span) if align_documents else None
        self.ready: list[np.ndarray] = []  # windows packed and not yet drawn
        self.pending = np.empty(0, dtype=dtype)  # tokens not yet in a window
        self.skip = 0  # tokens to drop before the next window starts (a stride beyond the last window)
        self.buffer = np.empty((buffer_size, self.span), dtype=dtype)
        self.filled = 0
        self.rng = np.random.default_rng([readers.readers.seed, readers.rank, 1])
        self.chunks = 0  # consumed so far: which slot the round-robin serves next
        self._chunks_iter = None
        # Bad data met by one of several processes: held (with the last batch trained on again) until the loop's next
        # sync with the host, where every rank stops with it, instead of one rank leaving the others in a collective.
        self.error: str | None = None
        self._last: np.ndarray | None = None

    @property
    def epoch(self) -> int:
        """The lowest epoch any of this process's readers is in."""
        return min(position[0] for position in self.readers.positions)

    def _next_chunk(self) -> None:
        if self._chunks_iter is None:  # the workers start here, from the positions restored by then
            self.readers.rotation = self.chunks % self.readers.slots
            loader = DataLoader(
                self.readers, batch_size=None, num_workers=self.workers, collate_fn=already_collated,
                worker_init_fn=_ignore_stop_signals if self.workers else None,
                prefetch_factor=4 if self.workers else None, generator=torch.Generator(),
            )  # fmt: skip
            self._chunks_iter = iter(loader)
        slot, tokens, position = next(self._chunks_iter)
        if tokens is None:
            raise UserError(f"train data: {position}")
        self.readers.positions[slot] = tuple(position)
        self.chunks += 1
        self.pending = np.concatenate([self.pending, tokens.astype(self.pending.dtype)])

    def _next_window(self) -> np.ndarray:
        if self.packer is not None:
            return self._next_packed_window()
        while True:
            dropped = min(self.skip, len(self.pending))
            self.pending, self.skip = self.pending[dropped:], self.skip - dropped
            if not self.skip and len(self.pending) >= self.span:
                break
            self._next_chunk()
        self.skip = self.stride  # the next window starts `stride` tokens after this one
        return self.pending[: self.span].copy()

    def _next_packed_window(self) -> np.ndarray:
        """The next window of documents packed best-fit, each with its end-of-text first, `BEST_FIT_DOCUMENTS` (at
        least) waiting to choose from. A document longer than a reader's chunk arrives cut where the chunk ends."""
        while not self.ready:
            if len(self.packer) >= BEST_FIT_DOCUMENTS and (pieces := self.packer.window()) is not None:
                self.ready.append(np.concatenate([item[offset : offset + n] for item, offset, n in pieces]))
                break
            self._next_chunk()
            eot = self.readers.eot_id
            for document in documents_of(self.pending, eot):
                for window in self.packer.add(document, len(document)):
                    self.ready += [document[offset : offset + n] for _, offset, n in window]
            self.pending = self.pending[:0]
        return self.ready.pop(0)

    def _shuffled_window(self) -> np.ndarray:
        if not len(self.buffer):
            return self._next_window()
        while self.filled < len(self.buffer):
            self.buffer[self.filled] = self._next_window()
            self.filled += 1
        i = int(self.rng.integers(self.filled))
        window = self.buffer[i].copy()
        self.buffer[i] = self._next_window()
        return window

    def next_windows(self, count: int) -> np.ndarray:
        """The next `count` windows `[count, context_len + 1]` of the stream, as int64. Bad data met with several
        processes is held in `error` (these windows are the last ones again) for the loop's next sync."""
        if self.error is None:
            try:
                self._last = np.stack([self._shuffled_window() for _ in range(count)]).astype(np.int64)
            except UserError as err:
                if self.processes == 1:
                    raise
                self.error = str(err)
        if self._last is None or len(self._last) != count:  # bad data before the first batch
            self._last = np.zeros((count, self.span), dtype=np.int64)
        return self._last.copy()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return to_device(self.next_windows(self.batch_size), self.device)

    def steps(self, state, total_steps: int) -> Iterator[Iterator]:
        """For each step left, the iterator its micro-batches come from (as `EpochBatches.steps` gives the token
        cache's windows); the state's epoch follows the readers'."""
        batches = iter(self.next_batch, None)
        while state.global_step < total_steps:
            state.epoch = self.epoch
            yield batches

    # ------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Where this process's stream is: arrays for safetensors, the rest for JSON."""
        state = {
            "arrays": {"pending": self.pending.copy(), "buffer": self.buffer[: self.filled].copy()},
            "meta": {"positions": [list(p) for p in self.readers.positions], "chunks": self.chunks,
                     "skip": self.skip, "rng": self.rng.bit_generator.state},
        }  # fmt: skip
        if self.packer is not None:  # the documents waiting, in the order they arrived, and the windows packed
            waiting = sorted(self.packer.waiting, key=lambda w: w[1])
            state["arrays"] |= {
                "waiting": np.concatenate([self.pending[:0]] + [item[o : o + n] for n, _, item, o in waiting]),
                "waiting_lengths": np.array([n for n, *_ in waiting], dtype=np.int64),
                "waiting_arrivals": np.array([a for _, a, *_ in waiting], dtype=np.int64),
                "ready": np.stack(self.ready) if self.ready else np.empty((0, self.span), self.pending.dtype),
            }
            state["meta"]["arrivals"] = self.packer.arrivals
        return state

    def load_state_dict(self, state: dict) -> None:
        arrays, meta = state["arrays"], state["meta"]
        if self.packer is not None:
            if "waiting" not in arrays:
                raise UserError(
                    "the checkpoint's stream was not aligned to documents: resume with align_documents false"
                )
            tokens, at = arrays["waiting"].astype(self.pending.dtype), 0
            for length, arrival in zip(arrays["waiting_lengths"].tolist(), arrays["waiting_arrivals"].tolist()):
                self.packer.waiting.append((length, arrival, tokens[at : at + length], 0))
                at += length
            self.packer.waiting.sort(key=lambda w: w[:2])
            self.packer.arrivals, self.packer.tokens = meta["arrivals"], at
            self.ready = list(arrays["ready"].astype(self.pending.dtype))
        self.pending = arrays["pending"].astype(self.pending.dtype)
        self.filled = len(arrays["buffer"])
        self.buffer[: self.filled] = arrays["buffer"]
        self.readers.positions = [tuple(p) for p in meta["positions"]]
        self.chunks, self.skip = meta["chunks"], meta["skip"]
        self.rng.bit_generator.state = meta["rng"]


def check_stream_files(saved: list, now: list, path: Path) -> None:
    """Refuse, in one line, to resume a stream whose files changed since checkpoint `path` (edited, truncated, added
    or removed): its saved position would point into other data."""
    if len(saved) != len(now):
        raise UserError(
            f"cannot resume {path}: the stream had {len(saved)} files and has {len(now)} now; resume on the data it "
            "was saved with, or start a new run from its weights with --init_from"
        )
    for before, after in zip(saved, now):
        if before != after:
            if before[0] != after[0] or len(before) != len(after):
                what = f"in place of {before[0]}"
            elif before[1] != after[1]:
                what = f"its size: {before[1]:,} -> {after[1]:,} bytes"
            else:
                what = "its modification time: edited in place"
            raise UserError(
                f"cannot resume {path}: the stream's file {after[0]} changed since the checkpoint ({what}); resume on "
                "the data it was saved with, or start a new run from its weights with --init_from"
            )


# ----------------------------------------------------------------------------------------------- fixed slices
def read_slice(
    source, start: tuple[int, int, int], count: int, tokenizer: str, eot_id: int
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """`count` tokens of `source` in its own order (shard 0 first) from `start` = (shard, document, tokens into it),
    and where they end, in the same terms: the fixed slices that evaluation reads. Fewer if the source ends first."""
    parts, size = [], 0
    for shard in range(start[0], source.num_shards):
        document, skip = start[1:] if shard == start[0] else (0, 0)
        for index, ids, ends, so_far in document_tokens(source, shard, document, skip, tokenizer, eot_id):
            taken = ids[: count - size]
            parts.append(taken)
            size += len(taken)
            if size == count:
                end = after(shard, index, ends and len(taken) == len(ids), so_far - (len(ids) - len(taken)))
                return np.concatenate(parts).astype(token_dtype(tokenizer)), end
    tokens = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint32)
    return tokens.astype(token_dtype(tokenizer)), (source.num_shards, 0, 0)


def __getattr__(name: str):  # names of earlier releases (accel_gpt/compat.py)
    from accel_gpt.compat import old_name

    return old_name(__name__, name)
