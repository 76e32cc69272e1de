"""The one exception type for problems a user can fix (bad config, missing data, unusable checkpoint).

Entry points print its message as a single line and exit non-zero instead of showing a traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one clear line."""
