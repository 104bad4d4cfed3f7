"""Reference-KL estimators k1, k2, k3 by exact enumeration over a small vocabulary (value and loss-gradient
expectations under pi), and the entropy bonus."""

import math

import pytest
import torch

from opd_megatron.math.divergences import reverse_kl
from opd_megatron.math.regularizers import entropy, reference_kl
from opd_megatron.math.checks import MathInputError

F64 = torch.float64
NEG_INF = float("-inf")


def random_logits(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def test_estimators_against_their_formulas():
    logp, ref = -torch.rand(3, 4, dtype=F64) * 3, -torch.rand(3, 4, dtype=F64) * 3
    r = torch.exp(ref - logp)
    torch.testing.assert_close(reference_kl(logp, ref, "k1"), logp - ref, rtol=0, atol=1e-15)
    torch.testing.assert_close(reference_kl(logp, ref, "k2"), 0.5 * torch.log(r) ** 2, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(reference_kl(logp, ref, "k3"), (r - 1) - torch.log(r), rtol=1e-13, atol=1e-15)
    assert (reference_kl(logp, ref, "k3") >= 0).all() and (reference_kl(logp, ref, "k1") < 0).any()


def enumerate_over_tokens(student_logits, reference_logits, estimator):
    """Exact E_{y ~ pi}[k(y)] and E_{y ~ pi}[grad_theta k(y)] over every token y of the vocabulary, the sample
    held fixed (pi(y) is the probability weight, without gradient) as a loss on sampled tokens is trained."""
    logits = student_logits.clone().requires_grad_(True)
    logp = torch.log_softmax(logits, -1)
    ref = torch.log_softmax(reference_logits, -1)
    per_token = reference_kl(logp, ref, estimator)  # the estimator at each possible sample y
    weights = logp.detach().exp()
    value = (weights * per_token).sum()
    (grad,) = torch.autograd.grad(value, logits)
    return value, grad


def exact_kl_and_grad(student_logits, reference_logits, direction):
    logits = student_logits.clone().requires_grad_(True)
    if direction == "pi||ref":
        kl = reverse_kl(logits, reference_logits)  # KL(student || "teacher" = ref)
    else:
        logp, ref = torch.log_softmax(logits, -1), torch.log_softmax(reference_logits, -1)
        kl = (ref.exp() * (ref - logp)).sum()
    (grad,) = torch.autograd.grad(kl.sum(), logits)
    return kl.sum(), grad


def test_expectations_by_exact_enumeration():
    student, reference = random_logits(6, seed=1, scale=1.5), random_logits(6, seed=2, scale=1.5)
    kl, grad_reverse = exact_kl_and_grad(student, reference, "pi||ref")
    _, grad_forward = exact_kl_and_grad(student, reference, "ref||pi")

    # Values: k1 and k3 are unbiased for KL(pi || ref); k2 is not.
    value1, grad1 = enumerate_over_tokens(student, reference, "k1")
    value2, grad2 = enumerate_over_tokens(student, reference, "k2")
    value3, grad3 = enumerate_over_tokens(student, reference, "k3")
    assert abs(value1 - kl) < 1e-12 and abs(value3 - kl) < 1e-12
    bias2 = float(value2 - kl)
    print(f"KL(pi||ref) = {float(kl):.6f}, E[k2] = {float(value2):.6f}, bias of k2 = {bias2:+.6f}")
    assert abs(bias2) > 1e-3

    # Gradients of the estimators used as a loss: k1 carries nothing, k2 is the reverse-KL gradient, k3 the
    # forward-KL gradient (regularizers.py module docstring).
    torch.testing.assert_close(grad1, torch.zeros_like(grad1), rtol=0, atol=1e-12)
    torch.testing.assert_close(grad2, grad_reverse, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad3, grad_forward, rtol=0, atol=1e-12)
    assert (grad3 - grad_reverse).abs().max() > 1e-3


def test_k2_bias_is_third_order_as_pi_approaches_ref():
    reference = random_logits(5, seed=3)
    direction = random_logits(5, seed=4)
    ratios = []
    for eps in (0.1, 0.01):
        student = reference + eps * direction
        kl, _ = exact_kl_and_grad(student, reference, "pi||ref")
        value2, _ = enumerate_over_tokens(student, reference, "k2")
        ratios.append(abs(float(value2 - kl)) / float(kl))
    # KL ~ eps^2 and the bias ~ eps^3: the relative bias falls ~10x with eps.
    assert ratios[1] < ratios[0] / 5


def test_k3_has_lower_variance_than_k1_near_the_reference():
    reference = random_logits(8, seed=5)
    student = reference + 0.2 * random_logits(8, seed=6)
    logp, ref = torch.log_softmax(student, -1), torch.log_softmax(reference, -1)
    weights = logp.exp()

    def variance(estimator):
        k = reference_kl(logp, ref, estimator)
        mean = (weights * k).sum()
        return (weights * (k - mean) ** 2).sum()
    assert variance("k3") < variance("k1") / 5


def test_reference_is_detached_and_gradcheck():
    logp = -torch.rand(2, 3, dtype=F64).requires_grad_(True)
    ref = -torch.rand(2, 3, dtype=F64).requires_grad_(True)
    for estimator in ("k1", "k2", "k3"):
        assert torch.autograd.gradcheck(lambda x: reference_kl(x, ref, estimator), (logp,))
        reference_kl(logp, ref, estimator).sum().backward()
    assert ref.grad is None


def test_entropy_against_the_formula_and_its_bounds():
    logits = random_logits(2, 3, 7, seed=7, scale=2.0)
    p = torch.softmax(logits / 0.6, -1)
    torch.testing.assert_close(entropy(logits, 0.6), -(p * p.log()).sum(-1), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(entropy(torch.zeros(4, 9, dtype=F64)), torch.full((4,), math.log(9), dtype=F64))
    one_hot = torch.tensor([[0.0, NEG_INF, NEG_INF]], dtype=F64, requires_grad=True)
    assert entropy(one_hot).item() == 0.0
    masked = torch.tensor([[1.0, NEG_INF, 2.0, NEG_INF]], dtype=F64, requires_grad=True)
    value = entropy(masked)
    torch.testing.assert_close(value, entropy(torch.tensor([[1.0, 2.0]], dtype=F64)))
    (grad,) = torch.autograd.grad(value.sum(), masked)
    assert torch.isfinite(grad).all() and (grad[0, [1, 3]] == 0).all()
    extreme = torch.tensor([[1e4, -1e4, 0.0]], dtype=torch.float32)
    assert torch.isfinite(entropy(extreme)).all()


def test_entropy_gradcheck():
    logits = random_logits(2, 5, seed=8).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: entropy(x, 1.3), (logits,))


def test_bad_input():
    logp, ref = -torch.rand(2, 3, dtype=F64), -torch.rand(2, 3, dtype=F64)
    with pytest.raises(MathInputError, match="estimator: expected one of"):
        reference_kl(logp, ref, "k4")
    with pytest.raises(MathInputError, match=r"student_logp \(2, 3\), reference_logp \(2, 4\)"):
        reference_kl(logp, -torch.rand(2, 4, dtype=F64))
    with pytest.raises(MathInputError, match="reference_logp: expected finite"):
        reference_kl(logp, ref * float("nan"))
    with pytest.raises(MathInputError, match="student_logp: expected a floating-point"):
        reference_kl(torch.zeros(2, 3, dtype=torch.long), ref)
    with pytest.raises(MathInputError, match="temperature: expected a finite value > 0"):
        entropy(random_logits(2, 5), 0.0)
    with pytest.raises(MathInputError, match="logits: expected finite"):
        entropy(torch.tensor([[0.0, float("nan")]]))
