"""The token cache on disk: one folder of tokens per corpus content, checked before use and replaced atomically.

`python -m accel_gpt.cache [--data_cache_dir DIR] list|prune` shows what it holds and removes what is not needed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import xxhash

from accel_gpt.cli import CommandLineParser, run_command
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


# ----------------------------------------------------------------------------------------------- list and prune
@dataclass
class Item:
    path: Path
    status: str  # "ok", "busy" (a run is writing it), or why it cannot be used
    size: int
    last_used: float
    tokens: int | None = None
    corpus: str = ""


def _bytes(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # a run renamed or removed it meanwhile
        return 0


def _size(path: Path) -> int:
    return sum(_bytes(p) for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _temporaries(entry: Path) -> tuple[list[Path], list[Path]]:
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
            status = "busy" if _temporaries(path)[0] else check(path) or "ok"
            try:
                meta = json.loads((path / META).read_text())
            except (OSError, ValueError):
                meta = None
            meta = meta if isinstance(meta, dict) else {}
            files = meta.get("files") or ["?"]
            corpus = files[0] + (f" (+{len(files) - 1} more)" if len(files) > 1 else "")
            items.append(Item(path, status, _size(path), path.stat().st_mtime, meta.get("num_tokens"), corpus))
    return items


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def list_cache(cache_dir: Path) -> None:
    items = scan(cache_dir)
    print(f"{cache_dir}: {len(items)} entries, {_mib(sum(i.size for i in items))}")
    rows = [("entry", "size", "tokens", "last used", "status", "corpus")] + [
        (
            i.path.name,
            _mib(i.size),
            f"{i.tokens:,}" if i.tokens is not None else "-",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(i.last_used)),
            i.status,
            i.corpus,
        )
        for i in items
    ]
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    for r in rows:  # sizes and token counts right-aligned
        cells = [f"{v:>{w}}" if c in (1, 2) else f"{v:<{w}}" for c, (v, w) in enumerate(zip(r, widths))]
        print("  " + "  ".join(cells + [r[5]]))


def prune(cache_dir: Path, unused_days: float | None, everything: bool, dry_run: bool) -> None:
    """Remove entries that cannot be used, temporary files of runs that died, and raw copies left by earlier
    versions; with `unused_days` also entries unused that long, with `everything` all. Never what a run is writing."""
    cutoff = None if unused_days is None else time.time() - unused_days * 86400
    verb = "would remove" if dry_run else "removed"
    freed = 0
    for i in scan(cache_dir):
        if i.status == "busy":
            print(f"kept {i.path}: a run is writing it")
            continue
        if i.status != "ok" or everything or (cutoff is not None and i.last_used < cutoff):
            why = i.status if i.status != "ok" else "--all" if everything else f"unused for {unused_days:g} days"
            print(f"{verb} {i.path} ({_mib(i.size)}): {why}")
            freed += i.size
            if not dry_run:
                shutil.rmtree(i.path, ignore_errors=True)
            continue
        for temp in _temporaries(i.path)[1]:
            print(f"{verb} {temp} ({_mib(_bytes(temp))}): left by a run that stopped while writing")
            freed += _bytes(temp)
            if not dry_run:
                temp.unlink(missing_ok=True)
    print(f"{'would free' if dry_run else 'freed'} {_mib(freed)}")


def main(argv: list[str] | None = None) -> None:
    parser = CommandLineParser(prog="python -m accel_gpt.cache", description=__doc__)
    parser.add_argument("--data_cache_dir", default=DEFAULT_DIR, help=f"the cache (default: {DEFAULT_DIR})")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every entry: size, tokens, last use, whether it is usable, its corpus")
    pruning = commands.add_parser(
        "prune", help="remove damaged, unfinished and old-format entries, and raw copies left by earlier versions"
    )
    pruning.add_argument("--unused_days", type=float, help="also remove usable entries not used for this many days")
    pruning.add_argument("--all", action="store_true", help="remove every entry that no run is writing")
    pruning.add_argument("--dry_run", action="store_true", help="say what would be removed, remove nothing")
    args = parser.parse_args(argv)
    if getattr(args, "unused_days", None) is not None and not 0 <= args.unused_days < float("inf"):
        raise UserError(f"unused_days must be a number of days >= 0, got {args.unused_days}")
    cache_dir = Path(args.data_cache_dir).expanduser()
    if not cache_dir.is_dir():
        raise UserError(f"no token cache at {cache_dir}")
    if args.command == "list":
        list_cache(cache_dir)
    else:
        prune(cache_dir, args.unused_days, args.all, args.dry_run)


if __name__ == "__main__":
    run_command(main)
