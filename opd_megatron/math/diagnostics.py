"""Per-step diagnostics of one batch: `batch_diagnostics(DiagnosticsBatch(...), DiagnosticsSettings(...)) ->
dict[str, float]` for `metrics.jsonl`. [Survey] `docs/opd-math.md`, "Diagnostics".

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
`checks.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


@dataclass
class DiagnosticsBatch:
    """What one batch gives `batch_diagnostics`; every field is optional (a diagnostic whose inputs are missing is
    left out). `[...]` is the token layout, `[B, T]` for a batch.

    mask `[...]`: 1 on the tokens that count (default: every position of the per-token inputs).
    student_logits, teacher_logits `[..., V]`: at `DiagnosticsSettings.student_temperature` /
        `teacher_temperature`.
    teacher_topk_ids, teacher_topk_logprobs `[..., K]`: a served teacher, used as given.
    sampled_ids `[...]`: `y_t`.
    student_logprobs, teacher_logprobs, behaviour_logprobs, old_logprobs `[...]`: sampled-token log-probs under
        `pi`, `q`, the sampler `mu`, and the loss's distribution at the sampling weights `pi_theta_old` (without
        `old_logprobs` the PPO ratio is not reported and `mu` stands for nothing else); the first two are read
        from the logits at `sampled_ids` when not given.
    log_ratio `[...]`: `r_t`, else `teacher_logprobs - student_logprobs`.
    advantages, values, value_targets `[...]`: `A_t`, `V(s_t)` and its regression targets.
    routing_stats: a `RoutingStats` of the CR-OPD loss (`[...]` fields).
    gate_keep_rates: gate name -> keep rate (`gates.token_weights(...).keep_rates`).
    staleness: a number or `[B]`; response_lengths `[B]`.
    teacher_tokens, wall_time_s: tokens the teacher scored in `wall_time_s` seconds.
    """

    mask: Optional[torch.Tensor] = None
    student_logits: Optional[torch.Tensor] = None
    teacher_logits: Optional[torch.Tensor] = None
    teacher_topk_ids: Optional[torch.Tensor] = None
    teacher_topk_logprobs: Optional[torch.Tensor] = None
    sampled_ids: Optional[torch.Tensor] = None
    student_logprobs: Optional[torch.Tensor] = None
    teacher_logprobs: Optional[torch.Tensor] = None
    log_ratio: Optional[torch.Tensor] = None
    behaviour_logprobs: Optional[torch.Tensor] = None
    old_logprobs: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    value_targets: Optional[torch.Tensor] = None
    routing_stats: Optional["RoutingStats"] = None
    gate_keep_rates: Optional[Mapping[str, float]] = None
    staleness: Union[int, float, torch.Tensor, None] = None
    response_lengths: Optional[torch.Tensor] = None
    teacher_tokens: Optional[float] = None
    wall_time_s: Optional[float] = None

    def per_token(self) -> dict[str, torch.Tensor]:
        """The given `[...]` tensors by name (the routing statistics' routed mass included)."""
        named = dict(sampled_ids=self.sampled_ids, student_logprobs=self.student_logprobs,
                     teacher_logprobs=self.teacher_logprobs, log_ratio=self.log_ratio,
                     behaviour_logprobs=self.behaviour_logprobs, old_logprobs=self.old_logprobs,
                     advantages=self.advantages, values=self.values, value_targets=self.value_targets)
        if self.routing_stats is not None:
            named["routing_stats.routed_mass"] = self.routing_stats.routed_mass
        return {name: tensor for name, tensor in named.items() if tensor is not None}

    def per_vocab(self) -> dict[str, torch.Tensor]:
        """The given `[..., V]` / `[..., K]` tensors by name."""
        named = dict(student_logits=self.student_logits, teacher_logits=self.teacher_logits,
                     teacher_topk_ids=self.teacher_topk_ids, teacher_topk_logprobs=self.teacher_topk_logprobs)
        return {name: tensor for name, tensor in named.items() if tensor is not None}


@dataclass(frozen=True)
class DiagnosticsSettings:
    """How `batch_diagnostics` reads a batch: `top_k` of the agreement statistics, the log-ratio `quantiles`, the
    PPO clip `ratio_interval` and the truncated-IS `mismatch_interval` the shares outside are counted against, and
    the temperatures of the logits."""

    top_k: int = 8
    quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95)
    ratio_interval: tuple[float, float] = (0.8, 1.2)
    mismatch_interval: tuple[float, float] = (0.5, 2.0)
    student_temperature: float = 1.0
    teacher_temperature: float = 1.0


@dataclass
class _TokenView:
    """The per-token quantities the statistics read, on a batch with kept tokens: `keep [...]`, the log-softmaxes
    `[..., V]` (zeros on masked rows), `ids [..., 1]` and the sampled-token log-probs / log-ratio `[...]`, given
    or read from the logits."""

    keep: torch.Tensor
    tokens: int
    student_logp: Optional[torch.Tensor]
    teacher_logp: Optional[torch.Tensor]
    ids: Optional[torch.Tensor]
    student_logprobs: Optional[torch.Tensor]
    teacher_logprobs: Optional[torch.Tensor]
    log_ratio: Optional[torch.Tensor]


@torch.no_grad()
def batch_diagnostics(batch: DiagnosticsBatch,
                      settings: DiagnosticsSettings = DiagnosticsSettings()) -> dict[str, float]:
    """The spec's diagnostics from one batch, as a flat `dict[str, float]` (keys in the module docstring).
    [Survey]"""
    keep = _checked_mask(batch, settings)
    out: dict[str, float] = {}
    tokens = int(keep.sum()) if keep is not None else 0
    if keep is not None:
        out["tokens/count"] = float(tokens)
    if tokens:
        view = _token_view(batch, settings, keep, tokens)
        if view.log_ratio is not None:
            out.update(_log_ratio_stats(view.log_ratio[keep], settings.quantiles))
        if view.student_logp is not None and view.teacher_logp is not None:
            out["kl/rkl_exact"] = _mean(_exact_reverse_kl(view.student_logp, view.teacher_logp), keep)
        out.update(_agreement_stats(batch, settings.top_k, view))
        if view.teacher_logp is not None:
            out["entropy/teacher"] = _mean(_entropy(view.teacher_logp), keep)
        if view.student_logp is not None:
            out["entropy/student"] = _mean(_entropy(view.student_logp), keep)
        # Two ratios, never confused (docs/opd-math.md, Route B): the PPO ratio pi_theta / pi_theta_old under the
        # loss's distribution, and the sampler-mismatch weight pi_theta_old / mu.
        if view.student_logprobs is not None and batch.old_logprobs is not None:
            out.update(_importance_stats(view.student_logprobs, batch.old_logprobs, keep, settings.ratio_interval))
        if batch.old_logprobs is not None and batch.behaviour_logprobs is not None:
            out.update(_mismatch_stats(batch.old_logprobs, batch.behaviour_logprobs, keep,
                                       settings.mismatch_interval))
        if batch.advantages is not None:
            out["advantage/mean"] = _mean(batch.advantages, keep)
            out["advantage/std"] = _std(batch.advantages, keep)
        if batch.values is not None and batch.value_targets is not None:
            out.update(_value_stats(batch.values, batch.value_targets, keep))
        if batch.routing_stats is not None:
            out.update(_routing_stats(batch.routing_stats, keep, tokens))
    for name, rate in (batch.gate_keep_rates or {}).items():
        out[f"gates/{name}_keep_rate"] = float(rate)
    out.update(_rollout_stats(batch))
    out.update(_throughput(batch))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Argument checks


def _checked_mask(batch: DiagnosticsBatch, settings: DiagnosticsSettings) -> Optional[torch.Tensor]:
    """Checks the batch's tensors and the settings; returns the mask as bool `[...]` (all True when not given),
    None when the batch has no tensor at all."""
    per_token, per_vocab = batch.per_token(), batch.per_vocab()
    keep = _token_layout_mask(batch.mask, per_token, per_vocab)
    for name, tensor in {**per_token, **per_vocab}.items():
        if name not in ("sampled_ids", "teacher_topk_ids"):
            require_floating(name, tensor)
            require_finite(name, tensor)
    student, teacher = batch.student_logits, batch.teacher_logits
    if student is not None and teacher is not None and student.shape != teacher.shape:
        raise MathInputError(f"teacher_logits: expected the shape of student_logits {tuple(student.shape)} "
                             f"(same vocabulary), got {tuple(teacher.shape)}")
    topk_ids, topk_logprobs = batch.teacher_topk_ids, batch.teacher_topk_logprobs
    if (topk_ids is None) != (topk_logprobs is None):
        raise MathInputError("teacher_topk_ids / teacher_topk_logprobs: a served teacher needs both")
    if topk_ids is not None and topk_ids.shape != topk_logprobs.shape:
        raise MathInputError(f"teacher_topk_logprobs: expected the shape of teacher_topk_ids "
                             f"{tuple(topk_ids.shape)}, got {tuple(topk_logprobs.shape)}")
    _check_settings(settings)
    vocab = next((t.shape[-1] for t in (student, teacher) if t is not None), None)
    if batch.sampled_ids is not None and vocab is not None:
        require_token_ids("sampled_ids", batch.sampled_ids[keep], vocab)
    if topk_ids is not None and vocab is not None:
        require_token_ids("teacher_topk_ids", topk_ids[keep], vocab)
    if student is not None and (teacher is not None or topk_ids is not None):
        require_positive_int("top_k", settings.top_k, at_most=vocab, what="the vocabulary size V")
    return keep


def _token_layout_mask(mask: Optional[torch.Tensor], per_token: dict[str, torch.Tensor],
                       per_vocab: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """The token layout is the mask's, else the first per-token input's (else the first per-vocabulary input's
    leading dims); every input must have it. Returns the mask as bool (all True when not given), or None when
    there is no tensor."""
    if mask is not None:
        leading = tuple(mask.shape)
        keep = require_binary_mask("mask", mask)
    elif per_token or per_vocab:
        first = next(iter(per_token.values()), None)
        leading = tuple(first.shape) if first is not None else tuple(next(iter(per_vocab.values())).shape[:-1])
        keep = None
    else:
        return None
    for name, tensor in per_token.items():
        if tuple(tensor.shape) != leading:
            raise MathInputError(f"{name}: expected shape {leading} (the token layout of mask), "
                                 f"got {tuple(tensor.shape)}")
    for name, tensor in per_vocab.items():
        if tuple(tensor.shape[:-1]) != leading:
            raise MathInputError(f"{name}: expected shape {leading + ('V',)} (the token layout of mask), "
                                 f"got {tuple(tensor.shape)}")
    if keep is None:
        device = next(iter({**per_token, **per_vocab}.values())).device
        keep = torch.ones(leading, dtype=torch.bool, device=device)
    return keep


def _check_settings(settings: DiagnosticsSettings) -> None:
    require_positive("student_temperature", settings.student_temperature)
    require_positive("teacher_temperature", settings.teacher_temperature)
    for q in settings.quantiles:
        if not 0.0 <= q <= 1.0:
            raise MathInputError(f"quantiles: expected values in [0, 1], got {q}")
    low, high = settings.ratio_interval
    if not 0.0 <= low <= high:
        raise MathInputError(f"ratio_interval: expected 0 <= low <= high, got {settings.ratio_interval}")


# ---------------------------------------------------------------------------------------------------------------
# The statistics, one family at a time (each on a batch with kept tokens)


def _token_view(batch: DiagnosticsBatch, settings: DiagnosticsSettings, keep: torch.Tensor,
                tokens: int) -> _TokenView:
    # Padding rows become zeros so -inf padding cannot produce NaN in the (discarded) values.
    def rows(logits: torch.Tensor, temperature: float) -> torch.Tensor:
        return torch.log_softmax(torch.where(keep.unsqueeze(-1), logits / temperature, 0.0), dim=-1)

    ids = torch.where(keep, batch.sampled_ids, 0).long().unsqueeze(-1) if batch.sampled_ids is not None else None
    student_logp = (rows(batch.student_logits, settings.student_temperature)
                    if batch.student_logits is not None else None)
    teacher_logp = (rows(batch.teacher_logits, settings.teacher_temperature)
                    if batch.teacher_logits is not None else None)
    student_logprobs, teacher_logprobs, log_ratio = batch.student_logprobs, batch.teacher_logprobs, batch.log_ratio
    if student_logprobs is None and student_logp is not None and ids is not None:
        student_logprobs = student_logp.gather(-1, ids).squeeze(-1)
    if teacher_logprobs is None and teacher_logp is not None and ids is not None:
        teacher_logprobs = teacher_logp.gather(-1, ids).squeeze(-1)
    if log_ratio is None and student_logprobs is not None and teacher_logprobs is not None:
        log_ratio = teacher_logprobs - student_logprobs
    return _TokenView(keep, tokens, student_logp, teacher_logp, ids, student_logprobs, teacher_logprobs, log_ratio)


def _log_ratio_stats(r: torch.Tensor, quantiles: Sequence[float]) -> dict[str, float]:
    """Mean, std, quantiles and negative share of the kept log-ratios `r [n]`, and the k1-k3 estimates."""
    r = r.double()
    out = {"log_ratio/mean": float(r.mean()), "log_ratio/std": float(r.std(correction=0))}
    for q, level in zip(quantiles, _quantiles(r, quantiles)):
        out[f"log_ratio/{_quantile_key(q)}"] = level
    out["log_ratio/negative_share"] = float((r < 0).double().mean())
    for name, estimate in _kl_estimates(r).items():
        out[f"kl/{name}"] = float(estimate.mean())
    return out


def _exact_reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    pi = student_logp.exp()
    return torch.where(pi > 0, pi * (student_logp - teacher_logp), 0.0).sum(dim=-1)


def _agreement_stats(batch: DiagnosticsBatch, top_k: int, view: _TokenView) -> dict[str, float]:
    """Teacher top-1 match with `y_t`, top-k overlap and the student's mass on the teacher's top-k."""
    out: dict[str, float] = {}
    topk_ids, topk_logprobs = batch.teacher_topk_ids, batch.teacher_topk_logprobs
    teacher_top1 = None
    if view.teacher_logp is not None:
        teacher_top1 = view.teacher_logp.argmax(dim=-1)
    elif topk_ids is not None:
        teacher_top1 = topk_ids.gather(-1, topk_logprobs.argmax(dim=-1, keepdim=True)).squeeze(-1)
    if teacher_top1 is not None and view.ids is not None:
        out["agreement/teacher_top1_match"] = _mean((teacher_top1 == view.ids.squeeze(-1)).double(), view.keep)

    student_logp = view.student_logp
    if student_logp is None:
        return out
    if view.teacher_logp is not None:
        teacher_topk = view.teacher_logp.topk(top_k, dim=-1).indices
    elif topk_ids is not None:
        if top_k > topk_ids.shape[-1]:
            raise MathInputError(f"top_k: expected at most K = {topk_ids.shape[-1]} (the ids the served "
                                 f"teacher gave), got {top_k}")
        chosen = topk_logprobs.topk(top_k, dim=-1).indices
        teacher_topk = torch.where(view.keep.unsqueeze(-1), topk_ids.gather(-1, chosen), 0)
    else:
        return out
    in_teacher = torch.zeros_like(student_logp, dtype=torch.bool).scatter_(-1, teacher_topk, True)
    in_student = torch.zeros_like(in_teacher).scatter_(-1, student_logp.topk(top_k, dim=-1).indices, True)
    out["agreement/topk_overlap"] = _mean((in_teacher & in_student).sum(dim=-1).double() / top_k, view.keep)
    out["agreement/student_mass_on_teacher_support"] = _mean(
        torch.where(in_teacher, student_logp.exp(), 0.0).sum(dim=-1), view.keep)
    return out


def _importance_stats(student_logprobs: torch.Tensor, old_logprobs: torch.Tensor, keep: torch.Tensor,
                      interval: tuple[float, float]) -> dict[str, float]:
    """The PPO ratio `pi_theta(y_t) / pi_theta_old(y_t)`: mean, min, max and the share outside `interval`."""
    ratio = (student_logprobs.double() - old_logprobs.double()).clamp(max=LOG_RATIO_CAP).exp()[keep]
    low, high = interval
    return {"importance/ratio_mean": float(ratio.mean()), "importance/ratio_min": float(ratio.min()),
            "importance/ratio_max": float(ratio.max()),
            "importance/clip_fraction": float(((ratio < low) | (ratio > high)).double().mean())}


def _mismatch_stats(old_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, keep: torch.Tensor,
                    interval: tuple[float, float]) -> dict[str, float]:
    """The sampler-mismatch weight `pi_theta_old(y_t) / mu(y_t)`: mean, min, max, the share outside `interval`
    and the mean absolute log-weight."""
    log_w = (old_logprobs.double() - behaviour_logprobs.double())[keep]
    weight = log_w.clamp(max=LOG_RATIO_CAP).exp()
    low, high = interval
    return {"mismatch/ratio_mean": float(weight.mean()), "mismatch/ratio_min": float(weight.min()),
            "mismatch/ratio_max": float(weight.max()),
            "mismatch/outside_fraction": float(((weight < low) | (weight > high)).double().mean()),
            "mismatch/log_ratio_abs_mean": float(log_w.abs().mean())}


def _value_stats(values: torch.Tensor, value_targets: torch.Tensor, keep: torch.Tensor) -> dict[str, float]:
    """Explained variance of the value head; absent when the targets do not vary."""
    target = value_targets.double()[keep]
    residual = target - values.double()[keep]
    variance = target.var(correction=0)
    if not float(variance) > 0:
        return {}
    return {"value/explained_variance": float(1.0 - residual.var(correction=0) / variance)}


def _routing_stats(stats: "RoutingStats", keep: torch.Tensor, tokens: int) -> dict[str, float]:
    routed = stats.routed.bool() & keep
    negative = stats.negative_advantage.bool() & keep
    out = {"routing/routed_rate": float(routed.sum()) / tokens}
    if routed.any():
        out["routing/routed_mass_mean"] = _mean(stats.routed_mass, routed)
    if negative.any():
        out["routing/empty_candidate_rate"] = _mean(stats.empty_candidates.double(), negative)
        out["routing/candidate_count_mean"] = _mean(stats.candidate_count.double(), negative)
    return out


def _rollout_stats(batch: DiagnosticsBatch) -> dict[str, float]:
    """Staleness (optimizer updates between `mu` and `pi`) and response lengths, per sequence."""
    out = {}
    if batch.staleness is not None:
        stale = torch.as_tensor(batch.staleness, dtype=torch.float64).reshape(-1)
        if stale.numel():
            if not torch.isfinite(stale).all() or (stale < 0).any():
                raise MathInputError(f"staleness: expected finite counts >= 0 of optimizer updates, "
                                     f"got {batch.staleness}")
            out["rollout/staleness_mean"] = float(stale.mean())
            out["rollout/staleness_max"] = float(stale.max())
    if batch.response_lengths is not None:
        lengths = torch.as_tensor(batch.response_lengths, dtype=torch.float64).reshape(-1)
        if lengths.numel():
            if not torch.isfinite(lengths).all() or (lengths < 0).any():
                raise MathInputError("response_lengths: expected finite lengths >= 0")
            out["rollout/response_length_mean"] = float(lengths.mean())
            out["rollout/response_length_max"] = float(lengths.max())
    return out


def _throughput(batch: DiagnosticsBatch) -> dict[str, float]:
    if batch.teacher_tokens is None or batch.wall_time_s is None:
        return {}
    require_positive("wall_time_s", batch.wall_time_s)
    if not (batch.teacher_tokens >= 0 and math.isfinite(batch.teacher_tokens)):
        raise MathInputError(f"teacher_tokens: expected a finite count >= 0, got {batch.teacher_tokens}")
    return {"throughput/teacher_tokens_per_s": float(batch.teacher_tokens) / float(batch.wall_time_s)}
