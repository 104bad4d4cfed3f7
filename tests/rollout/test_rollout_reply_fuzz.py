"""Property-based fuzzing of the served rollout engines' reply parsers (`rollout/served.py::parse_vllm_reply`,
`rollout/served_sglang.py::parse_sglang_reply`): whatever a rollout server sends back (any JSON shape, a valid reply
with any one part replaced, removed or duplicated), the parser gives rows that pass every check or a
`RolloutServerError` naming the server, never another exception (KeyError, TypeError, OverflowError, ...), so the
engine's bounded retry and its error line always apply. Crashes found are written down as regression tests at the
end, each seen to crash before its fix."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from opd_megatron.rollout.control import check_reported_version
from opd_megatron.rollout.generate import SamplingConfig
from opd_megatron.rollout.served import RolloutServerError, parse_vllm_reply
from opd_megatron.rollout.served_sglang import parse_sglang_reply
from tests.fuzz_json import FUZZ, json_values, mutate
from tests.rollout.test_sglang_rollout_protocol import sglang_row

WHERE = "rollout server http://127.0.0.1:9"
VOCAB, STOP = 64, 2
JSON = json_values((VOCAB, VOCAB - 1, STOP))
SAMPLED = SamplingConfig(max_new_tokens=6, temperature=0.7, top_k=20, n=2, stop_ids=(STOP,))   # SGLang's mask path
PLAIN = SamplingConfig(max_new_tokens=6, temperature=0.9, n=2, stop_ids=(STOP,))


def vllm_reply() -> dict:
    """A `/v1/completions` reply to `vllm_payload` with n=2: one row ended by the stop id, one by length."""
    return {"id": "cmpl-1", "object": "text_completion", "model": "student", "choices": [
        {"index": 1, "text": "", "token_ids": [4, 4, 8, 11, 12, 13], "finish_reason": "length",
         "logprobs": {"token_logprobs": [-2.0, -0.25, -0.5, -1.0, -3.0, -0.75], "tokens": None}},
        {"index": 0, "text": "", "token_ids": [7, 9, STOP], "finish_reason": "stop",
         "logprobs": {"token_logprobs": [-0.5, -1.25, -0.125], "tokens": None}}]}


def sglang_reply(masked: bool) -> list[dict]:
    return [sglang_row([1, 5], [7, 9, STOP], [-0.5, -1.25, -0.125], masked=masked),
            sglang_row([1, 5], [4, 4, 8, 11, 12, 13], [-2.0, -0.25, -0.5, -1.0, -3.0, -0.75], masked=masked)]


PARSERS = {
    "vllm": (vllm_reply, lambda reply: parse_vllm_reply(reply, PLAIN, VOCAB, WHERE)),
    "sglang_masked": (lambda: sglang_reply(True), lambda reply: parse_sglang_reply(reply, SAMPLED, VOCAB, "7", WHERE)),
    "sglang_plain": (lambda: sglang_reply(False), lambda reply: parse_sglang_reply(reply, PLAIN, VOCAB, "7", WHERE)),
}


def _parse(kind: str, reply):
    """The rows, or None for a RolloutServerError naming the server; any other exception fails the test."""
    try:
        rows = PARSERS[kind][1](reply)
    except RolloutServerError as exc:
        assert WHERE in str(exc), f"the error does not name the server: {exc}"
        return None
    assert len(rows) == 2
    for row in rows:       # accepted: then it passed every check a trained row needs
        assert 1 <= len(row.ids) == len(row.logprobs) <= SAMPLED.max_new_tokens
        assert all(type(t) is int and 0 <= t < VOCAB for t in row.ids)
        assert all(type(v) is float and math.isfinite(v) and v <= 1e-4 for v in row.logprobs)
        assert STOP not in row.ids[:-1]
    return rows


@pytest.mark.parametrize("kind", list(PARSERS))
def test_valid_replies_parse(kind):
    rows = _parse(kind, PARSERS[kind][0]())
    assert [r.ids for r in rows] == [[7, 9, STOP], [4, 4, 8, 11, 12, 13]]


@pytest.mark.parametrize("kind", list(PARSERS))
@FUZZ
@given(data=st.data())
def test_one_part_of_a_valid_reply_changed_gives_rows_or_a_rollout_error(kind, data):
    _parse(kind, mutate(PARSERS[kind][0](), data, JSON))


@pytest.mark.parametrize("kind", ["vllm", "sglang_masked"])
@FUZZ
@given(reply=JSON)
def test_any_json_gives_rows_or_a_rollout_error(kind, reply):
    _parse(kind, reply)


# -- regression tests: the crashes found, each written down -------------------------------------------------------

def _vllm_with(change) -> dict:
    reply = vllm_reply()
    change(reply["choices"][1])        # the row of index 0
    return reply


@pytest.mark.parametrize("change,message", [
    # `logprobs` that is not an object (AttributeError: 'bool' object has no attribute 'get'; found by the fuzzer)
    (lambda c: c.__setitem__("logprobs", True), "no token log-probs"),
    (lambda c: c.__setitem__("logprobs", [-0.5, -1.25, -0.125]), "no token log-probs"),
    # an index that is an infinite float (OverflowError in int())
    (lambda c: c.__setitem__("index", float("inf")), "integer `index`"),
    # an index that is not an integer but int() reads: 0.5 -> 0, true -> 1, "0" -> 0 (accepted silently before)
    (lambda c: c.__setitem__("index", 0.5), "integer `index`"),
    (lambda c: c.__setitem__("index", "0"), "integer `index`"),
    # a choice that is not an object (TypeError: list indices must be integers)
    (lambda c: (c.clear(), c.update({"index": [0]})), "integer `index`"),
])
def test_vllm_reply_crashes_are_rollout_errors(change, message):
    with pytest.raises(RolloutServerError, match=message):
        parse_vllm_reply(_vllm_with(change), PLAIN, VOCAB, WHERE)


def test_a_choice_that_is_not_an_object_is_a_rollout_error():
    reply = vllm_reply()
    reply["choices"][0] = [1]
    with pytest.raises(RolloutServerError, match="integer `index`"):
        parse_vllm_reply(reply, PLAIN, VOCAB, WHERE)


@pytest.mark.parametrize("reply", [["7"], "7", None, {"weight_version": 8}, {}])
def test_a_weight_info_reply_without_the_version_is_a_rollout_error(reply):
    """`GET /weight_info` after a sync (disk or NCCL): a list reply crashed with AttributeError before."""
    with pytest.raises(RolloutServerError, match="reports weight version .* expected '7'"):
        check_reported_version(reply, "http://127.0.0.1:9", "7", "reloading /w/v7")
    check_reported_version({"weight_version": 7}, "http://127.0.0.1:9", "7", "reloading /w/v7")
