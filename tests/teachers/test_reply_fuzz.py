"""Property-based fuzzing of the served teachers' reply handling: whatever a server sends (any bytes, any JSON shape,
a valid reply with any one part replaced, removed or duplicated), the client gives label-aligned scores that pass the
checks or a `TeacherError`, never another exception (KeyError, TypeError, IndexError, OverflowError, ...).

The fuzzed path is the one `ServedTeacher.score` runs on every reply: `HTTPTransport._json` (bytes -> JSON) and
`ServedTeacher.assemble` (JSON -> parse -> alignment -> checks), without sockets; and `identities` (the servers'
model info, read at start and after a rejected reply). The crashes are written down as explicit regression tests at
the end: the fuzzer found a vLLM choice index that is a list (unhashable); reading the parsers while fixing it found
the others, each seen to crash before its fix."""

from __future__ import annotations

import httpx
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from opd_megatron.teachers.base import TeacherError
from opd_megatron.teachers.http import HTTPTransport, pack_rows
from opd_megatron.teachers.sglang import SGLangTeacher
from opd_megatron.teachers.vllm import VLLMTeacher
from tests.fuzz_json import FUZZ, json_values, mutate
from tests.teachers.fake_server import VOCAB, make_request, sglang_generate, vllm_completions

URL = "http://127.0.0.1:9"   # never contacted: check_on_start is off and nothing is posted
KNOBS = {"urls": [URL], "vocab_size": VOCAB, "check_on_start": False}
JSON = json_values((VOCAB, VOCAB - 1))


@pytest.fixture(scope="module")
def teachers():
    sglang = SGLangTeacher(dict(KNOBS))
    vllm = VLLMTeacher({**KNOBS, "model": "teacher"})
    yield {"sglang": sglang, "vllm": vllm}
    sglang.close()
    vllm.close()


REQUESTS = {
    "sglang": make_request(lengths=(6, 4), score_start=(2, 1), length=6, topk=2, extra=2),
    "sglang_plain": make_request(lengths=(5,), score_start=(1,), length=5),
    "vllm": make_request(lengths=(6, 4), score_start=(2, 1), length=6, topk=2),
    "vllm_plain": make_request(lengths=(5,), score_start=(3,), length=5),
}


def _valid_reply(kind: str, teacher, request) -> object:
    rows = list(range(request.batch_size))
    body = teacher.payload(request, rows)
    return sglang_generate(body) if kind == "sglang" else vllm_completions(body)


def _assemble(teacher, request, reply):
    """The scores of one reply to a one-request batch, or the TeacherError; any other exception fails the test."""
    rows = list(range(request.batch_size))
    assert pack_rows([int(n) for n in request.lengths], 10 ** 6, 10 ** 6) == [rows]
    try:
        return teacher.assemble(request, [rows], [(URL, reply)])
    except TeacherError as exc:
        assert URL in str(exc), f"the error does not name the server: {exc}"
        return None


@pytest.mark.parametrize("kind", ["sglang", "sglang_plain", "vllm", "vllm_plain"])
def test_valid_replies_assemble(teachers, kind):
    teacher, request = teachers[kind.split("_")[0]], REQUESTS[kind]
    scores = teacher.assemble(request, [list(range(request.batch_size))],
                              [(URL, _valid_reply(kind.split("_")[0], teacher, request))])
    assert torch.equal(scores.valid, request.valid_mask())


@pytest.mark.parametrize("kind", ["sglang", "sglang_plain", "vllm", "vllm_plain"])
@FUZZ
@given(data=st.data())
def test_one_part_of_a_valid_reply_changed_gives_scores_or_a_teacher_error(teachers, kind, data):
    teacher, request = teachers[kind.split("_")[0]], REQUESTS[kind]
    reply = mutate(_valid_reply(kind.split("_")[0], teacher, request), data, JSON)
    scores = _assemble(teacher, request, reply)
    if scores is not None:      # accepted: then it passed every check
        values = scores.sampled_logprobs[scores.valid]
        assert bool(torch.isfinite(values).all()) and bool((values <= 1e-4).all())


@pytest.mark.parametrize("kind", ["sglang", "vllm"])
@FUZZ
@given(reply=JSON)
def test_any_json_gives_scores_or_a_teacher_error(teachers, kind, reply):
    _assemble(teachers[kind], REQUESTS[kind], reply)


@FUZZ
@given(body=st.binary(max_size=200) | JSON.map(lambda v: repr(v).encode()))
def test_any_bytes_give_json_or_a_teacher_error(teachers, body):
    transport: HTTPTransport = teachers["sglang"].transport
    reply = httpx.Response(200, content=body, request=httpx.Request("POST", URL + "/generate"))
    try:
        value = transport._json(reply, f"POST {URL}/generate")
    except TeacherError as exc:
        assert URL in str(exc)
        return
    _assemble(teachers["sglang"], REQUESTS["sglang"], value)


# -- regression tests: the crashes found (see the module docstring), each written down ------------------------------

def _sglang_with(teacher, request, change):
    reply = _valid_reply("sglang", teacher, request)
    change(reply)
    return reply


def _vllm_with(teacher, request, change):
    reply = _valid_reply("vllm", teacher, request)
    change(reply)
    return reply


@pytest.mark.parametrize("change,message", [
    # a logprob that is an integer too large for a float (OverflowError)
    (lambda r: r[0]["meta_info"]["input_token_logprobs"][1].__setitem__(0, -10 ** 400), "not a finite number"),
    # a token id too large for int64 (RuntimeError: Overflow when unpacking long)
    (lambda r: r[0]["meta_info"]["input_top_logprobs"][1][0].__setitem__(1, 2 ** 63), "token id"),
    (lambda r: r[0]["meta_info"]["input_token_ids_logprobs"][1][0].__setitem__(1, 2 ** 64), "token id"),
    # a token id that is a digit string Python's int() does not read (ValueError)
    (lambda r: r[0]["meta_info"]["input_top_logprobs"][1][0].__setitem__(1, "²"), "token id"),
])
def test_sglang_reply_crashes_are_teacher_errors(teachers, change, message):
    request = REQUESTS["sglang"]
    with pytest.raises(TeacherError, match=message):
        teachers["sglang"].assemble(request, [[0, 1]], [(URL, _sglang_with(teachers["sglang"], request, change))])


@pytest.mark.parametrize("change,message", [
    # a choice index that is a list or a dict (TypeError: unhashable)
    (lambda r: r["choices"][0].__setitem__("index", [0]), r"choice indices \[\[0\], 1\] are not the integers 0..1"),
    (lambda r: r["choices"][0].__setitem__("index", {"a": 1}), "choice indices"),
    # a top-logprob key that is a non-ASCII digit string (ValueError in int())
    (lambda r: r["choices"][0]["prompt_logprobs"][3].update({"²": {"logprob": -1.0}}), "token id"),
    # a logprob that is an integer too large for a float
    (lambda r: r["choices"][0]["prompt_logprobs"][3].update({"5": {"logprob": -10 ** 400}}), "not a finite number"),
    # a token id too large for int64
    (lambda r: r["choices"][0]["prompt_logprobs"][3].update({str(2 ** 70): {"logprob": -0.5}}), "token id"),
])
def test_vllm_reply_crashes_are_teacher_errors(teachers, change, message):
    request = REQUESTS["vllm"]
    with pytest.raises(TeacherError, match=message):
        teachers["vllm"].assemble(request, [[0, 1]], [(URL, _vllm_with(teachers["vllm"], request, change))])


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a": ' * 100_000, b"1" * 5000])
def test_bytes_crashes_are_teacher_errors(teachers, body):
    """Nesting deeper than the JSON parser's recursion (RecursionError) and an integer of more digits than Python
    converts (ValueError from int parsing, not a JSONDecodeError) are replies that are not JSON."""
    reply = httpx.Response(200, content=body, request=httpx.Request("POST", URL + "/generate"))
    with pytest.raises(TeacherError, match="not JSON"):
        teachers["sglang"].transport._json(reply, f"POST {URL}/generate")


@pytest.mark.parametrize("kind", ["sglang", "vllm"])
@FUZZ
@given(info=JSON | st.fixed_dictionaries({"data": JSON, "model_path": JSON, "served_model_name": JSON}))
def test_any_identity_reply_gives_an_identity_or_a_teacher_error(teachers, kind, info):
    """GET /get_model_info (SGLang) and GET /v1/models (vLLM), read at start and again after a rejected reply."""
    teacher = teachers[kind]
    teacher.transport.get_json = lambda url, path: info      # the instance's, for this example only
    try:
        identities = teacher.identities()
    except TeacherError as exc:
        assert URL in str(exc), f"the error does not name the server: {exc}"
    else:
        assert list(identities) == [URL] and all(isinstance(v, str) for v in identities.values())
    finally:
        del teacher.transport.get_json
