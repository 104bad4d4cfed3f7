"""SGLangTeacher against a local fake SGLang server: label-column alignment, top-k, extra ids, batching, checks."""

import pytest
import torch

from opd_megatron.config import ConfigError
from opd_megatron.teachers.base import TeacherError
from opd_megatron.teachers.sglang import SGLangTeacher
from tests.teachers.fake_server import VOCAB, FakeServer, assert_matches_toy, expected_scores, make_request, sglang_generate, \
    sglang_routes


def teacher(server, **knobs):
    return SGLangTeacher({"urls": [server.url], "vocab_size": VOCAB, "backoff_s": 0.01, "timeout_s": 5, **knobs})


@pytest.mark.parametrize("topk,extra", [(0, 0), (3, 0), (4, 3)])
def test_scores_are_label_aligned(topk, extra):
    request = make_request(topk=topk, extra=extra)
    with FakeServer(sglang_routes()) as server, teacher(server) as t:
        scores = t.score(request)
    assert_matches_toy(scores, request)


def test_request_fields():
    request = make_request(topk=2, extra=3)
    with FakeServer(sglang_routes()) as server, teacher(server) as t:
        t.score(request)
        body, = server.posts("/generate")
    assert body["input_ids"] == [request.row(b) for b in range(3)]  # pads never sent
    assert body["sampling_params"] == {"max_new_tokens": 0, "temperature": 1.0}
    assert body["return_logprob"] is True and body["top_logprobs_num"] == 2
    assert body["logprob_start_len"] == [4, 1, 7]
    for b, ids in enumerate(body["token_ids_logprob"]):  # the union of the row's scored columns' extra ids
        start, stop = int(request.score_start[b]), int(request.lengths[b]) - 1
        used = request.extra_ids[b, start:stop]
        assert ids == sorted(set(used[used >= 0].tolist()))


def test_extra_id_union_is_bounded():
    with FakeServer(sglang_routes()) as server, teacher(server, max_extra_ids=2) as t:
        with pytest.raises(TeacherError, match="max_extra_ids=2"):
            t.score(make_request(extra=3))
        assert server.posts("/generate") == []


def test_misaligned_reply_is_rejected():
    def shifted(body, headers):  # a server that answers as if logprob_start_len were one less
        return sglang_generate({**body, "logprob_start_len": [s - 1 for s in body["logprob_start_len"]]})
    with FakeServer(sglang_routes(shifted)) as server, teacher(server) as t:
        with pytest.raises(TeacherError, match="entries, expected"):
            t.score(make_request())


def test_model_identity_checked_at_start():
    with FakeServer(sglang_routes(model_path="org/other")) as server:
        with pytest.raises(TeacherError, match="not teacher.server.model='org/teacher'"):
            teacher(server, model="org/teacher")
        with teacher(server, model="org/other") as t:
            assert t.name == "org/other"


def test_servers_with_different_models_are_refused():
    with FakeServer(sglang_routes(model_path="a")) as one, FakeServer(sglang_routes(model_path="b")) as two:
        with pytest.raises(TeacherError, match="different models"):
            SGLangTeacher({"urls": [one.url, two.url], "vocab_size": VOCAB})


def test_temperature_other_than_one_is_refused():
    with FakeServer(sglang_routes()) as server:
        with pytest.raises(ConfigError, match="teacher.temperature"):
            teacher(server, temperature=0.7)


def test_unknown_config_key_is_named():
    with pytest.raises(ConfigError, match="unknown config key 'teacher.server.timeout'.*did you mean "
                                          "'teacher.server.timeout_s'"):
        SGLangTeacher({"urls": ["http://127.0.0.1:1"], "vocab_size": VOCAB, "timeout": 3})
    with pytest.raises(ConfigError, match="teacher.server.vocab_size"):
        SGLangTeacher({"urls": ["http://127.0.0.1:1"]})
    with pytest.raises(ConfigError, match="teacher.server.urls"):
        SGLangTeacher({"urls": ["127.0.0.1:1"], "vocab_size": VOCAB})


def test_last_vocab_id_reported_as_zero_is_accepted():
    # SGLang reports input token ids >= its model vocab - 1 as 0 (logprob_result_processor.py); unpadded models hit it.
    request = make_request(lengths=(5,), score_start=(1,), length=5)
    request.tokens[0, 3] = VOCAB - 1

    def clipped(body, headers):
        reply = sglang_generate(body)
        for entry in reply[0]["meta_info"]["input_token_logprobs"]:
            entry[1] = 0 if entry[1] >= VOCAB - 1 else entry[1]
        return reply
    with FakeServer(sglang_routes(clipped)) as server, teacher(server) as t:
        scores = t.score(request)
    torch.testing.assert_close(scores.sampled_logprobs, expected_scores(request)[0])


def test_scores_from_a_real_model_equal_the_model_itself():
    """The fake server answering from a real (tiny) causal LM: every column of the sampled, top-k and extra-id
    (token_ids_logprob) logprobs equals a direct forward of the same model on the padded batch."""
    from tests.teachers.fake_server import causal_lm_logprobs
    from tests.teachers.reference_teacher import ModelTeacher, TinyCausalLM, make_request as model_request, \
        random_rows

    model = TinyCausalLM(vocab_size=37).eval()
    request = model_request(random_rows([9, 14, 6], seed=4), [3, 6, 2], topk=3, extra=4, seed=5)
    want = ModelTeacher(model, 37).score(request)
    routes = sglang_routes(lambda body, headers: sglang_generate(body, causal_lm_logprobs(model)))
    with FakeServer(routes) as server, SGLangTeacher({"urls": [server.url], "vocab_size": 37}) as t:
        got = t.score(request)
    assert torch.equal(got.valid, want.valid) and torch.equal(got.extra_ids, request.extra_ids)
    torch.testing.assert_close(got.sampled_logprobs, want.sampled_logprobs, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.topk_ids, want.topk_ids)
    torch.testing.assert_close(got.topk_logprobs, want.topk_logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.extra_logprobs, want.extra_logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fault", ["other_id", "short_position"])
def test_extra_id_reply_faults_are_named(fault):
    """A reply whose input_token_ids_logprobs lacks a requested id at one position, or holds fewer entries there
    than the id list sent, fails naming the column / what was expected."""
    def broken(body, headers):
        reply = sglang_generate(body)
        position = reply[0]["meta_info"]["input_token_ids_logprobs"][2]
        if fault == "other_id":
            position[0][1] = VOCAB - 1 if position[0][1] != VOCAB - 1 else 0
        else:
            position.pop()
        return reply
    request = make_request(extra=3)
    scored = request.extra_ids[0, 4:8]           # row 0 scores columns 4..7; the union sent is their ids, sorted
    first = int(scored[scored >= 0].min())       # the entry changed above
    request.extra_ids[0, 5, 0] = first          # asked for at column 5 (entry 2)
    match = (f"no logprob for extra id {first} at column 5" if fault == "other_id"
             else "positions hold different numbers of entries")
    with FakeServer(sglang_routes(broken)) as server, teacher(server) as t:
        with pytest.raises(TeacherError, match=match):
            t.score(request)
