"""Training a byte-level BPE tokenizer on a corpus with Hugging Face `tokenizers` (on every core), and the folder it
is written to: `tokenizer.json` in Hugging Face's format, and `manifest.json` saying what it is and was trained on.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from accel_gpt.errors import UserError
from accel_gpt.tokenizer import (
    END_OF_TEXT,
    MANIFEST_FILE,
    PATTERNS,
    TOKENIZER_FILE,
    bpe_merges,
    bytes_to_unicode,
)

BLOCK_CHARS = 1 << 16  # text is read in blocks of at most this many characters, the end of each held out
HELD_OUT_EVERY = 10  # the last tenth of each block
HELD_OUT_CHARS = 1 << 21  # most held-out characters kept to measure the compression on
MIN_VOCAB_SIZE = 257 + 1  # the 256 bytes, one merge at least, and the end-of-text token
MAX_VOCAB_SIZE = 1 << 20


@dataclass
class Trained:
    ranks: dict[bytes, int]  # each token's bytes and its id, in the order of its merge: tiktoken's ranks
    characters: int  # trained on
    documents: int
    held_out: list[str]  # blocks held out, for the compression report
    seconds: float


def documents_of(source) -> Iterator[str]:
    """The documents of a data path's or dataset's training files (`data.streaming`'s sources), read as the token
    cache reads them, one at a time: memory holds one document, whatever the corpus's size."""
    for shard in range(source.num_shards):
        parts = []
        for _, piece, ends in source.documents(shard, 0):
            parts.append(piece)
            if ends:
                yield "".join(parts)
                parts = []
        if parts:
            yield "".join(parts)


def blocks_of(documents: Iterator[str], max_chars: int | None) -> Iterator[tuple[str, bool]]:
    """The documents in blocks of at most BLOCK_CHARS characters, the last 1/HELD_OUT_EVERY of each held out (so a
    corpus of one long document, or a small one, is held out from too), up to `max_chars` characters in all: (text,
    whether it is held out)."""
    total = 0
    for document in documents:
        for start in range(0, len(document), BLOCK_CHARS):
            block = document[start : start + BLOCK_CHARS]
            if max_chars is not None:
                block = block[: max_chars - total]
            cut = len(block) - len(block) // HELD_OUT_EVERY
            yield block[:cut], False
            if cut < len(block):
                yield block[cut:], True
            total += len(block)
            if max_chars is not None and total >= max_chars:
                return


def train_bpe(documents: Iterator[str], vocab_size: int, pattern: str, max_chars: int | None = None) -> Trained:
    """A byte-level BPE of `vocab_size` ids (the end-of-text the last) trained on `documents` with `tokenizers`,
    its text split by `PATTERNS[pattern]` first; its ids rank its merges, so tiktoken encodes with it."""
    try:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise UserError(
            'training a tokenizer needs Hugging Face\'s tokenizers package: pip install -e ".[tokenizer]" '
            "(training a model with one does not)"
        ) from None

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERNS[pattern]), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[END_OF_TEXT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )  # fmt: skip
    held_out, counts = [], {"characters": 0, "documents": 0, "held_out": 0}
    progress = tqdm(unit="char", unit_scale=True, desc="reading", disable=not sys.stderr.isatty(), leave=False)

    def training_blocks() -> Iterator[str]:
        for block, held in blocks_of(counted(documents), max_chars):
            progress.update(len(block))
            if held:
                if counts["held_out"] < HELD_OUT_CHARS:
                    held_out.append(block)
                    counts["held_out"] += len(block)
                continue
            counts["characters"] += len(block)
            yield block

    def counted(docs: Iterator[str]) -> Iterator[str]:
        for document in docs:
            counts["documents"] += 1
            yield document

    began = time.perf_counter()
    with progress:
        tokenizer.train_from_iterator(training_blocks(), trainer)
    if not counts["characters"]:
        raise UserError("the training data holds no text")
    decoder = {char: byte for byte, char in bytes_to_unicode().items()}
    by_id = sorted((i, token) for token, i in tokenizer.get_vocab().items() if token != END_OF_TEXT)
    ranks = {bytes(decoder[c] for c in token): rank for rank, (_, token) in enumerate(by_id)}
    return Trained(ranks, counts["characters"], counts["documents"], held_out, time.perf_counter() - began)


def tokenizer_json(ranks: dict[bytes, int], pattern: str) -> str:
    """Byte-level BPE `ranks` (and the end-of-text after them) in Hugging Face's tokenizer.json: its merges are the
    ones `bpe_merges` derives from the ranks, so Hugging Face encodes text to the ids tiktoken does with them."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = bytes_to_unicode()

    def spelled(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    vocab = {spelled(token): rank for token, rank in ranks.items()} | {END_OF_TEXT: len(ranks)}
    merges = [(spelled(a), spelled(b)) for a, b in bpe_merges(ranks)]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERNS[pattern]), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(END_OF_TEXT, special=True, normalized=False)])
    return tokenizer.to_str(pretty=False)


def write_tokenizer(out: Path, ranks: dict[bytes, int], pattern: str, trained_on: dict, max_length: int = 1024) -> str:
    """Write the tokenizer's files into `out` (made if needed); returns its content hash."""
    text = tokenizer_json(ranks, pattern)
    digest = hashlib.sha256(text.encode()).hexdigest()
    out.mkdir(parents=True, exist_ok=True)
    (out / TOKENIZER_FILE).write_text(text, encoding="utf-8")
    special = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              "clean_up_tokenization_spaces": False, **special}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    manifest = {"vocab_size": len(ranks) + 1, "sha256": digest, "pattern": pattern, "trained_on": trained_on}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    return digest


def compression(tokenizer, blocks: list[str]) -> dict:
    """Tokens per character and UTF-8 bytes per token of `blocks` (a document each) under `tokenizer`."""
    characters = sum(map(len, blocks))
    tokens = sum(len(tokenizer.encode_ordinary(b)) for b in blocks)
    return {"tokens_per_char": tokens / characters, "bytes_per_token": sum(len(b.encode()) for b in blocks) / tokens}
