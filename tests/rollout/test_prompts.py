"""PromptSource's evaluation prompts: held out of rollout.path (or read from eval.path) and never a training prompt,
over steps x ranks x world sizes; the split is a function of the file alone; files too small are refused."""

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opd_megatron.data.jsonl import DataError
from opd_megatron.data.tokenizer import ByteTokenizer
from opd_megatron.rollout.prompts import PromptSource
from opd_megatron.tasks import get_task

TOKENIZER = ByteTokenizer()


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _source(path: str, seed: int = 7, **kwargs) -> PromptSource:
    return PromptSource(TOKENIZER, seed, 64, path=path, **kwargs)


def _run_eval_prompts(source: PromptSource, count: int) -> list:
    """What the OPD loop evaluates on (`loop/evaluation.py`): `PromptSource.eval_prompts()`, `count` of them."""
    assert source.eval_count == count
    return source.eval_prompts()


def _training_texts(source: PromptSource, epochs: int = 3) -> set[str]:
    """Every prompt text `prompts` returns over enough steps to pass `epochs` times over the training records, for
    world sizes 1..4, every rank and a few per-rank counts."""
    seen = set()
    for world in (1, 2, 3, 4):
        for count in (1, 2, 5):
            steps = epochs * len(source.records) // (world * count) + 2
            for step in range(steps):
                for rank in range(world):
                    seen.update(p.text for p in source.prompts(step, rank, world, count))
    return seen


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"question {i} ?", "response": f"answer {i}"} for i in range(n)]


def test_eval_prompts_are_never_training_prompts(tmp_path):
    rows = _rows(40)
    rows += [dict(rows[i]) for i in (3, 3, 17, 29)]           # duplicates: a held-out text must not train either
    source = _source(_write(tmp_path / "prompts.jsonl", rows), eval_count=7)
    evaluated = _run_eval_prompts(source, 7)
    assert len(evaluated) == 7
    eval_texts = {p.text for p in evaluated}
    assert len(eval_texts) == 7, "the held-out prompts are 7 distinct records"
    trained = _training_texts(source)
    leaked = sorted(eval_texts & trained)
    assert not leaked, f"evaluation prompts that training also samples: {leaked}"
    # Only the held-out texts leave training: every other record of the file is trained on.
    assert trained == {r["prompt"] for r in rows} - eval_texts


def test_held_out_records_are_the_smallest_text_hashes_whatever_the_seed(tmp_path):
    rows = _rows(25)
    path = _write(tmp_path / "prompts.jsonl", rows)
    expected = sorted((r["prompt"] for r in rows), key=lambda t: hashlib.sha256(t.encode()).digest())[:5]
    for seed in (1, 2, 1234):
        assert [p.text for p in _source(path, seed=seed, eval_count=5).eval_prompts()] == expected
    # Appending records keeps the earlier held-out prompts unless a new text hashes below them.
    more = _rows(26)
    grown = _source(_write(tmp_path / "grown.jsonl", more), eval_count=5).eval_prompts()
    new_text = more[-1]["prompt"]
    expected_grown = sorted(expected + [new_text], key=lambda t: hashlib.sha256(t.encode()).digest())[:5]
    assert [p.text for p in grown] == expected_grown


def test_held_out_records_keep_their_ids_and_reference(tmp_path):
    rows = [{"q": f"q{i}", "a": f"a{i}", "tag": "math" if i % 2 else "code"} for i in range(6)]
    source = _source(_write(tmp_path / "prompts.jsonl", rows), eval_count=2, prompt_key="q", answer_key="a",
                     domain_key="tag")
    for p in source.eval_prompts():
        i = int(p.text[1:])
        assert p.ids == [TOKENIZER.bos_id] + list(f"q{i}".encode())
        assert p.reference == list(f"a{i}".encode()) + [TOKENIZER.eos_id]
        assert p.domain == ("math" if i % 2 else "code")


def test_eval_path_gives_the_eval_prompts_and_training_drops_only_their_texts(tmp_path):
    train = _write(tmp_path / "train.jsonl", [{"q": f"t{i}", "a": "x"} for i in range(6)] + [{"q": "e1", "a": "y"}])
    evals = _write(tmp_path / "eval.jsonl", [{"q": f"e{i}", "a": f"r{i}"} for i in range(5)])
    source = _source(train, eval_count=3, eval_path=evals, prompt_key="q", answer_key="a")
    evaluated = _run_eval_prompts(source, 3)
    assert [p.text for p in evaluated] == ["e0", "e1", "e2"]          # the eval file's first eval.prompts, in order
    assert [p.reference for p in evaluated] == [list(f"r{i}".encode()) + [TOKENIZER.eos_id] for i in range(3)]
    # rollout.path's "e1" is an evaluation prompt: it leaves training; no t* record is held out.
    assert _training_texts(source) == {f"t{i}" for i in range(6)}


def test_a_file_too_small_to_hold_out_eval_prompts_is_refused(tmp_path):
    path = _write(tmp_path / "prompts.jsonl", [{"prompt": t} for t in ("a b", "a b", "c d")])
    with pytest.raises(DataError) as error:
        _source(path, eval_count=2)
    message = str(error.value)
    assert "holds 3 prompts (2 distinct)" in message and "eval.prompts=2" in message
    assert "to 1 or less" in message and "eval.path" in message
    one = _source(path, eval_count=1)                                  # 1 held out: the other text still trains
    assert len(one.eval_prompts()) == 1 and one.records
    assert {p.text for p in one.records}.isdisjoint({p.text for p in one.eval_prompts()})


def test_eval_path_problems_are_refused_naming_the_file(tmp_path):
    train = _write(tmp_path / "train.jsonl", _rows(4))
    short = _write(tmp_path / "eval.jsonl", _rows(2))
    with pytest.raises(DataError, match=r"eval.path .*eval.jsonl holds 2 prompts, fewer than eval.prompts=3"):
        _source(train, eval_count=3, eval_path=short)
    with pytest.raises(FileNotFoundError, match=r"eval.path .*missing.jsonl not found"):
        _source(train, eval_count=1, eval_path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match=r"every prompt of rollout.path .* is also an evaluation prompt"):
        _source(train, eval_count=4, eval_path=train)
    task = get_task("sort_digits")
    with pytest.raises(ValueError, match="eval.path .* rollout.source=jsonl only"):
        PromptSource(task.tokenizer(), 7, 64, task=task, eval_count=4, eval_path=short)


def test_task_eval_prompts_are_the_eval_split_built_as_training_prompts():
    task = get_task("sort_digits")
    tokenizer = task.tokenizer()
    source = PromptSource(tokenizer, 7, 64, task=task, eval_count=5)
    evaluated = source.eval_prompts()
    examples = task.examples("eval", 5, 7)
    assert [p.text for p in evaluated] == [ex.prompt for ex in examples]
    for p, ex in zip(evaluated, examples):
        assert p.ids == [tokenizer.bos_id] + tokenizer.encode(ex.prompt)
        assert p.domain == task.name and p.privileged == tokenizer.encode(ex.answer) and p.reference is None
    assert [p.text for p in source.eval_prompts()] == [p.text for p in evaluated]      # the same list every call
    trained = {p.text for step in range(20) for p in source.prompts(step, 0, 1, 8)}
    assert trained.isdisjoint(p.text for p in evaluated), "the task's eval split is not a training prompt"


# -- fuzzing: any bytes, any JSON lines -> prompts or a DataError naming the file and line -------------------------
# OPD_FUZZ_EXAMPLES raises the example count for a longer hunt; CI runs 200.
FUZZ = settings(deadline=None, max_examples=int(os.environ.get("OPD_FUZZ_EXAMPLES", "200")),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
    | st.sampled_from(["\ud800", "12", "1=", "x" * 80, "1" * 5000]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["prompt", "response", "domain", "hint"]) | st.text(max_size=4), inner, max_size=4),
    max_leaves=12)
LINES = st.lists(JSON_VALUES.map(json.dumps) | st.text(max_size=30) | st.sampled_from(["", "[" * 5000]),
                 max_size=6).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass"))
DIGITS = get_task("sort_digits").tokenizer()


@FUZZ
@given(content=st.binary(max_size=120) | LINES, eval_count=st.integers(0, 2), keys=st.booleans(),
       digits=st.booleans())
def test_any_prompt_file_gives_prompts_or_a_data_error(tmp_path, content, eval_count, keys, digits):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(content)
    context = {"domain_key": "domain", "privileged_key": "hint"} if keys else {}
    try:
        source = PromptSource(DIGITS if digits else TOKENIZER, 7, 16, path=str(path), eval_count=eval_count,
                              **context)
    except DataError as exc:
        assert str(path) in str(exc), f"the error does not name the file: {exc}"
        return
    assert source.records and all(len(p.ids) <= 16 for p in source.records)
    assert len(source.prompts(0, 0, 1, 3)) == 3


@pytest.mark.parametrize("line,expected", [
    # Each escaped as another exception before its fix (the JSONL reader's fuzzer found the JSON ones; this reader
    # shares parse_json_line and the tokenizers).
    ('{"prompt": "\\ud800"}', "'prompt' is not valid Unicode"),                   # UnicodeEncodeError in encode
    ('{"prompt": "ok", "response": "\\udfff", "domain": "d", "hint": "1"}', "'response' is not valid Unicode"),
    ("[" * 5000, "not valid JSON (nested deeper than"),                           # RecursionError
    ('{"prompt": "1=", "hint": "\\ud800", "domain": "d"}', "'hint' is not valid Unicode"),
])
def test_prompt_reader_crashes_are_data_errors(tmp_path, line, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "1=", "response": "1", "domain": "d", "hint": "1"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}, line 2: ") + ".*" + re.escape(expected)):
        PromptSource(TOKENIZER, 7, 64, path=str(path), domain_key="domain", privileged_key="hint")


def test_prompt_outside_a_character_tokenizer_names_the_line(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "12="}, {"prompt": "1a="}])
    with pytest.raises(DataError, match=re.escape(f"{path}, line 2: ") + ".*outside the task alphabet"):
        PromptSource(DIGITS, 7, 64, path=path)
    answer = _write(tmp_path / "a.jsonl", [{"prompt": "12=", "response": "x"}])
    with pytest.raises(DataError, match=re.escape(f"{answer}, line 1: ") + ".*outside the task alphabet"):
        PromptSource(DIGITS, 7, 64, path=answer)
