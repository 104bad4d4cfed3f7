"""The fused output layer + loss (`opd_megatron/parallel/fused.py`) equals the unfused path (full logits
`hidden @ W.T`, then the single-device reference) in value and in the gradients of hidden and weight shard, at
TP=1, 2 and 4 with a vocabulary not divisible by tp, chunked or not, in float64 and float32, with megatron's
sequence-parallel hidden layout too; and equals the vocab-parallel op on the materialised shard."""

from __future__ import annotations

import pytest
import torch

from opd_megatron.parallel import fused
from tests.harness import run_distributed
from tests.parallel import fused_workers as workers

FLOAT64 = 1e-10
FLOAT32_REL = 1e-5


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fused_equals_unfused(tp):
    results = run_distributed(workers.fused_worker, world_size=tp, args=(tp,), timeout_s=240)
    assert len(results) == tp and all(results)
    failures = []
    for rank, result in enumerate(results):
        for name, value in result.items():
            ok = value if isinstance(value, bool) else value <= (FLOAT32_REL if "float32" in name else FLOAT64)
            if not ok:
                failures.append(f"rank {rank}: {name} = {value}")
    assert not failures, "\n".join(failures)


def test_without_model_parallel_state_runs_as_tp1():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (2, 3), generator=gen)
    logp = fused.fused_token_logprobs(hidden, weight, ids, temperature=0.7, chunk_size=4)
    expected = torch.log_softmax(hidden @ weight.T / 0.7, -1).gather(-1, ids[..., None])[..., 0]
    torch.testing.assert_close(logp, expected, rtol=0, atol=FLOAT64)
    assert torch.autograd.gradcheck(
        lambda h, w: fused.fused_token_logprobs(h, w, ids, temperature=0.7, chunk_size=4), (hidden, weight))
    teacher = torch.randn(2, 3, 11, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w: fused.fused_reverse_kl(h, w, teacher, student_temperature=0.7, chunk_size=4), (hidden, weight))
    assert torch.autograd.gradcheck(
        lambda h, w: fused.fused_divergence("generalized_jsd", h, w, teacher, beta=0.4, student_temperature=0.7,
                                            chunk_size=4), (hidden, weight))
