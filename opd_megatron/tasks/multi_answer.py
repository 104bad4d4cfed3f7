"""`any_order`: many valid answers, so the teacher's distribution carries more than its argmax.

`cfhad=` -> any ordering of those letters in which no two neighbours are alphabet neighbours (`c` may not follow
`d` or `b`): `fadch`, `hcfad`, ... The reference answer is one valid ordering drawn at random, so a teacher trained
on the references learns a spread over the letters still allowed at each step (many near-equal candidates, not
one), and a student must keep track of which letters it has written: a repeated or skipped letter, or a forbidden
pair, makes the whole answer wrong. The verifier accepts every valid ordering; a prompt with no valid ordering is
never drawn. What this task measures: whether a support or an objective that keeps only the teacher's top
candidates (top-1, sampled-token) loses something a full-distribution objective keeps.
"""

from __future__ import annotations

import random

from opd_megatron.tasks.base import Example, Task

LETTERS = "abcdefghijkl"


def is_valid_order(letters: str, order: str) -> bool:
    """`order` uses each of `letters` once and has no two alphabet neighbours next to each other."""
    if sorted(order) != sorted(letters):
        return False
    return all(abs(ord(a) - ord(b)) != 1 for a, b in zip(order, order[1:]))


class AnyOrder(Task):
    name = "any_order"
    alphabet = LETTERS + "="

    def __init__(self, size: int = 6):
        if not 4 <= size <= len(LETTERS):
            raise ValueError(f"any_order size must be in [4, {len(LETTERS)}] letters, got {size}")
        self.size = size
        self.max_prompt_chars = size + 1
        self.max_answer_chars = size

    def make_example(self, rng: random.Random) -> Example:
        while True:
            letters = "".join(sorted(rng.sample(LETTERS, self.size)))
            # Shuffle until valid: with 6 of 12 letters a random order is valid about a quarter of the time; a set
            # with no valid order (e.g. 4 consecutive letters) is rejected after a bounded number of tries.
            for _ in range(200):
                order = "".join(rng.sample(letters, self.size))
                if is_valid_order(letters, order):
                    prompt_order = "".join(rng.sample(letters, self.size))
                    return Example(prompt=prompt_order + "=", answer=order)

    def score(self, prompt: str, completion: str) -> float:
        return float(is_valid_order(prompt.rstrip("="), completion))
