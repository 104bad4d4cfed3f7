"""Vocab-parallel math equals its single-device reference (`math/divergences.py`), value and gradient, at TP = 1,
2, 4 on gloo processes; chunked equals unchunked; the token log-prob equals megatron-core's
`vocab_parallel_cross_entropy` negated; bad input raises a MathInputError naming the argument on every rank.

One process group per TP size runs every check (starting processes dominates the cost); the workers return
maximum errors, asserted here."""

from __future__ import annotations

import pytest
import torch

from opd_megatron.math import divergences as ref
from opd_megatron.parallel import divergences as vp
from opd_megatron.math.checks import MathInputError
from tests.harness import run_distributed
from tests.parallel import divergences_workers as workers

FLOAT64 = 1e-10
FLOAT32_REL = 1e-5


def _assert_results(results: list[dict]) -> None:
    failures = []
    for rank, result in enumerate(results):
        for name, value in result.items():
            if isinstance(value, bool):
                ok = value
            elif "float32" in name or "megatron" in name:
                ok = value <= FLOAT32_REL
            else:
                ok = value <= FLOAT64
            if not ok:
                failures.append(f"rank {rank}: {name} = {value}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_parity_with_single_device_reference(tp):
    results = run_distributed(workers.parity_worker, world_size=tp, args=(tp,), timeout_s=240)
    assert len(results) == tp and all(results)
    _assert_results(results)


def test_without_model_parallel_state_runs_as_tp1():
    """Outside an initialised megatron state (and with no group) there is nothing to communicate: tp = 1."""
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 11, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 11, (2, 3), generator=gen)
    value = vp.vocab_parallel_reverse_kl(student, teacher, student_temperature=0.7, chunk_size=4)
    expected = ref.reverse_kl(student, teacher, student_temperature=0.7)
    assert value.shape == (2, 3)
    torch.testing.assert_close(value, expected, rtol=0, atol=FLOAT64)
    logp = vp.vocab_parallel_token_logprobs(student, ids)
    torch.testing.assert_close(logp, torch.log_softmax(student, -1).gather(-1, ids[..., None])[..., 0],
                               rtol=0, atol=FLOAT64)
    with pytest.raises(MathInputError, match="chunk_size"):
        vp.vocab_parallel_entropy(student, chunk_size=0)
