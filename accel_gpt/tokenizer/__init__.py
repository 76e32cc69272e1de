"""Tokenizers as `tiktoken.Encoding` objects: GPT-2's, built offline from ranks shipped with the package; a folder
holding a byte-level BPE `tokenizer.json` (`python -m accel_gpt.tokenizer train` makes one: `training.py`); or
tiktoken's own. `TextStream` turns tokens into text one at a time, for printing generated text as it is produced.
"""

from __future__ import annotations

import codecs
import hashlib
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


# GPT-4's (cl100k): letters without a leading space after punctuation, digits in threes, newlines apart.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}  # the split patterns a trained tokenizer may use
TOKENIZER_FILE, MANIFEST_FILE = "tokenizer.json", "manifest.json"  # a tokenizer folder's


@cache
def get_tokenizer(name: str = "gpt2") -> tiktoken.Encoding:
    """Return the tokenizer `name`: "gpt2" from bundled ranks, a folder holding a byte-level BPE `tokenizer.json`
    (trained by `python -m accel_gpt.tokenizer train`, or a Hugging Face tokenizer's), or any other tiktoken
    encoding by its own name."""
    if name == "gpt2":
        return tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=gpt2_ranks(),
            special_tokens={END_OF_TEXT: END_OF_TEXT_ID},
        )
    if is_tokenizer_folder(name):
        return load_tokenizer_folder(Path(name).expanduser())
    try:
        return tiktoken.get_encoding(name)
    except ValueError:
        names = ", ".join(tiktoken.list_encoding_names())
        raise UserError(
            f"unknown tokenizer {name!r}: no folder of that name, and not one of tiktoken's encodings ({names})"
        ) from None
    except OSError as err:  # tiktoken downloads other encodings' ranks on first use
        raise UserError(f"tokenizer {name!r} is not cached and could not be downloaded ({err}); use gpt2") from None


def is_tokenizer_folder(name: str) -> bool:
    """Whether tokenizer `name` names a folder (a path, not one of tiktoken's names)."""
    return Path(name).expanduser().is_dir() or "/" in name or name.startswith(".")


def tokenizer_id(name: str) -> str:
    """What identifies tokenizer `name`'s tokens, for the token cache's keys and a run's checks: the name of a
    built-in one, a folder's content hash (two folders of one tokenizer share their cache entries)."""
    if not is_tokenizer_folder(name):
        return name
    return "sha256:" + hashlib.sha256(tokenizer_file(Path(name).expanduser()).read_bytes()).hexdigest()


def carried_files(name: str) -> dict[str, bytes]:
    """What a run saves of tokenizer `name` with every checkpoint, so that the checkpoint is a tokenizer folder too
    (`get_tokenizer(checkpoint)`): a folder's tokenizer files; nothing for a built-in one, found by its name."""
    if not is_tokenizer_folder(name):
        return {}
    folder = Path(name).expanduser()
    return {f: (folder / f).read_bytes() for f in (TOKENIZER_FILE, "tokenizer_config.json") if (folder / f).is_file()}


def tokenizer_file(folder: Path) -> Path:
    if not folder.is_dir():
        raise UserError(f"tokenizer {folder} is not a folder: give gpt2, a tiktoken name, or a tokenizer's folder")
    if not (folder / TOKENIZER_FILE).is_file():
        raise UserError(
            f"tokenizer {folder} holds no {TOKENIZER_FILE}: train one with python -m accel_gpt.tokenizer train, or "
            "give a Hugging Face tokenizer's folder"
        )
    return folder / TOKENIZER_FILE


def load_tokenizer_folder(folder: Path) -> tiktoken.Encoding:
    """A byte-level BPE `tokenizer.json` as a tiktoken encoding (tiktoken encodes on every core faster than
    `tokenizers` does, and reading the file needs neither): its ids rank its merges, and its split pattern is read
    from its pre-tokenizer. Anything else is refused in one line."""
    path = tokenizer_file(folder)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        model = spec["model"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"tokenizer {path} is not a tokenizer.json ({err})") from None
    try:
        return _byte_level_bpe(spec, model, folder, path)
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as err:  # a field of the wrong form
        raise UserError(f"tokenizer {path} is not a valid tokenizer.json ({type(err).__name__}: {err})") from None


def _byte_level_bpe(spec: dict, model: dict, folder: Path, path: Path) -> tiktoken.Encoding:
    if model.get("type") != "BPE":
        raise UserError(f"tokenizer {path} is a {model.get('type')} model: accel_gpt reads byte-level BPE tokenizers")
    # What tokenizers and transformers would do beside the split and the merges, and tiktoken cannot: refused, or the
    # ids trained on would differ from theirs (and from an exported model's tokenizer).
    if spec.get("normalizer") is not None:
        raise UserError(
            f"tokenizer {path} normalizes text first ({spec['normalizer'].get('type')}): accel_gpt reads byte-level "
            "BPE tokenizers that encode text as it is"
        )
    if (spec.get("post_processor") or {}).get("type", "ByteLevel") != "ByteLevel":
        raise UserError(
            f"tokenizer {path} adds tokens to what it encodes ({spec['post_processor'].get('type')}): accel_gpt "
            "reads byte-level BPE tokenizers that add none"
        )
    pattern = split_pattern(spec.get("pre_tokenizer"), path)
    special = {t["content"]: t["id"] for t in spec.get("added_tokens") or [] if t.get("special")}
    if END_OF_TEXT not in special:
        raise UserError(f"tokenizer {path} has no {END_OF_TEXT} token: accel_gpt ends every document with it")
    decoder = {char: byte for byte, char in bytes_to_unicode().items()}
    try:
        ranks = {
            bytes(decoder[c] for c in token): rank for token, rank in model["vocab"].items() if token not in special
        }
    except KeyError:
        raise UserError(f"tokenizer {path} is not byte-level: its tokens are not spelled in bytes") from None
    ids = [model["vocab"].get("".join(m) if isinstance(m, list) else m.replace(" ", "")) for m in model["merges"]]
    if any(a is None or b is None or a >= b for a, b in zip(ids, ids[1:])):
        raise UserError(f"tokenizer {path}: its ids do not follow its merges' order, which tiktoken needs")
    merged = sum(len(token) > 1 for token in ranks)  # every token of several bytes is made by one merge
    if len(ids) != merged:
        raise UserError(
            f"tokenizer {path} has {len(ids)} merges for {merged} tokens of several bytes: each needs the merge that "
            "makes it"
        )
    return tiktoken.Encoding(name=str(folder), pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)


def split_pattern(pre_tokenizer: dict | None, path: Path) -> str:
    """The regular expression a byte-level pre-tokenizer splits text with: GPT-2's for a ByteLevel one that splits
    itself, or the pattern of the Split before it."""
    steps = (pre_tokenizer or {}).get("pretokenizers") or [pre_tokenizer or {}]
    kinds = [step.get("type") for step in steps]
    if steps[-1].get("add_prefix_space"):
        raise UserError(
            f"tokenizer {path} puts a space before every text (add_prefix_space): accel_gpt reads byte-level BPE "
            "tokenizers that encode text as it is"
        )
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PATTERN
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        if regex and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
            return regex
    raise UserError(
        f"tokenizer {path} does not split text as byte-level BPE does (pre-tokenizer {kinds}): accel_gpt reads "
        "byte-level BPE tokenizers"
    )


@cache
def gpt2_ranks() -> dict[bytes, int]:
    """GPT-2's byte-level BPE: each token's bytes and its rank (its id), from the ranks shipped with the package."""
    with resources.as_file(resources.files("accel_gpt") / "assets" / "gpt2.tiktoken") as path:
        return tiktoken.load.load_tiktoken_bpe(str(path))


# ----------------------------------------------------------------------------------------------- Hugging Face files
# What export writes of a tokenizer: GPT-2's files, or a tokenizer folder's tokenizer.json and the configs.
HF_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


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
    """Tokenizer `name` as Hugging Face's files (`AutoTokenizer.from_pretrained(out)` loads them offline and gives
    the ids accel_gpt's own encoding gives): GPT-2's, or a tokenizer folder's `tokenizer.json`; the names written.
    tiktoken's other encodings have none: []."""
    special = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT}
    if is_tokenizer_folder(name):
        (out / TOKENIZER_FILE).write_bytes(tokenizer_file(Path(name).expanduser()).read_bytes())
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
                  "clean_up_tokenization_spaces": False, **special}  # fmt: skip
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
        return [TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json"]
    if name != "gpt2":
        return []
    chars = bytes_to_unicode()

    def spelled(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    vocab = {spelled(token): rank for token, rank in gpt2_ranks().items()} | {END_OF_TEXT: END_OF_TEXT_ID}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = [f"{spelled(a)} {spelled(b)}" for a, b in gpt2_merges()]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length, "add_prefix_space": False, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]


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
