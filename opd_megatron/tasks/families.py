"""The task families.

- `sort_digits`: `52818340=` -> `01234588`. Chosen by a measurement on 2 CPU cores to show OPD's effect in
  minutes: a 0.8M-parameter teacher reaches 100% in 80 s of SFT (4-digit addition stayed at 0% after 156 s).
- `add`: `123+456=` -> `579`: multi-digit addition, answer written most-significant digit first, so a student's
  early carry error compounds through the rest of the answer.
- `chain`: a small reasoning chain, `a=3;b=a+4;c=b*2;c?` -> `14`: each step refers to the one before it, so the
  answer needs the intermediate values; arithmetic is mod 10 to keep the alphabet small. Accepts any completion
  whose value is right, with or without the intermediate steps the teacher writes (`a3b7c4>4`: values then `>`
  and the answer); partial credit is not given.

Tasks where on-policy states matter (issue 16), each in its own module: `prefix_sum` (compounding.py: a long
output whose every step depends on the previous output), `any_order` (multi_answer.py: many valid answers),
`zipf_lang` (zipf_language.py: a 4,096-id word vocabulary with Zipf-distributed words).
"""

from __future__ import annotations

import random

from opd_megatron.tasks.base import Example, Task
from opd_megatron.tasks.compounding import PrefixSum
from opd_megatron.tasks.multi_answer import AnyOrder
from opd_megatron.tasks.zipf_language import ZipfLanguage

DIGITS = "0123456789"


class SortDigits(Task):
    name = "sort_digits"
    alphabet = DIGITS + "="

    def __init__(self, length: int = 8):
        self.length = length
        self.max_prompt_chars = length + 1
        self.max_answer_chars = length

    def make_example(self, rng: random.Random) -> Example:
        digits = "".join(rng.choice(DIGITS) for _ in range(self.length))
        return Example(prompt=digits + "=", answer="".join(sorted(digits)))

    def score(self, prompt: str, completion: str) -> float:
        return float(completion == "".join(sorted(prompt.rstrip("="))))


class Addition(Task):
    name = "add"
    alphabet = DIGITS + "+="

    def __init__(self, digits: int = 3):
        self.digits = digits
        self.max_prompt_chars = 2 * digits + 2
        self.max_answer_chars = digits + 1

    def make_example(self, rng: random.Random) -> Example:
        a, b = (rng.randrange(10 ** self.digits) for _ in range(2))
        return Example(prompt=f"{a}+{b}=", answer=str(a + b))

    def score(self, prompt: str, completion: str) -> float:
        a, b = prompt.rstrip("=").split("+")
        return float(completion == str(int(a) + int(b)))


class ReasoningChain(Task):
    """Variables a, b, c, ... each defined from the previous one by +k or *k (mod 10)."""

    name = "chain"
    alphabet = DIGITS + "abcdefgh=+*;?>"

    def __init__(self, steps: int = 3):
        if not 2 <= steps <= 8:
            raise ValueError(f"chain steps must be in [2, 8], got {steps}")
        self.steps = steps
        self.max_prompt_chars = 3 + 6 * (steps - 1) + 3
        self.max_answer_chars = 2 * steps + 2

    def make_example(self, rng: random.Random) -> Example:
        names = "abcdefgh"[: self.steps]
        value = rng.randrange(10)
        parts, values = [f"{names[0]}={value}"], [value]
        for i in range(1, self.steps):
            op, k = rng.choice("+*"), rng.randrange(1, 10)
            value = (value + k) % 10 if op == "+" else (value * k) % 10
            parts.append(f"{names[i]}={names[i - 1]}{op}{k}")
            values.append(value)
        prompt = ";".join(parts) + f";{names[-1]}?"
        worked = "".join(f"{n}{v}" for n, v in zip(names, values))
        return Example(prompt=prompt, answer=f"{worked}>{values[-1]}")

    def _value(self, prompt: str) -> int:
        defs = prompt.rstrip("?").split(";")[:-1]
        env: dict[str, int] = {}
        for d in defs:
            name, expr = d.split("=")
            if expr.isdigit():
                env[name] = int(expr)
            else:
                ref, op, k = expr[0], expr[1], int(expr[2:])
                env[name] = (env[ref] + k) % 10 if op == "+" else (env[ref] * k) % 10
        return env[defs[-1].split("=")[0]]

    def score(self, prompt: str, completion: str) -> float:
        answer = completion.rsplit(">", 1)[-1]
        return float(answer == str(self._value(prompt)))


TASKS = {"sort_digits": SortDigits, "add": Addition, "chain": ReasoningChain, "prefix_sum": PrefixSum,
         "any_order": AnyOrder, "zipf_lang": ZipfLanguage}


def get_task(name: str, **kwargs) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name](**kwargs)
