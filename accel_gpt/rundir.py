"""Run directories: where a run writes, whether it may write there, and whether it starts anew or continues.

Decided before any data is tokenized or a model built, by the processes that write, and agreed by every rank: a
new run never lands on an old one's files, and a directory that cannot be written is one line, not a traceback.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import socket
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from accelerate import Accelerator

from accel_gpt.checkpoint import CHECKPOINT_RE, find_checkpoint, list_checkpoints, overwritten_name, restore_swapped_out
from accel_gpt.config import TrainConfig
from accel_gpt.errors import UserError
from accel_gpt.launch import agree

RUN_FILES = ("metrics.jsonl", "samples.jsonl", "config.yaml")  # what a run writes into output_dir
LOCK_FILE = ".accel_gpt.lock"  # held by a live run's main process (DirLock)
OVERWRITE = "overwrite"  # choose_start's word for "an earlier run is here, and --overwrite true replaces it"


@dataclass
class RunDirs:
    output_dir: Path
    checkpoint_dir: Path
    resume_from: Path | None  # the verified checkpoint to continue from; None starts a new run
    locks: list[DirLock] = field(default_factory=list)  # the main process's claims on them, for the run's life
    overwrite_pending: bool = False  # --overwrite true found an earlier run: `set_aside_earlier_run` moves it

    def set_aside_earlier_run(self, accelerator: Accelerator) -> None:
        """Move the earlier run that `--overwrite true` replaces aside, once everything that can refuse the new run
        (its data, its model) has been checked: a run that fails before it starts leaves the earlier one in place."""
        if not self.overwrite_pending:
            return
        moved = agree(
            accelerator,
            lambda: set_aside_run(self.output_dir, self.checkpoint_dir) if accelerator.is_main_process else None,
        )[0]
        self.overwrite_pending = False
        if accelerator.is_main_process:
            where = " and ".join(str(d) for d in moved)
            line = (
                f"accel_gpt: --overwrite true: moved the earlier run in {self.output_dir} to {where} (nothing deleted)"
            )
            print(line, flush=True)

    def release(self) -> None:
        for lock in reversed(self.locks):  # the checkpoint folder first: an empty run directory may then go too
            lock.release()
        self.locks = []


class DirLock:
    """An exclusive claim on a directory by the live run's main process, so that two runs never write into one.
    flock: the kernel drops it when the process ends, killed with SIGKILL too, so a dead run's claim never lingers.
    The lock file names its holder (`claim`) for whoever else tries. A directory made for the run and left with
    nothing in it (a run that failed before writing) is removed again on release."""

    held: set[int] = set()  # every lock's descriptor, closed in forked children (DataLoader and tokenizer workers)

    def __init__(self, directory: Path, made: bool = False):
        self.directory, self.made = directory, made or not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 4096).decode(errors="replace").strip() or "it has not said which process yet"
            os.close(self.fd)
            raise UserError(
                f"{directory} is in use by a live run ({holder}): wait for it to end, or pass another --output_dir "
                "(or --checkpoint_dir)"
            ) from None
        DirLock.held.add(self.fd)

    def claim(self) -> None:
        """Name this process as the holder: once the directory is this run's (a run refused there writes nothing)."""
        holder = f"process {os.getpid()} on {socket.gethostname()} since {datetime.now():%H:%M:%S}"
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, holder.encode(), 0)

    def release(self) -> None:
        with contextlib.suppress(OSError):  # also when the folder is gone (removed by hand): nothing to tidy then
            if self.made and [p.name for p in self.directory.iterdir()] == [LOCK_FILE]:
                (self.directory / LOCK_FILE).unlink()
                self.directory.rmdir()
        DirLock.held.discard(self.fd)
        os.close(self.fd)  # closing drops the flock


def _close_locks_in_child() -> None:
    # A forked child shares the lock's open file: were it to keep its copy, the lock would outlive the run's release.
    for fd in DirLock.held:
        with contextlib.suppress(OSError):
            os.close(fd)
    DirLock.held.clear()


os.register_at_fork(after_in_child=_close_locks_in_child)


def new_run_dir(model: str) -> Path:
    """`runs/<model>-<date>-<time>`, made here and so this run's alone: a run that started in the same second, in
    another process or on another machine sharing the folder, has made that one, and this one gets a suffix."""
    stamp = f"runs/{model}-{datetime.now():%Y%m%d-%H%M%S}"
    for n in itertools.count(1):
        path = Path(stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
        except OSError as err:
            raise UserError(f"output_dir {path} cannot be created: {err.strerror or err}") from None


def unwritable(path: Path, option: str) -> str | None:
    """Why `path` cannot be used as a directory to write in, or None if it can (or can be created).

    Probes with a real file rather than permission bits, which root ignores; creates nothing that stays."""
    existing = path
    try:
        while not existing.exists():  # the nearest existing ancestor is where the directory would be created
            existing = existing.parent
        if not existing.is_dir():
            where = "" if existing == path else f" cannot be created: {existing}"
            return f"{option} {path}{where} is a file, not a directory"
        fd, probe = tempfile.mkstemp(prefix=".accel_gpt-write-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        verb = "written" if existing == path else f"created in {existing}"
        return f"{option} {path} cannot be {verb}: {err.strerror or err}"
    return None


def checkpoint_entries(checkpoint_dir: Path) -> list[Path]:
    """A run's checkpoints in `checkpoint_dir`, with the hidden copies of interrupted saves and set-aside branches."""
    if not checkpoint_dir.is_dir():
        return []
    return [
        p
        for p in sorted(checkpoint_dir.iterdir())
        if CHECKPOINT_RE.match(p.name) or p.name.startswith((".checkpoint_", "abandoned-after-"))
    ]


def previous_run(output_dir: Path, checkpoint_dir: Path) -> list[Path]:
    """What an earlier run left that a new one would overwrite or mix with: logged steps and checkpoints."""
    metrics = output_dir / "metrics.jsonl"
    logged = [metrics] if metrics.is_file() and metrics.stat().st_size else []
    return logged + checkpoint_entries(checkpoint_dir)


def set_aside_run(output_dir: Path, checkpoint_dir: Path) -> list[Path]:
    """Move an earlier run's files into `<output_dir>/overwritten-<time>/`, deleting nothing; returns where.

    Checkpoints kept under output_dir keep their relative place there, so the folder is itself a run directory
    (`analysis.load_run` reads it); checkpoints kept elsewhere go into an `overwritten-<time>/` of their own.
    Renames within a directory: cheap at any size, and they work where output_dir is a mount point."""
    name = overwritten_name(output_dir, checkpoint_dir)
    dest = output_dir / name
    out, ckpt = output_dir.resolve(), checkpoint_dir.resolve()
    ckpt_dest = dest / ckpt.relative_to(out) if ckpt.is_relative_to(out) else checkpoint_dir / name
    moves = [(output_dir / f, dest / f) for f in RUN_FILES if (output_dir / f).exists()]
    moves += [(entry, ckpt_dest / entry.name) for entry in checkpoint_entries(checkpoint_dir)]
    try:
        for source, target in moves:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
    except OSError as err:
        raise UserError(f"could not move the earlier run in {output_dir} aside: {err.strerror or err}") from None
    # Checkpoints kept in output_dir itself land in dest: it is named once.
    return [d for d in dict.fromkeys((dest, ckpt_dest)) if d.exists() and (d == dest or not d.is_relative_to(dest))]


def choose_start(cfg: TrainConfig, output_dir: Path, checkpoint_dir: Path) -> tuple[Path | None, str]:
    """(the checkpoint to resume from, or None for a new run; what to tell the user, or "", or OVERWRITE when an
    earlier run is to be moved aside once the new one has been checked). On the main process only: it reads and
    hashes checkpoints, and may restore one that an interrupted save left hidden."""
    if cfg.checkpoint == "auto":
        restore_swapped_out(checkpoint_dir)
        if list_checkpoints(checkpoint_dir):  # the header then says where it resumed
            return find_checkpoint(checkpoint_dir, "latest"), ""
        # A job killed before its first save left steps but no checkpoint: the same command starts it again.
        return None, f"accel_gpt: --checkpoint auto: no checkpoint in {checkpoint_dir}; starting a new run"
    if cfg.checkpoint is not None:
        return find_checkpoint(checkpoint_dir, cfg.checkpoint), ""
    found = previous_run(output_dir, checkpoint_dir)
    if not found:
        return None, ""
    if cfg.overwrite:
        return None, OVERWRITE
    inside = checkpoint_dir.resolve().is_relative_to(output_dir.resolve())
    places = dict.fromkeys(output_dir if inside or p.parent == output_dir else checkpoint_dir for p in found)
    shown = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
    raise UserError(
        f"{' and '.join(map(str, places))} already {'hold' if len(places) > 1 else 'holds'} a run ({shown}); to "
        "continue it pass --checkpoint auto|latest|N, to keep it choose another --output_dir, to start over pass "
        "--overwrite true (moves it aside, deletes nothing)"
    )


def resolve_run_dirs(cfg: TrainConfig, accelerator: Accelerator) -> RunDirs:
    """Pick the run's directories, check they can be written, and decide between a new run and a resume."""
    output_dir = cfg.output_dir
    if output_dir is None:  # one new directory for all ranks, made by the main process
        name = f"from-{Path(cfg.init_from).name}" if cfg.init_from else cfg.model
        output_dir = agree(accelerator, lambda: new_run_dir(name) if accelerator.is_main_process else None)[0]
    output_dir = Path(output_dir)
    checkpoint_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else output_dir / "checkpoints"

    def check() -> None:  # the main process writes the run; one process per machine writes the token cache
        to_check = {"output_dir": output_dir, "checkpoint_dir": checkpoint_dir} if accelerator.is_main_process else {}
        if accelerator.is_local_main_process:
            to_check["data_cache_dir"] = cfg.token_cache_dir()
        for option, path in to_check.items():
            if problem := unwritable(path, option):
                raise UserError(problem)

    agree(accelerator, check)

    dirs = RunDirs(output_dir, checkpoint_dir, None)

    def lock() -> None:  # both, also the checkpoint folder inside the run directory: another run may name either
        for directory in dict.fromkeys([output_dir.resolve(), checkpoint_dir.resolve()]):
            dirs.locks.append(DirLock(directory, made=cfg.output_dir is None and directory == output_dir.resolve()))

    try:
        agree(accelerator, lambda: lock() if accelerator.is_main_process else None)
        # Only once every directory is known to be usable and ours may the main process move an earlier run aside.
        dirs.resume_from, note = agree(
            accelerator, lambda: choose_start(cfg, output_dir, checkpoint_dir) if accelerator.is_main_process else None
        )[0]
        for lock in dirs.locks:
            lock.claim()
    except BaseException:
        dirs.release()  # a notebook may try again at once
        raise
    if note == OVERWRITE:
        dirs.overwrite_pending, note = True, ""
    if note and accelerator.is_main_process:
        print(note, flush=True)
    return dirs


def complete_already(step: int, total_steps: int, checkpoint: Path) -> str:
    """The line for a resume that has nothing left to train (a finished job requeued with `--checkpoint auto`);
    a checkpoint beyond the run's end is an error instead: max_steps was probably lowered by mistake."""
    if step > total_steps:
        raise UserError(
            f"{checkpoint} is at step {step}, beyond this run's {total_steps} steps: raise what sets its length "
            "(max_steps, train_tokens, tokens_per_parameter or num_epochs) to continue it"
        )
    return f"accel_gpt: run already complete: {checkpoint} is at step {step} of {total_steps}; nothing left to train"
