"""Errors a run reports to the user as one clear line (the CLI maps them to exit codes)."""


class ReportedError(Exception):
    """An expected failure, not a bug: a teacher down or answering garbage, a checkpoint that cannot be saved or
    read, a layout that cannot work. The CLI prints it as one line, `opd-megatron <command>: error: <message>`, on
    every rank and exits 2; its traceback only with OPD_DEBUG=1. The message names the culprit and what was
    expected. (Config and data errors are ValueErrors, reported the same way.)"""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the last checkpoint is kept and nothing is saved over it."""


class RolloutServerError(ReportedError):
    """A rollout server (rollout.engine vllm / sglang) is down, answers garbage, lost its weights or cannot reload
    them; the message names the server and the evidence."""


class RolloutMismatchError(ReportedError):
    """A served engine's log-probs disagree with the trainer's on the same tokens beyond the configured bound
    before training (wrong weights, tokenizer, logprobs mode or padded vocabulary)."""
