"""A served teacher whose replies turn bad part way through a run, driven through the real clients against local
servers on 127.0.0.1: after N good replies the server answers with non-finite or positive logprobs, top-k ids past
the vocabulary, the wrong number of positions, or another model's answers. Each bad reply is rejected (never
returned to the loop), counted, and the batch asked again within teacher.server.reply_retries; then the client
stops with an error naming the server's URL, the check, the row/column and the value. A server that now serves
another model stops the run at the first rejected reply. Attempts are counted in the servers' request logs; nothing
is timed."""

from __future__ import annotations

import math
import re
import threading

import pytest

from opd_megatron.teachers.http import RejectedReplyError
from opd_megatron.teachers.sglang import SGLangTeacher
from opd_megatron.teachers.vllm import VLLMTeacher
from tests.teachers.fake_server import VOCAB, FakeServer, assert_matches_toy, make_request, sglang_generate, \
    sglang_routes, vllm_completions, vllm_routes

KNOBS = {"vocab_size": VOCAB, "timeout_s": 5.0, "backoff_s": 0.01, "reply_retries": 2}
GOOD = 2            # good replies before the server degrades


class Degrading:
    """A scoring route that answers `build(body)` for the first `good` requests, then `build(body)` altered by
    `change` for the next `bad` ones (None: for ever), then good again; counts the requests."""

    def __init__(self, build, change, good: int = GOOD, bad: int | None = None):
        self.build, self.change, self.good, self.bad = build, change, good, bad
        self.requests = 0
        self._lock = threading.Lock()

    def degraded(self) -> bool:
        return self.requests > self.good and (self.bad is None or self.requests <= self.good + self.bad)

    def __call__(self, body, headers):
        with self._lock:
            self.requests += 1
            bad = self.degraded()
        reply = self.build(body)
        if bad:
            self.change(reply)
        return reply


def _sglang_nan(reply):
    reply[1]["meta_info"]["input_token_logprobs"][3][0] = math.nan


def _sglang_positive(reply):
    reply[0]["meta_info"]["input_top_logprobs"][2][0][0] = 0.75


def _sglang_id_past_vocab(reply):
    reply[2]["meta_info"]["input_top_logprobs"][1][1][1] = VOCAB + 5


def _sglang_short(reply):
    reply[0]["meta_info"]["input_token_logprobs"].pop()


def _vllm_inf(reply):
    position = reply["choices"][1]["prompt_logprobs"][4]
    position[next(iter(position))]["logprob"] = -math.inf


def _vllm_id_past_vocab(reply):
    reply["choices"][0]["prompt_logprobs"][6][str(VOCAB)] = {"logprob": -0.01, "rank": 1, "decoded_token": "?"}


def _vllm_short(reply):
    reply["choices"][2]["prompt_logprobs"].pop()


def _vllm_other_model(reply):
    reply["model"] = "someone-else"


SGLANG_FAULTS = {
    "nan": (_sglang_nan, r"row 1 column 3: sampled-token logprob nan is NaN/inf or positive"),
    "positive": (_sglang_positive, r"row 0 column 5 \(input_top_logprobs\[2\]\): logprob 0.75 is NaN/inf or "
                                  r"positive"),
    "id_past_vocab": (_sglang_id_past_vocab, r"row 2 column 7: top-k ids \[69\] outside \[0, 64\)"),
    "wrong_length": (_sglang_short, r"row 0: meta_info.input_token_logprobs has 4 entries, expected 5"),
}
VLLM_FAULTS = {
    "inf": (_vllm_inf, r"row 1 column 3 \(prompt_logprobs\[4\]\): logprob -inf is NaN/inf or positive"),
    "id_past_vocab": (_vllm_id_past_vocab, r"row 0 column 5: top-k ids \[64\] outside \[0, 64\)"),
    "wrong_length": (_vllm_short, r"row 2: prompt_logprobs has 11 entries, expected 12"),
    "other_model": (_vllm_other_model, r"the reply is from model 'someone-else', not teacher.server.model='teacher'"),
}


def _client(kind: str, url: str):
    if kind == "sglang":
        return SGLangTeacher({"urls": [url], **KNOBS})
    return VLLMTeacher({"urls": [url], "model": "teacher", **KNOBS})


def _server(kind: str, route: Degrading) -> FakeServer:
    return FakeServer(sglang_routes(route) if kind == "sglang" else vllm_routes(route))


CASES = [("sglang", name) for name in SGLANG_FAULTS] + [("vllm", name) for name in VLLM_FAULTS]


@pytest.mark.parametrize("kind,fault", CASES)
def test_a_teacher_that_goes_bad_is_rejected_counted_retried_then_stops_naming_url_and_evidence(kind, fault):
    change, evidence = (SGLANG_FAULTS if kind == "sglang" else VLLM_FAULTS)[fault]
    route = Degrading(sglang_generate if kind == "sglang" else vllm_completions, change)
    request = make_request(topk=2)
    with _server(kind, route) as server, _client(kind, server.url) as teacher:
        for _ in range(GOOD):
            scores = teacher.score(request)
            assert_matches_toy(scores, request)
            assert scores.rejected_replies == 0
        with pytest.raises(RejectedReplyError) as caught:
            teacher.score(request)
        message = str(caught.value)
        # 1 + reply_retries attempts at the bad batch, each rejected and counted; then nothing more is sent.
        assert route.requests == GOOD + 3
        assert teacher.rejected_replies == 3
        assert server.url in message and "3 in a row" in message and "reply_retries=2" in message
        assert len(re.findall(evidence, message)) == 3, message      # the evidence of each attempt


@pytest.mark.parametrize("kind,fault", [("sglang", "nan"), ("sglang", "wrong_length"), ("vllm", "other_model")])
def test_one_bad_reply_is_asked_again_and_the_good_answer_is_used(kind, fault):
    change, _ = (SGLANG_FAULTS if kind == "sglang" else VLLM_FAULTS)[fault]
    route = Degrading(sglang_generate if kind == "sglang" else vllm_completions, change, good=1, bad=1)
    request = make_request(topk=2)
    with _server(kind, route) as server, _client(kind, server.url) as teacher:
        assert teacher.score(request).rejected_replies == 0
        scores = teacher.score(request)      # the bad reply, then the good one
        assert route.requests == 3 and teacher.rejected_replies == 1 and scores.rejected_replies == 1
        assert_matches_toy(scores, request)   # the accepted scores are the good reply's, nothing of the bad one
        assert teacher.score(request).rejected_replies == 0


def test_reply_retries_zero_stops_at_the_first_bad_reply():
    route = Degrading(sglang_generate, _sglang_nan, good=0)
    with FakeServer(sglang_routes(route)) as server, \
            SGLangTeacher({"urls": [server.url], **KNOBS, "reply_retries": 0}) as teacher:
        with pytest.raises(RejectedReplyError, match=r"1 in a row \(1 \+ teacher.server.reply_retries=0\)"):
            teacher.score(make_request())
        assert route.requests == 1


def test_a_server_that_now_serves_another_model_stops_at_the_first_rejected_reply():
    """The server is restarted on another checkpoint with a larger vocabulary: its replies hold ids past ours, and
    /get_model_info now names the other model. Asking again cannot help: the run stops at once, naming both."""
    model = {"path": "org/teacher-v1"}
    route = Degrading(sglang_generate, _sglang_id_past_vocab)
    routes = sglang_routes(route)
    routes[("GET", "/get_model_info")] = lambda b, h: {"model_path": model["path"], "served_model_name": None}
    request = make_request(topk=2)
    with FakeServer(routes) as server, SGLangTeacher({"urls": [server.url], **KNOBS}) as teacher:
        assert teacher.served == {server.url: "org/teacher-v1"}
        for _ in range(GOOD):
            teacher.score(request)
        model["path"] = "org/other-model"
        with pytest.raises(RejectedReplyError) as caught:
            teacher.score(request)
        message = str(caught.value)
        assert f"{server.url} now serves 'org/other-model', not 'org/teacher-v1'" in message, message
        assert "top-k ids [69] outside [0, 64)" in message      # the rejected reply's evidence
        assert route.requests == GOOD + 1 and teacher.rejected_replies == 1


def test_a_vllm_server_restarted_on_another_checkpoint_under_the_same_name_stops():
    root = {"path": "/models/toy"}
    route = Degrading(vllm_completions, _vllm_inf)
    routes = vllm_routes(route)
    routes[("GET", "/v1/models")] = lambda b, h: {"object": "list", "data": [
        {"id": "teacher", "object": "model", "root": root["path"], "max_model_len": 256}]}
    with FakeServer(routes) as server, VLLMTeacher({"urls": [server.url], "model": "teacher", **KNOBS}) as teacher:
        for _ in range(GOOD):
            teacher.score(make_request())
        root["path"] = "/models/other"
        with pytest.raises(RejectedReplyError, match=r"now serves 'teacher \(/models/other\)', not "
                                                     r"'teacher \(/models/toy\)'"):
            teacher.score(make_request())
