"""Windows that start at a document (`--align_documents`): a corpus's documents, each with its end-of-text token
first, packed best-fit into windows, so no window starts mid-document.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np

from accel_gpt.data.tokens import TokenStream
from accel_gpt.data.windows import Windows

SCAN_TOKENS = 1 << 22  # tokens read at once while finding the documents' ends
BEST_FIT_DOCUMENTS = 1000  # documents a window's filling chooses from (nanochat's best-fit packing buffer)


def document_spans(stream: TokenStream, eot_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Each document as a span with its end-of-text token first, as GPT-2 saw a document begin: (starts, lengths).
    A document after the first starts at the end-of-text that ends the one before it; the first has none before it
    and starts at -1 (one is put in front of it when read). A span of the end-of-text alone is no document."""
    ends = [
        np.flatnonzero(stream.read(pos, min(pos + SCAN_TOKENS, len(stream))) == eot_id) + pos
        for pos in range(0, len(stream), SCAN_TOKENS)
    ]
    eots = np.concatenate([np.zeros(0, dtype=np.int64), *ends])
    starts = np.concatenate([[-1], eots])
    lengths = np.concatenate([eots, [len(stream)]]) - starts
    keep = lengths > 1
    return starts[keep], lengths[keep]


@dataclass
class Packing:
    """Windows as pieces of documents: window i is pieces `offsets[i]:offsets[i + 1]`, piece p the tokens
    `[starts[p], starts[p] + lengths[p])` (a start of -1: an end-of-text, then the corpus's first tokens)."""

    starts: np.ndarray
    lengths: np.ndarray
    offsets: np.ndarray
    documents: int  # in the corpus
    tokens: int  # in the corpus, end-of-text tokens included

    @property
    def kept(self) -> int:
        return int(self.lengths.sum())

    def line(self, role: str) -> str:
        """What packing made of the corpus, for the console: the share of its tokens no window holds."""
        windows = len(self.offsets) - 1
        dropped = 1 - self.kept / max(1, self.tokens)
        return (
            f"align_documents: {role} data's {self.documents:,} documents packed into {windows:,} windows; "
            f"{dropped:.1%} of its tokens dropped (the ends of documents cut to fill a window, the last partial window)"
        )


class BestFit:
    """Best-fit packing of documents into windows of `span` tokens (nanochat's, with long documents kept): a window
    is filled with the longest waiting document that fits what is left of it, again and again; when none fits,
    with the start of the shortest waiting one, whose rest is dropped, so every window is full and starts at a
    document. A document longer than a window first fills windows of its own, one after another (the only windows
    that start inside a document: a book is not cut down to its first window), and its last part waits like a
    short document. A document is any `item` (a position, an array), read from `offset`, `length` tokens long."""

    def __init__(self, span: int):
        self.span = span
        self.waiting: list[tuple] = []  # (length, arrival, item, offset), sorted: the longest that fits is a bisect
        self.arrivals = 0
        self.tokens = 0  # waiting

    def __len__(self) -> int:
        return len(self.waiting)

    def add(self, item, length: int, offset: int = 0) -> list[list[tuple]]:
        """Add a document; returns the windows of its own that it fills, each `[(item, offset, span)]`."""
        windows = []
        while length > self.span:
            windows.append([(item, offset, self.span)])
            offset, length = offset + self.span, length - self.span
        if length:
            bisect.insort(self.waiting, (length, self.arrivals, item, offset))
            self.arrivals += 1
            self.tokens += length
        return windows

    def window(self) -> list[tuple] | None:
        """The next window's pieces `[(item, offset, length), ...]`; None while fewer tokens than a window wait."""
        if self.tokens < self.span:
            return None
        left, pieces = self.span, []
        while left:
            fits = bisect.bisect_right(self.waiting, (left, math.inf)) - 1
            length, _, item, offset = self.waiting.pop(max(fits, 0))  # none fits: the shortest, cut
            pieces.append((item, offset, min(length, left)))
            left -= pieces[-1][2]
            self.tokens -= length
        return pieces


def pack_documents(starts: np.ndarray, lengths: np.ndarray, span: int) -> tuple[list, list, list]:
    """`BestFit` over a corpus's documents (`document_spans`), `BEST_FIT_DOCUMENTS` waiting at a time, in corpus
    order; the last partial window is dropped. Returns the pieces' starts, lengths and each window's first piece."""
    packer, following = BestFit(span), 0
    piece_starts, piece_lengths, offsets = [], [], [0]

    def emit(window: list[tuple]) -> None:
        for start, offset, length in window:
            piece_starts.append(start + offset)
            piece_lengths.append(length)
        offsets.append(len(piece_starts))

    while True:
        while (len(packer) < BEST_FIT_DOCUMENTS or packer.tokens < span) and following < len(starts):
            for window in packer.add(int(starts[following]), int(lengths[following])):
                emit(window)
            following += 1
        if (window := packer.window()) is None:
            break
        emit(window)
    return piece_starts, piece_lengths, offsets


def pack(stream: TokenStream, eot_id: int, context_len: int) -> Packing:
    starts, lengths = document_spans(stream, eot_id)
    piece_starts, piece_lengths, offsets = pack_documents(starts, lengths, context_len + 1)
    return Packing(
        np.array(piece_starts, dtype=np.int64), np.array(piece_lengths, dtype=np.int64),
        np.array(offsets, dtype=np.int64), len(starts), len(stream) + 1,
    )  # fmt: skip


class PackedWindows(Windows):
    """Windows of `context_len + 1` tokens that each start at a document (`pack`); ids in packing order."""

    def __init__(self, stream: TokenStream, eot_id: int, context_len: int, packing: Packing | None = None):
        self.stream, self.eot_id, self.context_len = stream, eot_id, context_len
        self.packing = packing or pack(stream, eot_id, context_len)

    def __len__(self) -> int:
        return len(self.packing.offsets) - 1

    def read_window(self, i: int, out: np.ndarray) -> None:
        if not 0 <= i < len(self):
            raise IndexError(i)
        packing, at = self.packing, 0
        for piece in range(packing.offsets[i], packing.offsets[i + 1]):
            start, length = int(packing.starts[piece]), int(packing.lengths[piece])
            if start < 0:  # the corpus's first document: its end-of-text put in front
                out[at] = self.eot_id
                self.stream.read(0, length - 1, out=out[at + 1 : at + length])
            else:
                self.stream.read(start, start + length, out=out[at : at + length])
            at += length
