"""Credit estimators against direct formulas: returns through padding, leave-one-out baselines, MiniLLM's
single-step terms, GAE, the outcome hybrid, bad input, and a property test over masks."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd_megatron.math import credit
from opd_megatron.math.credit import (advantages, batch_mean_advantages, gae_advantages, outcome_hybrid,
                                      returns_to_go)
from opd_megatron.math.checks import MathInputError

DTYPE = torch.float64


def random_batch(batch=4, length=6, seed=0, padding=True):
    generator = torch.Generator().manual_seed(seed)
    log_ratio = torch.randn(batch, length, generator=generator, dtype=DTYPE)
    mask = torch.rand(batch, length, generator=generator) > 0.3 if padding else torch.ones(batch, length, dtype=bool)
    return log_ratio, mask


def direct_returns(log_ratio, mask, gamma):
    """G_t = sum over unmasked t' >= t of gamma^(unmasked steps from t to t') r_t', 0 on masked t."""
    out = torch.zeros_like(log_ratio)
    for b in range(log_ratio.shape[0]):
        for t in range(log_ratio.shape[1]):
            if not mask[b, t]:
                continue
            steps, total = 0, 0.0
            for u in range(t, log_ratio.shape[1]):
                if mask[b, u]:
                    total += gamma ** steps * log_ratio[b, u].item()
                    steps += 1
            out[b, t] = total
    return out


def test_immediate_is_the_log_ratio_on_the_mask():
    log_ratio, mask = random_batch()
    out = advantages(log_ratio, mask, "immediate")
    assert torch.equal(out, torch.where(mask, log_ratio, 0.0))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.9, 1.0])
def test_discounted_returns_match_the_direct_sum(gamma):
    log_ratio, mask = random_batch(batch=5, length=7, seed=1)
    expected = direct_returns(log_ratio, mask, gamma)
    torch.testing.assert_close(advantages(log_ratio, mask, "discounted", gamma), expected, rtol=0, atol=1e-12)
    if gamma == 1.0:
        torch.testing.assert_close(advantages(log_ratio, mask, "return_to_go"), expected, rtol=0, atol=1e-12)
    if gamma == 0.0:
        assert torch.equal(advantages(log_ratio, mask, "discounted", 0.0), advantages(log_ratio, mask, "immediate"))


def test_returns_pass_through_interior_masked_positions():
    log_ratio = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]], dtype=DTYPE)
    mask = torch.tensor([[1, 0, 1, 1, 0]])   # an interior environment token and trailing padding
    out = returns_to_go(log_ratio, mask, gamma=0.5)
    # the masked 2.0 and 5.0 neither contribute nor receive; the discount counts unmasked steps only
    torch.testing.assert_close(out, torch.tensor([[1 + 0.5 * (3 + 0.5 * 4), 0.0, 3 + 0.5 * 4, 4.0, 0.0]],
                                                 dtype=DTYPE))


def test_group_leave_one_out_baseline():
    log_ratio = torch.tensor([[1.0, 1.0], [2.0, 0.0], [4.0, 2.0], [8.0, 1.0], [3.0, 3.0]], dtype=DTYPE)
    mask = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 1], [1, 1]])
    returns = returns_to_go(log_ratio, mask)          # [[2, 1], [2, 0], [4, 0], [9, 1], [6, 3]]
    group_ids = torch.tensor([7, 7, 7, 3, 3])          # arbitrary labels
    out = advantages(log_ratio, mask, "baseline", baseline="group_mean", group_ids=group_ids)
    baseline = torch.tensor([[(2 + 4) / 2, 0 / 1], [(2 + 4) / 2, 1 / 1], [(2 + 2) / 2, 0.0],
                             [6.0, 3.0], [9.0, 1.0]], dtype=DTYPE)   # row 2 is masked at t=1: it does not count
    torch.testing.assert_close(out, torch.where(mask.bool(), returns - baseline, 0.0), rtol=0, atol=1e-12)

    # consecutive groups by size give the same as the labels that spell them out
    log_ratio, mask = random_batch(batch=6, seed=2)
    by_size = advantages(log_ratio, mask, "baseline", baseline="group_mean", group_size=3)
    by_ids = advantages(log_ratio, mask, "baseline", baseline="group_mean", group_ids=torch.tensor([0, 0, 0, 1, 1, 1]))
    torch.testing.assert_close(by_size, by_ids, rtol=0, atol=0)
    # the batch mean is the group mean of one group
    one_group = advantages(log_ratio, mask, "baseline", baseline="group_mean", group_size=6)
    torch.testing.assert_close(advantages(log_ratio, mask, "baseline", baseline="batch_mean"), one_group)


def test_rollout_alone_in_its_group_gets_no_baseline():
    log_ratio, mask = random_batch(batch=3, seed=3, padding=False)
    out = advantages(log_ratio, mask, "baseline", baseline="group_mean", group_ids=torch.tensor([0, 1, 2]))
    torch.testing.assert_close(out, returns_to_go(log_ratio, mask))


def test_reverse_kl_and_value_baselines():
    log_ratio, mask = random_batch(seed=4)
    generator = torch.Generator().manual_seed(5)
    rkl = torch.rand(log_ratio.shape, generator=generator, dtype=DTYPE)
    values = torch.randn(log_ratio.shape, generator=generator, dtype=DTYPE)
    returns = direct_returns(log_ratio, mask, 0.9)
    torch.testing.assert_close(advantages(log_ratio, mask, "baseline", 0.9, baseline="reverse_kl", reverse_kl=rkl),
                               torch.where(mask, returns + rkl, 0.0))
    torch.testing.assert_close(advantages(log_ratio, mask, "baseline", 0.9, baseline="value", values=values),
                               torch.where(mask, returns - values, 0.0))


def test_single_step_future_return_and_length_normalisation():
    log_ratio = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0]], dtype=DTYPE)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    future = advantages(log_ratio, mask, "single_step")
    torch.testing.assert_close(future, torch.tensor([[9.0, 7.0, 4.0, 0.0], [6.0, 0.0, 0.0, 0.0]], dtype=DTYPE))
    normalised = advantages(log_ratio, mask, "single_step", length_normalized=True)
    # G_{t+1} / (T - t - 1) for 0-based t: the mean of the log-ratios after t, 0 at the last position
    torch.testing.assert_close(normalised, torch.tensor([[3.0, 3.5, 4.0, 0.0], [6.0, 0.0, 0.0, 0.0]], dtype=DTYPE))
    discounted = advantages(log_ratio, mask, "single_step", 0.5)
    # gamma * G^gamma_{t+1}: adding r_t back gives the discounted return
    torch.testing.assert_close(discounted + torch.where(mask.bool(), log_ratio, 0.0),
                               returns_to_go(log_ratio, mask, 0.5))


@pytest.mark.parametrize("gamma", [0.7, 1.0])
def test_gae_limits_and_direct_formula(gamma):
    log_ratio, mask = random_batch(batch=5, length=6, seed=6)
    values = torch.randn(log_ratio.shape, generator=torch.Generator().manual_seed(7), dtype=DTYPE)
    # lambda = 1 telescopes to the (discounted) return minus the value, for any value
    torch.testing.assert_close(gae_advantages(log_ratio, mask, values, gamma, 1.0).advantages,
                               torch.where(mask, direct_returns(log_ratio, mask, gamma) - values, 0.0))
    # lambda = 0 is TD(0) and general lambda the sum of (gamma lambda)^l delta_{t+l}, over unmasked steps
    for lam in (0.0, 0.6):
        out = gae_advantages(log_ratio, mask, values, gamma, lam)
        expected = torch.zeros_like(log_ratio)
        for b in range(log_ratio.shape[0]):
            steps = [t for t in range(log_ratio.shape[1]) if mask[b, t]]
            deltas = []
            for i, t in enumerate(steps):
                next_value = values[b, steps[i + 1]] if i + 1 < len(steps) else 0.0
                deltas.append(log_ratio[b, t] + gamma * next_value - values[b, t])
            for i, t in enumerate(steps):
                expected[b, t] = sum((gamma * lam) ** l * deltas[i + l] for l in range(len(steps) - i))
        torch.testing.assert_close(out.advantages, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(out.value_targets, torch.where(mask, expected + values, 0.0), rtol=0, atol=1e-12)
        torch.testing.assert_close(advantages(log_ratio, mask, "gae", gamma, lam=lam, values=values),
                                   out.advantages)


def test_outcome_hybrid():
    opd = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]], dtype=DTYPE)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 0]])
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=DTYPE)
    out = outcome_hybrid(opd, mask, rewards, alpha=0.5, beta=2.0, group_size=2)
    centred = torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=DTYPE)    # leave-one-out within each pair
    torch.testing.assert_close(out, torch.where(mask.bool(), 0.5 * opd + 2.0 * centred[:, None], 0.0))
    batch = outcome_hybrid(opd, mask, rewards, reward_baseline="batch_mean")
    centred = rewards - torch.tensor([2 / 3, 1.0, 2 / 3, 2 / 3], dtype=DTYPE)
    torch.testing.assert_close(batch, torch.where(mask.bool(), opd + centred[:, None], 0.0))
    raw = outcome_hybrid(opd, mask, rewards, alpha=0.0, reward_baseline="none")
    torch.testing.assert_close(raw, torch.where(mask.bool(), rewards[:, None].expand(-1, 2), 0.0))


def test_advantages_carry_no_gradient_and_ignore_infinite_padding():
    log_ratio, mask = random_batch(seed=8)
    log_ratio = torch.where(mask, log_ratio, -math.inf).requires_grad_(True)
    for estimator in ("immediate", "return_to_go", "single_step"):
        out = advantages(log_ratio, mask, estimator)
        assert not out.requires_grad and torch.isfinite(out).all()


@pytest.mark.parametrize("call, argument", [
    (lambda r, m: advantages(r, m, "discounted", 1.5), "gamma"),
    (lambda r, m: advantages(r, m, "discounted", -0.1), "gamma"),
    (lambda r, m: advantages(r, m, "gae", lam=1.2, values=torch.zeros_like(r)), "lam"),
    (lambda r, m: advantages(r, m, "vtrace"), "estimator"),
    (lambda r, m: advantages(r, m, "baseline", baseline="median"), "baseline"),
    (lambda r, m: advantages(r, m, "baseline"), "baseline"),
    (lambda r, m: advantages(r, m[:, :-1], "immediate"), "mask"),
    (lambda r, m: advantages(r[0], m[0], "immediate"), "log_ratio"),
    (lambda r, m: advantages(r.masked_fill(~m, math.nan), m, "immediate"), "log_ratio"),
    (lambda r, m: advantages(r.masked_fill(m, math.inf), m, "immediate"), "log_ratio"),
    (lambda r, m: advantages(r, m.double() * 0.5, "immediate"), "mask"),
    (lambda r, m: advantages(r, m, "return_to_go", 0.9), "gamma"),
    (lambda r, m: advantages(r, m, "discounted", 0.9, values=torch.zeros_like(r)), "values"),
    (lambda r, m: advantages(r, m, "return_to_go", length_normalized=True), "length_normalized"),
    (lambda r, m: advantages(r, m, "baseline", baseline="batch_mean", group_size=2), "group_size"),
    (lambda r, m: advantages(r, m, "baseline", baseline="group_mean"), "group_ids/group_size"),
    (lambda r, m: advantages(r, m, "baseline", baseline="group_mean", group_size=3), "group_size"),
    (lambda r, m: advantages(r, m, "baseline", baseline="group_mean", group_ids=torch.zeros(3)), "group_ids"),
    (lambda r, m: advantages(r, m, "baseline", baseline="reverse_kl"), "reverse_kl"),
    (lambda r, m: advantages(r, m, "gae"), "values"),
    (lambda r, m: advantages(r, m, "gae", values=torch.zeros(4, 5)), "values"),
    (lambda r, m: advantages(r, m, "gae", values=torch.full_like(r, math.nan)), "values"),
    (lambda r, m: outcome_hybrid(r, m, torch.zeros(3), reward_baseline="none"), "rewards"),
    (lambda r, m: outcome_hybrid(r, m, torch.zeros(4), alpha=math.nan, reward_baseline="none"), "alpha"),
    (lambda r, m: outcome_hybrid(r, m, torch.zeros(4), reward_baseline="mode"), "reward_baseline"),
])
def test_bad_input_names_the_argument(call, argument):
    log_ratio, mask = random_batch(batch=4, length=6, seed=9)
    with pytest.raises(MathInputError, match=f"^{argument}:"):
        call(log_ratio, mask)


@settings(max_examples=50, deadline=None)
@given(batch=st.integers(1, 5), length=st.integers(1, 7), seed=st.integers(0, 2 ** 16),
       empty_rows=st.integers(0, 5), gamma=st.floats(0.0, 1.0), lam=st.floats(0.0, 1.0),
       scale=st.sampled_from([1.0, 1e4]))
def test_property_finite_and_zero_off_the_mask(batch, length, seed, empty_rows, gamma, lam, scale):
    generator = torch.Generator().manual_seed(seed)
    log_ratio = scale * torch.randn(batch, length, generator=generator, dtype=DTYPE)
    mask = torch.rand(batch, length, generator=generator) > 0.4
    mask[:min(empty_rows, batch)] = False                        # all-padding rows
    log_ratio = log_ratio.masked_fill(~mask & (torch.rand(batch, length, generator=generator) > 0.5), -math.inf)
    values = torch.randn(batch, length, generator=generator, dtype=DTYPE)
    outputs = [advantages(log_ratio, mask, "immediate"), advantages(log_ratio, mask, "return_to_go"),
               advantages(log_ratio, mask, "discounted", gamma),
               advantages(log_ratio, mask, "single_step", gamma, length_normalized=True),
               advantages(log_ratio, mask, "baseline", gamma, baseline="batch_mean"),
               advantages(log_ratio, mask, "baseline", gamma, baseline="group_mean",
                          group_ids=torch.randint(0, 3, (batch,), generator=generator)),
               advantages(log_ratio, mask, "baseline", baseline="reverse_kl", reverse_kl=values.abs()),
               advantages(log_ratio, mask, "gae", gamma, lam=lam, values=values)]
    outputs.append(outcome_hybrid(outputs[1], mask, torch.randn(batch, generator=generator, dtype=DTYPE),
                                  reward_baseline="batch_mean"))
    for out in outputs:
        assert out.shape == (batch, length)
        assert torch.isfinite(out).all()
        assert (out[~mask] == 0).all()
    gae_out = credit.gae_advantages(log_ratio, mask, values, gamma, lam)
    assert torch.isfinite(gae_out.value_targets).all() and (gae_out.value_targets[~mask] == 0).all()


def test_batch_mean_from_global_column_totals_equals_the_whole_batch_estimator():
    """Two 'data-parallel ranks' of different lengths: each rank's A from the global column totals equals the
    batch-mean baseline estimator run on the concatenated batch (a rank-local mean would not)."""
    gen = torch.Generator().manual_seed(4)
    whole = torch.randn(6, 7, generator=gen, dtype=torch.float64)
    mask = torch.rand(6, 7, generator=gen) < 0.7
    mask[4:, 5:] = False           # the second rank's rows are shorter: its batch is trimmed to 5 columns
    expected = advantages(whole, mask, "baseline", 0.9, baseline="batch_mean")
    returns = returns_to_go(whole, mask, 0.9)
    sums, counts = torch.where(mask, returns, 0.0).sum(0), mask.double().sum(0)
    for rows, width in ((slice(0, 4), 7), (slice(4, 6), 5)):
        part_mask = mask[rows, :width]
        got = batch_mean_advantages(returns[rows, :width], mask[rows, :width], sums[:width], counts[:width])
        torch.testing.assert_close(torch.where(part_mask, got, 0.0), torch.where(part_mask, expected[rows, :width], 0.0),
                                   rtol=1e-12, atol=1e-12)
    local = advantages(whole[:4], mask[:4], "baseline", 0.9, baseline="batch_mean")
    assert not torch.allclose(torch.where(mask[:4], local, 0.0), torch.where(mask[:4], expected[:4], 0.0))
