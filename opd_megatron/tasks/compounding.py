"""`prefix_sum`: a long output whose every step depends on the previous output, so one early error derails the rest.

`3141=` -> `3489`: the running sums of the digits mod 10, one output digit per input digit. Output digit t is
(output digit t-1 + input digit t) mod 10, so a model that computes each step from what it has already written
carries an early mistake into every later digit: the states after a student's own error are states a teacher's
outputs never visit, the case on-policy distillation is meant for (the survey's exposure-bias argument; the sorting
task of the quickstart has no such chain, and SFT beat OPD on it).

The verifier's score is exact match by default (`partial_credit=0`); with `partial_credit=1` it is the share of
output digits that are right before the first wrong one (a denser reward for route B's outcome term and for RL).
"""

from __future__ import annotations

import random

from opd_megatron.tasks.base import Example, Task

DIGITS = "0123456789"


def running_sums(digits: str) -> str:
    """The running sums mod 10 of a digit string: `3141` -> `3489`."""
    total, out = 0, []
    for ch in digits:
        total = (total + int(ch)) % 10
        out.append(str(total))
    return "".join(out)


class PrefixSum(Task):
    name = "prefix_sum"
    alphabet = DIGITS + "="

    def __init__(self, length: int = 12, partial_credit: int = 0):
        if not 2 <= length <= 64:
            raise ValueError(f"prefix_sum length must be in [2, 64] digits, got {length}")
        if partial_credit not in (0, 1):
            raise ValueError(f"prefix_sum partial_credit must be 0 (exact match) or 1 (right prefix share), got "
                             f"{partial_credit}")
        self.length = length
        self.partial_credit = bool(partial_credit)
        self.max_prompt_chars = length + 1
        self.max_answer_chars = length

    def make_example(self, rng: random.Random) -> Example:
        digits = "".join(rng.choice(DIGITS) for _ in range(self.length))
        return Example(prompt=digits + "=", answer=running_sums(digits))

    def score(self, prompt: str, completion: str) -> float:
        expected = running_sums(prompt.rstrip("="))
        if not self.partial_credit:
            return float(completion == expected)
        if completion == expected:
            return 1.0
        right = 0
        for got, want in zip(completion, expected):
            if got != want:
                break
            right += 1
        # A completion with the whole answer right and more after it is not right: at most (n - 1) / n.
        return min(right, len(expected) - 1) / len(expected)
