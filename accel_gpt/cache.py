"""`python -m accel_gpt.cache [--data_cache_dir DIR] list|prune`: what the token cache holds, and removing what no
run needs."""

# The cache itself is accel_gpt/data/cache.py; for a release this module also answers for the names it held there.

from __future__ import annotations

import shutil
import time
from pathlib import Path

from accel_gpt.cli import CommandLineParser, run_command
from accel_gpt.data.cache import DEFAULT_DIR, file_bytes, scan, temporaries
from accel_gpt.errors import UserError


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
        for temp in temporaries(i.path)[1]:
            print(f"{verb} {temp} ({_mib(file_bytes(temp))}): left by a run that stopped while writing")
            freed += file_bytes(temp)
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


def __getattr__(name: str):  # the cache's names of earlier releases, when it was this module
    from accel_gpt.compat import moved_name

    return moved_name(__name__, "accel_gpt.data.cache", name)


if __name__ == "__main__":
    run_command(main)
