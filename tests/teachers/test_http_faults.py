"""The served-teacher transport against local servers that misbehave on purpose: refused connections, a server
dying mid-run, hung requests, malformed replies, 429/503 with Retry-After, the in-flight bound, batching by a token
budget, and the API key (sent as Bearer, never shown). Every loop is bounded; timeouts are short. Nothing is
timed: attempts are counted in the servers' request logs (or, where no server answers, in the client's own calls),
and the waits between them are the values the client chose, recorded by `waits` instead of slept."""

import math
import threading
import time

import httpx
import pytest

from opd_megatron.config import ConfigError
from opd_megatron.teachers import http
from opd_megatron.teachers.base import TeacherError
from opd_megatron.teachers.http import HTTPTeacherConfig, pack_rows, retry_after_s
from opd_megatron.teachers.sglang import SGLangTeacher
from opd_megatron.teachers.vllm import VLLMTeacher
from tests.teachers.fake_server import VOCAB, FakeServer, Reply, assert_matches_toy, free_port, make_request, \
    sglang_generate, sglang_routes, vllm_completions, vllm_routes

# reply_retries=0: a rejected reply fails at once here (asking again is tests/teachers/test_degrading_teacher.py's).
FAST = {"vocab_size": VOCAB, "timeout_s": 2.0, "connect_timeout_s": 1.0, "max_retries": 2, "backoff_s": 0.05,
        "backoff_max_s": 0.2, "max_retry_time_s": 5.0, "reply_retries": 0}


def sglang(urls, **knobs):
    return SGLangTeacher({"urls": list(urls), **FAST, **knobs})


@pytest.fixture
def waits(monkeypatch):
    """The retry waits (seconds) the transport chooses, in order. A batch's requests wait on its `stop` event
    (http.HTTPTransport.post_all); here that event records the wait and returns at once instead of sleeping."""
    chosen: list[float] = []

    class RecordingEvent(threading.Event):
        def wait(self, timeout=None):
            chosen.append(timeout)
            return self.is_set()

    class Threading:  # http.py's view of `threading`: every name as it is, but Event
        Event = RecordingEvent

        def __getattr__(self, name):
            return getattr(threading, name)

    monkeypatch.setattr(http, "threading", Threading())
    return chosen


@pytest.fixture
def client_calls(monkeypatch):
    """Every GET / POST the client sends, as (method, url), also those that never reach a server."""
    calls: list[tuple[str, str]] = []
    for method in ("get", "post"):
        original = getattr(httpx.Client, method)

        def sent(self, url, *args, _method=method, _original=original, **kwargs):
            calls.append((_method.upper(), str(url)))
            return _original(self, url, *args, **kwargs)
        monkeypatch.setattr(httpx.Client, method, sent)
    return calls


def test_connection_refused_at_start_names_the_url(client_calls):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TeacherError, match=f"GET {url}/health_generate failed.*ConnectError.*is the teacher server "
                                           f"running"):
        sglang([url])
    assert client_calls == [("GET", f"{url}/health_generate")]  # one attempt, no retries


def test_server_killed_mid_run_retries_then_fails_naming_the_url(waits, client_calls):
    server = FakeServer(sglang_routes())
    t = sglang([server.url])
    assert_matches_toy(t.score(make_request()), make_request())
    assert waits == []
    server.stop()
    client_calls.clear()
    with pytest.raises(TeacherError, match=rf"after 3 attempt\(s\).*{server.url}/generate: ConnectError"):
        t.score(make_request())
    assert client_calls == [("POST", f"{server.url}/generate")] * 3  # 1 + max_retries, all to the one server
    # Two backoffs between them, doubling from backoff_s = 0.05, each jittered into [1/2, 1] of its value.
    assert len(waits) == 2 and 0.025 <= waits[0] <= 0.05 and 0.05 <= waits[1] <= 0.1, waits
    t.close()


def test_server_dying_after_one_request_gives_no_partial_result():
    calls = {"n": 0}
    lock = threading.Lock()

    def dies(body, headers):
        with lock:
            calls["n"] += 1
            first = calls["n"] == 1
        return sglang_generate(body) if first else Reply(drop=True)
    with FakeServer(sglang_routes(dies)) as server, sglang([server.url], max_rows_per_request=1, max_inflight=1) as t:
        request = make_request(lengths=(9, 6), score_start=(4, 1))
        with pytest.raises(TeacherError, match=r"after 3 attempt\(s\).*(RemoteProtocolError|ReadError|ConnectError)"):
            t.score(request)
        # One request per row, one in flight: row 0 answered once and never sent again, row 1 dropped on each of its
        # 1 + max_retries attempts, nothing after.
        sent = [body["input_ids"] for body in server.posts("/generate")]
        assert sent == [[request.row(0)]] + [[request.row(1)]] * 3, [[len(r) for r in rows] for rows in sent]
        assert calls["n"] == 4


def test_another_server_takes_over_when_one_is_down():
    dead = f"http://127.0.0.1:{free_port()}"
    with FakeServer(sglang_routes()) as server:
        t = SGLangTeacher({"urls": [server.url, dead], **FAST, "check_on_start": False, "balance": "round_robin",
                           "max_rows_per_request": 1})
        request = make_request()
        assert_matches_toy(t.score(request), request)  # each failed attempt on `dead` is retried on `server`
        t.close()


def test_hung_request_times_out():
    with FakeServer(sglang_routes(lambda b, h: Reply(sglang_generate(b), hang_s=3.0))) as server:
        with sglang([server.url], timeout_s=0.3, max_retries=1) as t:
            # A ReadTimeout: the client gave up on a request the server had received (it would answer after 3 s).
            with pytest.raises(TeacherError, match=r"after 2 attempt\(s\).*timed out \(ReadTimeout, timeout_s=0.3\)"):
                t.score(make_request(lengths=(6,), score_start=(2,), length=6))
            assert len(server.posts("/generate")) == 2  # both attempts reached the server


def _mangled(routes, build, change):
    """`routes` whose scoring reply is `build(body)` altered in place by `change`."""
    def route(body, headers):
        reply = build(body)
        change(reply)
        return reply
    return routes(route)


def _mangle_sglang(change):
    return _mangled(sglang_routes, sglang_generate, change)


def _mangle_vllm(change):
    return _mangled(vllm_routes, vllm_completions, change)


@pytest.mark.parametrize("change,message", [
    (lambda r: r[1]["meta_info"]["input_token_logprobs"].pop(), "row 1: meta_info.input_token_logprobs has 4 entries, "
                                                                "expected 5"),
    (lambda r: r[0]["meta_info"]["input_top_logprobs"][2].pop(), "2 top-logprob entries, expected at least 3"),
    (lambda r: r.pop(), "2 results for 3 rows"),
    (lambda r: r[0]["meta_info"]["input_token_logprobs"].__setitem__(0, [-0.5, 1, None]), "should be null"),
    (lambda r: r[2]["meta_info"]["input_token_logprobs"][1].__setitem__(0, None), "expected a logprob number"),
])
def test_sglang_malformed_replies_are_rejected(change, message):
    with FakeServer(_mangle_sglang(change)) as server, sglang([server.url]) as t:
        with pytest.raises(TeacherError, match=message.replace("(", r"\(").replace("[", r"\[")):
            t.score(make_request(topk=3))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 0.5])
@pytest.mark.parametrize("field", ["sampled", "topk", "extra"])
def test_sglang_non_finite_or_positive_logprobs_are_rejected(bad, field):
    def change(reply):
        meta = reply[0]["meta_info"]
        entry = {"sampled": meta["input_token_logprobs"][2], "topk": meta["input_top_logprobs"][2][0],
                 "extra": meta["input_token_ids_logprobs"][2][0]}[field]
        entry[0] = bad
    request = make_request(topk=2, extra=2)
    request.extra_ids[0, :, 0] = 5  # the id whose logprob is mangled is asked for at every column
    with FakeServer(_mangle_sglang(change)) as server, sglang([server.url]) as t:
        with pytest.raises(TeacherError, match="NaN/inf or positive"):
            t.score(request)


def test_sglang_ids_out_of_range_are_rejected():
    def change(reply):
        reply[0]["meta_info"]["input_top_logprobs"][1][0][1] = VOCAB + 3
    with FakeServer(_mangle_sglang(change)) as server, sglang([server.url]) as t:
        with pytest.raises(TeacherError, match=r"top-k ids \[67\] outside \[0, 64\)"):
            t.score(make_request(topk=2))


@pytest.mark.parametrize("change,message", [
    (lambda r: r["choices"][0]["prompt_logprobs"].pop(), "prompt_logprobs has 8 entries, expected 9"),
    (lambda r: r["choices"].pop(), "expected 3 choices, got 2"),
    (lambda r: r["choices"][1]["prompt_logprobs"][3].update({"7": {"logprob": math.nan}}), "NaN/inf or positive"),
    (lambda r: r["choices"][1]["prompt_logprobs"][3].update({"7": {"logprob": 0.25}}), "NaN/inf or positive"),
    (lambda r: r["choices"][2]["prompt_logprobs"][9].update({"900": {"logprob": -1e-9}}), r"outside \[0, 64\)"),
])
def test_vllm_malformed_replies_are_rejected(change, message):
    with FakeServer(_mangle_vllm(change)) as server, \
            VLLMTeacher({"urls": [server.url], "model": "teacher", **FAST}) as t:
        with pytest.raises(TeacherError, match=message):
            t.score(make_request(topk=2))


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured_then_success(status, waits):
    calls = []

    def busy(body, headers):
        calls.append(status)
        if len(calls) <= 2:
            return Reply({"error": "busy"}, status, {"Retry-After": "0.3"})
        return sglang_generate(body)
    request = make_request()
    with FakeServer(sglang_routes(busy)) as server, sglang([server.url], max_retries=3) as t:
        assert_matches_toy(t.score(request), request)
        assert len(server.posts("/generate")) == 3
    assert len(calls) == 3
    assert waits == [0.3, 0.3]  # Retry-After beats the 0.05 s and 0.1 s backoffs


def test_retry_after_beyond_the_retry_budget_fails_at_once(waits):
    route = lambda b, h: Reply({"error": "overloaded"}, 503, {"Retry-After": "60"})
    with FakeServer(sglang_routes(route)) as server, sglang([server.url], max_retry_time_s=2.0) as t:
        with pytest.raises(TeacherError, match=r"HTTP 503.*next retry in 60.00s would pass max_retry_time_s=2.0"):
            t.score(make_request())
        assert waits == []  # no wait at all
        assert len(server.posts("/generate")) == 1


def test_other_http_errors_are_not_retried():
    route = lambda b, h: Reply({"error": "token id 9999 out of vocabulary"}, 400)
    with FakeServer(sglang_routes(route)) as server, sglang([server.url]) as t:
        with pytest.raises(TeacherError, match=f"POST {server.url}/generate returned HTTP 400.*out of vocabulary"):
            t.score(make_request())
        assert len(server.posts("/generate")) == 1


@pytest.mark.parametrize("balance", ["least_inflight", "round_robin"])
def test_inflight_limit_is_respected_across_servers(balance):
    lock, now, peak = threading.Lock(), [0], [0]

    def slow(body, headers):  # counts the requests in flight over both servers together
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        time.sleep(0.15)
        with lock:
            now[0] -= 1
        return sglang_generate(body)
    with FakeServer(sglang_routes(slow)) as one, FakeServer(sglang_routes(slow)) as two:
        with sglang([one.url, two.url], max_inflight=3, max_rows_per_request=1, balance=balance) as t:
            request = make_request(lengths=(6,) * 9, score_start=(1,) * 9, length=6)
            assert_matches_toy(t.score(request), request)
        assert peak[0] == 3
        assert len(one.posts("/generate")) + len(two.posts("/generate")) == 9
        assert one.posts("/generate") and two.posts("/generate")  # both servers used


def test_inflight_limit_counted_on_one_server():
    slow = lambda b, h: Reply(sglang_generate(b), hang_s=0.1)
    with FakeServer(sglang_routes(slow)) as server, sglang([server.url], max_inflight=2, max_rows_per_request=1) as t:
        t.score(make_request(lengths=(6,) * 8, score_start=(1,) * 8, length=6))
        assert server.max_inflight == 2


def test_rows_are_batched_by_token_budget_and_row_cap():
    lengths = (9, 6, 12, 3, 4, 5, 12)
    request = make_request(lengths=lengths, score_start=(1,) * 7, length=12)
    with FakeServer(sglang_routes()) as server, \
            sglang([server.url], max_tokens_per_request=16, max_rows_per_request=3, max_inflight=1) as t:
        assert_matches_toy(t.score(request), request)
        sizes = [[len(ids) for ids in body["input_ids"]] for body in server.posts("/generate")]
    assert sizes == [[9, 6], [12, 3], [4, 5], [12]]
    assert pack_rows(lengths, 16, 3) == [[0, 1], [2, 3], [4, 5], [6]]
    assert pack_rows([1] * 5, 100, 2) == [[0, 1], [2, 3], [4]]
    assert pack_rows([30, 2], 16, 8) == [[0], [1]]  # a row above the budget goes alone


def test_api_key_is_sent_as_bearer_and_never_shown(monkeypatch):
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("OPD_TEST_TEACHER_KEY", secret)

    def generate(body, headers):
        if headers.get("authorization") != f"Bearer {secret}":
            return Reply({"error": "unauthorized"}, 401)
        # a server that echoes the request headers into its error
        return Reply({"error": f"bad request; headers were {headers}"}, 400)
    routes = {**sglang_routes(generate)}
    with FakeServer(routes) as server:
        t = sglang([server.url], api_key_env="OPD_TEST_TEACHER_KEY")
        with pytest.raises(TeacherError) as caught:
            t.score(make_request())
        _, _, headers, _ = server.requests[-1]
        assert headers["authorization"] == f"Bearer {secret}"
        assert "HTTP 400" in str(caught.value) and secret not in str(caught.value)
        assert "<api key>" in str(caught.value)
        for text in (repr(t), repr(t.transport), repr(t.config), str(t.config.__dict__)):
            assert secret not in text
        assert "OPD_TEST_TEACHER_KEY" in repr(t.transport)
        t.close()
    with FakeServer(routes) as server:  # no key: the server refuses, and the error says so without a key
        with sglang([server.url]) as t, pytest.raises(TeacherError, match="HTTP 401"):
            t.score(make_request())


def test_missing_api_key_variable_is_named():
    with pytest.raises(ConfigError, match="'OPD_TEST_NO_SUCH_KEY' is not set"):
        sglang(["http://127.0.0.1:1"], api_key_env="OPD_TEST_NO_SUCH_KEY")


def test_retry_after_formats():
    assert retry_after_s("2") == 2.0 and retry_after_s("0.5") == 0.5
    assert retry_after_s(None) is None and retry_after_s("soon") is None
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: no wait
    with pytest.raises(ConfigError, match="teacher.server.max_inflight"):
        HTTPTeacherConfig.from_dict({"urls": "http://h:1", "vocab_size": 8, "max_inflight": 0})
    assert HTTPTeacherConfig.from_dict({"urls": "http://h:1/", "vocab_size": 8}).urls == ["http://h:1"]
