"""Tokenizers as `tiktoken.Encoding` objects; GPT-2's is built offline from ranks shipped with the package.

Nothing here touches the network for "gpt2", so training and tests run on machines without internet.
`TextStream` turns tokens into text one at a time, for printing generated text as it is produced.
"""

from __future__ import annotations

import codecs
import json
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import tiktoken
import tiktoken.load

from accel_gpt.errors import UserError

# GPT-2's original split pattern; tiktoken's r50k pattern is a faster equivalent (same tokens on all bundled text).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256


@cache
def get_tokenizer(name: str = "gpt2") -> tiktoken.Encoding:
    """Return the tokenizer `name`: "gpt2" from bundled ranks, any other tiktoken encoding by its own name."""
    if name != "gpt2":
        try:
            return tiktoken.get_encoding(name)
        except ValueError as err:
            raise UserError(f"unknown tokenizer {name!r}: {str(err).splitlines()[0]}") from None
        except OSError as err:  # tiktoken downloads other encodings' ranks on first use
            raise UserError(f"tokenizer {name!r} is not cached and could not be downloaded ({err}); use gpt2") from None
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=gpt2_ranks(),
        special_tokens={END_OF_TEXT: END_OF_TEXT_ID},
    )


@cache
def gpt2_ranks() -> dict[bytes, int]:
    """GPT-2's byte-level BPE: each token's bytes and its rank (its id), from the ranks shipped with the package."""
    with resources.as_file(resources.files("accel_gpt") / "assets" / "gpt2.tiktoken") as path:
        return tiktoken.load.load_tiktoken_bpe(str(path))


# ----------------------------------------------------------------------------------------------- Hugging Face files
HF_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, in which its vocab.json and merges.txt spell tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


@cache
def gpt2_merges() -> tuple[tuple[bytes, bytes], ...]:
    return tuple(bpe_merges(gpt2_ranks()))


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merges that build each token of byte-level BPE `ranks`, in rank order: a token's two parts are what BPE
    makes of its bytes with the merges ranked below it alone (found by running it where more than one split of the
    token is two lower-ranked tokens)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        splits = [i for i in range(1, len(token)) if ranks.get(token[:i], rank) < rank > ranks.get(token[i:], rank)]
        if len(splits) == 1:
            merges.append((token[: splits[0]], token[splits[0] :]))
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            lowest, i = min(pairs)
            if lowest >= rank:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not one merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def write_hf_tokenizer(name: str, out: Path, max_length: int) -> list[str]:
    """GPT-2's tokenizer as Hugging Face's files (`AutoTokenizer.from_pretrained(out)` loads them offline and gives
    the ids accel_gpt's own encoding gives); the names written. Other tokenizers have none yet: []."""
    if name != "gpt2":
        return []
    chars = bytes_to_unicode()

    def spelled(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    vocab = {spelled(token): rank for token, rank in gpt2_ranks().items()} | {END_OF_TEXT: END_OF_TEXT_ID}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = [f"{spelled(a)} {spelled(b)}" for a, b in gpt2_merges()]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    special = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT}
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length, "add_prefix_space": False, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return list(HF_TOKENIZER_FILES)


@cache
def token_byte_lengths(name: str = "gpt2") -> np.ndarray:
    """The UTF-8 bytes of text each token id of tokenizer `name` stands for; 0 for special tokens (the end-of-text
    marks a document's end, it is no text) and for ids that stand for nothing. Bits per byte divide by these."""
    tokenizer = get_tokenizer(name)
    lengths = np.zeros(tokenizer.n_vocab, dtype=np.int64)
    special = {tokenizer.encode_single_token(token) for token in tokenizer.special_tokens_set}
    for token_id in range(tokenizer.n_vocab):
        if token_id not in special:
            try:
                lengths[token_id] = len(tokenizer.decode_single_token_bytes(token_id))
            except KeyError:  # a hole in the id space
                pass
    return lengths


class TextStream:
    """Decodes token ids one at a time into text, emitting only complete characters.

    Byte-level BPE can split one UTF-8 character over several tokens (most Chinese characters take 2-3 bytes):
    the bytes of an unfinished character wait for the tokens that complete it. Bytes that can never form a
    character become U+FFFD, as `Encoding.decode` does, so the pieces join to the same text."""

    def __init__(self, tokenizer: tiktoken.Encoding):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text that this token completes (often '' mid-character)."""
        return self._decoder.decode(self.tokenizer.decode_single_token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is left at the end: an unfinished character's bytes, as U+FFFD."""
        return self._decoder.decode(b"", final=True)
