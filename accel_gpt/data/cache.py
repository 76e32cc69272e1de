"""The token cache on disk: one folder of tokens per corpus content, checked before use and replaced atomically.

`scan` is what `python -m accel_gpt.cache list|prune` (`accel_gpt/cache.py`) shows and removes.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import xxhash

from accel_gpt.errors import UserError

DEFAULT_DIR = "~/.cache/accel_gpt"
VERSION = 2  # bump when the token file's format or the way text becomes tokens changes
TOKENS, META = "tokens.arrow", "meta.json"
BUSY_SECONDS = 3600  # a temporary file written to this recently belongs to a run still tokenizing
LEGACY_RAW = "hf"  # raw Arrow copies of corpora made by accel_gpt versions that read them through `datasets`


def file_digest(path: Path) -> str:
    """xxh3-128 of the file's bytes, at GB/s: keying and checking cost well under 1% of tokenizing (RESULTS.md)."""
    digest = xxhash.xxh3_128()
    try:
        with open(path, "rb") as f:
            while block := f.read(8 << 20):
                digest.update(block)
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    return digest.hexdigest()


def entry_for(cache_dir: str | Path | None, files: list[Path], settings: dict) -> Path:
    """The folder for these files' tokens: keyed on their contents in order and the tokenization settings,
    so an edit is seen even when the size and modification time are put back (cp -p, rsync -t, tar)."""
    parts = [VERSION, settings, [file_digest(f) for f in files]]
    key = xxhash.xxh3_128_hexdigest(json.dumps(parts, sort_keys=True).encode())[:24]
    return Path(cache_dir or DEFAULT_DIR).expanduser() / f"tokens-{key}"


def check(entry: Path) -> str | None:
    """Why the tokens in `entry` cannot be used, or None when they can. Absent tokens are "missing"; otherwise the
    file's size, hash and token count are checked against meta.json."""
    tokens = entry / TOKENS
    if not tokens.exists():
        return "missing"
    try:
        meta = json.loads((entry / META).read_text())
        if meta.get("version") != VERSION:
            return f"written by another accel_gpt version ({meta.get('version', 1)})"
        size = tokens.stat().st_size
        if size != meta["bytes"]:
            return f"{TOKENS} has {size:,} bytes, {meta['bytes']:,} expected"
        if file_digest(tokens) != meta["xxh3"]:
            return f"{TOKENS} does not match its recorded hash"
        reader = pa.ipc.open_file(pa.memory_map(str(tokens), "r"))
        count = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
        if count != meta["num_tokens"]:
            return f"{TOKENS} holds {count:,} tokens, {meta['num_tokens']:,} expected"
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UserError, pa.ArrowException) as err:
        return f"{type(err).__name__}: {err}"
    return None


def temp_tokens(entry: Path) -> Path:
    """A unique file in `entry` to write tokens into: concurrent builders (several nodes) never share one."""
    entry.mkdir(parents=True, exist_ok=True)
    return entry / f".tokens-{uuid.uuid4().hex}.arrow"


def install(entry: Path, tmp: Path, meta: dict) -> None:
    """Record the size, hash and `meta` of the tokens written to `tmp`, then rename them into place.

    meta.json goes first: its checked fields depend only on the content, so builders racing on one entry write the
    same values, and tokens.arrow, renamed last, never appears without them."""
    meta = {"version": VERSION, **meta, "bytes": tmp.stat().st_size, "xxh3": file_digest(tmp)}
    meta_tmp = entry / f".meta-{uuid.uuid4().hex}.json"
    meta_tmp.write_text(json.dumps(meta, indent=1))
    os.replace(meta_tmp, entry / META)
    os.replace(tmp, entry / TOKENS)


def mark_used(entry: Path) -> None:
    """The folder's modification time is its last use, which `prune --unused_days` reads."""
    try:
        os.utime(entry)
    except OSError:  # a read-only shared cache is still usable
        pass


# ----------------------------------------------------------------------------------------------- its entries
@dataclass
class Item:
    path: Path
    status: str  # "ok", "busy" (a run is writing it), or why it cannot be used
    size: int
    last_used: float
    tokens: int | None = None
    corpus: str = ""


def file_bytes(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # a run renamed or removed it meanwhile
        return 0


def _size(path: Path) -> int:
    return sum(file_bytes(p) for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def temporaries(entry: Path) -> tuple[list[Path], list[Path]]:
    """(fresh, stale) temporary files: fresh ones belong to a run still writing, stale ones to a run that died."""
    fresh, stale = [], []
    for temp in entry.glob(".*-*"):
        try:
            (fresh if time.time() - temp.stat().st_mtime < BUSY_SECONDS else stale).append(temp)
        except OSError:  # renamed into place meanwhile
            pass
    return fresh, stale


def scan(cache_dir: Path) -> list[Item]:
    """Every entry of the cache, checked, plus the raw corpus copies that earlier versions left."""
    items = []
    for path in sorted(cache_dir.iterdir()):
        if path.name == LEGACY_RAW and path.is_dir():
            items.append(Item(path, "obsolete: raw corpus copies", _size(path), path.stat().st_mtime))
        elif path.is_dir() and path.name.startswith("tokens-"):
            status = "busy" if temporaries(path)[0] else check(path) or "ok"
            try:
                meta = json.loads((path / META).read_text())
            except (OSError, ValueError):
                meta = None
            meta = meta if isinstance(meta, dict) else {}
            files = meta.get("files") or ["?"]
            corpus = files[0] + (f" (+{len(files) - 1} more)" if len(files) > 1 else "")
            items.append(Item(path, status, _size(path), path.stat().st_mtime, meta.get("num_tokens"), corpus))
    return items
