"""The one exception type for problems a user can fix (bad config, missing data, unusable checkpoint).

Entry points print its message as a single line and exit non-zero instead of showing a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input, reported as one clear line."""


def run_command(main: Callable[[], None]) -> None:
    """Run a command-line entry point: a UserError becomes one `accel_gpt: error:` line on stderr and exit 2."""
    try:
        main()
    except UserError as err:
        print(f"accel_gpt: error: {err}", file=sys.stderr)
        sys.exit(2)
