"""VLLMTeacher against a local fake vLLM OpenAI server: alignment, top-k (k or k+1 entries), caps, identity."""

import pytest
import torch

from opd_megatron.teachers.base import TeacherError
from opd_megatron.teachers.vllm import VLLMTeacher
from tests.teachers.fake_server import VOCAB, FakeServer, assert_matches_toy, expected_scores, make_request, vllm_completions, \
    vllm_routes


def teacher(server, **knobs):
    return VLLMTeacher({"urls": [server.url], "model": "teacher", "vocab_size": VOCAB, "backoff_s": 0.01,
                        "timeout_s": 5, **knobs})


@pytest.mark.parametrize("topk", [0, 1, 5])
def test_scores_are_label_aligned(topk):
    request = make_request(topk=topk)
    with FakeServer(vllm_routes()) as server, teacher(server) as t:
        scores = t.score(request)
        body, = server.posts("/v1/completions")
    assert_matches_toy(scores, request)
    assert body["prompt"] == [request.row(b) for b in range(3)]
    assert body["model"] == "teacher" and body["max_tokens"] == 0 and body["echo"] is True
    assert body["prompt_logprobs"] == max(topk, 1) and body["temperature"] == 1.0


def test_shuffled_choices_are_matched_by_index():
    def shuffled(body, headers):
        reply = vllm_completions(body)
        reply["choices"].reverse()
        return reply
    request = make_request(topk=2)
    with FakeServer(vllm_routes(shuffled)) as server, teacher(server) as t:
        scores = t.score(request)
    torch.testing.assert_close(scores.sampled_logprobs, expected_scores(request)[0])


def test_topk_cap_and_extra_ids_refused():
    with FakeServer(vllm_routes()) as server, teacher(server) as t:
        assert t.max_topk == 20 and not t.scores_extra_ids
        with pytest.raises(TeacherError, match="at most top-20"):
            t.score(make_request(topk=21))
        with pytest.raises(TeacherError, match="cannot score extra ids"):
            t.score(make_request(extra=2))
        assert server.posts("/v1/completions") == []
    with FakeServer(vllm_routes()) as server, teacher(server, max_topk=4) as t:
        with pytest.raises(TeacherError, match="at most top-4"):
            t.score(make_request(topk=5))


def test_served_model_name_checked():
    with FakeServer(vllm_routes(model="other")) as server:
        with pytest.raises(TeacherError, match=r"serves \['other'\], not teacher.server.model='teacher'"):
            teacher(server)
        with VLLMTeacher({"urls": [server.url], "vocab_size": VOCAB}) as t:  # no model: the server's first
            assert t.name == "other"


def test_rows_longer_than_max_model_len_refused_before_sending():
    with FakeServer(vllm_routes(max_model_len=10)) as server, teacher(server) as t:
        with pytest.raises(TeacherError, match="max_model_len - 1 = 9"):
            t.score(make_request())
        assert server.posts("/v1/completions") == []


def test_missing_actual_token_is_rejected():
    def dropped(body, headers):
        reply = vllm_completions(body)
        positions = reply["choices"][0]["prompt_logprobs"]
        actual = str(body["prompt"][0][-1])
        positions[-1] = {key: v for key, v in positions[-1].items() if key != actual} or {"0": {"logprob": -1.0}}
        return reply
    with FakeServer(vllm_routes(dropped)) as server, teacher(server) as t:
        with pytest.raises(TeacherError, match="actual token .* is missing"):
            t.score(make_request(topk=0))
