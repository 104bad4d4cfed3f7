"""The tasks where on-policy states matter (issue 16): `prefix_sum` (an early error derails the rest, partial credit
on the right prefix), `any_order` (many valid answers, every one accepted), `zipf_lang` (a 4,096-id word vocabulary,
Zipf-distributed words, a grammar the verifier checks). The interface checks every task shares (deterministic,
disjoint splits, round-trip tokenizers) are in test_tasks.py, which runs over every registered task."""

import collections
import itertools

import pytest

from opd_megatron.data.tokenizer import load_tokenizer
from opd_megatron.tasks import get_task
from opd_megatron.tasks.compounding import running_sums
from opd_megatron.tasks.multi_answer import is_valid_order
from opd_megatron.tasks.zipf_language import WORDS, WordTokenizer


def test_prefix_sum_answers_and_partial_credit():
    assert running_sums("3141") == "3489"
    exact = get_task("prefix_sum", length=4)
    assert exact.examples("train", 1, seed=0)[0].answer == running_sums(exact.examples("train", 1, seed=0)[0]
                                                                        .prompt.rstrip("="))
    assert exact.score("3141=", "3489") == 1.0 and exact.score("3141=", "3488") == 0.0
    partial = get_task("prefix_sum", length=4, partial_credit=1)
    assert partial.score("3141=", "3489") == 1.0
    # An early error: every later digit follows from the wrong one, and only the prefix before it earns credit.
    assert partial.score("3141=", "3596") == 0.25
    assert partial.score("3141=", "3488") == 0.75
    assert partial.score("3141=", "") == 0.0 and partial.score("3141=", "9489") == 0.0
    assert partial.score("3141=", "34890") == 0.75          # the whole answer and more is not right
    with pytest.raises(ValueError, match="partial_credit"):
        get_task("prefix_sum", partial_credit=2)
    with pytest.raises(ValueError, match="length"):
        get_task("prefix_sum", length=1)


def test_any_order_accepts_every_valid_order_and_references_vary():
    task = get_task("any_order", size=5)
    letters = "acegi"                                      # no two alphabet neighbours: all 120 orders are valid
    assert all(task.score("gciea=", "".join(p)) == 1.0 for p in itertools.permutations(letters))
    assert task.score("abdfh=", "adbfh") == 1.0
    assert task.score("abdfh=", "abdfh") == 0.0           # a and b are neighbours
    assert task.score("abdfh=", "adbf") == 0.0 and task.score("abdfh=", "adbfhh") == 0.0
    assert not is_valid_order("abc", "acb")               # c then b
    examples = task.examples("train", 300, seed=5)
    assert all(task.score(ex.prompt, ex.answer) == 1.0 for ex in examples)
    # The reference is one valid order drawn at random: the same letter set gets different references, so a
    # teacher trained on them spreads its mass over the valid next letters.
    by_set = collections.defaultdict(set)
    for ex in examples:
        by_set["".join(sorted(ex.prompt.rstrip("=")))].add(ex.answer)
    assert any(len(answers) > 1 for answers in by_set.values())


def test_zipf_lang_grammar_vocabulary_and_zipf_frequencies():
    task = get_task("zipf_lang")
    tokenizer = task.tokenizer()
    assert isinstance(tokenizer, WordTokenizer) and tokenizer.vocab_size == 4096 == WORDS + 4
    assert load_tokenizer("task:zipf_lang").vocab_size == 4096       # the SFT path's data.tokenizer spec
    examples = task.examples("train", 2000, seed=0)
    ids = [tokenizer.encode(ex.prompt + ex.answer) for ex in examples]
    assert all(len(row) == task.prompt_words + 1 + task.answer_words for row in ids)
    # Zipf within a class: rank-1 words are drawn far more often than rank-10 words (weights 1/1 vs 1/10).
    counts = collections.Counter(w for row in ids for w in row if w != 0)
    rank = lambda w: (w - 1) // task.classes + 1                        # noqa: E731
    by_rank = collections.Counter()
    for word, n in counts.items():
        by_rank[rank(word)] += n
    assert by_rank[1] > 5 * by_rank[10] > 0
    assert len(counts) > 2000                                          # thousands of distinct ids are used
    # The verifier: the reference passes; a word from a class that does not follow fails; any other word of a
    # successor class passes (many valid answers).
    ex = examples[0]
    words = ex.answer.split()
    last_prompt = tokenizer.encode(ex.prompt)[-2]
    allowed = task.successors[task.word_class(last_prompt)]
    bad_class = next(c for c in range(task.classes) if c not in allowed)
    bad = tokenizer.words[bad_class + 1]
    assert task.score(ex.prompt, " ".join([bad] + words[1:]) + " ") == 0.0
    first = tokenizer.encode(words[0] + " ")[0]
    same_class = tokenizer.words[first + task.classes if first + task.classes <= WORDS else first - task.classes]
    assert task.score(ex.prompt, " ".join([same_class] + words[1:]) + " ") == 1.0
    assert task.score(ex.prompt, " ".join(words[:-1]) + " ") == 0.0     # too short
    assert task.score(ex.prompt, ex.answer + "= ") == 0.0                # too long
    with pytest.raises(ValueError, match="outside the task alphabet"):
        tokenizer.encode("bada zzzz ")
    with pytest.raises(ValueError, match="classes"):
        get_task("zipf_lang", classes=64)


@pytest.mark.parametrize("name", ["prefix_sum", "any_order", "zipf_lang"])
def test_new_tasks_run_through_the_run_config(name):
    """`opd-megatron train` accepts them by `rollout.task=<name>` (the config validates the task name)."""
    from opd_megatron.config import load_config
    from opd_megatron.tools.quickstart import default_config_path
    cfg = load_config(default_config_path(), [f"rollout.task={name}", f"data.tokenizer=task:{name}",
                                              "model.vocab_size=4096", "teacher.colocated.model.vocab_size=4096"])
    assert cfg.rollout.task == name
