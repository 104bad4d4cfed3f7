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


DEDICATED = [("forward_kl", {}), ("total_variation", {}), ("generalized_jsd", {"beta": 0.3}),
             ("skew_forward_kl", {"alpha": 0.2}), ("skew_reverse_kl", {"alpha": 0.7})]


@pytest.mark.parametrize("kind,parameters", DEDICATED)
def test_dedicated_kernels_pass_gradcheck(kind, parameters):
    """The closed-form gradients of the dedicated kernels (`divergence_kernels.py`) against finite differences
    in float64, with temperatures, padding columns beyond `true_vocab_size` and chunks (tp = 1). The teacher is
    well away from the student, so total variation's sign never flips inside the finite-difference step."""
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(5, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = 2.0 * torch.randn(5, 9, generator=gen, dtype=torch.float64)

    def divergence(logits):
        return vp.vocab_parallel_divergence(kind, logits, teacher, student_temperature=0.8, teacher_temperature=1.2,
                                            true_vocab_size=7, chunk_size=2, **parameters)

    assert torch.autograd.gradcheck(divergence, (student,), eps=1e-6, atol=1e-7)
    value = divergence(student)
    expected = getattr(ref, kind)(student[:, :7], teacher[:, :7], student_temperature=0.8, teacher_temperature=1.2,
                                  **parameters)
    torch.testing.assert_close(value, expected, rtol=0, atol=FLOAT64)


def test_skew_at_alpha_one_is_zero_with_zero_gradient():
    gen = torch.Generator().manual_seed(4)
    student = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    for kind in ("skew_forward_kl", "skew_reverse_kl"):
        student.grad = None
        value = vp.vocab_parallel_divergence(kind, student, teacher, alpha=1.0)
        value.sum().backward()
        assert torch.equal(value, torch.zeros(4, dtype=torch.float64))
        assert torch.equal(student.grad, torch.zeros_like(student))

