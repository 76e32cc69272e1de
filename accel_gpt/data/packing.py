"""Windows that start at a document (`--align_documents`): a corpus's documents, each with its end-of-text token
first, packed best-fit into windows, so no window starts mid-document.
"""

from __future__ import annotations

import bisect
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


def pack_documents(starts: np.ndarray, lengths: np.ndarray, span: int) -> tuple[list, list, list]:
    """Best-fit packing of documents (in corpus order, `BEST_FIT_DOCUMENTS` waiting at a time) into windows of
    `span` tokens: each window is filled with the longest waiting document that fits what is left of it, again and
    again; when none fits, with the start of the shortest waiting one, whose rest is dropped. Every window is full.
    A document longer than a window first fills windows of its own, one after another (the only windows that
    start inside a document: a book is not reduced to its first window), and its last part waits like a short
    document. Returns the pieces' starts, lengths and each window's first piece."""
    waiting: list[tuple[int, int, int]] = []  # (length, arrival, start), sorted
    piece_starts, piece_lengths, offsets = [], [], [0]
    following = 0

    def refill() -> None:
        nonlocal following
        while len(waiting) < BEST_FIT_DOCUMENTS and following < len(starts):
            start, length = int(starts[following]), int(lengths[following])
            while length > span:
                piece_starts.append(start)
                piece_lengths.append(span)
                offsets.append(len(piece_starts))
                start, length = start + span, length - span
            if length:
                bisect.insort(waiting, (length, following, start))
            following += 1

    refill()
    while waiting:
        left, pieces = span, []
        while left and waiting:
            fits = bisect.bisect_right(waiting, (left, len(starts), 0)) - 1
            length, _, start = waiting.pop(fits) if fits >= 0 else waiting.pop(0)
            pieces.append((start, min(length, left)))
            left -= pieces[-1][1]
            refill()
        if left:  # the corpus ran out inside this window: it is dropped
            break
        for start, length in pieces:
            piece_starts.append(start)
            piece_lengths.append(length)
        offsets.append(len(piece_starts))
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
