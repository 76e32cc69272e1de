"""What every command line shares: a parser whose mistakes are one line, and the entry point that turns a
UserError into `accel_gpt: error: ...` on stderr and exit status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from accel_gpt.errors import UserError


class CommandLineParser(argparse.ArgumentParser):
    """argparse whose errors (an unknown flag, a missing or malformed value) are one UserError line instead of
    usage + message; abbreviated flags are refused, so a new option never changes what an old command means."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UserError(f"command line: {message}")


def summary(doc: str) -> str:
    """A command module's docstring as its `--help` description: the first paragraph, on one line, a sentence."""
    first = " ".join(doc.split("\n\n")[0].split()).rstrip(":")
    return first if first.endswith(".") else first + "."


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint and --step, as every command that reads a checkpoint takes them."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint directory, or a run directory or its checkpoint_dir (the newest checkpoint that verifies)",
    )
    parser.add_argument("--step", type=int, help="with a run directory: the checkpoint at this step")


def run_command(main: Callable[[], None]) -> None:
    """Run a command-line entry point: a UserError becomes one `accel_gpt: error:` line on stderr and exit 2; Ctrl-C
    (KeyboardInterrupt) one `accel_gpt: interrupted` line and exit 130, as a shell reports it; a closed pipe on
    stdout a quiet exit 141. Never a traceback for these."""
    try:
        main()
    except UserError as err:
        sys.stderr.write(f"accel_gpt: error: {err}\n")  # one write: the lines of several processes never interleave
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("accel_gpt: interrupted\n")
        sys.exit(130)
    except BrokenPipeError:
        # The reader of the output went away (`... | head`): stop quietly, as Unix tools do (128 + SIGPIPE). Python
        # would complain again when it flushes stdout at exit, so stdout goes to /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
