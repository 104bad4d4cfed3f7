"""Route A divergences and the masked reduction against formulas written out plainly, their limits, gradients
(gradcheck, float64), masked vocabularies, extreme logits and bad input."""

import math

import pytest
import torch

from opd_megatron.math.divergences import (divergence_from_log_probs, forward_kl, generalized_jsd, reduce_loss,
                                           reverse_kl, skew_forward_kl, skew_reverse_kl, total_variation)
from opd_megatron.math.checks import MathInputError

F64 = torch.float64
NEG_INF = float("-inf")


def random_logits(*shape, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale


# Plain formulas: probabilities, explicit logs, no log-space tricks.
def plain_kl(a, b):
    return (a * torch.log(a / b)).sum(-1)


def plain_fkl(p, q):
    return plain_kl(q, p)


def plain_rkl(p, q):
    return plain_kl(p, q)


def plain_jsd(p, q, beta):
    m = beta * q + (1 - beta) * p
    return beta * plain_kl(q, m) + (1 - beta) * plain_kl(p, m)


def plain_sfkl(p, q, alpha):
    return plain_kl(q, alpha * q + (1 - alpha) * p)


def plain_srkl(p, q, alpha):
    return plain_kl(p, alpha * p + (1 - alpha) * q)


def plain_tv(p, q):
    return 0.5 * (q - p).abs().sum(-1)


def softmax_t(z, tau):
    return torch.exp(z / tau) / torch.exp(z / tau).sum(-1, keepdim=True)


LOSSES = [  # (name, our function with its parameter bound, the plain formula with the same parameter)
    ("forward_kl", lambda s, t, **kw: forward_kl(s, t, **kw), plain_fkl),
    ("reverse_kl", lambda s, t, **kw: reverse_kl(s, t, **kw), plain_rkl),
    ("jsd_0.3", lambda s, t, **kw: generalized_jsd(s, t, 0.3, **kw), lambda p, q: plain_jsd(p, q, 0.3)),
    ("jsd_0.5", lambda s, t, **kw: generalized_jsd(s, t, 0.5, **kw), lambda p, q: plain_jsd(p, q, 0.5)),
    ("skew_fkl_0.1", lambda s, t, **kw: skew_forward_kl(s, t, 0.1, **kw), lambda p, q: plain_sfkl(p, q, 0.1)),
    ("skew_rkl_0.4", lambda s, t, **kw: skew_reverse_kl(s, t, 0.4, **kw), lambda p, q: plain_srkl(p, q, 0.4)),
    ("total_variation", lambda s, t, **kw: total_variation(s, t, **kw), plain_tv),
]
LOSS_IDS = [name for name, _, _ in LOSSES]


@pytest.mark.parametrize("name,loss,plain", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("shape", [(2, 3, 7), (5, 4)])
def test_each_loss_matches_the_plain_formula(name, loss, plain, shape):
    s, t = random_logits(*shape, seed=1), random_logits(*shape, seed=2)
    tau_s, tau_t = 0.7, 1.3
    got = loss(s, t, student_temperature=tau_s, teacher_temperature=tau_t)
    want = plain(softmax_t(s, tau_s), softmax_t(t, tau_t))
    assert got.shape == shape[:-1]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_jsd_endpoints_are_the_plain_kls_exactly():
    s, t = random_logits(2, 3, 7, seed=3), random_logits(2, 3, 7, seed=4)
    torch.testing.assert_close(generalized_jsd(s, t, 0.0), forward_kl(s, t), rtol=0, atol=1e-12)
    torch.testing.assert_close(generalized_jsd(s, t, 1.0), reverse_kl(s, t), rtol=0, atol=1e-12)


def test_jsd_mixture_formula_vanishes_near_the_endpoints_as_beta_times_kl():
    # The endpoint values are definitions (TRL), not limits: just inside, the mixture formula is ~beta * FKL
    # and ~(1 - beta) * RKL (documented in generalized_jsd).
    s, t = random_logits(4, 9, seed=5), random_logits(4, 9, seed=6)
    eps = 1e-7
    torch.testing.assert_close(generalized_jsd(s, t, eps) / eps, forward_kl(s, t), rtol=1e-5, atol=0)
    torch.testing.assert_close(generalized_jsd(s, t, 1 - eps) / eps, reverse_kl(s, t), rtol=1e-5, atol=0)
    assert (generalized_jsd(s, t, 0.5) <= math.log(2)).all()


def test_skew_limits():
    s, t = random_logits(3, 8, seed=7), random_logits(3, 8, seed=8)
    torch.testing.assert_close(skew_forward_kl(s, t, 0.0), forward_kl(s, t), rtol=0, atol=1e-12)
    torch.testing.assert_close(skew_reverse_kl(s, t, 0.0), reverse_kl(s, t), rtol=0, atol=1e-12)
    assert skew_forward_kl(s, t, 1.0).abs().max() < 1e-15
    assert skew_reverse_kl(s, t, 1.0).abs().max() < 1e-15


def test_total_variation_in_unit_interval_and_one_for_disjoint_supports():
    s, t = random_logits(6, 5, seed=9, scale=5.0), random_logits(6, 5, seed=10, scale=5.0)
    tv = total_variation(s, t)
    assert ((tv >= 0) & (tv <= 1)).all()
    disjoint_s = torch.tensor([[0.0, 1.0, NEG_INF, NEG_INF]], dtype=F64)
    disjoint_t = torch.tensor([[NEG_INF, NEG_INF, 2.0, 0.5]], dtype=F64)
    torch.testing.assert_close(total_variation(disjoint_s, disjoint_t), torch.ones(1, dtype=F64))


def test_identical_distributions_give_zero():
    s = random_logits(2, 3, 6, seed=11)
    for _, loss, _ in LOSSES:
        assert loss(s, s.clone()).abs().max() < 1e-14


@pytest.mark.parametrize("name,loss,plain", LOSSES, ids=LOSS_IDS)
def test_gradcheck(name, loss, plain):
    s = random_logits(2, 2, 5, seed=12).requires_grad_(True)
    t = random_logits(2, 2, 5, seed=13)
    assert torch.autograd.gradcheck(lambda x: loss(x, t, student_temperature=0.8, teacher_temperature=1.5), (s,))


@pytest.mark.parametrize("name,loss,plain", LOSSES, ids=LOSS_IDS)
def test_gradient_reaches_the_student_only(name, loss, plain):
    s = random_logits(2, 3, 5, seed=14).requires_grad_(True)
    t = random_logits(2, 3, 5, seed=15).requires_grad_(True)
    loss(s, t).sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("name,loss,plain", LOSSES, ids=LOSS_IDS)
def test_shared_masked_vocabulary_is_the_smaller_vocabulary(name, loss, plain):
    # -inf logits on both sides (vocabulary padding): 0 * log 0 = 0, no NaN in value or gradient.
    s, t = random_logits(3, 6, seed=16), random_logits(3, 6, seed=17)
    masked = torch.tensor([False, True, False, False, True, False])
    s_masked = s.masked_fill(masked, NEG_INF).requires_grad_(True)
    t_masked = t.masked_fill(masked, NEG_INF)
    got = loss(s_masked, t_masked, student_temperature=0.9)
    torch.testing.assert_close(got, loss(s[:, ~masked], t[:, ~masked], student_temperature=0.9),
                               rtol=1e-12, atol=1e-14)
    got.sum().backward()
    assert torch.isfinite(s_masked.grad).all()
    assert (s_masked.grad[:, masked] == 0).all()


def test_teacher_masked_token_with_student_mass():
    # The student puts mass where the teacher has none: reverse KL is truly infinite, the others finite.
    s = torch.tensor([[0.0, 1.0, 2.0]], dtype=F64, requires_grad=True)
    t = torch.tensor([[1.0, NEG_INF, 0.0]], dtype=F64)
    assert torch.isinf(reverse_kl(s, t)).all()
    for value in (forward_kl(s, t), generalized_jsd(s, t, 0.5), skew_forward_kl(s, t, 0.1),
                  skew_reverse_kl(s, t, 0.1), total_variation(s, t)):
        assert torch.isfinite(value).all() and (value >= 0).all()
        (grad,) = torch.autograd.grad(value.sum(), s)
        assert torch.isfinite(grad).all()
    # The skew bounds forward KL by -log(alpha) even where pi has no mass.
    s_zero = torch.tensor([[0.0, NEG_INF, 0.0]], dtype=F64)
    t_all = torch.tensor([[0.0, 0.0, 0.0]], dtype=F64)
    assert torch.isinf(forward_kl(s_zero, t_all)).all()
    assert skew_forward_kl(s_zero, t_all, 0.1) <= -math.log(0.1)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_extreme_logits_stay_finite(dtype):
    s = torch.tensor([[1e4, -1e4, 0.0, -1e4], [-1e4, 1e4, 1e4, NEG_INF]], dtype=dtype, requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 0.0, 3.0], [1e4, -1e4, 1e4, NEG_INF]], dtype=dtype)
    for _, loss, _ in LOSSES:
        value = loss(s, t, student_temperature=0.5)
        (grad,) = torch.autograd.grad(value.sum(), s)
        assert torch.isfinite(value).all() and (value >= 0).all()
        assert torch.isfinite(grad).all()


def test_half_precision_inputs_are_computed_in_float32():
    s, t = random_logits(2, 5, seed=18).bfloat16(), random_logits(2, 5, seed=19).bfloat16()
    got = forward_kl(s, t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), forward_kl(s.double(), t.double()), rtol=1e-5, atol=1e-6)


def test_divergence_from_log_probs_on_a_log_prob_pair():
    s, t = random_logits(3, 6, seed=20), random_logits(3, 6, seed=21)
    lp, lq = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    torch.testing.assert_close(divergence_from_log_probs("generalized_jsd", lp, lq, beta=0.2),
                               generalized_jsd(s, t, 0.2), rtol=0, atol=1e-15)


# reduce_loss
def test_reduce_loss_normalizers_by_hand():
    per_position = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 9.0, 9.0, 9.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    # token mean: (1 + 2 + 3 + 5) / 4; sequence mean: mean(2, 5) over the two non-empty rows;
    # constant: 11 / (B * max_length) with max_length = T = 4 or given.
    assert reduce_loss(per_position, mask, "token_mean").item() == pytest.approx(11 / 4, abs=1e-15)
    assert reduce_loss(per_position, mask, "sequence_mean").item() == pytest.approx(3.5, abs=1e-15)
    assert reduce_loss(per_position, mask, "constant").item() == pytest.approx(11 / 12, abs=1e-15)
    assert reduce_loss(per_position, mask, "constant", max_length=8).item() == pytest.approx(11 / 24, abs=1e-15)
    assert reduce_loss(per_position, mask.to(F64), "token_mean").item() == pytest.approx(11 / 4, abs=1e-15)
    flat = reduce_loss(per_position.flatten(), mask.flatten(), "token_mean")
    assert flat.item() == pytest.approx(11 / 4, abs=1e-15)


def test_reduce_loss_padding_never_leaks_and_empty_mask_is_zero():
    per_position = torch.tensor([[1.0, float("inf")], [float("nan"), float("-inf")]], dtype=F64,
                                requires_grad=True)
    mask = torch.tensor([[True, False], [False, False]])
    for normalizer in ("token_mean", "sequence_mean", "constant"):
        value = reduce_loss(per_position, mask, normalizer)
        assert torch.isfinite(value)
        (grad,) = torch.autograd.grad(value, per_position)
        assert grad[0, 0] > 0 and (grad.flatten()[1:] == 0).all()
        empty = reduce_loss(per_position, torch.zeros_like(mask), normalizer)
        assert empty.item() == 0.0
        (grad,) = torch.autograd.grad(empty, per_position)
        assert (grad == 0).all()


# Bad input
def test_bad_logits_name_the_argument():
    s, t = random_logits(2, 3, 5, seed=22), random_logits(2, 3, 5, seed=23)
    with pytest.raises(MathInputError, match=r"student_logits \(2, 3, 5\), teacher_logits \(2, 3, 6\)"):
        forward_kl(s, random_logits(2, 3, 6))
    with pytest.raises(MathInputError, match=r"student_logits \(2, 3, 5\), teacher_logits \(3, 3, 5\)"):
        reverse_kl(s, random_logits(3, 3, 5))
    nan = s.clone()
    nan[0, 1, 2] = float("nan")
    with pytest.raises(MathInputError, match="student_logits: expected finite"):
        forward_kl(nan, t)
    with pytest.raises(MathInputError, match="teacher_logits: expected finite"):
        total_variation(s, nan)
    plus_inf = s.clone()
    plus_inf[1, 0, 0] = float("inf")
    with pytest.raises(MathInputError, match="teacher_logits"):
        reverse_kl(s, plus_inf)
    all_masked = s.clone()
    all_masked[0, 0] = NEG_INF
    with pytest.raises(MathInputError, match="student_logits: every logit is -inf"):
        forward_kl(all_masked, t)
    with pytest.raises(MathInputError, match="student_logits: expected a floating-point tensor"):
        forward_kl(torch.ones(2, 5, dtype=torch.long), t[0])


@pytest.mark.parametrize("bad", [-0.1, 1.1, float("nan")])
def test_beta_and_alpha_outside_unit_interval(bad):
    s, t = random_logits(2, 5, seed=24), random_logits(2, 5, seed=25)
    with pytest.raises(MathInputError, match="beta: expected a value in"):
        generalized_jsd(s, t, bad)
    with pytest.raises(MathInputError, match="alpha: expected a value in"):
        skew_forward_kl(s, t, bad)
    with pytest.raises(MathInputError, match="alpha: expected a value in"):
        skew_reverse_kl(s, t, bad)


def test_bad_temperatures_kinds_and_parameters():
    s, t = random_logits(2, 5, seed=26), random_logits(2, 5, seed=27)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(MathInputError, match="student_temperature: expected a finite value > 0"):
            forward_kl(s, t, student_temperature=bad)
        with pytest.raises(MathInputError, match="teacher_temperature: expected a finite value > 0"):
            forward_kl(s, t, teacher_temperature=bad)
    lp, lq = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    with pytest.raises(MathInputError, match="kind: expected one of"):
        divergence_from_log_probs("kl", lp, lq)
    with pytest.raises(MathInputError, match="beta: required for kind 'generalized_jsd'"):
        divergence_from_log_probs("generalized_jsd", lp, lq)
    with pytest.raises(MathInputError, match="alpha: not a parameter of kind 'forward_kl'"):
        divergence_from_log_probs("forward_kl", lp, lq, alpha=0.1)


def test_bad_reduce_arguments():
    per_position, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(MathInputError, match="normalizer: expected one of"):
        reduce_loss(per_position, mask, "mean")
    with pytest.raises(MathInputError, match=r"mask: expected the shape of per_position \(2, 3\)"):
        reduce_loss(per_position, torch.ones(2, 4), "token_mean")
    with pytest.raises(MathInputError, match="mask: expected a 0/1"):
        reduce_loss(per_position, torch.full((2, 3), 0.5), "token_mean")
    with pytest.raises(MathInputError, match="max_length: expected an integer >= 1"):
        reduce_loss(per_position, mask, "constant", max_length=0)
    with pytest.raises(MathInputError, match="max_length: only used"):
        reduce_loss(per_position, mask, "token_mean", max_length=4)
    with pytest.raises(MathInputError, match=r"per_position: normalizer 'sequence_mean' needs shape \[B, T\]"):
        reduce_loss(torch.zeros(6), torch.ones(6), "sequence_mean")
