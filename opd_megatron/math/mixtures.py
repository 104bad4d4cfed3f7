"""Sampling mixtures of OPD: where the training sequences come from.

- On-policy fraction `lambda` [GKD]: each batch comes from student rollouts with probability `lambda`, else from a
  fixed dataset (teacher-generated or ground-truth sequences). `OnPolicyMixture` makes that decision a pure
  function of `(seed, step)`, so a resumed run repeats it without saving any random state.
- Teacher-mixed sampling [MiniLLM]: tokens are drawn from `p_mix = alpha * q + (1 - alpha) * pi` and the student's
  gradient is corrected by the per-token importance weight `w_t = pi(y_t|s_t) / p_mix(y_t|s_t)` (MiniLLM's
  per-token approximation of the sequence-level ratio), optionally clipped. Use `w_t` as the token weight of the
  route-B loss. Since `p_mix >= (1 - alpha) pi`, `w_t <= 1 / (1 - alpha)` for `alpha < 1`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from opd_megatron.math.checks import MathInputError, require_choice, require_finite, require_in_range

SCHEDULES = ("bernoulli", "even")
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class OnPolicyMixture:
    """On-policy fraction `lambda` [GKD]: batch `step` is a student-rollout batch (True) or a fixed-dataset batch.

    `schedule="bernoulli"` (GKD's per-batch coin): on-policy iff `u(seed, step) < fraction`, `u` a uniform in
    [0, 1) hashed from `(seed, step)` (splitmix64); the realised fraction over n batches has standard deviation
    `sqrt(lambda (1 - lambda) / n)`. `schedule="even"` [Ours]: on-policy iff `floor((step + 1) lambda + u0)` exceeds
    `floor(step lambda + u0)` with a seeded offset `u0`, so every prefix of n batches holds `floor(n lambda + u0)`
    on-policy batches (within 1 of `n lambda`) in a seed-dependent arrangement. Both are pure functions of
    `(fraction, seed, schedule, step)`.
    """

    fraction: float
    seed: int = 0
    schedule: str = "bernoulli"

    def __post_init__(self) -> None:
        require_in_range("fraction", self.fraction, 0.0, 1.0)
        require_choice("schedule", self.schedule, SCHEDULES)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise MathInputError(f"seed: expected an integer, got {self.seed!r}")

    def is_on_policy(self, step: int) -> bool:
        if not isinstance(step, int) or step < 0:
            raise MathInputError(f"step: expected an integer >= 0 (the batch index), got {step!r}")
        if self.schedule == "bernoulli":
            return _uniform(self.seed, step) < self.fraction
        offset = _uniform(self.seed ^ 0x5DEECE66D, 0)
        return math.floor((step + 1) * self.fraction + offset) > math.floor(step * self.fraction + offset)

    def decisions(self, steps: int) -> list[bool]:
        """`is_on_policy` for batches `0 .. steps - 1`."""
        return [self.is_on_policy(step) for step in range(steps)]

    def realised_fraction(self, steps: int) -> float:
        """Share of on-policy batches among batches `0 .. steps - 1` (0 for `steps = 0`)."""
        if not isinstance(steps, int) or steps < 0:
            raise MathInputError(f"steps: expected an integer >= 0, got {steps!r}")
        return sum(self.decisions(steps)) / steps if steps else 0.0


@dataclass(frozen=True)
class TeacherMixedSample:
    """Tokens drawn from `p_mix` (`[...]`, long) and their importance weights `pi(y)/p_mix(y)` (`[...]`, no grad,
    clipped at `max_weight` if one was given)."""

    tokens: torch.Tensor
    importance_weights: torch.Tensor


def teacher_mixed_log_probs(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            alpha: float) -> torch.Tensor:
    """`log p_mix = log(alpha * q + (1 - alpha) * pi)` [MiniLLM], `[..., V]`, no gradient;
    `q = softmax(teacher_logits)`, `pi = softmax(student_logits)` (apply temperatures to the logits first).
    `alpha = 0` is pure student sampling, `alpha = 1` pure teacher sampling. -inf logits (masked vocabulary
    entries) are allowed."""
    require_in_range("alpha", alpha, 0.0, 1.0)
    _check_logits(student_logits, teacher_logits)
    with torch.no_grad():
        log_q = torch.log_softmax(teacher_logits.detach(), dim=-1)
        log_pi = torch.log_softmax(student_logits.detach().to(log_q.dtype), dim=-1)
        log_alpha = math.log(alpha) if alpha > 0 else -math.inf
        log_rest = math.log1p(-alpha) if alpha < 1 else -math.inf
        return torch.logaddexp(log_q + log_alpha, log_pi + log_rest)


def teacher_mixed_importance_weights(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                                     tokens: torch.Tensor, alpha: float,
                                     max_weight: float | None = None) -> torch.Tensor:
    """`w_t = pi(y_t|s_t) / p_mix(y_t|s_t)` [MiniLLM] for given tokens `[...]` (logits `[..., V]`), no gradient,
    `min(w_t, max_weight)` if `max_weight` is given. A token with `pi = p_mix = 0` gets 0."""
    log_mix = teacher_mixed_log_probs(student_logits, teacher_logits, alpha)
    if not torch.is_tensor(tokens) or tokens.is_floating_point() or tuple(tokens.shape) != tuple(log_mix.shape[:-1]):
        raise MathInputError(f"tokens: expected an integer tensor of shape {tuple(log_mix.shape[:-1])}, got "
                             f"{(tokens.dtype, tuple(tokens.shape)) if torch.is_tensor(tokens) else tokens!r}")
    vocab = log_mix.shape[-1]
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab):
        raise MathInputError(f"tokens: expected ids in [0, {vocab}), got range [{int(tokens.min())}, "
                             f"{int(tokens.max())}]")
    if max_weight is not None and not (isinstance(max_weight, (int, float)) and 0 < max_weight < math.inf):
        raise MathInputError(f"max_weight: expected a finite value > 0 or None, got {max_weight!r}")
    with torch.no_grad():
        log_pi = torch.log_softmax(student_logits.detach().to(log_mix.dtype), dim=-1)
        index = tokens.long().unsqueeze(-1)
        token_log_pi = log_pi.gather(-1, index).squeeze(-1)
        token_log_mix = log_mix.gather(-1, index).squeeze(-1)
        weights = torch.where(token_log_pi == -math.inf, 0.0, torch.exp(token_log_pi - token_log_mix))
        return weights if max_weight is None else weights.clamp_max(max_weight)


def sample_teacher_mixed(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float, *,
                         max_weight: float | None = None,
                         generator: torch.Generator | None = None) -> TeacherMixedSample:
    """Draw one token per position from `p_mix = alpha * q + (1 - alpha) * pi` [MiniLLM] (logits `[..., V]`, tokens
    `[...]`) with its importance weight `pi/p_mix`; `generator` makes the draw reproducible."""
    log_mix = teacher_mixed_log_probs(student_logits, teacher_logits, alpha)
    vocab = log_mix.shape[-1]
    flat = torch.exp(log_mix).reshape(-1, vocab)
    tokens = (torch.multinomial(flat, 1, generator=generator).reshape(log_mix.shape[:-1]) if flat.shape[0]
              else torch.zeros(log_mix.shape[:-1], dtype=torch.long, device=log_mix.device))
    weights = teacher_mixed_importance_weights(student_logits, teacher_logits, tokens, alpha, max_weight)
    return TeacherMixedSample(tokens=tokens, importance_weights=weights)


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if not torch.is_tensor(student_logits) or not torch.is_tensor(teacher_logits) or \
            student_logits.dim() < 1 or tuple(student_logits.shape) != tuple(teacher_logits.shape):
        shapes = [tuple(x.shape) if torch.is_tensor(x) else type(x).__name__ for x in (student_logits, teacher_logits)]
        raise MathInputError(f"student_logits, teacher_logits: expected equal shapes [..., V] (one vocabulary), "
                             f"got {shapes[0]} and {shapes[1]}")
    require_finite("student_logits", student_logits.detach())
    require_finite("teacher_logits", teacher_logits.detach())


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _uniform(seed: int, step: int) -> float:
    """A uniform in [0, 1) that depends only on `(seed, step)`: 53 bits of a two-round splitmix64 hash."""
    return (_splitmix64(_splitmix64(seed & _MASK64) ^ step) >> 11) / float(1 << 53)
