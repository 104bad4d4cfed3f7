"""Served teachers' API keys: from the environment or a file only, never from the config itself; never in an error
message, a repr or a log line, even when a server echoes the request's headers back. (The whole-run check, every
file of a run directory and its stdout/stderr grepped for the key, is tests/opd/test_served_teacher_faults.py.)"""

from __future__ import annotations

import pytest

from opd_megatron.config import ConfigError, load_config
from opd_megatron.teachers.base import TeacherError
from opd_megatron.teachers.sglang import SGLangTeacher
from tests.teachers.fake_server import VOCAB, FakeServer, Reply, make_request, sglang_generate, sglang_routes

KEY = "sk-live-0123456789abcdefSECRET"
FAST = {"vocab_size": VOCAB, "timeout_s": 2.0, "backoff_s": 0.01, "max_retries": 0, "reply_retries": 0}
SERVED = ["run.algorithm=opd", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2",
          "parallel.global_batch_size=8", "opd.loss=policy_gradient", "teacher.kind=sglang", "teacher.topk=4",
          "teacher.server.urls=[http://127.0.0.1:1]", "teacher.server.vocab_size=14"]


@pytest.mark.parametrize("override,key", [
    (f"teacher.server.api_key_env={KEY}", "api_key_env"),                    # the key pasted where its NAME goes
    ("teacher.server.api_key_env=hf_AbCdEf0123456789SECRET", "api_key_env"),   # a token that looks like a name
    (f"teacher.server.api_key_file={KEY}", "api_key_file"),                  # the key pasted where a path goes
])
def test_a_key_written_in_the_config_is_refused_without_showing_it(override, key):
    with pytest.raises(ConfigError) as caught:
        load_config(None, SERVED + [override])
    message = str(caught.value)
    assert f"teacher.server.{key}: expected" in message and "not shown: it may be the key itself" in message
    assert override.split("=", 1)[1] not in message


def test_an_unknown_api_key_entry_is_refused_without_showing_it():
    with pytest.raises(ConfigError, match="unknown config key 'teacher.server.api_key'") as caught:
        load_config(None, SERVED + [f"teacher.server.api_key={KEY}"])
    assert KEY not in str(caught.value)


def test_env_and_file_are_exclusive_and_names_are_kept():
    with pytest.raises(ConfigError, match="at most one of teacher.server.api_key_env and teacher.server.api_key_file"):
        load_config(None, SERVED + ["teacher.server.api_key_env=OPD_KEY", "teacher.server.api_key_file=/run/k"])
    cfg = load_config(None, SERVED + ["teacher.server.api_key_env=OPD_TEACHER_API_KEY"])
    assert cfg.teacher.server.api_key_env == "OPD_TEACHER_API_KEY"


def _keyed_routes(generate=None):
    def route(body, headers):
        if headers.get("authorization") != f"Bearer {KEY}":
            return Reply({"error": "unauthorized"}, 401)
        return (generate or (lambda b, h: sglang_generate(b)))(body, headers)
    return sglang_routes(route)


def test_the_key_is_read_from_a_file(tmp_path):
    key_file = tmp_path / "teacher.key"
    key_file.write_text(f"{KEY}\n")
    with FakeServer(_keyed_routes()) as server:
        with SGLangTeacher({"urls": [server.url], **FAST, "api_key_file": str(key_file)}) as teacher:
            assert teacher.score(make_request()).valid.any()
            assert KEY not in repr(teacher.transport) and str(key_file) in repr(teacher.transport)
        assert server.requests[-1][2]["authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("content,message", [(None, "cannot read .*teacher.key \\(FileNotFoundError\\)"),
                                             ("\n", ".*teacher.key is empty; expected the API key on its first line")])
def test_a_missing_or_empty_key_file_is_named(tmp_path, content, message):
    key_file = tmp_path / "teacher.key"
    if content is not None:
        key_file.write_text(content)
    with pytest.raises(ConfigError, match="teacher.server.api_key_file: " + message):
        SGLangTeacher({"urls": ["http://127.0.0.1:1"], **FAST, "api_key_file": str(key_file)})


def test_a_malformed_reply_that_echoes_the_key_is_rejected_without_it(monkeypatch, caplog):
    """A reply that fails the checks is quoted in the error (the evidence), and logged when it is asked again: a server
    that echoes the request's headers into it must not put the key into either."""
    monkeypatch.setenv("OPD_TEST_SECRET_KEY", KEY)

    def echoing(body, headers):
        reply = sglang_generate(body)
        reply[1] = {"error": headers["authorization"]}
        return reply
    with FakeServer(_keyed_routes(echoing)) as server, \
            SGLangTeacher({"urls": [server.url], **FAST, "reply_retries": 1,
                           "api_key_env": "OPD_TEST_SECRET_KEY"}) as teacher:
        with pytest.raises(TeacherError, match="no meta_info") as caught:
            teacher.score(make_request())
    assert "<api key>" in str(caught.value) and KEY not in str(caught.value)
    assert "reply rejected" in caplog.text and KEY not in caplog.text


@pytest.mark.parametrize("status", [200, 400])
def test_a_key_cut_by_the_message_length_limit_leaves_no_part_behind(tmp_path, status):
    """Error messages quote at most a few hundred characters of a reply: the key is taken out before the cut, so a
    key that straddles it leaves no prefix behind."""
    filler = "x" * 270       # the key starts ~12 characters before the 300-character cut of a quoted reply
    key_file = tmp_path / "teacher.key"
    key_file.write_text(KEY)

    def echoing(body, headers):
        if status == 200:
            return Reply(f"not json {filler}{headers['authorization']}".encode())
        return Reply({"error": filler + headers["authorization"]}, status)
    with FakeServer(_keyed_routes(echoing)) as server, \
            SGLangTeacher({"urls": [server.url], **FAST, "api_key_file": str(key_file)}) as teacher:
        with pytest.raises(TeacherError) as caught:
            teacher.score(make_request())
    assert KEY[:8] not in str(caught.value), str(caught.value)[-200:]
