"""Synthetic tasks: deterministic from the seed, disjoint train/eval prompts, verifiers that accept the reference
answer and reject wrong ones, tokenizers that round-trip and refuse characters outside the alphabet."""

import pytest

from opd_megatron.tasks import TASKS, get_task


@pytest.mark.parametrize("name", sorted(TASKS))
def test_reference_answers_pass_and_corruptions_fail(name):
    task = get_task(name)
    examples = task.examples("train", 200, seed=3)
    assert all(task.score(ex.prompt, ex.answer) == 1.0 for ex in examples)
    wrong = 0
    for ex in examples:
        last = ex.answer[-1]
        corrupted = ex.answer[:-1] + ("0" if last != "0" else "1")
        wrong += task.score(ex.prompt, corrupted) == 0.0
    assert wrong == len(examples)
    assert all(task.score(ex.prompt, "") == 0.0 for ex in examples[:20])
    assert max(len(ex.prompt) for ex in examples) <= task.max_prompt_chars
    assert max(len(ex.answer) for ex in examples) <= task.max_answer_chars


@pytest.mark.parametrize("name", sorted(TASKS))
def test_deterministic_and_disjoint_splits(name):
    task = get_task(name)
    a = task.examples("eval", 50, seed=1)
    assert a == task.examples("eval", 50, seed=1)
    assert a != task.examples("eval", 50, seed=2)
    train = {ex.prompt for ex in task.examples("train", 4096, seed=1)}
    assert not train & {ex.prompt for ex in a}
    assert len({ex.prompt for ex in a}) == 50


@pytest.mark.parametrize("name", sorted(TASKS))
def test_tokenizer_round_trip(name):
    task = get_task(name)
    tok = task.tokenizer()
    ex = task.examples("train", 1)[0]
    ids = tok.encode(ex.prompt + ex.answer)
    assert max(ids) < tok.pad_id < tok.vocab_size and tok.eos_id == tok.vocab_size - 1
    assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == ex.prompt + ex.answer
    with pytest.raises(ValueError, match="outside the task alphabet"):
        tok.encode(ex.prompt + "Z")


def test_specific_answers():
    assert get_task("sort_digits").score("52818340=", "01234588") == 1.0
    assert get_task("add").score("123+456=", "579") == 1.0
    chain = get_task("chain")
    assert chain.score("a=3;b=a+4;c=b*2;c?", "a3b7c4>4") == 1.0
    assert chain.score("a=3;b=a+4;c=b*2;c?", "4") == 1.0          # the value alone is accepted
    assert chain.score("a=3;b=a+4;c=b*2;c?", "a3b7c4>5") == 0.0
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")
