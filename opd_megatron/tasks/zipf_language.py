"""`zipf_lang`: a synthetic language of 4,092 Zipf-distributed words, so the size of a distillation support matters.

The language: words 1..4092 fall into `classes` word classes (62 by default; word w is in class (w - 1) mod classes,
so every class holds 4092 / classes words); a fixed grammar gives each class two successor classes; a sentence moves
from a word to any word of one of its class's successor classes. Within a class, words are drawn Zipf-distributed (weight 1/rank,
rank = (w - 1) // classes + 1), so word frequencies over the language follow Zipf's law. The task: a prompt of
`prompt_words` words of a sentence and `=`; the answer continues it by `answer_words` words. The verifier accepts
every grammatical continuation (each word in a successor class of the one before it, from the last prompt word on).

The teacher's next-word distribution is a Zipf spread over the 2 x 66 words of the two successor classes (62
classes of 66 words): its top-1 word carries about 10% of the mass, its top-8 44%, its top-64 85%, so a top-k
support of k in {1, 8, 64} and the full vocabulary distil visibly different targets, while every word of those
classes is right. The word-level tokenizer has the character tokenizer's interface: ids 0 (`=`), 1..4092 (the
words), then pad, bos, eos: 4,096 ids.
"""

from __future__ import annotations

import random
from functools import cached_property
from typing import Optional, Sequence

from opd_megatron.tasks.base import Example, Task

WORDS = 4092                 # the language's words; with `=`, pad, bos and eos the vocabulary has 4,096 ids
SEPARATOR = "="
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]    # 70 syllables
_GRAMMAR_SEED = 20261206     # the grammar is part of the task's definition, the same for every run seed


def word_spelling(index: int) -> str:
    """The letters of word `index` (1-based): distinct, lower-case, no digits (a corrupted word is no word)."""
    if not 1 <= index <= WORDS:
        raise ValueError(f"word index must be in [1, {WORDS}], got {index}")
    n = index - 1            # 70 x 70 = 4,900 two-syllable words >= WORDS
    return _SYLLABLES[n % len(_SYLLABLES)] + _SYLLABLES[n // len(_SYLLABLES)]


class WordTokenizer:
    """One id per word of a fixed word list, then pad, bos, eos (the `data.tokenizer.Tokenizer` interface).

    Text is a sequence of words each followed by one space (`"bada kepo = "`), so a prompt and its answer
    concatenate into text that encodes to the concatenation of their ids. A word outside the list is an error
    naming it, never a silent unknown id."""

    def __init__(self, words: Sequence[str]):
        if len(set(words)) != len(words):
            raise ValueError("WordTokenizer word list has repeated words")
        self.words = list(words)
        self._ids = {word: i for i, word in enumerate(self.words)}
        self.pad_id = len(self.words)
        self.bos_id: Optional[int] = len(self.words) + 1
        self.eos_id = len(self.words) + 2
        self.vocab_size = len(self.words) + 3

    def encode(self, text: str) -> list[int]:
        unknown = sorted({word for word in text.split() if word not in self._ids})
        if unknown:
            raise ValueError(f"text {text[:80]!r} has words {unknown[:5]} outside the task alphabet (the word list "
                             f"of {len(self.words)} words)")
        return [self._ids[word] for word in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.words[int(i)] + " " for i in ids if 0 <= int(i) < len(self.words))

    @property
    def has_chat_template(self) -> bool:
        return False

    def apply_chat_template(self, prompt: str) -> str:
        raise ValueError("a synthetic task's word tokenizer has no chat template")


class ZipfLanguage(Task):
    name = "zipf_lang"
    alphabet = ""            # word-level: the vocabulary is `WordTokenizer`'s word list, not characters

    def __init__(self, classes: int = 62, prompt_words: int = 4, answer_words: int = 8):
        if classes < 4 or WORDS % classes:
            raise ValueError(f"zipf_lang classes must be >= 4 and divide {WORDS}, got {classes}")
        if prompt_words < 1 or answer_words < 1:
            raise ValueError(f"zipf_lang prompt_words and answer_words must be >= 1, got {prompt_words}, "
                             f"{answer_words}")
        self.classes, self.prompt_words, self.answer_words = classes, prompt_words, answer_words
        longest = max(len(word) for word in self.vocabulary) + 1
        self.max_prompt_chars = (prompt_words + 1) * longest
        self.max_answer_chars = answer_words * longest
        grammar = random.Random(_GRAMMAR_SEED)
        # Two distinct successor classes per class, neither the class itself.
        self.successors = [tuple(grammar.sample([d for d in range(classes) if d != c], 2)) for c in range(classes)]
        per_class = WORDS // classes
        self._zipf_weights = [1.0 / rank for rank in range(1, per_class + 1)]

    @cached_property
    def vocabulary(self) -> list[str]:
        return [SEPARATOR] + [word_spelling(i) for i in range(1, WORDS + 1)]

    def tokenizer(self) -> WordTokenizer:
        return WordTokenizer(self.vocabulary)

    def word_class(self, word: int) -> int:
        return (word - 1) % self.classes

    def _draw_word(self, rng: random.Random, word_class: int) -> int:
        rank = rng.choices(range(len(self._zipf_weights)), weights=self._zipf_weights)[0]
        return word_class + 1 + rank * self.classes

    def make_example(self, rng: random.Random) -> Example:
        words = [self._draw_word(rng, rng.randrange(self.classes))]
        for _ in range(self.prompt_words + self.answer_words - 1):
            words.append(self._draw_word(rng, rng.choice(self.successors[self.word_class(words[-1])])))
        spell = self.vocabulary
        prompt = "".join(spell[w] + " " for w in words[: self.prompt_words]) + SEPARATOR + " "
        answer = "".join(spell[w] + " " for w in words[self.prompt_words:])
        return Example(prompt=prompt, answer=answer)

    def score(self, prompt: str, completion: str) -> float:
        """1.0 when the completion is `answer_words` words, each in a successor class of the word before it."""
        index = self.tokenizer_ids
        prompt_words = prompt.split()
        answer = completion.split()
        if len(answer) != self.answer_words or not prompt_words[:-1]:
            return 0.0
        previous = index.get(prompt_words[-2])      # the last word before `=`
        for word in answer:
            current = index.get(word)
            if previous is None or current is None or current == 0:
                return 0.0
            if self.word_class(current) not in self.successors[self.word_class(previous)]:
                return 0.0
            previous = current
        return 1.0

    @cached_property
    def tokenizer_ids(self) -> dict[str, int]:
        return {word: i for i, word in enumerate(self.vocabulary)}
