"""Route A: per-position divergences between the student `pi` and the teacher `q` at visited states, and the
masked reduction of per-position losses to one scalar.

Every divergence here is a sum over outcomes `v` of a term that depends only on `(pi_v, q_v)` (an
f-divergence), so one routine on log-probability pairs `[..., K]` serves the full vocabulary (`K = V`) and any
support built by `opd_megatron/math/supports.py` (`K` = support size, plus a tail bucket).

Conventions (all functions):
- logits `[..., V]` (`[N, V]` or `[B, T, V]`); temperatures divide the logits before `log_softmax`.
- the result is the per-position loss summed over the vocabulary, shape `logits.shape[:-1]`.
- gradient flows into the student only: the teacher is detached.
- computed in log space; `0 * log 0 = 0`: an outcome with zero probability on the side that weights the
  term contributes nothing (no NaN from masked `-inf` logits, in value or gradient). A divergence is `+inf`
  where it truly is, e.g. reverse KL where the student puts mass on a token the teacher masks.
- half-precision inputs are computed in float32; float64 stays float64.
"""

from __future__ import annotations

import math

import torch

from opd_megatron.math.checks import (MathInputError, require_binary_mask, require_choice, require_finite,
                                      require_in_range, require_positive, require_positive_int,
                                      require_same_shape)

DIVERGENCES = ("forward_kl", "reverse_kl", "generalized_jsd", "skew_forward_kl", "skew_reverse_kl",
               "total_variation")
NORMALIZERS = ("token_mean", "sequence_mean", "constant")


def check_logits(name: str, logits: torch.Tensor) -> None:
    """A floating tensor `[..., V]` with `V >= 1`, no NaN or +inf, and at least one logit > -inf per position
    (an all -inf row is no distribution)."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise MathInputError(f"{name}: expected a floating-point tensor [..., V], got "
                             f"{type(logits).__name__ if not isinstance(logits, torch.Tensor) else logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise MathInputError(f"{name}: expected shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    require_finite(name, logits)
    if torch.isneginf(logits).all(dim=-1).any():
        raise MathInputError(f"{name}: every logit is -inf at some position (no distribution there)")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The common dtype, at least float32: bf16/fp16 log-softmax loses too much for a loss."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def log_probs(logits: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """`log_softmax(logits / temperature)` `[..., V]` in `dtype`."""
    return torch.log_softmax(logits.to(dtype) / temperature, dim=-1)


def _student_teacher_log_probs(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                               student_temperature: float, teacher_temperature: float
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    require_same_shape(student_logits=student_logits, teacher_logits=teacher_logits)
    require_positive("student_temperature", student_temperature)
    require_positive("teacher_temperature", teacher_temperature)
    dtype = compute_dtype(student_logits, teacher_logits)
    return (log_probs(student_logits, student_temperature, dtype),
            log_probs(teacher_logits.detach(), teacher_temperature, dtype))


def _log_mixture(weight: float, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """`log(weight * a + (1 - weight) * b)` elementwise. The endpoints return one side exactly, so no
    `log(0)` enters (its gradient would be NaN where both sides are -inf)."""
    if weight == 0.0:
        return log_b
    if weight == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight), log_b + math.log1p(-weight))


def _kl_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Elementwise `a * (log a - log b)`: 0 where `a = 0`, +inf where `a > 0 = b` (also when `a` underflows,
    e.g. `log a = -1e4`: the true value is infinite, and 0 * inf would be NaN). The -inf entries are replaced
    before the product so that a zero upstream gradient never meets `-inf - -inf` (0 * NaN = NaN in backward)."""
    zero = torch.isneginf(log_a)
    infinite = torch.isneginf(log_b) & ~zero
    safe_a = log_a.masked_fill(zero, 0.0)
    safe_b = log_b.masked_fill(zero | infinite, 0.0)
    terms = safe_a.exp() * (safe_a - safe_b)
    return terms.masked_fill(zero, 0.0).masked_fill(infinite, float("inf"))


def require_divergence_parameters(kind: str, beta: float | None, alpha: float | None) -> None:
    """`kind` is one of `DIVERGENCES` and gets exactly its own parameter: `beta` in [0, 1] for
    `generalized_jsd`, `alpha` in [0, 1] for the skew KLs, neither for the others."""
    require_choice("kind", kind, DIVERGENCES)
    needs = {"generalized_jsd": "beta", "skew_forward_kl": "alpha", "skew_reverse_kl": "alpha"}.get(kind)
    for name, value in (("beta", beta), ("alpha", alpha)):
        if name == needs:
            if value is None:
                raise MathInputError(f"{name}: required for kind {kind!r}, got None")
            require_in_range(name, float(value), 0.0, 1.0)
        elif value is not None:
            raise MathInputError(f"{name}: not a parameter of kind {kind!r} (expected None), got {value}")


def divergence_from_log_probs(kind: str, student_logp: torch.Tensor, teacher_logp: torch.Tensor, *,
                              beta: float | None = None, alpha: float | None = None) -> torch.Tensor:
    """Per-position divergence from normalised log-probabilities `[..., K]` of the student (`pi`) and the
    teacher (`q`) on the same outcomes (full vocabulary, or a support with its tail bucket) -> `[...]`.

    kind (the functions of this module of the same name give each formula and source):
    - `forward_kl`       `sum_v q_v (log q_v - log pi_v)`
    - `reverse_kl`       `sum_v pi_v (log pi_v - log q_v)`
    - `generalized_jsd`  (needs `beta`) `beta KL(q||M) + (1-beta) KL(pi||M)`, `M = beta q + (1-beta) pi`;
                         `beta = 0` is forward KL and `beta = 1` reverse KL by definition [GKD]
    - `skew_forward_kl`  (needs `alpha`) `KL(q || alpha q + (1-alpha) pi)` [DistiLLM]
    - `skew_reverse_kl`  (needs `alpha`) `KL(pi || alpha pi + (1-alpha) q)` [DistiLLM]
    - `total_variation`  `1/2 sum_v |q_v - pi_v|`

    Outcomes that are -inf on both sides (masked vocabulary, unused support slots) contribute exactly 0. The
    teacher side is used as given (detach it before if it must not receive gradient)."""
    require_divergence_parameters(kind, beta, alpha)
    require_same_shape(student_logp=student_logp, teacher_logp=teacher_logp)

    # Outcomes impossible on both sides are taken out before any arithmetic: every term below is then
    # finite or a true +inf, and their gradients are clean.
    dead = torch.isneginf(student_logp) & torch.isneginf(teacher_logp)
    lp = student_logp.masked_fill(dead, 0.0)
    lq = teacher_logp.masked_fill(dead, 0.0)

    if kind == "forward_kl":
        terms = _kl_terms(lq, lp)
    elif kind == "reverse_kl":
        terms = _kl_terms(lp, lq)
    elif kind == "generalized_jsd":
        beta = float(beta)
        # TRL's generalized_jsd_loss convention: the endpoints are the plain KLs, not the limits of the
        # mixture formula (which tends to 0 at both ends, as beta * FKL and (1 - beta) * RKL).
        if beta == 0.0:
            terms = _kl_terms(lq, lp)
        elif beta == 1.0:
            terms = _kl_terms(lp, lq)
        else:
            lm = _log_mixture(beta, lq, lp)
            terms = beta * _kl_terms(lq, lm) + (1.0 - beta) * _kl_terms(lp, lm)
    elif kind == "skew_forward_kl":
        terms = _kl_terms(lq, _log_mixture(float(alpha), lq, lp))
    elif kind == "skew_reverse_kl":
        terms = _kl_terms(lp, _log_mixture(float(alpha), lp, lq))
    else:
        terms = 0.5 * (lq.exp() - lp.exp()).abs()
    return terms.masked_fill(dead, 0.0).sum(dim=-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, student_temperature: float = 1.0,
               teacher_temperature: float = 1.0) -> torch.Tensor:
    """Forward KL `FKL_t = KL(q || pi) = sum_v q_v (log q_v - log pi_v)` [GKD] (mode-covering).

    `pi = softmax(z^S / tau_S)`, `q = softmax(z^T / tau_T)`; logits `[..., V]` -> `[...]`."""
    lp, lq = _student_teacher_log_probs(student_logits, teacher_logits, student_temperature, teacher_temperature)
    return divergence_from_log_probs("forward_kl", lp, lq)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, student_temperature: float = 1.0,
               teacher_temperature: float = 1.0) -> torch.Tensor:
    """Reverse KL `RKL_t = KL(pi || q) = sum_v pi_v (log pi_v - log q_v)` [GKD] (mode-seeking; the exact
    gradient of the immediate term, "analytic RKL" [Survey]). Logits `[..., V]` -> `[...]`."""
    lp, lq = _student_teacher_log_probs(student_logits, teacher_logits, student_temperature, teacher_temperature)
    return divergence_from_log_probs("reverse_kl", lp, lq)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, *,
                    student_temperature: float = 1.0, teacher_temperature: float = 1.0) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence, TRL/GKD convention [GKD]:
    `M = beta q + (1 - beta) pi`, `JSD_beta = beta KL(q || M) + (1 - beta) KL(pi || M)`, beta in [0, 1].

    The endpoints are defined as the plain KLs, as TRL's `generalized_jsd_loss` does: `beta = 0` IS forward KL
    `KL(q || pi)` and `beta = 1` IS reverse KL `KL(pi || q)`. Note that this is a jump, not a limit: the mixture
    formula itself goes to 0 at both ends, as `beta * FKL` for beta -> 0 and `(1 - beta) * RKL` for beta -> 1
    (the other term is second order), so the loss scale drops by a factor ~beta just inside the endpoints.
    `beta = 0.5` is the symmetric JSD (bounded by log 2). Logits `[..., V]` -> `[...]`."""
    lp, lq = _student_teacher_log_probs(student_logits, teacher_logits, student_temperature, teacher_temperature)
    return divergence_from_log_probs("generalized_jsd", lp, lq, beta=beta)


def skew_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float, *,
                    student_temperature: float = 1.0, teacher_temperature: float = 1.0) -> torch.Tensor:
    """Skew forward KL `SFKL_alpha = KL(q || alpha q + (1 - alpha) pi)` [DistiLLM], alpha in [0, 1].

    `alpha = 0` is forward KL; `alpha = 1` is 0; the skew keeps the loss finite (<= -log alpha) where `pi` has
    no mass. Logits `[..., V]` -> `[...]`."""
    lp, lq = _student_teacher_log_probs(student_logits, teacher_logits, student_temperature, teacher_temperature)
    return divergence_from_log_probs("skew_forward_kl", lp, lq, alpha=alpha)


def skew_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float, *,
                    student_temperature: float = 1.0, teacher_temperature: float = 1.0) -> torch.Tensor:
    """Skew reverse KL `SRKL_alpha = KL(pi || alpha pi + (1 - alpha) q)` [DistiLLM], alpha in [0, 1].

    `alpha = 0` is reverse KL; `alpha = 1` is 0. Logits `[..., V]` -> `[...]`."""
    lp, lq = _student_teacher_log_probs(student_logits, teacher_logits, student_temperature, teacher_temperature)
    return divergence_from_log_probs("skew_reverse_kl", lp, lq, alpha=alpha)


def total_variation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                    student_temperature: float = 1.0, teacher_temperature: float = 1.0) -> torch.Tensor:
    """Total variation `TV_t = 1/2 sum_v |q_v - pi_v|`, in [0, 1] [Survey]. The gradient at `q_v = pi_v` is
    taken as 0 (subgradient). Logits `[..., V]` -> `[...]`."""
    lp, lq = _student_teacher_log_probs(student_logits, teacher_logits, student_temperature, teacher_temperature)
    return divergence_from_log_probs("total_variation", lp, lq)


def reduce_loss(per_position: torch.Tensor, mask: torch.Tensor, normalizer: str = "token_mean",
                max_length: int | None = None) -> torch.Tensor:
    """Masked reduction of per-position losses `[B, T]` with a 0/1 (or bool) mask `[B, T]` (1 = trains) to a
    0-dim loss `(1/Z) sum_{b,t} m_{b,t} l_{b,t}`, with the normalisers `Z` of the spec [Survey], the same as
    `policy_gradient_loss`'s:

    - `token_mean`     `Z = sum_{b,t} m` (every token weighs the same).
    - `sequence_mean`  `mean_b [ sum_t m l / sum_t m ]` over the sequences with at least one token (every
                       sequence weighs the same; all-padding rows are not sequences and are left out).
    - `constant`       `Z = B * max_length` (default `max_length = T`): each sequence's sum over a fixed length,
                       then the batch mean (Dr. GRPO); independent of how many tokens the batch holds.

    Masked positions never reach the result, whatever they hold (inf and NaN included), and receive zero
    gradient. An empty mask (or a batch of all-padding rows) gives 0, not NaN. `token_mean` also accepts
    per-position losses of any shape (e.g. `[N]` from `[N, V]` logits) with a mask of that shape."""
    require_choice("normalizer", normalizer, NORMALIZERS)
    if not isinstance(per_position, torch.Tensor) or not per_position.is_floating_point():
        raise MathInputError("per_position: expected a floating-point tensor [B, T]")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(per_position.shape):
        raise MathInputError(f"mask: expected the shape of per_position {tuple(per_position.shape)}, got "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if normalizer != "token_mean" and per_position.dim() != 2:
        raise MathInputError(f"per_position: normalizer {normalizer!r} needs shape [B, T], "
                             f"got {tuple(per_position.shape)}")
    if max_length is not None:
        if normalizer != "constant":
            raise MathInputError(f"max_length: only used by normalizer 'constant' (expected None), got {max_length}")
        require_positive_int("max_length", max_length)
    mask = require_binary_mask("mask", mask)

    kept = torch.where(mask, per_position, torch.zeros_like(per_position))
    if normalizer == "constant":
        batch, length = per_position.shape
        return kept.sum() / max(batch * (max_length or length), 1)  # an empty batch gives 0, not NaN
    if normalizer == "token_mean":
        return kept.sum() / mask.sum().clamp_min(1).to(kept.dtype)
    counts = mask.sum(dim=1).to(kept.dtype)
    per_sequence = kept.sum(dim=1) / counts.clamp_min(1.0)  # 0 for an all-padding row
    return per_sequence.sum() / (counts > 0).sum().clamp_min(1).to(kept.dtype)
