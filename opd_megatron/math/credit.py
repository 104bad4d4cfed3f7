"""Temporal credit for route B: turn the per-token log-ratio `r_t = log q(y_t|s_t) - log pi(y_t|s_t)` into the
advantage `A_t` of the policy-gradient loss `L = -(1/Z) sum_t m_t w_t c_t(theta) sg(A_t)`.

Shapes: `log_ratio`, `mask` and every per-position input are `[B, T]` (B rollouts, T positions); per-sequence
inputs (`group_ids`, `rewards`) are `[B]`. Outputs are `[B, T]`, zero on masked positions, without gradient.

Padding and interior masks (decided here, [Ours]): a masked position (`m_t = 0`) neither contributes a reward nor
receives an advantage, and it is not a step: returns pass through it unchanged. So for an unmasked `t`,
`G_t = sum_{t' >= t, m_t' = 1} gamma^k(t, t') r_t'` where `k(t, t')` counts the unmasked positions in `[t, t')`.
Interior masked tokens (e.g. tool output between two assistant turns) are environment, not actions: later
rewards still reach the earlier actions that led to them, and the discount counts actions, not tokens. A row that
is all padding gets all-zero advantages.

Estimators (the `estimator` argument of `advantages`):
- `"immediate"`     `A_t = r_t` [TM]: gamma = 0; biased for the sequence objective, low variance.
- `"return_to_go"`  `A_t = G_t = sum_{t' >= t} r_t'` [MiniLLM]: unbiased for `grad KL(pi || q)_seq`.
- `"discounted"`    `A_t = sum_{t' >= t} gamma^(t'-t) r_t'`: biased for gamma < 1, bias grows as gamma falls.
- `"baseline"`      `A_t = G^gamma_t - b(s_t)` with `b` from `baseline=` (`"group_mean"`, `"batch_mean"`,
                    `"reverse_kl"` [vOPD], `"value"`); unbiased while `b` does not depend on `y_t`.
- `"single_step"`   `A_t = gamma * G^gamma_{t+1}` (optionally `/ n_future_t`) [MiniLLM]: the long-term part of
                    MiniLLM's single-step decomposition; the caller adds the step-t term exactly over the
                    vocabulary (route A reverse KL at every visited state).
- `"gae"`           GAE-OPD [Survey]: `delta_t = r_t + gamma V(s_t+1) - V(s_t)`, `A_t = sum_l (gamma lam)^l delta_t+l`
                    (`gae_advantages`, which also returns the value head's targets).
The outcome/verifier hybrid `alpha A^OPD + beta (R - b_R)` [Survey] is `outcome_hybrid`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from opd_megatron.math.checks import (MathInputError, require_binary_mask, require_choice, require_finite_where,
                                      require_in_range, require_positive_int)

ESTIMATORS = ("immediate", "return_to_go", "discounted", "baseline", "single_step", "gae")
BASELINES = ("group_mean", "batch_mean", "reverse_kl", "value")
REWARD_BASELINES = ("group_mean", "batch_mean", "none")


@dataclass(frozen=True)
class GaeOutput:
    """GAE-OPD result: `advantages` `A_t` and `value_targets` (the lambda-returns `A_t + V(s_t)` the value head is
    regressed on), both `[B, T]`, zero on masked positions."""

    advantages: torch.Tensor
    value_targets: torch.Tensor


def advantages(log_ratio: torch.Tensor, mask: torch.Tensor, estimator: str, gamma: float = 1.0, *,
               lam: float = 1.0, baseline: str | None = None, group_ids: torch.Tensor | None = None,
               group_size: int | None = None, reverse_kl: torch.Tensor | None = None,
               values: torch.Tensor | None = None, length_normalized: bool = False) -> torch.Tensor:
    """Advantages `A_t` `[B, T]` (no gradient, zero on masked positions) from the log-ratio `r_t` `[B, T]`.

    Formulas and marks: see the module docstring. Arguments an estimator does not use must stay at their
    defaults (a `MathInputError` names the one that was set), except `gamma`, which `"immediate"` ignores (it is
    gamma = 0 by definition); `"return_to_go"` is gamma = 1 and rejects any other gamma (use `"discounted"`).

    - `gamma`, `lam` in [0, 1]; `lam` only for `"gae"`.
    - `baseline` (only for `"baseline"`), `b(s_t)` subtracted from the discounted return `G^gamma_t`:
      `"group_mean"`: mean of `G_t` at the same position over the OTHER rollouts of the same prompt (leave-one-out;
      `group_ids` `[B]` integer labels, or `group_size` n for consecutive groups of n). `"batch_mean"`: the same
      over the other rollouts of the whole batch. Leaving the rollout itself out keeps `b` independent of its own
      tokens, so the estimator stays unbiased with independent rollouts; including it would scale the expected
      gradient by `1 - 1/n`. Rollouts masked at `t` do not count; with no other rollout at `t`, `b = 0`.
      `"reverse_kl"`: the closed-form one-step value `b(s_t) = -RKL_t` [vOPD], with `reverse_kl` `[B, T]` the exact
      per-state `sum_v pi_v (log pi_v - log q_v)` (full vocabulary or a top-k support). `"value"`: `b(s_t) =
      values` `[B, T]` (a value head, or any per-state function).
    - `values` `[B, T]`: `V(s_t)` for `"gae"` (required) and `baseline="value"`.
    - `length_normalized` (only `"single_step"`): MiniLLM's `G_{t+1} / (T - t - 1)`, resolved with 0-based t:
      `T - t - 1` is the number of positions after t, here the number of UNMASKED positions after t, so the
      result is the mean future log-ratio (for gamma < 1: the discounted future sum over that count); 0 at the
      last position, where nothing follows.
    """
    require_choice("estimator", estimator, ESTIMATORS)
    require_in_range("gamma", gamma, 0.0, 1.0)
    require_in_range("lam", lam, 0.0, 1.0)
    log_ratio, mask = _check_log_ratio(log_ratio, mask)
    unused = {"lam": lam != 1.0, "baseline": baseline is not None, "group_ids": group_ids is not None,
              "group_size": group_size is not None, "reverse_kl": reverse_kl is not None,
              "values": values is not None, "length_normalized": bool(length_normalized)}
    used = {"gae": ("lam", "values"), "single_step": ("length_normalized",), "baseline": ("baseline",)}
    if estimator == "baseline":
        require_choice("baseline", baseline, BASELINES)
        used["baseline"] += {"group_mean": ("group_ids", "group_size"), "batch_mean": (),
                             "reverse_kl": ("reverse_kl",), "value": ("values",)}[baseline]
    for name, is_set in unused.items():
        if is_set and name not in used.get(estimator, ()):
            raise MathInputError(f"{name}: not used by estimator={estimator!r}"
                                 f"{' with baseline=' + repr(baseline) if estimator == 'baseline' else ''}; "
                                 f"leave it at its default")
    if estimator == "return_to_go" and gamma != 1.0:
        raise MathInputError(f"gamma: return_to_go is undiscounted (gamma = 1), got {gamma}; "
                             f"use estimator='discounted'")

    rewards = torch.where(mask, log_ratio, 0.0)
    if estimator == "immediate":
        return rewards
    if estimator in ("return_to_go", "discounted"):
        return _returns(rewards, mask, gamma)
    if estimator == "gae":
        if values is None:
            raise MathInputError("values: estimator='gae' needs the value predictions V(s_t) [B, T]")
        return gae_advantages(log_ratio, mask, values, gamma, lam).advantages
    if estimator == "single_step":
        future = _returns(rewards, mask, gamma) - rewards
        if length_normalized:
            n_future = _reverse_cumsum(mask.to(log_ratio.dtype)) - mask.to(log_ratio.dtype)
            future = torch.where(n_future > 0, future / n_future.clamp_min(1.0), 0.0)
        return torch.where(mask, future, 0.0)

    returns = _returns(rewards, mask, gamma)
    if baseline == "group_mean":
        index = _group_index(returns.shape[0], group_ids, group_size, returns.device)
        b = leave_one_out_mean(returns, mask, index)
    elif baseline == "batch_mean":
        b = leave_one_out_mean(returns, mask, torch.zeros(returns.shape[0], dtype=torch.long, device=returns.device))
    elif baseline == "reverse_kl":
        b = -_check_per_position("reverse_kl", reverse_kl, mask, log_ratio.dtype)
    else:
        b = _check_per_position("values", values, mask, log_ratio.dtype)
    return torch.where(mask, returns - b, 0.0)


def batch_mean_advantages(returns: torch.Tensor, mask: torch.Tensor, column_sums: torch.Tensor,
                          column_counts: torch.Tensor) -> torch.Tensor:
    """`A_t = G_t - b_t` with the leave-one-out per-position batch mean `b_t` over the WHOLE global batch, from its
    per-column totals: `returns`, `mask` `[B, T]` (this data-parallel rank's rows), `column_sums`,
    `column_counts` `[T]`: `sum_j m_j,t G_j,t` and `sum_j m_j,t` over every row of every data-parallel rank (an
    all-reduce of this rank's totals). Equals `advantages(..., "baseline", baseline="batch_mean")` on the
    concatenated global batch; a rank-local mean would make the estimator depend on the data-parallel size."""
    returns, mask = _check_log_ratio(returns, mask, name="returns")
    if tuple(column_sums.shape) != (returns.shape[1],) or tuple(column_counts.shape) != (returns.shape[1],):
        raise MathInputError(f"column_sums, column_counts: expected shape ({returns.shape[1]},), got "
                             f"{tuple(column_sums.shape)} and {tuple(column_counts.shape)}")
    own = torch.where(mask, returns, 0.0)
    weight = mask.to(returns.dtype)
    others = column_counts.to(returns.dtype)[None, :] - weight
    b = torch.where(others > 0, (column_sums.to(returns.dtype)[None, :] - own) / others.clamp_min(1.0), 0.0)
    return torch.where(mask, returns - b, 0.0)


def returns_to_go(log_ratio: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """`G^gamma_t = r_t + gamma G^gamma_{next unmasked t'}` on unmasked positions, 0 on masked ones; `[B, T]`.
    gamma = 1 is MiniLLM's return-to-go [MiniLLM], gamma < 1 the discounted return. Masked positions are passed
    through (see the module docstring)."""
    require_in_range("gamma", gamma, 0.0, 1.0)
    log_ratio, mask = _check_log_ratio(log_ratio, mask)
    return _returns(torch.where(mask, log_ratio, 0.0), mask, gamma)


def gae_advantages(log_ratio: torch.Tensor, mask: torch.Tensor, values: torch.Tensor, gamma: float = 1.0,
                   lam: float = 1.0) -> GaeOutput:
    """GAE-OPD [Survey]: generalized advantage estimation (GAE, Schulman et al. 2016) on the OPD reward `r_t`.

    `delta_t = r_t + gamma V(s_t+1) - V(s_t)`, `A_t = sum_l (gamma lam)^l delta_{t+l}`, value targets
    `A_t + V(s_t)` (the lambda-returns). `s_t+1` is the next unmasked position; after the last one `V = 0`
    (terminal). `lam = 1` telescopes to `G^gamma_t - V(s_t)` (return-to-go minus the value at gamma = 1) for any
    `values`; `lam = 0` is TD(0), `A_t = delta_t`. Inputs `[B, T]`: `log_ratio`, `mask`, and `values` (the value
    head's predictions, detached here; masked entries are ignored). Outputs `[B, T]`, zero on masked positions.
    """
    require_in_range("gamma", gamma, 0.0, 1.0)
    require_in_range("lam", lam, 0.0, 1.0)
    log_ratio, mask = _check_log_ratio(log_ratio, mask)
    values = _check_per_position("values", values, mask, log_ratio.dtype)
    rewards = torch.where(mask, log_ratio, 0.0)
    # Backwards over positions: `running` is A at the next unmasked position, `next_value` its V; a masked
    # position is not a step, so both pass through it unchanged (module docstring).
    advantage = torch.zeros_like(rewards)
    running = rewards.new_zeros(rewards.shape[0])
    next_value = rewards.new_zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(m, delta + gamma * lam * running, running)
        next_value = torch.where(m, values[:, t], next_value)
        advantage[:, t] = torch.where(m, running, 0.0)
    return GaeOutput(advantages=advantage, value_targets=torch.where(mask, advantage + values, 0.0))


def centred_rewards(rewards: torch.Tensor, reward_baseline: str = "group_mean",
                    group_ids: torch.Tensor | None = None, group_size: int | None = None) -> torch.Tensor:
    """`R - b_R` `[B]`, the outcome term of the hybrid [Survey]. `rewards` `R(x, y)` `[B]`. `reward_baseline`:
    `"group_mean"` (leave-one-out mean of R over the other rollouts of the same prompt, as RLOO: `group_ids` `[B]`
    or `group_size`), `"batch_mean"` (leave-one-out over the batch) or `"none"`. A rollout alone in its group gets
    `b_R = 0`. Needs every row of a group at once: computing it on a micro-batch that splits a group changes the
    estimator (the loop computes it on the whole batch; groups never cross data-parallel ranks)."""
    require_choice("reward_baseline", reward_baseline, REWARD_BASELINES)
    if not torch.is_tensor(rewards) or rewards.dim() != 1 or not rewards.is_floating_point():
        raise MathInputError(f"rewards: expected a float tensor of shape (B,) (one reward per sequence), got "
                             f"{tuple(rewards.shape) if torch.is_tensor(rewards) else type(rewards).__name__}")
    rewards = rewards.detach()
    require_finite_where("rewards", rewards, torch.ones_like(rewards, dtype=torch.bool))
    if reward_baseline != "group_mean" and (group_ids is not None or group_size is not None):
        raise MathInputError(f"group_ids/group_size: only used with reward_baseline='group_mean', "
                             f"got reward_baseline={reward_baseline!r}")
    if reward_baseline == "none":
        return rewards
    batch = rewards.shape[0]
    index = (_group_index(batch, group_ids, group_size, rewards.device) if reward_baseline == "group_mean"
             else torch.zeros(batch, dtype=torch.long, device=rewards.device))
    all_rows = torch.ones(batch, 1, dtype=torch.bool, device=rewards.device)
    return rewards - leave_one_out_mean(rewards[:, None], all_rows, index)[:, 0]


def outcome_hybrid(opd_advantages: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, alpha: float = 1.0,
                   beta: float = 1.0, reward_baseline: str = "group_mean", group_ids: torch.Tensor | None = None,
                   group_size: int | None = None) -> torch.Tensor:
    """Outcome/verifier hybrid [Survey]: `A_t = alpha * A_t^OPD + beta * (R - b_R)` on unmasked positions, `[B, T]`.

    `opd_advantages` `[B, T]` (from `advantages`), `rewards` `R(x, y)` `[B]` (one per sequence, broadcast over its
    tokens); `reward_baseline`, `group_ids`, `group_size` as in `centred_rewards` (`"none"` takes `rewards` as
    already centred). `alpha`, `beta` finite reals.
    """
    opd_advantages, mask = _check_log_ratio(opd_advantages, mask, name="opd_advantages")
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise MathInputError(f"{name}: expected a finite real number, got {value!r}")
    batch = opd_advantages.shape[0]
    if not torch.is_tensor(rewards) or tuple(rewards.shape) != (batch,):
        raise MathInputError(f"rewards: expected shape ({batch},) (one reward per sequence), "
                             f"got {tuple(rewards.shape) if torch.is_tensor(rewards) else type(rewards).__name__}")
    centred = centred_rewards(rewards.to(opd_advantages.dtype), reward_baseline, group_ids, group_size)
    return torch.where(mask, alpha * opd_advantages + beta * centred[:, None], 0.0)


def leave_one_out_mean(x: torch.Tensor, mask: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """`b_i,t = mean of x_j,t over j != i in the group of i with m_j,t = 1` (0 if there is none); `[B, K]`.
    `group_index` `[B]` holds group numbers in `[0, G)`."""
    values = torch.where(mask, x, 0.0)
    weight = mask.to(x.dtype)
    groups = int(group_index.max()) + 1 if group_index.numel() else 0
    sums = values.new_zeros(groups, x.shape[1]).index_add_(0, group_index, values)
    counts = values.new_zeros(groups, x.shape[1]).index_add_(0, group_index, weight)
    others = counts[group_index] - weight
    return torch.where(others > 0, (sums[group_index] - values) / others.clamp_min(1.0), 0.0)


def _group_index(batch: int, group_ids: torch.Tensor | None, group_size: int | None,
                 device: torch.device) -> torch.Tensor:
    if (group_ids is None) == (group_size is None):
        raise MathInputError("group_ids/group_size: a group mean needs exactly one of group_ids [B] "
                             "(the prompt of each rollout) or group_size (consecutive groups of n)")
    if group_size is not None:
        require_positive_int("group_size", group_size)
        if batch % group_size:
            raise MathInputError(f"group_size: expected a divisor of the batch size {batch}, got {group_size}")
        return torch.arange(batch, device=device) // group_size
    if not torch.is_tensor(group_ids) or tuple(group_ids.shape) != (batch,) or group_ids.is_floating_point():
        raise MathInputError(f"group_ids: expected an integer tensor of shape ({batch},), got "
                             f"{_describe(group_ids)}")
    return torch.unique(group_ids, return_inverse=True)[1].to(device)


def _check_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor,
                     name: str = "log_ratio") -> tuple[torch.Tensor, torch.Tensor]:
    if not torch.is_tensor(log_ratio) or log_ratio.dim() != 2 or not log_ratio.is_floating_point():
        raise MathInputError(f"{name}: expected a floating tensor [B, T], got "
                             f"{_describe(log_ratio)}")
    if not torch.is_tensor(mask) or tuple(mask.shape) != tuple(log_ratio.shape):
        raise MathInputError(f"mask: expected shape {tuple(log_ratio.shape)} (that of {name}), got "
                             f"{tuple(mask.shape) if torch.is_tensor(mask) else mask!r}")
    mask = require_binary_mask("mask", mask)
    log_ratio = log_ratio.detach()
    require_finite_where(name, log_ratio, mask)
    return log_ratio, mask


def _check_per_position(name: str, tensor: torch.Tensor | None, mask: torch.Tensor,
                        dtype: torch.dtype) -> torch.Tensor:
    if tensor is None:
        raise MathInputError(f"{name}: required here, expected a tensor of shape {tuple(mask.shape)}")
    if not torch.is_tensor(tensor) or tuple(tensor.shape) != tuple(mask.shape):
        raise MathInputError(f"{name}: expected shape {tuple(mask.shape)} (that of log_ratio), got "
                             f"{tuple(tensor.shape) if torch.is_tensor(tensor) else tensor!r}")
    tensor = tensor.detach().to(dtype)
    require_finite_where(name, tensor, mask)
    return torch.where(mask, tensor, 0.0)


def _returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """The discounted-return scan on checked inputs (`rewards` already 0 on masked positions)."""
    out = torch.zeros_like(rewards)
    running = rewards.new_zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t], rewards[:, t] + gamma * running, running)
        out[:, t] = torch.where(mask[:, t], running, 0.0)
    return out


def _describe(value) -> str:
    return f"{value.dtype} {tuple(value.shape)}" if torch.is_tensor(value) else repr(value)


def _reverse_cumsum(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1).cumsum(-1).flip(-1)
