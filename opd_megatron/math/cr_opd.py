"""Counterfactual Routed OPD (CR-OPD): vocabulary routing of the negative-advantage policy-gradient mass.
[Ours, after Survey]: the survey names the idea; the precise definitions below are ours (`docs/opd-math.md`,
"Vocabulary routing and CR-OPD").

Why: with a negative advantage `A_t < 0` on the sampled token `y_t`, the sampled-token policy gradient on the
logits is `-A_t (e_{y_t} - pi)`: gradient descent takes mass from `y_t` and spreads it over ALL tokens in
proportion to `pi`, teacher-rejected ones included. CR-OPD sends that mass only to the candidate set

    C_t = { v != y_t : v in Supp_T(s_t) and v in Reach_S(s_t) }

(teacher-supported, student-reachable alternatives), split by routing weights `rho_t(v)` on `C_t`. Two forms of
the routed loss (`RoutingConfig.form`, config key `opd.cr_opd.form`), both [Ours, after Survey]:
- matched (default): `L_t = |A_t| (1 - sg pi(y_t)) [log pi(y_t) - sum_{v in C_t} rho_t(v) log pi(v)]`, logit
  gradient `|A_t| (1 - pi(y_t)) (e_{y_t} - rho_t)`: `y_t` is pushed down exactly as by the plain PG term, linear
  in `A_t`, and the freed mass goes to `C_t` by `rho_t` instead of to every token by `pi`.
- kl_target: `L_t = |A_t| KL(p~_t || pi)` restricted to `{y_t} U C_t`, with the target moving
  `delta_t = sg(pi(y_t)) (1 - exp(eta A_t))` from `y_t` to `C_t` by `rho_t` (push on `y_t` quadratic in small
  `|A_t|`; kept for comparison).
With `A_t >= 0` or `C_t` empty both forms are the plain PG term `-A_t log pi(y_t)`.

Shapes: logits `[..., V]` (`[N, V]` or `[B, T, V]`); per-position tensors (sampled ids, advantages, mask) have the
leading shape `[...]`. Everything is computed on the flattened `[N, V]` view and returned in the leading shape.
This is the single-device reference; it imports only torch and `checks.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from opd_megatron.math.checks import (MathInputError, require_binary_mask, require_choice, require_finite,
                                      require_floating, require_mask_shape,
                                      require_positive, require_positive_int, require_token_ids)

TEACHER_SUPPORTS = ("topk", "threshold")
STUDENT_REACHES = ("top_p", "topk", "threshold")
ROUTING_WEIGHTS = ("q", "sqrt_q_pi", "uniform")
ROUTING_FORMS = ("matched", "kl_target")


@dataclass(frozen=True)
class RoutingConfig:
    """How CR-OPD builds `C_t`, splits the routed mass and which routed loss it uses.

    form: "matched" (the default: `y_t` pushed down exactly as by the plain PG term, the freed mass sent to `C_t`)
        or "kl_target" (`|A_t| KL(p~_t || pi)` on `{y_t} U C_t` with the multiplicative target); `cr_opd_loss`.
    teacher_support: "topk" (the teacher's `teacher_top_k` most likely tokens) or "threshold"
        (`q_v >= teacher_min_prob`, the spec's `eps_q`). Tokens with `q_v = 0` are never in the support.
    student_reach: "top_p" (the student's nucleus: the smallest set of most likely tokens holding mass
        `>= student_top_p`), "topk" (`student_top_k` most likely) or "threshold" (`pi_v >= student_min_prob`,
        the spec's `eps_pi`). Tokens with `pi_v = 0` (a `-inf` logit) are never reachable.
    weights: "q" (`rho(v) ∝ q_v`), "sqrt_q_pi" (`rho(v) ∝ sqrt(q_v pi_v)`) or "uniform" (`1/|C_t|`), on `C_t`.
    eta: step of the multiplicative target, `p~(y_t) = pi(y_t) exp(eta A_t)` (form "kl_target" only); must be > 0.
    """

    form: str = "matched"
    teacher_support: str = "topk"
    teacher_top_k: int = 20
    teacher_min_prob: float = 1e-3
    student_reach: str = "top_p"
    student_top_p: float = 0.95
    student_top_k: int = 20
    student_min_prob: float = 1e-3
    weights: str = "q"
    eta: float = 1.0

    def __post_init__(self) -> None:
        require_choice("form", self.form, ROUTING_FORMS)
        require_choice("teacher_support", self.teacher_support, TEACHER_SUPPORTS)
        require_choice("student_reach", self.student_reach, STUDENT_REACHES)
        require_choice("weights", self.weights, ROUTING_WEIGHTS)
        require_positive_int("teacher_top_k", self.teacher_top_k)
        require_positive_int("student_top_k", self.student_top_k)
        _require_probability("teacher_min_prob", self.teacher_min_prob)
        _require_probability("student_min_prob", self.student_min_prob)
        _require_probability("student_top_p", self.student_top_p)
        require_positive("eta", self.eta)


@dataclass
class RoutingStats:
    """Per-position statistics of one CR-OPD call, in the leading shape `[...]` of the logits; masked positions
    hold 0 / False.

    routed_mass: where the routed loss was used, the mass it routes from `y_t` to `C_t`, else 0. Form "matched":
        `|A_t| (1 - pi(y_t))`, the logit-gradient mass taken from `z_{y_t}` (which the plain PG term spreads over
        every other token by `pi`, and the matched form gives to `C_t`); form "kl_target": `delta_t`, the
        probability mass the target moves.
    candidate_count: `|C_t|` (int64).
    empty_candidates: `C_t` is empty (at every unmasked position, whatever the sign of `A_t`).
    routed: the routed loss was used (`A_t < 0` and `C_t` non-empty).
    negative_advantage: `A_t < 0` (the positions CR-OPD tries to route; `routed | fallback`).
    """

    routed_mass: torch.Tensor
    candidate_count: torch.Tensor
    empty_candidates: torch.Tensor
    routed: torch.Tensor
    negative_advantage: torch.Tensor


def _require_probability(name: str, value: float) -> None:
    if not (0.0 < float(value) <= 1.0):
        raise MathInputError(f"{name}: expected a probability in (0, 1], got {value}")


def _topk_members(logprobs: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean `[N, V]`: the k largest entries of each row (ties broken by torch.topk)."""
    members = torch.zeros_like(logprobs, dtype=torch.bool)
    return members.scatter_(-1, logprobs.topk(k, dim=-1).indices, True)


def teacher_support(vocab_size: int, config: RoutingConfig, *, teacher_logits: Optional[torch.Tensor] = None,
                    teacher_topk_ids: Optional[torch.Tensor] = None,
                    teacher_topk_logprobs: Optional[torch.Tensor] = None,
                    teacher_temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`Supp_T(s_t)` and the teacher log-probs it was read from. [Ours, after Survey]

    Dense input: `teacher_logits [N, V]`, `log q = log_softmax(z^T / tau_T)`.
    Sparse input (a server's answer): `teacher_topk_ids [N, K]` and `teacher_topk_logprobs [N, K]`, used as
    given (already at the server's temperature, so `teacher_temperature` must stay 1); `log q = -inf` off the
    given ids. "topk" keeps the `teacher_top_k <= K` largest given entries; "threshold" keeps given ids with
    `q_v >= teacher_min_prob` (exact as long as the server's K covers every such token).

    Returns `(support [N, V] bool, teacher_logprobs [N, V])`; `support` excludes `q_v = 0`.
    """
    if teacher_logits is not None:
        logq = torch.log_softmax(teacher_logits / teacher_temperature, dim=-1)
    else:
        logq = torch.full(teacher_topk_ids.shape[:-1] + (vocab_size,), -math.inf,
                          dtype=teacher_topk_logprobs.dtype, device=teacher_topk_logprobs.device)
        logq.scatter_(-1, teacher_topk_ids, teacher_topk_logprobs)
    if config.teacher_support == "topk":
        if teacher_logits is not None:
            support = _topk_members(logq, config.teacher_top_k)
        else:
            chosen = teacher_topk_logprobs.topk(config.teacher_top_k, dim=-1).indices
            support = torch.zeros_like(logq, dtype=torch.bool)
            support.scatter_(-1, teacher_topk_ids.gather(-1, chosen), True)
    else:
        support = logq >= math.log(config.teacher_min_prob)
    return support & (logq > -math.inf), logq


def student_reach(student_logprobs: torch.Tensor, config: RoutingConfig) -> torch.Tensor:
    """`Reach_S(s_t)` from the student's log-probs `[N, V]` (its sampling distribution). [Ours, after Survey]

    top_p: `v` is reachable when the mass of the strictly more likely tokens (sorted order) is `< student_top_p`
    (the nucleus of top-p sampling; always holds the argmax). topk: the `student_top_k` most likely.
    threshold: `pi_v >= student_min_prob`. Every option excludes `pi_v = 0`. Returns `[N, V]` bool.
    """
    if config.student_reach == "top_p":
        sorted_logp, order = student_logprobs.sort(dim=-1, descending=True)
        sorted_p = sorted_logp.exp()
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        reach = torch.zeros_like(student_logprobs, dtype=torch.bool)
        reach.scatter_(-1, order, mass_before < config.student_top_p)
    elif config.student_reach == "topk":
        reach = _topk_members(student_logprobs, config.student_top_k)
    else:
        reach = student_logprobs >= math.log(config.student_min_prob)
    return reach & (student_logprobs > -math.inf)


def candidate_set(support: torch.Tensor, reach: torch.Tensor, sampled_ids: torch.Tensor) -> torch.Tensor:
    """`C_t = {v != y_t : v in Supp_T and v in Reach_S}`, `[N, V]` bool. [Ours, after Survey]"""
    not_sampled = torch.ones_like(support).scatter_(-1, sampled_ids.unsqueeze(-1), False)
    return support & reach & not_sampled


def routing_weights(candidates: torch.Tensor, teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor,
                    weights: str) -> torch.Tensor:
    """`rho_t(v)` on `C_t`, `[N, V]`: each row sums to 1 over `C_t` (0 off `C_t`; all 0 when `C_t` is empty).
    [Ours, after Survey]

    "q": `rho(v) = q_v / sum_{u in C} q_u`; "sqrt_q_pi": `sqrt(q_v pi_v) / sum_{u in C} sqrt(q_u pi_u)`;
    "uniform": `1/|C_t|`. Computed as a softmax of the log-weights over `C_t`, so tiny `q`, `pi` do not underflow.
    """
    require_choice("weights", weights, ROUTING_WEIGHTS)
    if weights == "q":
        log_weight = teacher_logprobs
    elif weights == "sqrt_q_pi":
        log_weight = 0.5 * (teacher_logprobs + student_logprobs)
    else:
        log_weight = torch.zeros_like(student_logprobs)
    nonempty = candidates.any(dim=-1, keepdim=True)
    # Rows without candidates get a harmless all-zero row of log-weights (softmax of all -inf is NaN).
    log_weight = torch.where(candidates, log_weight, -math.inf)
    log_weight = torch.where(nonempty, log_weight, 0.0)
    return torch.where(candidates, torch.softmax(log_weight, dim=-1), 0.0)


def routed_mass(student_logprobs_sampled: torch.Tensor, advantages: torch.Tensor, eta: float) -> torch.Tensor:
    """`delta_t = sg(pi(y_t)) * (1 - exp(eta * A_t))` for `A_t < 0`, else 0: the kl_target form's moved mass.
    [Ours, after Survey]

    The target keeps `pi(y_t) exp(eta A_t)` on `y_t` (a multiplicative-weights step), so `0 <= delta_t < pi(y_t)`.
    """
    delta = student_logprobs_sampled.exp() * -torch.expm1(eta * advantages.clamp(max=0.0))
    return torch.where(advantages < 0, delta, 0.0)


def matched_mass(student_logprobs_sampled: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """`|A_t| (1 - sg pi(y_t))` for `A_t < 0`, else 0, `[N]`: the matched form's push. [Ours, after Survey]

    It is the plain PG term's gradient on `z_{y_t}`, `-A_t (1 - pi(y_t))`, and the total that term spreads over
    the other tokens (`|A_t| pi_v` each); the matched form sends that total to `C_t`. `1 - pi` as `-expm1(log pi)`,
    exact when `pi(y_t)` is near 1.
    """
    push = advantages.abs() * -torch.expm1(student_logprobs_sampled.detach())
    return torch.where(advantages < 0, push, 0.0)


def matched_routed_loss(logits: torch.Tensor, sampled_ids: torch.Tensor, candidates: torch.Tensor,
                        weights: torch.Tensor, push: torch.Tensor) -> torch.Tensor:
    """The matched form `L_t = push_t [log pi(y_t) - sum_{v in C_t} rho_t(v) log pi(v)]`, `[N]`. [Ours, after Survey]

    Inputs: the (tempered) student logits `z [N, V]`, `sampled_ids [N]`, `candidates [N, V]` (`C_t`),
    `weights [N, V]` (`rho_t`, summing to 1 on `C_t`) and `push [N]` (`matched_mass`, no gradient). Since
    `sum_C rho = 1`, the normaliser cancels: `log pi(y) - sum_C rho log pi(v) = sum_{v in C} rho(v) (z_y - z_v)`,
    which is what is computed, so the loss reads only the logits of `{y_t} U C_t` and its gradient is exactly
    `push_t (e_{y_t} - rho_t)` there and exactly 0 elsewhere (not only up to rounding). Rows with `C_t` empty give 0.
    """
    gap = torch.where(candidates, logits.gather(-1, sampled_ids.unsqueeze(-1)) - logits, 0.0)
    return push * (weights * gap).sum(dim=-1)


def routed_target(student_logprobs: torch.Tensor, sampled_ids: torch.Tensor, delta: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """The routed target `p~_t = sg(pi) + delta_t (rho_t - e_{y_t})`, `[N, V]`. [Ours, after Survey]

    Mass `delta_t [N]` leaves `y_t` and lands on `C_t` split by `rho_t` (`weights [N, V]`); every other token keeps
    `pi_v`. Rows with `delta_t = 0` are `sg(pi)`. The caller zeroes `delta_t` where `C_t` is empty.
    """
    pi = student_logprobs.detach().exp()
    onehot = torch.zeros_like(pi).scatter_(-1, sampled_ids.unsqueeze(-1), 1.0)
    return pi + delta.unsqueeze(-1) * (weights - onehot)


def kl_target_routed_loss(logits: torch.Tensor, student_logprobs: torch.Tensor, sampled_ids: torch.Tensor,
                          candidates: torch.Tensor, weights: torch.Tensor, advantages: torch.Tensor,
                          routed: torch.Tensor, eta: float) -> torch.Tensor:
    """The kl_target form `L_t = |A_t| sg(P_t) KL(p~^S_t || pi^S_t)` on `S_t = {y_t} U C_t`, `[N]` (`cr_opd_loss`
    derives it). [Ours, after Survey]

    Inputs: the (tempered) student logits `z [N, V]` (differentiable) and their log-softmax `[N, V]` (no
    gradient), `sampled_ids [N]`, `candidates [N, V]`, `weights [N, V]` (`rho_t`), `advantages [N]`, `routed [N]`
    (rows where mass moves; elsewhere the target is `pi^S` and the value 0) and `eta`.
    """
    with torch.no_grad():
        onehot = torch.zeros_like(candidates).scatter_(-1, sampled_ids.unsqueeze(-1), True)
        in_s = onehot | candidates
        mass_s = (student_logprobs.exp() * in_s).sum(dim=-1)
        # The target renormalised on S, built from pi^S (not pi / P) so it stays exact when P underflows:
        # p~^S = pi^S + pi^S(y) (1 - exp(eta A)) (rho - e_y).
        pi_s = torch.log_softmax(student_logprobs.masked_fill(~in_s, -math.inf), dim=-1).exp()
        moved_s = torch.where(routed, pi_s.gather(-1, sampled_ids.unsqueeze(-1)).squeeze(-1)
                              * -torch.expm1(eta * advantages.clamp(max=0.0)), 0.0)
        target_s = pi_s + moved_s.unsqueeze(-1) * (weights - onehot.to(pi_s.dtype))

    # Reads only the logits of S (the where() sends exactly 0 gradient elsewhere).
    logp_s = torch.log_softmax(torch.where(in_s, logits, -math.inf), dim=-1)
    kl_terms = torch.where(in_s, torch.xlogy(target_s, target_s) - target_s * logp_s, 0.0)
    return advantages.abs() * mass_s * kl_terms.sum(dim=-1)


def cr_opd_loss(student_logits: torch.Tensor, sampled_ids: torch.Tensor, advantages: torch.Tensor,
                mask: Optional[torch.Tensor] = None, *, teacher_logits: Optional[torch.Tensor] = None,
                teacher_topk_ids: Optional[torch.Tensor] = None,
                teacher_topk_logprobs: Optional[torch.Tensor] = None,
                config: RoutingConfig = RoutingConfig(), student_temperature: float = 1.0,
                teacher_temperature: float = 1.0) -> tuple[torch.Tensor, RoutingStats]:
    """Per-position CR-OPD loss and its routing statistics. [Ours, after Survey]

    Inputs: `student_logits [..., V]` (differentiable), `sampled_ids [...]` (`y_t`), `advantages [...]` (`A_t`,
    used as `sg(A_t)`), `mask [...]` (1 on training tokens; default all), and the teacher either dense
    (`teacher_logits [..., V]`) or sparse (`teacher_topk_ids`, `teacher_topk_logprobs [..., K]`).
    `pi = softmax(z^S / tau_S)`.

    Per position, with `S_t = {y_t} U C_t` (both forms [Ours, after Survey], `docs/opd-math.md`):
    - `A_t >= 0`, or `A_t < 0` with `C_t` empty (the fallback): the plain sampled-token PG term
      `L_t = -A_t log pi(y_t)`, gradient `-A_t (e_{y_t} - pi)` on the logits (`A_t = 0` gives 0).
    - `A_t < 0` and `C_t` non-empty, form "matched" (the default):
          L_t = |A_t| (1 - sg pi(y_t)) [ log pi(y_t) - sum_{v in C_t} rho_t(v) log pi(v) ]
              = |A_t| (1 - sg pi(y_t)) sum_{v in C_t} rho_t(v) (z_{y_t} - z_v)        (sum_C rho = 1)
      (`matched_routed_loss`), gradient `dL_t/dz = |A_t| (1 - pi(y_t)) (e_{y_t} - rho_t)`: on `z_{y_t}` exactly the
      plain PG term's `-A_t (1 - pi(y_t))`, on `C_t` minus that total split by `rho_t`, and exactly 0 elsewhere
      (the second line reads only `z_S`). Linear in `A_t`, like the positive side. The value can be negative
      (when `y_t` is likelier than its candidates): it is a surrogate, not a divergence.
    - `A_t < 0` and `C_t` non-empty, form "kl_target": the restricted routed loss
          L_t = |A_t| * sg(P_t) * KL(p~^S_t || pi^S_t),
      where `P_t = sum_{v in S_t} pi_v`, `pi^S_t = softmax(z_{S_t})` is the student renormalised on `S_t` (it
      reads only the logits of `S_t`), and `p~^S_t = p~_t|_{S_t} / P_t` is the routed target renormalised on
      `S_t` (the target keeps the mass `P_t` on `S_t`: it only moves `delta_t` inside it).

    Derivation (kl_target): for `v in S_t`, `d KL(p~^S || softmax(z_S)) / d z_v = pi^S_v - p~^S_v`, so
    `dL_t/dz_v = |A_t| P_t (pi_v - p~_v) / P_t = |A_t| (pi_v - p~_v)` = `|A_t| delta_t (e_{y_t} - rho_t)_v`;
    for `v not in S_t` the loss does not read `z_v`, so the gradient is exactly 0, to every order and even when
    the target is reused for several optimizer steps. On `S_t` this is the gradient of the full
    `|A_t| CE(p~_t, pi)` (whose gradient `pi - p~` also vanishes off `S_t` because `p~ = sg(pi)` there, but only
    at the current point and only up to rounding). The value equals `|A_t| KL(p~_t || pi)` over the full
    vocabulary (= that CE minus the constant `H(p~_t)`), so it is >= 0 and 0 when nothing moves. Its push on
    `z_{y_t}`, `|A_t| delta_t ~ eta pi(y_t) A_t^2` for small `|A_t|`, is quadratic: small negative advantages are
    nearly ignored (the reason "matched" is the default).
    Consequence for one descent step (either form, with `m_t` = `|A_t| (1 - pi(y_t))` matched, `|A_t| delta_t`
    kl_target): `z_{y_t}` falls by `lr m_t`, each `z_v` of `C_t` rises by `lr m_t rho_t(v)`, every other logit
    stays; `pi(y_t)` falls. Tokens outside `S_t` keep their logits and hence their odds against each other; their
    probabilities share one normaliser change, so they are "not moved" in the logit sense the spec states, not
    frozen in probability. (Gradients here are with respect to the tempered logits `z^S / tau_S`; with respect to
    the raw logits they carry a factor `1 / tau_S`.) `RoutingStats.routed_mass` holds `|A_t| (1 - pi(y_t))`
    (matched) or `delta_t` (kl_target) on routed positions.

    Returns `(loss [...], RoutingStats)`; masked positions have loss 0 and no gradient.
    """
    keep = _checked_mask(student_logits, sampled_ids, advantages, mask, teacher_logits, teacher_topk_ids,
                         teacher_topk_logprobs, config, student_temperature, teacher_temperature)
    dense = teacher_logits is not None
    leading, vocab = tuple(student_logits.shape[:-1]), student_logits.shape[-1]

    # --- flatten; padding rows become harmless zeros so they cannot poison values or gradients ----------------
    n = math.prod(leading)
    keep = keep.reshape(n)
    ids = torch.where(keep, sampled_ids.reshape(n), 0).long()
    adv = torch.where(keep, advantages.reshape(n).detach(), 0.0)
    logits = torch.where(keep.unsqueeze(-1), student_logits.reshape(n, vocab) / student_temperature, 0.0)
    if torch.isinf(logits.detach().gather(-1, ids.unsqueeze(-1))).any():
        raise MathInputError("student_logits: the sampled token (sampled_ids) has a -inf logit at an unmasked "
                             "position; pi(y_t) = 0 cannot have been sampled")
    student_logp = torch.log_softmax(logits, dim=-1)

    with torch.no_grad():
        if dense:
            teacher = dict(teacher_logits=torch.where(keep.unsqueeze(-1), teacher_logits.reshape(n, vocab), 0.0))
        else:
            k = teacher_topk_ids.shape[-1]
            teacher = dict(teacher_topk_ids=torch.where(keep.unsqueeze(-1), teacher_topk_ids.reshape(n, k), 0).long(),
                           teacher_topk_logprobs=teacher_topk_logprobs.reshape(n, k))
        support, teacher_logp = teacher_support(vocab, config, teacher_temperature=teacher_temperature, **teacher)
        logp = student_logp.detach()
        candidates = candidate_set(support, student_reach(logp, config), ids) & keep.unsqueeze(-1)
        count = candidates.sum(dim=-1)
        negative = keep & (adv < 0)
        routed = negative & (count > 0)
        rho = routing_weights(candidates, teacher_logp, logp, config.weights)
        logp_sampled = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)

    if config.form == "matched":
        moved = torch.where(routed, matched_mass(logp_sampled, adv), 0.0)
        routed_loss = matched_routed_loss(logits, ids, candidates, rho, moved)
    else:
        moved = torch.where(routed, routed_mass(logp_sampled, adv, config.eta), 0.0)
        routed_loss = kl_target_routed_loss(logits, logp, ids, candidates, rho, adv, routed, config.eta)
    pg_loss = -adv * student_logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    loss = torch.where(keep, torch.where(routed, routed_loss, pg_loss), 0.0)

    stats = RoutingStats(routed_mass=moved.reshape(leading), candidate_count=count.reshape(leading),
                         empty_candidates=(keep & (count == 0)).reshape(leading), routed=routed.reshape(leading),
                         negative_advantage=negative.reshape(leading))
    return loss.reshape(leading), stats


def _checked_mask(student_logits: torch.Tensor, sampled_ids: torch.Tensor, advantages: torch.Tensor,
                  mask: Optional[torch.Tensor], teacher_logits: Optional[torch.Tensor],
                  teacher_topk_ids: Optional[torch.Tensor], teacher_topk_logprobs: Optional[torch.Tensor],
                  config: RoutingConfig, student_temperature: float, teacher_temperature: float) -> torch.Tensor:
    """`cr_opd_loss`'s argument checks; returns the mask as bool `[...]` (all True when not given)."""
    require_floating("student_logits", student_logits)
    if student_logits.dim() < 2:
        raise MathInputError(f"student_logits: expected shape [..., V] with at least 2 dims, "
                             f"got {tuple(student_logits.shape)}")
    require_finite("student_logits", student_logits)
    leading, vocab = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    require_mask_shape(sampled_ids, leading, "sampled_ids")
    require_mask_shape(advantages, leading, "advantages")
    require_floating("advantages", advantages)
    if mask is None:
        mask = torch.ones(leading, dtype=torch.bool, device=student_logits.device)
    require_mask_shape(mask, leading, "mask")
    keep = require_binary_mask("mask", mask)
    if not torch.isfinite(advantages[keep]).all():
        raise MathInputError("advantages: expected finite values on unmasked positions, found NaN/inf")
    require_token_ids("sampled_ids", sampled_ids[keep], vocab)
    require_positive("student_temperature", student_temperature)
    require_positive("teacher_temperature", teacher_temperature)
    if config.student_reach == "topk":
        require_positive_int("student_top_k", config.student_top_k, at_most=vocab, what="the vocabulary size V")
    dense = teacher_logits is not None
    sparse = teacher_topk_ids is not None or teacher_topk_logprobs is not None
    if dense == sparse:
        raise MathInputError("teacher_logits / teacher_topk_ids+teacher_topk_logprobs: expected exactly one "
                             "teacher input, dense logits or sparse top-k ids with their log-probs")
    if dense:
        require_floating("teacher_logits", teacher_logits)
        require_finite("teacher_logits", teacher_logits)
        if tuple(teacher_logits.shape) != tuple(student_logits.shape):
            raise MathInputError(f"teacher_logits: expected the shape of student_logits "
                                 f"{tuple(student_logits.shape)} (same positions and vocabulary), "
                                 f"got {tuple(teacher_logits.shape)}")
        if config.teacher_support == "topk":
            require_positive_int("teacher_top_k", config.teacher_top_k, at_most=vocab,
                                 what="the vocabulary size V")
    else:
        _check_sparse_teacher(teacher_topk_ids, teacher_topk_logprobs, keep, vocab, config, teacher_temperature)
    return keep


def _check_sparse_teacher(teacher_topk_ids: Optional[torch.Tensor], teacher_topk_logprobs: Optional[torch.Tensor],
                          keep: torch.Tensor, vocab: int, config: RoutingConfig, teacher_temperature: float) -> None:
    """A server's answer `[..., K]`: both fields, one shape, log-probabilities <= 0, ids in the vocabulary on
    unmasked positions, used at temperature 1, and at least `teacher_top_k` of them for a top-k support."""
    leading = tuple(keep.shape)
    if teacher_topk_ids is None or teacher_topk_logprobs is None:
        raise MathInputError("teacher_topk_ids / teacher_topk_logprobs: the sparse teacher needs both")
    if teacher_topk_ids.dim() != len(leading) + 1 or tuple(teacher_topk_ids.shape[:-1]) != leading:
        raise MathInputError(f"teacher_topk_ids: expected shape {leading + ('K',)}, "
                             f"got {tuple(teacher_topk_ids.shape)}")
    if tuple(teacher_topk_logprobs.shape) != tuple(teacher_topk_ids.shape):
        raise MathInputError(f"teacher_topk_logprobs: expected the shape of teacher_topk_ids "
                             f"{tuple(teacher_topk_ids.shape)}, got {tuple(teacher_topk_logprobs.shape)}")
    require_floating("teacher_topk_logprobs", teacher_topk_logprobs)
    require_finite("teacher_topk_logprobs", teacher_topk_logprobs)
    if (teacher_topk_logprobs > 1e-6).any():
        raise MathInputError("teacher_topk_logprobs: expected log-probabilities (<= 0), found positive values")
    require_token_ids("teacher_topk_ids", teacher_topk_ids[keep], vocab)
    if teacher_temperature != 1.0:
        raise MathInputError("teacher_temperature: sparse teacher log-probs are used as the server gave them; "
                             f"expected 1.0, got {teacher_temperature}")
    if config.teacher_support == "topk":
        require_positive_int("teacher_top_k", config.teacher_top_k, at_most=teacher_topk_ids.shape[-1],
                             what="the K ids the sparse teacher gave")
