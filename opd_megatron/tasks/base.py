"""The task interface: prompts generated from a seed, a verifier scoring completions, a character tokenizer.

A task family defines `make_example(rng)` (one prompt and its reference answer) and `score(prompt, completion)`
(1.0 when a program accepts the completion, else 0.0; partial credit where the family defines it). Splits are
disjoint by construction: every example is drawn from `random.Random(hash(seed, split, index))`, and held-out
prompts that also occur in the training split are skipped, so evaluation never sees a training prompt.
"""

from __future__ import annotations

import abc
import hashlib
import random
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str          # the reference completion (without the end-of-sequence token)


class CharTokenizer:
    """One id per character of a fixed alphabet, then pad, bos, eos (the `data.tokenizer.Tokenizer` interface).

    Small vocabularies keep the synthetic tasks fast on a CPU (the quickstart's is 17 ids). Characters outside
    the alphabet are an error naming them, never a silent unknown id."""

    def __init__(self, alphabet: str):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"CharTokenizer alphabet has repeated characters: {alphabet!r}")
        self.alphabet = alphabet
        self._ids = {ch: i for i, ch in enumerate(alphabet)}
        self.pad_id = len(alphabet)
        self.bos_id: Optional[int] = len(alphabet) + 1
        self.eos_id = len(alphabet) + 2
        self.vocab_size = len(alphabet) + 3

    def encode(self, text: str) -> list[int]:
        unknown = sorted({ch for ch in text if ch not in self._ids})
        if unknown:
            raise ValueError(f"text {text!r} has characters {unknown} outside the task alphabet {self.alphabet!r}")
        return [self._ids[ch] for ch in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.alphabet[int(i)] for i in ids if 0 <= int(i) < len(self.alphabet))

    @property
    def has_chat_template(self) -> bool:
        return False

    def apply_chat_template(self, prompt: str) -> str:
        raise ValueError("a synthetic task's character tokenizer has no chat template")


def _example_rng(seed: int, split: str, index: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{split}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


class Task(abc.ABC):
    """A task family. Subclasses set `name`, `alphabet`, `max_prompt_chars` and `max_answer_chars`."""

    name: str
    alphabet: str
    max_prompt_chars: int
    max_answer_chars: int

    @abc.abstractmethod
    def make_example(self, rng: random.Random) -> Example:
        """One prompt and its reference answer, drawn from `rng`."""

    @abc.abstractmethod
    def score(self, prompt: str, completion: str) -> float:
        """1.0 if the completion (decoded, without eos) answers the prompt correctly, else 0.0."""

    def tokenizer(self) -> CharTokenizer:
        return CharTokenizer(self.alphabet)

    def train_example(self, index: int, seed: int = 0) -> Example:
        """The `index`-th training example of the endless, deterministic training stream."""
        return self.make_example(_example_rng(seed, "train", index))

    def examples(self, split: str, count: int, seed: int = 0) -> list[Example]:
        """`count` examples of `split` ("train" or "eval"); deterministic in (seed, split, index). Eval prompts
        never repeat a train prompt of the same seed among the first `_TRAIN_CHECK` train examples."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        out: list[Example] = []
        seen: set[str] = set()
        excluded = {ex.prompt for ex in self.examples("train", _TRAIN_CHECK, seed)} if split == "eval" else set()
        index = 0
        while len(out) < count:
            if index > 50 * count + 1000:
                raise ValueError(f"task {self.name}: could not draw {count} distinct {split} prompts; the task "
                                 f"has too few distinct prompts for that count")
            example = self.make_example(_example_rng(seed, split, index))
            index += 1
            if example.prompt in excluded or (split == "eval" and example.prompt in seen):
                continue
            seen.add(example.prompt)
            out.append(example)
        return out

    def accuracy(self, prompts: Sequence[str], completions: Sequence[str]) -> float:
        if not prompts:
            return 0.0
        return sum(self.score(p, c) for p, c in zip(prompts, completions)) / len(prompts)


_TRAIN_CHECK = 4096
