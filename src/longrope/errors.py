"""The one exception type users see: bad input, reported as one line and exit code 2 by the CLI."""


class UsageError(ValueError):
    """Bad input from the user; the message names the problem and the fix.

    Under torchrun every rank checks the same arguments and data, so only rank 0 prints such an
    error; `rank_specific=True` marks one that a single rank may meet alone (its GPU, say),
    which every rank that meets it prints."""

    def __init__(self, message: str = "", *, rank_specific: bool = False):
        super().__init__(message)
        self.rank_specific = rank_specific
