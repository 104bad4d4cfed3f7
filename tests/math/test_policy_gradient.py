"""Route-B policy-gradient loss: both forms against the direct formula, PPO clip (separate eps, dual clip) case by
case, the three normalisers, padding, gradcheck, bad input, and a property test over masks."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd_megatron.math.policy_gradient import policy_gradient_loss, token_log_ratio
from opd_megatron.math.checks import MathInputError

DTYPE = torch.float64


def random_inputs(batch=3, length=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logp = -torch.rand(batch, length, generator=generator, dtype=DTYPE) * 3
    behaviour = logp + 0.1 * torch.randn(batch, length, generator=generator, dtype=DTYPE)
    adv = torch.randn(batch, length, generator=generator, dtype=DTYPE)
    mask = torch.rand(batch, length, generator=generator) > 0.3
    weights = torch.rand(batch, length, generator=generator, dtype=DTYPE)
    return logp.requires_grad_(True), behaviour, adv, mask, weights


def grad_of(loss, tensor):
    return torch.autograd.grad(loss, tensor)[0]


def test_log_prob_form_is_the_direct_formula_and_its_gradient():
    logp, _, adv, mask, weights = random_inputs()
    loss, stats = policy_gradient_loss(logp, adv, mask, weights=weights)
    count = mask.sum()
    expected = -(mask * weights * logp * adv).sum() / count
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad_of(loss, logp), -(mask * weights * adv) / count)
    assert stats.clip_fraction == 0 and stats.ratio_mean == 1 and stats.tokens == count


def test_ratio_form_on_policy_has_the_log_prob_gradient():
    logp, _, adv, mask, weights = random_inputs(seed=1)
    on_policy, _ = policy_gradient_loss(logp, adv, mask, weights=weights)
    ratio_form, stats = policy_gradient_loss(logp, adv, mask, weights=weights, old_logp=logp.detach())
    torch.testing.assert_close(grad_of(ratio_form, logp), grad_of(on_policy, logp))
    assert stats.ratio_mean == 1 and stats.ratio_max == 1 and stats.clip_fraction == 0


def test_ratio_form_unclipped_is_the_direct_formula():
    logp, behaviour, adv, mask, _ = random_inputs(seed=2)
    loss, _ = policy_gradient_loss(logp, adv, mask, old_logp=behaviour, clip_eps_low=None,
                                   clip_eps_high=None)
    rho = torch.exp(logp - behaviour)
    torch.testing.assert_close(loss, -(mask * rho * adv).sum() / mask.sum())
    torch.testing.assert_close(grad_of(loss, logp), -(mask * rho * adv) / mask.sum())


# (ratio, advantage) -> (objective per token, whether it carries gradient, clip active, dual active)
# eps_low = 0.2, eps_high = 0.28 (DAPO's clip-higher), dual clip c = 3
CLIP_CASES = [
    (1.1, 1.0, 1.1, True, False, False),      # inside the range
    (1.5, 1.0, 1.28, False, True, False),     # A > 0 above 1 + eps_high: clipped
    (0.5, 1.0, 0.5, True, False, False),      # A > 0 below 1 - eps_low: min keeps rho A
    (0.5, -1.0, -0.8, False, True, False),    # A < 0 below 1 - eps_low: clipped
    (1.25, -1.0, -1.25, True, False, False),  # A < 0 above 1 + eps_high: min keeps rho A (unclipped side)
    (5.0, -1.0, -3.0, False, False, True),    # A < 0 above c: dual clip bounds it at c A
    (2.5, -1.0, -2.5, True, False, False),    # A < 0 below c: dual clip inactive
]


@pytest.mark.parametrize("ratio, adv, objective, has_grad, clipped, dual", CLIP_CASES)
def test_ppo_clip_case_by_case(ratio, adv, objective, has_grad, clipped, dual):
    logp = torch.tensor([[math.log(ratio) - 1.0]], dtype=DTYPE, requires_grad=True)
    behaviour = torch.tensor([[-1.0]], dtype=DTYPE)
    loss, stats = policy_gradient_loss(logp, torch.tensor([[adv]], dtype=DTYPE), torch.ones(1, 1, dtype=bool),
                                       old_logp=behaviour, clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0)
    torch.testing.assert_close(loss, torch.tensor(-objective, dtype=DTYPE))
    gradient = grad_of(loss, logp)
    assert (gradient.abs() > 0).item() == has_grad
    if has_grad:
        torch.testing.assert_close(gradient, torch.tensor([[-ratio * adv]], dtype=DTYPE))
    assert stats.clip_fraction.item() == float(clipped) and stats.dual_clip_fraction.item() == float(dual)
    torch.testing.assert_close(stats.ratio_mean, torch.tensor(ratio, dtype=DTYPE))


def test_clip_statistics_over_a_batch():
    ratios = torch.tensor([[1.0, 1.5, 0.5, 9.0], [1.0, 1.0, 1.0, 1.0]], dtype=DTYPE)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0], [1.0, 1.0, 1.0, 1.0]], dtype=DTYPE)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    logp = torch.log(ratios).requires_grad_(True)
    _, stats = policy_gradient_loss(logp, adv, mask, old_logp=torch.zeros_like(ratios), dual_clip=3.0)
    assert stats.tokens == 5
    torch.testing.assert_close(stats.clip_fraction, torch.tensor(2 / 5, dtype=DTYPE))
    torch.testing.assert_close(stats.dual_clip_fraction, torch.tensor(1 / 5, dtype=DTYPE))
    torch.testing.assert_close(stats.ratio_mean, torch.tensor((1 + 1.5 + 0.5 + 9 + 1) / 5, dtype=DTYPE))
    torch.testing.assert_close(stats.ratio_max, torch.tensor(9.0, dtype=DTYPE))


def test_normalisers():
    logp, _, adv, mask, weights = random_inputs(batch=4, length=6, seed=3)
    mask[0] = False                                                   # an all-padding row
    per_token = mask * weights * logp * adv
    counts = mask.sum(1)
    token_mean, _ = policy_gradient_loss(logp, adv, mask, weights=weights)
    torch.testing.assert_close(token_mean, -per_token.sum() / counts.sum())
    sequence_mean, _ = policy_gradient_loss(logp, adv, mask, weights=weights, normalizer="sequence_mean")
    rows = counts > 0
    torch.testing.assert_close(sequence_mean, -(per_token.sum(1)[rows] / counts[rows]).mean())
    constant, _ = policy_gradient_loss(logp, adv, mask, weights=weights, normalizer="constant")
    torch.testing.assert_close(constant, -per_token.sum() / (4 * 6))
    longer, _ = policy_gradient_loss(logp, adv, mask, weights=weights, normalizer="constant", max_length=10)
    torch.testing.assert_close(longer, -per_token.sum() / (4 * 10))


@pytest.mark.parametrize("normalizer", ["token_mean", "sequence_mean", "constant"])
@pytest.mark.parametrize("form", ["log_prob", "ratio"])
def test_all_padding_batch_gives_zero_loss_and_zero_gradient(normalizer, form):
    logp = torch.full((2, 3), -math.inf, dtype=DTYPE, requires_grad=True)    # padding may hold -inf
    behaviour = torch.full((2, 3), -math.inf, dtype=DTYPE) if form == "ratio" else None
    loss, stats = policy_gradient_loss(logp, torch.ones(2, 3, dtype=DTYPE), torch.zeros(2, 3, dtype=bool),
                                       old_logp=behaviour, normalizer=normalizer)
    assert loss.item() == 0.0
    assert torch.equal(grad_of(loss, logp), torch.zeros(2, 3, dtype=DTYPE))
    assert stats.tokens == 0 and stats.clip_fraction == 0 and stats.ratio_mean == 0 and stats.ratio_max == 0


def test_zero_weight_removes_the_token_and_weights_are_constants():
    logp, _, adv, mask, _ = random_inputs(seed=4)
    weights = torch.ones_like(adv)
    weights[0, 0] = 0.0
    mask[0, 0] = True
    weights.requires_grad_(True)
    loss, _ = policy_gradient_loss(logp, adv, mask, weights=weights)
    gradient, weight_gradient = torch.autograd.grad(loss, [logp, weights], allow_unused=True)
    assert gradient[0, 0] == 0.0 and (gradient[mask & (weights > 0)] != 0).all()
    assert weight_gradient is None                     # w_t is a constant of the loss


def test_gradcheck_ratio_form():
    logp, behaviour, adv, mask, weights = random_inputs(batch=2, length=4, seed=5)
    # keep every ratio strictly inside or outside the clip range: the min form is not differentiable at its kinks
    behaviour = logp.detach() + torch.tensor([[0.0, 0.5, -0.5, 0.05], [0.3, -0.3, 0.1, -0.1]], dtype=DTYPE)

    def loss_of(x):
        return policy_gradient_loss(x, adv, mask, weights=weights, old_logp=behaviour, dual_clip=2.0,
                                    normalizer="sequence_mean")[0]

    assert torch.autograd.gradcheck(loss_of, (logp.detach().clone().requires_grad_(True),))


def test_token_log_ratio():
    teacher = torch.tensor([[-1.0, -2.0, -math.inf]], dtype=DTYPE)
    student = torch.tensor([[-0.5, -3.0, -1.0]], dtype=DTYPE, requires_grad=True)
    ratio = token_log_ratio(teacher, student)
    assert not ratio.requires_grad
    torch.testing.assert_close(ratio, torch.tensor([[-0.5, 1.0, -math.inf]], dtype=DTYPE))
    masked = token_log_ratio(teacher, student, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(masked, torch.tensor([[-0.5, 1.0, 0.0]], dtype=DTYPE))
    with pytest.raises(MathInputError, match="^teacher_logp, student_logp:"):
        token_log_ratio(teacher[:, :2], student)


@pytest.mark.parametrize("kwargs, argument", [
    ({"advantages": torch.zeros(3, 4)}, "advantages"),
    ({"mask": torch.ones(3, 4, dtype=bool)}, "mask"),
    ({"mask": torch.full((3, 5), 0.5)}, "mask"),
    ({"mask": None}, "mask"),
    ({"old_logp": torch.zeros(2, 5)}, "old_logp"),
    ({"weights": torch.zeros(3, 5, 1)}, "weights"),
    ({"weights": -torch.ones(3, 5)}, "weights"),
    ({"normalizer": "max"}, "normalizer"),
    ({"normalizer": "token_mean", "max_length": 8}, "max_length"),
    ({"normalizer": "constant", "max_length": 0}, "max_length"),
    ({"old_logp": torch.zeros(3, 5), "clip_eps_low": 1.5}, "clip_eps_low"),
    ({"old_logp": torch.zeros(3, 5), "clip_eps_high": -0.1}, "clip_eps_high"),
    ({"old_logp": torch.zeros(3, 5), "dual_clip": 1.0}, "dual_clip"),
    ({"old_logp": torch.full((3, 5), math.nan)}, "old_logp"),
    ({"advantages": torch.full((3, 5), math.nan)}, "advantages"),
    ({"logp": torch.full((3, 5), math.nan)}, "logp"),
    ({"logp": torch.zeros(15)}, "logp"),
])
def test_bad_input_names_the_argument(kwargs, argument):
    arguments = {"logp": torch.zeros(3, 5), "advantages": torch.zeros(3, 5), "mask": torch.ones(3, 5, dtype=bool)}
    arguments.update(kwargs)
    with pytest.raises(MathInputError, match=f"^{argument}:"):
        policy_gradient_loss(arguments.pop("logp"), arguments.pop("advantages"), arguments.pop("mask"), **arguments)


@settings(max_examples=50, deadline=None)
@given(batch=st.integers(1, 4), length=st.integers(1, 6), seed=st.integers(0, 2 ** 16), empty_rows=st.integers(0, 4),
       normalizer=st.sampled_from(["token_mean", "sequence_mean", "constant"]), ratio_form=st.booleans(),
       dual_clip=st.sampled_from([None, 3.0]), scale=st.sampled_from([1.0, 1e4]))
def test_property_finite_loss_and_gradient(batch, length, seed, empty_rows, normalizer, ratio_form, dual_clip,
                                           scale):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, length, generator=generator) > 0.4
    mask[:min(empty_rows, batch)] = False
    logp = -scale * torch.rand(batch, length, generator=generator, dtype=DTYPE)      # extreme log-probs
    logp = logp.masked_fill(~mask & (torch.rand(batch, length, generator=generator) > 0.5), -math.inf)
    behaviour = -scale * torch.rand(batch, length, generator=generator, dtype=DTYPE) if ratio_form else None
    adv = scale * torch.randn(batch, length, generator=generator, dtype=DTYPE)
    weights = torch.rand(batch, length, generator=generator, dtype=DTYPE)
    logp.requires_grad_(True)
    loss, stats = policy_gradient_loss(logp, adv, mask, old_logp=behaviour, weights=weights,
                                       normalizer=normalizer, dual_clip=dual_clip if ratio_form else None)
    gradient = grad_of(loss, logp)
    assert torch.isfinite(loss) and torch.isfinite(gradient).all()
    assert (gradient[~mask] == 0).all()
    for value in (stats.clip_fraction, stats.dual_clip_fraction, stats.ratio_mean, stats.ratio_max):
        assert torch.isfinite(value)
    assert 0 <= stats.clip_fraction <= 1
