"""Route B: the sampled-token log-ratio policy gradient of OPD.

    L = -(1/Z) sum_{b,t} m_t w_t c_t(theta) sg(A_t)

on `[B, T]` tensors of sampled-token quantities, with `A_t` from `opd_megatron.math.credit` and the reward
`r_t = log q(y_t|s_t) - log pi(y_t|s_t)` from `token_log_ratio`. Two forms of `c_t`:
- on-policy log-prob form `c_t = log pi(y_t|s_t)` (rollouts from the current student, `mu == pi`) [TM];
- importance-ratio form `c_t = rho_t = pi_theta(y_t|s_t) / pi_theta_old(y_t|s_t) = exp(logp - old_logp)`, the PPO
  ratio of the current weights to the weights that sampled, both under the loss's distribution (so exactly 1 on
  fresh on-policy data whatever the rollout's top-p / top-k / temperature; the sampler mismatch
  `pi_theta_old / mu` is a separate weight, truncated IS in `gates.py`; docs/opd-math.md, Route B), PPO-clipped in
  the min form with separate low/high epsilon, `min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)`, and an
  optional dual clip `max(., c A)` for `A < 0` (Ye et al. 2020) [Survey].
At `rho = 1` both forms have the same gradient `-(1/Z) m w A grad log pi`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from opd_megatron.math.divergences import NORMALIZERS, reduce_loss
from opd_megatron.math.checks import MathInputError, require_binary_mask, require_choice, require_finite_where
# exp() of a log importance ratio beyond +-20 (a factor 5e8) overflows float16/bfloat16 sums and means the token is
# far off-policy; the log ratio is clamped there (and its gradient is zero), as verl and OpenRLHF do.
LOG_RATIO_CLAMP = 20.0


@dataclass(frozen=True)
class PolicyGradientStats:
    """Diagnostics of one route-B loss (0-dim tensors, no gradient, no device sync).

    `clip_fraction`: share of unmasked tokens where the PPO clip is active (the clipped branch is taken and the
    token gives no gradient); `dual_clip_fraction`: share where the dual-clip bound `c A` is taken;
    `ratio_mean`, `ratio_max`: of `rho_t` over unmasked tokens (1 in the log-prob form); `tokens`: number of
    unmasked tokens. With no unmasked token every statistic is 0.
    """

    clip_fraction: torch.Tensor
    dual_clip_fraction: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_max: torch.Tensor
    tokens: torch.Tensor


def token_log_ratio(teacher_logp: torch.Tensor, student_logp: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """The OPD reward `r_t = log q(y_t|s_t) - log pi(y_t|s_t)` `[B, T]`, without gradient; 0 on masked positions if
    a mask is given. Its negative is the single-sample reverse-KL estimate at `s_t` (k1). [TM]

    `teacher_logp`, `student_logp` `[B, T]`: log-probabilities of the sampled tokens. A teacher log-prob of -inf
    (the teacher rules the token out) gives `r_t = -inf`, which the credit estimators reject on unmasked positions.
    """
    if not torch.is_tensor(student_logp) or not torch.is_tensor(teacher_logp) or \
            tuple(student_logp.shape) != tuple(teacher_logp.shape):
        raise MathInputError(f"teacher_logp, student_logp: expected equal shapes, got "
                             f"{_shape(teacher_logp)} and {_shape(student_logp)}")
    ratio = teacher_logp.detach() - student_logp.detach()
    if mask is None:
        return ratio
    if tuple(mask.shape) != tuple(ratio.shape):
        raise MathInputError(f"mask: expected shape {tuple(ratio.shape)}, got {_shape(mask)}")
    return torch.where(require_binary_mask("mask", mask), ratio, 0.0)


def policy_gradient_loss(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                         old_logp: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                         normalizer: str = "token_mean", clip_eps_low: float | None = 0.2,
                         clip_eps_high: float | None = 0.2, dual_clip: float | None = None,
                         max_length: int | None = None) -> tuple[torch.Tensor, PolicyGradientStats]:
    """`L = -(1/Z) sum_{b,t} m_t w_t c_t(theta) sg(A_t)` [TM, Survey]; returns `(loss, stats)`.

    - `logp` `[B, T]`: `log pi_theta(y_t|s_t)` of the sampled tokens, with gradient.
    - `advantages` `[B, T]`: `A_t` (detached here: `sg`). `mask` `[B, T]`: 0/1 or bool, 1 on trained tokens.
    - `old_logp` `[B, T]` or None: `log pi_theta_old(y_t|s_t)`, the sampling weights' log-prob under the loss's
      distribution (not the truncated/tempered sampler's `log mu`). None selects the on-policy log-prob
      form `c_t = log pi`; a tensor selects the ratio form `c_t = rho_t = exp(logp - old_logp)` with the PPO
      min-form clip `[1 - clip_eps_low, 1 + clip_eps_high]` (None: no clip on that side) and, if `dual_clip = c`
      (c > 1), the bound `max(min(rho A, clip(rho) A), c A)` for `A < 0`. Clip arguments are ignored in the
      log-prob form.
    - `weights` `[B, T]` or None: token weights `w_t >= 0` (a product of gates, truncated IS weights),
      treated as constants (detached).
    - `normalizer` (`Z`), shared with route A (`divergences.reduce_loss`): `"token_mean"` - the number
      of unmasked tokens in the batch (gated tokens with `w_t = 0` still count); `"sequence_mean"` - each
      sequence's sum over its own unmasked-token count, then the mean over sequences that have at least one
      unmasked token; `"constant"` - `B * max_length` (each sequence's sum over a fixed length, default
      `max_length = T`, then the batch mean; Dr. GRPO's choice). A batch with no unmasked token gives loss 0
      (never NaN), still connected to `logp` for backward.
    Masked positions may hold anything but NaN (e.g. -inf log-probs of padding): they are replaced before any
    arithmetic so that neither the loss nor its gradient sees them. The loss is computed in at least float32
    (bf16 log-probs are upcast; the ratio's exp is too coarse in bf16).
    """
    logp_shape = _shape(logp)
    if not torch.is_tensor(logp) or logp.dim() != 2 or not logp.is_floating_point():
        raise MathInputError(f"logp: expected a floating tensor [B, T], got {logp_shape}")
    for name, tensor, required in (("advantages", advantages, True), ("mask", mask, True),
                                   ("old_logp", old_logp, False), ("weights", weights, False)):
        if (required or tensor is not None) and (not torch.is_tensor(tensor) or tuple(tensor.shape) != logp_shape):
            raise MathInputError(f"{name}: expected shape {logp_shape} (that of logp), got {_shape(tensor)}")
    require_choice("normalizer", normalizer, NORMALIZERS)
    mask = require_binary_mask("mask", mask)
    require_finite_where("logp", logp.detach(), mask)
    require_finite_where("advantages", advantages.detach(), mask)

    logp = torch.where(mask, logp.to(torch.promote_types(logp.dtype, torch.float32)), 0.0)
    adv = torch.where(mask, advantages.detach().to(logp.dtype), 0.0)
    weight = torch.ones_like(adv) if weights is None else weights.detach().to(logp.dtype)
    if weights is not None:
        require_finite_where("weights", weight, mask)
        if (weight[mask] < 0).any():
            raise MathInputError("weights: expected token weights >= 0 on unmasked positions")
    weight = torch.where(mask, weight, 0.0)

    clip_active = dual_active = torch.zeros_like(mask)
    if old_logp is None:
        objective = logp * adv
        ratio = torch.ones_like(adv)
    else:
        low, high = _clip_bounds(clip_eps_low, clip_eps_high)
        if dual_clip is not None and not (isinstance(dual_clip, (int, float)) and 1.0 < dual_clip < math.inf):
            raise MathInputError(f"dual_clip: expected a finite constant c > 1, got {dual_clip!r}")
        require_finite_where("old_logp", old_logp.detach(), mask)
        behaviour = torch.where(mask, old_logp.detach().to(logp.dtype), 0.0)
        ratio = torch.exp((logp - behaviour).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        surrogate = ratio * adv
        clipped = (ratio if low is None and high is None else ratio.clamp(low, high)) * adv
        # min form: the clipped branch is taken (and gives no gradient) only where it is strictly smaller.
        clip_active = mask & (clipped < surrogate)
        objective = torch.where(clip_active, clipped.detach(), surrogate)
        if dual_clip is not None:
            bound = dual_clip * adv
            dual_active = mask & (adv < 0) & (bound > objective)
            objective = torch.where(dual_active, bound, objective)
        ratio = ratio.detach()

    # one definition of Z for route A and route B
    loss = reduce_loss(-weight * objective, mask, normalizer, max_length)

    tokens = mask.sum()
    denominator = tokens.clamp_min(1).to(logp.dtype)
    stats = PolicyGradientStats(
        clip_fraction=clip_active.sum().to(logp.dtype).detach() / denominator,
        dual_clip_fraction=dual_active.sum().to(logp.dtype).detach() / denominator,
        ratio_mean=torch.where(mask, ratio, 0.0).sum() / denominator,
        ratio_max=torch.where(mask, ratio, 0.0).amax() if ratio.numel() else logp.new_zeros(()).detach(),
        tokens=tokens)
    return loss, stats


def _clip_bounds(eps_low: float | None, eps_high: float | None) -> tuple[float | None, float | None]:
    if eps_low is not None and not (isinstance(eps_low, (int, float)) and 0.0 <= eps_low <= 1.0):
        raise MathInputError(f"clip_eps_low: expected a value in [0, 1] (the ratio's lower bound 1 - eps_low "
                             f"must stay >= 0) or None, got {eps_low!r}")
    if eps_high is not None and not (isinstance(eps_high, (int, float)) and 0.0 <= eps_high < math.inf):
        raise MathInputError(f"clip_eps_high: expected a finite value >= 0 or None, got {eps_high!r}")
    return (None if eps_low is None else 1.0 - eps_low), (None if eps_high is None else 1.0 + eps_high)


def _shape(tensor) -> object:
    return tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
