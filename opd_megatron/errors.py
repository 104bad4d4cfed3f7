"""Errors a run reports to the user as one clear line (the CLI maps them to exit codes)."""


class ReportedError(Exception):
    """An expected failure, not a bug: a teacher down or answering garbage, a checkpoint that cannot be saved or
    read, a layout that cannot work. The CLI prints it as one line, `opd-megatron <command>: error: <message>`, on
    every rank and exits 2; its traceback only with OPD_DEBUG=1. The message names the culprit and what was
    expected. (Config and data errors are ValueErrors, reported the same way.)"""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the last checkpoint is kept and nothing is saved over it."""
