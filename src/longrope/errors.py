"""The one exception type users see: bad input, reported as one line and exit code 2 by the CLI."""


class UsageError(ValueError):
    """Bad input from the user; the message names the problem and the fix."""
