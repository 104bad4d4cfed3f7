"""Per-step diagnostics of one batch: `batch_diagnostics(...) -> dict[str, float]` for `metrics.jsonl`.
[Survey] `docs/opd-math.md`, "Diagnostics".

Every input is optional; a diagnostic whose inputs are not given is absent from the dict (never NaN), and so is
every per-token diagnostic when the mask keeps no token. Masked positions never count: per-token statistics are
over the positions with `m_t = 1`. Values are computed without gradient and reduced in float64.

Keys (all floats):
    tokens/count                           masked-in tokens of the batch
    log_ratio/mean, log_ratio/std          mean and population std of `r_t = log q(y_t) - log pi(y_t)`
    log_ratio/q05 ... log_ratio/q95        quantiles of `r_t` (`quantiles`; linear interpolation)
    log_ratio/negative_share               share of `r_t < 0`
    kl/k1, kl/k2, kl/k3                    sampled-token estimates of `KL(pi || q)` per token from `r_t`:
                                           `k1 = -r`, `k2 = r^2 / 2`, `k3 = exp(r) - 1 - r` (Schulman's estimators;
                                           `r` capped at 50 inside k3, see LOG_RATIO_CAP)
    kl/rkl_exact                           exact per-token `sum_v pi_v (log pi_v - log q_v)` (dense logits)
    agreement/teacher_top1_match           share of `argmax_v q_v == y_t`
    agreement/topk_overlap                 `|topk_q & topk_pi| / k` with `k = top_k`
    agreement/student_mass_on_teacher_support   `sum_{v in topk_q} pi_v` (the teacher's top-k, or its served ids)
    entropy/teacher, entropy/student       mean `H(q)`, `H(pi)` (nats)
    routing/routed_rate                    share of masked tokens whose CR-OPD loss was routed
    routing/routed_mass_mean               mean routed mass over routed tokens: `|A_t| (1 - pi(y_t))` (the push
                                           moved from `y_t` to `C_t`) in the matched form, `delta_t` in kl_target
    routing/empty_candidate_rate           share of negative-advantage tokens with an empty `C_t` (the fallback)
    routing/candidate_count_mean           mean `|C_t|` over negative-advantage tokens
    gates/<name>_keep_rate                 each given gate keep rate (`gates.token_weights(...).keep_rates`)
    importance/ratio_mean, importance/ratio_min, importance/ratio_max   the PPO ratio
                                           `pi_theta(y_t) / pi_theta_old(y_t)`, both under the loss's distribution
                                           (full softmax at the student temperature): exactly 1 on fresh
                                           on-policy data, whatever the rollout's top-p / top-k / temperature
    importance/clip_fraction               share of PPO ratios outside `ratio_interval` (both ends inside)
    mismatch/ratio_mean, mismatch/ratio_min, mismatch/ratio_max   the sampler-mismatch weight
                                           `pi_theta_old(y_t) / mu(y_t)`: the loss's distribution at the sampling
                                           weights vs what actually sampled (truncated / tempered sampling, engine
                                           numerics); corrected by truncated IS, never by the PPO clip
    mismatch/outside_fraction              share of mismatch weights outside `mismatch_interval`
    mismatch/log_ratio_abs_mean            mean `|log pi_theta_old(y_t) - log mu(y_t)|`
    advantage/mean, advantage/std          of `A_t`
    rollout/staleness_mean, rollout/staleness_max   optimizer updates between `mu` and `pi` (per sequence)
    rollout/response_length_mean, rollout/response_length_max
    value/explained_variance               `1 - Var(G - V) / Var(G)` of the value head (GAE-OPD); absent when
                                           `Var(G) = 0`
    throughput/teacher_tokens_per_s        `teacher_tokens / wall_time_s`

This module computes its entropies and k1-k3 inline (small private helpers) so it depends only on torch and
`tensor_checks`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

import torch

from opd_megatron.math.checks import (MathInputError, require_binary_mask, require_finite, require_floating,
                                      require_positive, require_positive_int, require_token_ids)

if TYPE_CHECKING:  # only for the annotation; the stats object is duck-typed
    from opd_megatron.math.cr_opd import RoutingStats

LOG_RATIO_CAP = 50.0
"""Exponentials of log-ratios are evaluated with the log-ratio capped at 50: `k3 = exp(r) - 1 - r` and the
importance ratio `pi/mu` stay finite (float32 overflows at `exp(88)`, float64 at `exp(709)`) when a teacher or a
stale rollout is extremely off. Below the cap every value is exact; a capped ratio still counts as clipped."""


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    p = logp.exp()
    return -torch.where(p > 0, p * logp, 0.0).sum(dim=-1)


def _kl_estimates(log_ratio: torch.Tensor) -> dict[str, torch.Tensor]:
    """k1, k2, k3 per token for `KL(pi || q)` from `r = log q(y) - log pi(y)`, `y ~ pi`."""
    capped = log_ratio.clamp(max=LOG_RATIO_CAP)
    return {"k1": -log_ratio, "k2": 0.5 * log_ratio.square(), "k3": torch.expm1(capped) - capped}


def _mean(values: torch.Tensor, keep: torch.Tensor) -> float:
    return float(values.double()[keep].mean())


def _std(values: torch.Tensor, keep: torch.Tensor) -> float:
    return float(values.double()[keep].std(correction=0))


def _quantiles(values: torch.Tensor, levels: Sequence[float]) -> list[float]:
    """Linear-interpolation quantiles of a 1-D tensor (torch.quantile's default), by one sort: torch.quantile
    refuses inputs above 2^24 elements, a size a large batch reaches."""
    ordered = values.sort().values
    last = ordered.numel() - 1
    out = []
    for level in levels:
        position = level * last
        low = math.floor(position)
        high = min(low + 1, last)
        out.append(float(ordered[low] + (position - low) * (ordered[high] - ordered[low])))
    return out


def _quantile_key(q: float) -> str:
    return f"q{round(100 * q):02d}"


@torch.no_grad()
def batch_diagnostics(mask: Optional[torch.Tensor] = None, *,
                      student_logits: Optional[torch.Tensor] = None,
                      teacher_logits: Optional[torch.Tensor] = None,
                      teacher_topk_ids: Optional[torch.Tensor] = None,
                      teacher_topk_logprobs: Optional[torch.Tensor] = None,
                      sampled_ids: Optional[torch.Tensor] = None,
                      student_logprobs: Optional[torch.Tensor] = None,
                      teacher_logprobs: Optional[torch.Tensor] = None,
                      log_ratio: Optional[torch.Tensor] = None,
                      behaviour_logprobs: Optional[torch.Tensor] = None,
                      old_logprobs: Optional[torch.Tensor] = None,
                      advantages: Optional[torch.Tensor] = None,
                      gate_keep_rates: Optional[Mapping[str, float]] = None,
                      routing_stats: Optional["RoutingStats"] = None,
                      values: Optional[torch.Tensor] = None,
                      value_targets: Optional[torch.Tensor] = None,
                      staleness: Union[int, float, torch.Tensor, None] = None,
                      response_lengths: Optional[torch.Tensor] = None,
                      teacher_tokens: Optional[float] = None,
                      wall_time_s: Optional[float] = None,
                      top_k: int = 8,
                      quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95),
                      ratio_interval: tuple[float, float] = (0.8, 1.2),
                      mismatch_interval: tuple[float, float] = (0.5, 2.0),
                      student_temperature: float = 1.0,
                      teacher_temperature: float = 1.0) -> dict[str, float]:
    """The spec's diagnostics from one batch, as a flat `dict[str, float]` (keys in the module docstring).
    [Survey]

    Shapes (`[...]` is the token layout, `[B, T]` for a batch): `mask [...]` (default: every position of the
    per-token inputs); `student_logits`, `teacher_logits [..., V]` (at `student_temperature`,
    `teacher_temperature`); `teacher_topk_ids`, `teacher_topk_logprobs [..., K]` (a served teacher, used as given);
    `sampled_ids [...]` (`y_t`); `student_logprobs`, `teacher_logprobs`, `behaviour_logprobs`, `old_logprobs [...]`
    (sampled-token log-probs under `pi`, `q`, the sampler `mu`, and the loss's distribution at the sampling
    weights `pi_theta_old`; without `old_logprobs`, the PPO ratio is not reported and `mu` stands for nothing
    else); `log_ratio [...]` (`r_t`, else `teacher_logprobs - student_logprobs`, each
    read from the logits at `sampled_ids` when not given); `advantages`, `values`, `value_targets [...]`;
    `staleness` (a number or `[B]`); `response_lengths [B]`; `teacher_tokens` (tokens the teacher scored in
    `wall_time_s` seconds).
    """
    per_token = {name: t for name, t in dict(
        sampled_ids=sampled_ids, student_logprobs=student_logprobs, teacher_logprobs=teacher_logprobs,
        log_ratio=log_ratio, behaviour_logprobs=behaviour_logprobs, old_logprobs=old_logprobs, advantages=advantages, values=values,
        value_targets=value_targets).items() if t is not None}
    per_vocab = {name: t for name, t in dict(
        student_logits=student_logits, teacher_logits=teacher_logits, teacher_topk_ids=teacher_topk_ids,
        teacher_topk_logprobs=teacher_topk_logprobs).items() if t is not None}
    if routing_stats is not None:
        per_token["routing_stats.routed_mass"] = routing_stats.routed_mass

    # The token layout: the mask's, else the first per-token input's.
    if mask is not None:
        leading = tuple(mask.shape)
        keep = require_binary_mask("mask", mask)
    elif per_token or per_vocab:
        first = next(iter(per_token.values()), None)
        leading = tuple(first.shape) if first is not None else tuple(next(iter(per_vocab.values())).shape[:-1])
        keep = None
    else:
        leading, keep = (), None
    for name, tensor in per_token.items():
        if tuple(tensor.shape) != leading:
            raise MathInputError(f"{name}: expected shape {leading} (the token layout of mask), "
                                 f"got {tuple(tensor.shape)}")
    for name, tensor in per_vocab.items():
        if tuple(tensor.shape[:-1]) != leading:
            raise MathInputError(f"{name}: expected shape {leading + ('V',)} (the token layout of mask), "
                                 f"got {tuple(tensor.shape)}")
    if keep is None and (per_token or per_vocab):
        device = next(iter({**per_token, **per_vocab}.values())).device
        keep = torch.ones(leading, dtype=torch.bool, device=device)
    for name, tensor in {**per_token, **per_vocab}.items():
        if name not in ("sampled_ids", "teacher_topk_ids"):
            require_floating(name, tensor)
            require_finite(name, tensor)
    if student_logits is not None and teacher_logits is not None and student_logits.shape != teacher_logits.shape:
        raise MathInputError(f"teacher_logits: expected the shape of student_logits {tuple(student_logits.shape)} "
                             f"(same vocabulary), got {tuple(teacher_logits.shape)}")
    if (teacher_topk_ids is None) != (teacher_topk_logprobs is None):
        raise MathInputError("teacher_topk_ids / teacher_topk_logprobs: a served teacher needs both")
    if teacher_topk_ids is not None and teacher_topk_ids.shape != teacher_topk_logprobs.shape:
        raise MathInputError(f"teacher_topk_logprobs: expected the shape of teacher_topk_ids "
                             f"{tuple(teacher_topk_ids.shape)}, got {tuple(teacher_topk_logprobs.shape)}")
    require_positive("student_temperature", student_temperature)
    require_positive("teacher_temperature", teacher_temperature)
    for q in quantiles:
        if not 0.0 <= q <= 1.0:
            raise MathInputError(f"quantiles: expected values in [0, 1], got {q}")
    low, high = ratio_interval
    if not 0.0 <= low <= high:
        raise MathInputError(f"ratio_interval: expected 0 <= low <= high, got {ratio_interval}")

    vocab = next((t.shape[-1] for t in (student_logits, teacher_logits) if t is not None), None)
    if sampled_ids is not None and vocab is not None:
        require_token_ids("sampled_ids", sampled_ids[keep], vocab)
    if teacher_topk_ids is not None and vocab is not None:
        require_token_ids("teacher_topk_ids", teacher_topk_ids[keep], vocab)
    if student_logits is not None and (teacher_logits is not None or teacher_topk_ids is not None):
        require_positive_int("top_k", top_k, at_most=vocab, what="the vocabulary size V")

    out: dict[str, float] = {}
    tokens = int(keep.sum()) if keep is not None else 0
    if keep is not None:
        out["tokens/count"] = float(tokens)

    if tokens:
        # Padding rows become zeros so -inf padding cannot produce NaN in the (discarded) values.
        def rows(logits: torch.Tensor, temperature: float) -> torch.Tensor:
            return torch.log_softmax(torch.where(keep.unsqueeze(-1), logits / temperature, 0.0), dim=-1)

        ids = torch.where(keep, sampled_ids, 0).long().unsqueeze(-1) if sampled_ids is not None else None
        student_logp = rows(student_logits, student_temperature) if student_logits is not None else None
        teacher_logp = rows(teacher_logits, teacher_temperature) if teacher_logits is not None else None

        if student_logprobs is None and student_logp is not None and ids is not None:
            student_logprobs = student_logp.gather(-1, ids).squeeze(-1)
        if teacher_logprobs is None and teacher_logp is not None and ids is not None:
            teacher_logprobs = teacher_logp.gather(-1, ids).squeeze(-1)
        if log_ratio is None and student_logprobs is not None and teacher_logprobs is not None:
            log_ratio = teacher_logprobs - student_logprobs

        if log_ratio is not None:
            r = log_ratio.double()[keep]
            out["log_ratio/mean"] = float(r.mean())
            out["log_ratio/std"] = float(r.std(correction=0))
            for q, level in zip(quantiles, _quantiles(r, quantiles)):
                out[f"log_ratio/{_quantile_key(q)}"] = level
            out["log_ratio/negative_share"] = float((r < 0).double().mean())
            for name, estimate in _kl_estimates(r).items():
                out[f"kl/{name}"] = float(estimate.mean())

        if student_logp is not None and teacher_logp is not None:
            pi = student_logp.exp()
            rkl = torch.where(pi > 0, pi * (student_logp - teacher_logp), 0.0).sum(dim=-1)
            out["kl/rkl_exact"] = _mean(rkl, keep)

        teacher_top1 = None
        if teacher_logp is not None:
            teacher_top1 = teacher_logp.argmax(dim=-1)
        elif teacher_topk_ids is not None:
            teacher_top1 = teacher_topk_ids.gather(-1, teacher_topk_logprobs.argmax(dim=-1, keepdim=True)).squeeze(-1)
        if teacher_top1 is not None and ids is not None:
            out["agreement/teacher_top1_match"] = _mean((teacher_top1 == ids.squeeze(-1)).double(), keep)

        teacher_topk = None
        if student_logp is None:
            pass
        elif teacher_logp is not None:
            teacher_topk = teacher_logp.topk(top_k, dim=-1).indices
        elif teacher_topk_ids is not None:
            if top_k > teacher_topk_ids.shape[-1]:
                raise MathInputError(f"top_k: expected at most K = {teacher_topk_ids.shape[-1]} (the ids the served "
                                     f"teacher gave), got {top_k}")
            chosen = teacher_topk_logprobs.topk(top_k, dim=-1).indices
            teacher_topk = torch.where(keep.unsqueeze(-1), teacher_topk_ids.gather(-1, chosen), 0)
        if teacher_topk is not None and student_logp is not None:
            in_teacher = torch.zeros_like(student_logp, dtype=torch.bool).scatter_(-1, teacher_topk, True)
            in_student = torch.zeros_like(in_teacher).scatter_(-1, student_logp.topk(top_k, dim=-1).indices, True)
            out["agreement/topk_overlap"] = _mean((in_teacher & in_student).sum(dim=-1).double() / top_k, keep)
            out["agreement/student_mass_on_teacher_support"] = _mean(
                torch.where(in_teacher, student_logp.exp(), 0.0).sum(dim=-1), keep)

        if teacher_logp is not None:
            out["entropy/teacher"] = _mean(_entropy(teacher_logp), keep)
        if student_logp is not None:
            out["entropy/student"] = _mean(_entropy(student_logp), keep)

        # Two ratios, never confused (opd-math.md, Route B): the PPO ratio pi_theta / pi_theta_old under the loss's
        # distribution, and the sampler-mismatch weight pi_theta_old / mu.
        if student_logprobs is not None and old_logprobs is not None:
            ratio = (student_logprobs.double() - old_logprobs.double()).clamp(max=LOG_RATIO_CAP).exp()[keep]
            out["importance/ratio_mean"] = float(ratio.mean())
            out["importance/ratio_min"] = float(ratio.min())
            out["importance/ratio_max"] = float(ratio.max())
            out["importance/clip_fraction"] = float(((ratio < low) | (ratio > high)).double().mean())
        if old_logprobs is not None and behaviour_logprobs is not None:
            log_w = (old_logprobs.double() - behaviour_logprobs.double())[keep]
            weight = log_w.clamp(max=LOG_RATIO_CAP).exp()
            m_low, m_high = mismatch_interval
            out["mismatch/ratio_mean"] = float(weight.mean())
            out["mismatch/ratio_min"] = float(weight.min())
            out["mismatch/ratio_max"] = float(weight.max())
            out["mismatch/outside_fraction"] = float(((weight < m_low) | (weight > m_high)).double().mean())
            out["mismatch/log_ratio_abs_mean"] = float(log_w.abs().mean())

        if advantages is not None:
            out["advantage/mean"] = _mean(advantages, keep)
            out["advantage/std"] = _std(advantages, keep)

        if values is not None and value_targets is not None:
            target = value_targets.double()[keep]
            residual = target - values.double()[keep]
            variance = target.var(correction=0)
            if float(variance) > 0:
                out["value/explained_variance"] = float(1.0 - residual.var(correction=0) / variance)

        if routing_stats is not None:
            routed = routing_stats.routed.bool() & keep
            negative = routing_stats.negative_advantage.bool() & keep
            out["routing/routed_rate"] = float(routed.sum()) / tokens
            if routed.any():
                out["routing/routed_mass_mean"] = _mean(routing_stats.routed_mass, routed)
            if negative.any():
                out["routing/empty_candidate_rate"] = _mean(routing_stats.empty_candidates.double(), negative)
                out["routing/candidate_count_mean"] = _mean(routing_stats.candidate_count.double(), negative)

    for name, rate in (gate_keep_rates or {}).items():
        out[f"gates/{name}_keep_rate"] = float(rate)

    if staleness is not None:
        stale = torch.as_tensor(staleness, dtype=torch.float64).reshape(-1)
        if stale.numel():
            if not torch.isfinite(stale).all() or (stale < 0).any():
                raise MathInputError(f"staleness: expected finite counts >= 0 of optimizer updates, got {staleness}")
            out["rollout/staleness_mean"] = float(stale.mean())
            out["rollout/staleness_max"] = float(stale.max())

    if response_lengths is not None:
        lengths = torch.as_tensor(response_lengths, dtype=torch.float64).reshape(-1)
        if lengths.numel():
            if not torch.isfinite(lengths).all() or (lengths < 0).any():
                raise MathInputError("response_lengths: expected finite lengths >= 0")
            out["rollout/response_length_mean"] = float(lengths.mean())
            out["rollout/response_length_max"] = float(lengths.max())

    if teacher_tokens is not None and wall_time_s is not None:
        require_positive("wall_time_s", wall_time_s)
        if not (teacher_tokens >= 0 and math.isfinite(teacher_tokens)):
            raise MathInputError(f"teacher_tokens: expected a finite count >= 0, got {teacher_tokens}")
        out["throughput/teacher_tokens_per_s"] = float(teacher_tokens) / float(wall_time_s)
    return out
