"""Errors a run reports to the user as one clear line (the CLI maps them to exit codes)."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the last checkpoint is kept and nothing is saved over it."""
