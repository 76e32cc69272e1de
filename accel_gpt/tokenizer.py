"""Tokenizers as `tiktoken.Encoding` objects; GPT-2's is built offline from ranks shipped with the package.

Nothing here touches the network for "gpt2", so training and tests run on machines without internet.
`TextStream` turns tokens into text one at a time, for printing generated text as it is produced.
"""

from __future__ import annotations

import codecs
from functools import cache
from importlib import resources

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
    ranks_path = resources.files("accel_gpt") / "assets" / "gpt2.tiktoken"
    with resources.as_file(ranks_path) as path:
        ranks = tiktoken.load.load_tiktoken_bpe(str(path))
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={END_OF_TEXT: END_OF_TEXT_ID},
    )


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
