"""Regularisers added to an OPD loss: KL to a frozen reference policy estimated on sampled tokens (k1, k2, k3),
and the student's entropy (the entropy bonus) [Survey].

Reference KL, on tokens `y_t ~ pi` (the student's own rollout) with `log r_t = log ref(y_t|s_t) - log pi(y_t|s_t)`
(Schulman 2020, "Approximating KL divergence"). Each estimator is judged twice: as a value (its expectation
under `pi`) and as a loss (the expectation of its gradient, the sample held fixed as autograd does):

- k1 = -log r:           value KL(pi||ref), unbiased, high variance, can be < 0; loss gradient 0 (noise only).
- k2 = (log r)^2 / 2:     value biased (KL to second order in log r), >= 0; loss gradient grad KL(pi||ref), exact.
- k3 = (r - 1) - log r:   value KL(pi||ref), unbiased, >= 0, low variance near ref; loss gradient
                          grad KL(ref||pi), the FORWARD KL.

Gradient derivations [Ours]: `grad log r = -grad log pi` and `E_pi[grad log pi] = 0`; `grad k2 = log(pi/ref)
grad log pi` whose expectation is `grad sum_v pi_v log(pi_v/ref_v)`; `grad k3 = (1 - r) grad log pi` whose
expectation is `-sum_v ref_v grad log pi_v = grad KL(ref||pi)`. So "k3 in the loss" (GRPO) pulls toward the
reference with the mode-covering KL, and "k1 as a reward" needs the policy-gradient form to act at all. With
tokens from a stale behaviour policy `mu != pi` all of these need the importance ratio `pi/mu`.
"""

from __future__ import annotations

import torch

from opd_megatron.math.divergences import check_logits, compute_dtype, log_probs
from opd_megatron.math.checks import (MathInputError, require_choice, require_finite, require_positive,
                                      require_same_shape)

KL_ESTIMATORS = ("k1", "k2", "k3")


def reference_kl(student_logp: torch.Tensor, reference_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of `KL(pi || ref)` from the log-probabilities of the sampled tokens `y_t ~ pi`:
    student_logp `[B, T]` (`log pi(y_t|s_t)`, with gradient) and reference_logp `[B, T]` (`log ref(y_t|s_t)`,
    detached) -> `[B, T]` (any equal shapes work). With `log r = log ref - log pi` (Schulman 2020):

    - `k1 = -log r = log pi - log ref`: unbiased for KL(pi||ref); gradient zero in expectation.
    - `k2 = 1/2 (log r)^2`: biased (it is the f-divergence with f(x) = (log x)^2 / 2, equal to KL(pi||ref) to
      second order); its gradient is unbiased for grad KL(pi||ref).
    - `k3 = (r - 1) - log r`: unbiased for KL(pi||ref) and >= 0 per sample; its gradient is unbiased for
      grad KL(ref||pi), the forward KL (module docstring).

    Reduce with `divergences.reduce_loss`. k3 is computed as `expm1(log r) - log r` (no cancellation near
    r = 1); it overflows to +inf for log r above ~709 (float64), a true reflection of `r = ref/pi` there."""
    require_choice("estimator", estimator, KL_ESTIMATORS)
    for name, tensor in (("student_logp", student_logp), ("reference_logp", reference_logp)):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise MathInputError(f"{name}: expected a floating-point tensor of log-probabilities")
        require_finite(name, tensor)
    require_same_shape(student_logp=student_logp, reference_logp=reference_logp)
    dtype = compute_dtype(student_logp, reference_logp)
    log_r = reference_logp.detach().to(dtype) - student_logp.to(dtype)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    return torch.expm1(log_r) - log_r


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position entropy `H_t = -sum_v pi_v log pi_v` of `pi = softmax(z / tau)`, logits `[..., V]` ->
    `[...]`, with gradient; masked (-inf) logits contribute 0. The entropy bonus [Survey] subtracts
    `coef * reduce_loss(entropy(student_logits), mask, normalizer)` from the loss."""
    check_logits("logits", logits)
    require_positive("temperature", temperature)
    logp = log_probs(logits, temperature, compute_dtype(logits))
    zero = torch.isneginf(logp)
    safe = logp.masked_fill(zero, 0.0)
    return -torch.where(zero, torch.zeros_like(safe), safe.exp() * safe).sum(dim=-1)
