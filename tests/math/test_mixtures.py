"""Sampling mixtures: the on-policy fraction schedule [GKD] and teacher-mixed sampling with its importance
correction [MiniLLM]."""

import math

import pytest
import torch

from opd_megatron.math.mixtures import (OnPolicyMixture, sample_teacher_mixed, teacher_mixed_importance_weights,
                                        teacher_mixed_log_probs)
from opd_megatron.math.checks import MathInputError

DTYPE = torch.float64


def logits_pair(shape=(2, 5), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=DTYPE),
            2 * torch.randn(*shape, generator=generator, dtype=DTYPE))


# ---- on-policy fraction ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["bernoulli", "even"])
def test_on_policy_decisions_are_a_pure_function_of_seed_and_step(schedule):
    mixture = OnPolicyMixture(0.3, seed=11, schedule=schedule)
    forward = mixture.decisions(200)
    # asked in any order, or by a fresh object after a resume, each step gives the same answer
    assert [OnPolicyMixture(0.3, seed=11, schedule=schedule).is_on_policy(s) for s in reversed(range(200))] == \
        forward[::-1]
    assert OnPolicyMixture(0.3, seed=12, schedule=schedule).decisions(200) != forward


def test_bernoulli_realised_fraction():
    for fraction in (0.1, 0.5, 0.8):
        steps = 4000
        realised = OnPolicyMixture(fraction, seed=3).realised_fraction(steps)
        assert abs(realised - fraction) < 4 * math.sqrt(fraction * (1 - fraction) / steps), (fraction, realised)


def test_even_schedule_holds_the_fraction_on_every_prefix():
    for fraction in (0.25, 1 / 3, 0.7):
        decisions = OnPolicyMixture(fraction, seed=5, schedule="even").decisions(300)
        on_policy = 0
        for n, decision in enumerate(decisions, start=1):
            on_policy += decision
            assert abs(on_policy - n * fraction) < 1.0 + 1e-9


@pytest.mark.parametrize("schedule", ["bernoulli", "even"])
def test_fraction_zero_and_one(schedule):
    assert not any(OnPolicyMixture(0.0, seed=1, schedule=schedule).decisions(500))
    assert all(OnPolicyMixture(1.0, seed=1, schedule=schedule).decisions(500))
    assert OnPolicyMixture(1.0, schedule=schedule).realised_fraction(0) == 0.0


@pytest.mark.parametrize("make, argument", [
    (lambda: OnPolicyMixture(1.2), "fraction"),
    (lambda: OnPolicyMixture(0.5, schedule="round_robin"), "schedule"),
    (lambda: OnPolicyMixture(0.5, seed=0.5), "seed"),
    (lambda: OnPolicyMixture(0.5).is_on_policy(-1), "step"),
    (lambda: OnPolicyMixture(0.5).realised_fraction(-3), "steps"),
])
def test_on_policy_bad_input(make, argument):
    with pytest.raises(MathInputError, match=f"^{argument}:"):
        make()


# ---- teacher-mixed sampling -----------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
def test_mixture_is_the_direct_formula(alpha):
    student, teacher = logits_pair()
    expected = alpha * torch.softmax(teacher, -1) + (1 - alpha) * torch.softmax(student, -1)
    torch.testing.assert_close(teacher_mixed_log_probs(student, teacher, alpha).exp(), expected)


def test_importance_weights_correct_the_expectation_exactly():
    student, teacher = logits_pair(shape=(3, 6), seed=1)
    f = torch.randn(3, 6, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    alpha = 0.3
    p_mix = teacher_mixed_log_probs(student, teacher, alpha).exp()
    every_token = torch.arange(6).expand(3, 6)
    weights = torch.stack([teacher_mixed_importance_weights(student, teacher, every_token[:, v], alpha)
                           for v in range(6)], dim=-1)
    # E_{y ~ p_mix}[w(y) f(y)] = E_{y ~ pi}[f(y)], and w <= 1 / (1 - alpha)
    torch.testing.assert_close((p_mix * weights * f).sum(-1), (torch.softmax(student, -1) * f).sum(-1))
    assert (weights <= 1 / (1 - alpha) + 1e-12).all()
    clipped = teacher_mixed_importance_weights(student, teacher, every_token[:, 0], alpha, max_weight=0.5)
    torch.testing.assert_close(clipped, weights[:, 0].clamp_max(0.5))
    pure_student = teacher_mixed_importance_weights(student, teacher, every_token[:, 1], 0.0)
    torch.testing.assert_close(pure_student, torch.ones(3, dtype=DTYPE))


def test_samples_follow_the_mixture_and_the_corrected_mean_is_on_policy():
    student, teacher = logits_pair(shape=(1, 4), seed=3)
    alpha, draws = 0.4, 40000
    sample = sample_teacher_mixed(student.expand(draws, 4), teacher.expand(draws, 4), alpha,
                                  generator=torch.Generator().manual_seed(4))
    assert sample.tokens.shape == (draws,) and sample.tokens.dtype == torch.long
    p_mix = teacher_mixed_log_probs(student, teacher, alpha).exp()[0]
    frequency = torch.bincount(sample.tokens, minlength=4).to(DTYPE) / draws
    assert (frequency - p_mix).abs().max() < 5 * math.sqrt(0.25 / draws)
    f = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=DTYPE)
    corrected = (sample.importance_weights * f[sample.tokens]).mean()
    on_policy = (torch.softmax(student[0], -1) * f).sum()
    spread = (sample.importance_weights * f[sample.tokens]).std() / math.sqrt(draws)
    assert abs(corrected - on_policy) < 5 * spread
    again = sample_teacher_mixed(student.expand(draws, 4), teacher.expand(draws, 4), alpha,
                                 generator=torch.Generator().manual_seed(4))
    assert torch.equal(again.tokens, sample.tokens)


def test_masked_vocabulary_entries_are_never_sampled():
    student, teacher = logits_pair(shape=(500, 5), seed=5)
    student[:, 4] = -math.inf
    teacher[:, 4] = -math.inf
    sample = sample_teacher_mixed(student, teacher, 0.5, generator=torch.Generator().manual_seed(6))
    assert (sample.tokens != 4).all() and torch.isfinite(sample.importance_weights).all()
    # a token neither side can produce gets weight 0, not NaN
    weights = teacher_mixed_importance_weights(student, teacher, torch.full((500,), 4), 0.5)
    assert (weights == 0).all()


@pytest.mark.parametrize("call, argument", [
    (lambda s, t: teacher_mixed_log_probs(s, t[:, :4], 0.5), "student_logits, teacher_logits"),
    (lambda s, t: teacher_mixed_log_probs(s, t, 1.5), "alpha"),
    (lambda s, t: teacher_mixed_log_probs(s.masked_fill(s > 0, math.nan), t, 0.5), "student_logits"),
    (lambda s, t: teacher_mixed_log_probs(s, t.masked_fill(t > 0, math.inf), 0.5), "teacher_logits"),
    (lambda s, t: teacher_mixed_importance_weights(s, t, torch.tensor([0, 5]), 0.5), "tokens"),
    (lambda s, t: teacher_mixed_importance_weights(s, t, torch.tensor([0.0, 1.0]), 0.5), "tokens"),
    (lambda s, t: teacher_mixed_importance_weights(s, t, torch.tensor([0, 1]), 0.5, max_weight=0.0), "max_weight"),
])
def test_teacher_mixed_bad_input(call, argument):
    student, teacher = logits_pair()
    with pytest.raises(MathInputError, match=f"^{argument}:"):
        call(student, teacher)
