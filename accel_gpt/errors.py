"""The one exception type for problems a user can fix (bad config, missing data, unusable checkpoint).

Command lines print its message as a single line and exit non-zero (`accel_gpt.cli.run_command`).
"""


class UserError(Exception):
    """A problem with the user's input, reported as one clear line."""


def __getattr__(name: str):  # names of earlier releases (accel_gpt/compat.py)
    from accel_gpt.compat import old_name

    return old_name(__name__, name)
