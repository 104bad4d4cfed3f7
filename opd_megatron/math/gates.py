"""Token gates: the token weight `w_t` as a product of gates, and each gate's keep rate.
[Survey] `docs/opd-math.md`, "Gates and token weights".

Every gate is a boolean keep-set `[...]` over positions (`[B, T]` for a batch), computed without gradient; the
truncated train/inference importance weight is the one non-binary factor. `token_weights` multiplies the
configured ones into `w_t [...]` (0 on masked positions) and reports, for each gate, the share of masked tokens it
keeps (alone, not after the others). This is the single-device reference; it imports only torch and
`checks.py` (and `regularizers.entropy`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from opd_megatron.math.regularizers import entropy
from opd_megatron.math.checks import (MathInputError, require_binary_mask, require_choice, require_finite,
                                      require_floating, require_mask_shape, require_positive)

SIGNS = ("negative", "positive")
ENTROPY_KEEPS = ("high", "low")
CLIP_MODES = ("drop", "clip")


@dataclass(frozen=True)
class GateConfig:
    """Which gates multiply into `w_t`; `None` turns a gate off (the default: every gate off, `w_t = m_t`).

    teacher_confidence: `c` in (0, 1]; keep `max_v q_v >= c`.
    teacher_entropy: `h >= 0` nats; keep `H(q) <= h`.
    student_entropy: `h_S >= 0` nats; keep `H(pi) >= h_S` when `student_entropy_keep="high"` (default), or
        `H(pi) <= h_S` with "low". See `student_entropy_gate` for why "high" is the default.
    sign: "negative" keeps `r_t < 0` (tokens the teacher rates below the student), "positive" keeps `r_t > 0`;
        `r_t = 0` is dropped by both.
    log_ratio_clip: `c > 0`; with `log_ratio_clip_mode="drop"` (default, the spec's gate) keep `|r_t| <= c`;
        with "clip" no token is dropped and `r_t` is clamped to `[-c, c]` instead (`GateResult.log_ratio`).
    truncated_is: `(eps_lo, eps_hi)` with `0 <= eps_lo <= 1 <= eps_hi < inf`; factor
        `sg(pi/mu)` inside `[eps_lo, eps_hi]`, else 0 (MiMo and Nemotron-Cascade 2 use (0.5, 2.0)).
    """

    teacher_confidence: Optional[float] = None
    teacher_entropy: Optional[float] = None
    student_entropy: Optional[float] = None
    student_entropy_keep: str = "high"
    sign: Optional[str] = None
    log_ratio_clip: Optional[float] = None
    log_ratio_clip_mode: str = "drop"
    truncated_is: Optional[tuple[float, float]] = None

    def __post_init__(self) -> None:
        if self.teacher_confidence is not None and not (0.0 < self.teacher_confidence <= 1.0):
            raise MathInputError(f"teacher_confidence: expected a probability in (0, 1], "
                                 f"got {self.teacher_confidence}")
        for name in ("teacher_entropy", "student_entropy"):
            value = getattr(self, name)
            if value is not None and not (value >= 0.0 and math.isfinite(value)):
                raise MathInputError(f"{name}: expected a finite entropy >= 0 (nats), got {value}")
        require_choice("student_entropy_keep", self.student_entropy_keep, ENTROPY_KEEPS)
        if self.sign is not None:
            require_choice("sign", self.sign, SIGNS)
        if self.log_ratio_clip is not None:
            require_positive("log_ratio_clip", self.log_ratio_clip)
        require_choice("log_ratio_clip_mode", self.log_ratio_clip_mode, CLIP_MODES)
        if self.truncated_is is not None:
            _require_is_interval("truncated_is", self.truncated_is)


@dataclass
class GateResult:
    """weights: `w_t [...]` (0 on masked positions), detached. keep: positions with `w_t > 0` among masked ones.
    keep_rates: gate name -> share of masked tokens that gate keeps (0.0 when no token is masked in);
    "all" is the share kept by the product. log_ratio: `r_t`, clamped when `log_ratio_clip_mode="clip"`
    (None when no log-ratio was given)."""

    weights: torch.Tensor
    keep: torch.Tensor
    keep_rates: dict[str, float]
    log_ratio: Optional[torch.Tensor]


def _require_is_interval(name: str, interval: tuple[float, float]) -> None:
    try:
        low, high = (float(x) for x in interval)
    except (TypeError, ValueError):
        raise MathInputError(f"{name}: expected a pair (eps_lo, eps_hi), got {interval!r}") from None
    if not (0.0 <= low <= 1.0 <= high < math.inf):
        raise MathInputError(f"{name}: expected 0 <= eps_lo <= 1 <= eps_hi < inf (the interval must hold the "
                             f"on-policy ratio 1), got ({low}, {high})")


def _check_logits(name: str, logits: torch.Tensor, temperature: float, temperature_name: str) -> None:
    require_floating(name, logits)
    require_finite(name, logits)
    require_positive(temperature_name, temperature)


@torch.no_grad()
def teacher_confidence_gate(threshold: float, *, teacher_logits: Optional[torch.Tensor] = None,
                            teacher_topk_logprobs: Optional[torch.Tensor] = None,
                            teacher_temperature: float = 1.0) -> torch.Tensor:
    """Keep `max_v q_v >= c`, `[...]` bool. [Survey] From dense `teacher_logits [..., V]`
    (`q = softmax(z^T / tau_T)`) or a server's `teacher_topk_logprobs [..., K]` (its largest entry is the top-1;
    used as given)."""
    if teacher_logits is not None:
        _check_logits("teacher_logits", teacher_logits, teacher_temperature, "teacher_temperature")
        top1 = torch.log_softmax(teacher_logits / teacher_temperature, dim=-1).max(dim=-1).values
    elif teacher_topk_logprobs is not None:
        require_floating("teacher_topk_logprobs", teacher_topk_logprobs)
        require_finite("teacher_topk_logprobs", teacher_topk_logprobs)
        top1 = teacher_topk_logprobs.max(dim=-1).values
    else:
        raise MathInputError("teacher_logits / teacher_topk_logprobs: the teacher-confidence gate needs one of them")
    return top1.exp() >= threshold


@torch.no_grad()
def teacher_entropy_gate(teacher_logits: torch.Tensor, max_entropy: float,
                         teacher_temperature: float = 1.0) -> torch.Tensor:
    """Keep `H(q) <= h`, `[...]` bool from `teacher_logits [..., V]`. [Survey] Needs the full distribution: a
    top-k answer only bounds `H(q)`, so sparse teacher input is not accepted here."""
    _check_logits("teacher_logits", teacher_logits, teacher_temperature, "teacher_temperature")
    return entropy(teacher_logits, teacher_temperature) <= max_entropy


@torch.no_grad()
def student_entropy_gate(student_logits: torch.Tensor, threshold: float, keep: str = "high",
                         student_temperature: float = 1.0) -> torch.Tensor:
    """Keep `H(pi) >= h_S` ("high", default) or `H(pi) <= h_S` ("low"), `[...]` bool. [Ours, after Survey]

    Direction: the spec names the gate without a direction. "high" is the default because the positions where
    the student's next token is open (forking tokens) are where its choice, and so the teacher's verdict on it,
    changes the continuation; RLVR studies that train only on the high-entropy minority of tokens keep or improve
    accuracy, and near-deterministic student positions mostly carry `r_t ~ 0`. "low" is offered for the opposite
    use: dropping positions where a single sampled token is a noisy estimate of the student's choice.
    """
    _check_logits("student_logits", student_logits, student_temperature, "student_temperature")
    require_choice("keep", keep, ENTROPY_KEEPS)
    student_entropy = entropy(student_logits, student_temperature)
    return student_entropy >= threshold if keep == "high" else student_entropy <= threshold


@torch.no_grad()
def sign_gate(log_ratio: torch.Tensor, keep: str) -> torch.Tensor:
    """Keep `r_t < 0` ("negative") or `r_t > 0` ("positive"), `[...]` bool; `r_t = 0` is dropped. [Survey]"""
    require_choice("keep", keep, SIGNS)
    return log_ratio < 0 if keep == "negative" else log_ratio > 0


@torch.no_grad()
def log_ratio_gate(log_ratio: torch.Tensor, clip: float) -> torch.Tensor:
    """The log-ratio clip as a gate: keep `r_t in [-c, c]`, `[...]` bool. [Survey]"""
    require_positive("clip", clip)
    return log_ratio.abs() <= clip


def clip_log_ratio(log_ratio: torch.Tensor, clip: float) -> torch.Tensor:
    """The log-ratio clip as a value clip: `clamp(r_t, -c, c)`, `[...]`; drops nothing. [Survey]"""
    require_positive("clip", clip)
    return log_ratio.clamp(-clip, clip)


@torch.no_grad()
def truncated_importance_weight(student_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor,
                                low: float = 0.5, high: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated train/inference importance sampling (MiMo, Nemotron-Cascade 2: [0.5, 2.0]).

    `w_t = sg(pi(y_t) / mu(y_t))` if `eps_lo <= pi/mu <= eps_hi` (both ends kept), else 0. Inputs are the
    sampled-token log-probs `[...]` under the current student (`log pi`) and the behaviour policy at rollout time
    (`log mu`). Returns `(weight [...], inside [...] bool)`.
    """
    _require_is_interval("truncated_is", (low, high))
    require_floating("student_logprobs", student_logprobs)
    require_floating("behaviour_logprobs", behaviour_logprobs)
    require_mask_shape(behaviour_logprobs, tuple(student_logprobs.shape), "behaviour_logprobs")
    ratio = (student_logprobs.detach() - behaviour_logprobs.detach()).exp()
    inside = (ratio >= low) & (ratio <= high)
    return torch.where(inside, ratio, 0.0), inside


@torch.no_grad()
def token_weights(config: GateConfig, mask: torch.Tensor, *, log_ratio: Optional[torch.Tensor] = None,
                  teacher_logits: Optional[torch.Tensor] = None,
                  teacher_topk_logprobs: Optional[torch.Tensor] = None,
                  student_logits: Optional[torch.Tensor] = None,
                  student_logprobs: Optional[torch.Tensor] = None,
                  behaviour_logprobs: Optional[torch.Tensor] = None,
                  student_temperature: float = 1.0, teacher_temperature: float = 1.0,
                  teacher_confidence: Optional[torch.Tensor] = None,
                  teacher_entropy: Optional[torch.Tensor] = None,
                  student_entropy: Optional[torch.Tensor] = None) -> GateResult:
    """`w_t = m_t * prod_g gate_g(t) * [truncated IS weight]`, `[...]`, and each gate's keep rate. [Survey]

    `mask [...]` (`[B, T]`); per-token inputs `[...]`: `log_ratio` (`r_t`), `student_logprobs` and
    `behaviour_logprobs` (sampled-token log-probs); per-vocabulary inputs `[..., V]`: `teacher_logits`,
    `student_logits`; or `teacher_topk_logprobs [..., K]` for the confidence gate. Only the inputs of the
    configured gates are needed; a configured gate whose input is missing is an error naming it.
    Vocab-parallel callers pass the per-position statistics instead of logits (computed from TP shards by
    `parallel/diagnostics.py`): `teacher_confidence [...]` (`max_v q_v`), `teacher_entropy`, `student_entropy [...]`
    (nats, at the given temperatures); each, when given, is used in place of the logits for its gate.
    Keep rates are over masked-in tokens: `sum(m * gate) / sum(m)` (0.0 when `sum(m) = 0`), under the keys
    "teacher_confidence", "teacher_entropy", "student_entropy", "sign", "log_ratio_clip", "truncated_is"
    (configured gates only) and "all" (the product's).
    """
    keep_mask = require_binary_mask("mask", mask)
    need = _GateInputs(tuple(mask.shape))
    gates = _distribution_gates(config, need, teacher_logits=teacher_logits,
                                teacher_topk_logprobs=teacher_topk_logprobs, student_logits=student_logits,
                                student_temperature=student_temperature, teacher_temperature=teacher_temperature,
                                teacher_confidence=teacher_confidence, teacher_entropy=teacher_entropy,
                                student_entropy=student_entropy)
    weight = keep_mask.to(torch.get_default_dtype())
    clipped = log_ratio
    if config.sign is not None:
        gates["sign"] = sign_gate(need("log_ratio", log_ratio, "sign"), config.sign)
    if config.log_ratio_clip is not None:
        within = log_ratio_gate(need("log_ratio", log_ratio, "log_ratio_clip"), config.log_ratio_clip)
        if config.log_ratio_clip_mode == "drop":
            gates["log_ratio_clip"] = within
        else:
            clipped = clip_log_ratio(log_ratio, config.log_ratio_clip)
    if config.truncated_is is not None:
        ratio_weight, inside = truncated_importance_weight(
            need("student_logprobs", student_logprobs, "truncated_is"),
            need("behaviour_logprobs", behaviour_logprobs, "truncated_is"), *config.truncated_is)
        gates["truncated_is"] = inside
        weight = weight.to(ratio_weight.dtype) * ratio_weight

    kept = keep_mask.clone()
    for gate in gates.values():
        kept &= gate
    weight = torch.where(kept, weight, 0.0)
    unclipped = within if config.log_ratio_clip is not None and config.log_ratio_clip_mode == "clip" else None
    return GateResult(weights=weight, keep=kept, keep_rates=_keep_rates(keep_mask, gates, kept, unclipped),
                      log_ratio=clipped)


class _GateInputs:
    """`need(name, tensor, gate)`: a configured gate's input, checked (present, the mask's leading shape, floating,
    finite) or a MathInputError naming it."""

    def __init__(self, leading: tuple[int, ...]) -> None:
        self.leading = leading

    def __call__(self, name: str, tensor: Optional[torch.Tensor], gate: str, vocab: bool = False) -> torch.Tensor:
        if tensor is None:
            raise MathInputError(f"{name}: the {gate} gate is configured but {name} was not given")
        shape = tuple(tensor.shape[:-1]) if vocab else tuple(tensor.shape)
        if shape != self.leading:
            raise MathInputError(f"{name}: expected leading shape {self.leading} (the mask's), got "
                                 f"{tuple(tensor.shape)}")
        require_floating(name, tensor)
        require_finite(name, tensor)
        return tensor


def _distribution_gates(config: GateConfig, need: _GateInputs, *, teacher_logits: Optional[torch.Tensor],
                        teacher_topk_logprobs: Optional[torch.Tensor], student_logits: Optional[torch.Tensor],
                        student_temperature: float, teacher_temperature: float,
                        teacher_confidence: Optional[torch.Tensor], teacher_entropy: Optional[torch.Tensor],
                        student_entropy: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gates read from the teacher's or the student's distribution (confidence, entropies), each from its
    per-position statistic when given (vocab-parallel callers), else from the logits."""
    gates: dict[str, torch.Tensor] = {}
    if config.teacher_confidence is not None:
        if teacher_confidence is not None:
            gates["teacher_confidence"] = need("teacher_confidence", teacher_confidence,
                                               "teacher_confidence") >= config.teacher_confidence
        elif teacher_logits is not None:
            gates["teacher_confidence"] = teacher_confidence_gate(
                config.teacher_confidence, teacher_temperature=teacher_temperature,
                teacher_logits=need("teacher_logits", teacher_logits, "teacher_confidence", vocab=True))
        else:
            gates["teacher_confidence"] = teacher_confidence_gate(
                config.teacher_confidence,
                teacher_topk_logprobs=need("teacher_topk_logprobs", teacher_topk_logprobs, "teacher_confidence",
                                           vocab=True))
    if config.teacher_entropy is not None and teacher_entropy is not None:
        gates["teacher_entropy"] = need("teacher_entropy", teacher_entropy, "teacher_entropy") <= config.teacher_entropy
    elif config.teacher_entropy is not None:
        gates["teacher_entropy"] = teacher_entropy_gate(
            need("teacher_logits", teacher_logits, "teacher_entropy", vocab=True), config.teacher_entropy,
            teacher_temperature)
    if config.student_entropy is not None and student_entropy is not None:
        values = need("student_entropy", student_entropy, "student_entropy")
        gates["student_entropy"] = values >= config.student_entropy if config.student_entropy_keep == "high" \
            else values <= config.student_entropy
    elif config.student_entropy is not None:
        gates["student_entropy"] = student_entropy_gate(
            need("student_logits", student_logits, "student_entropy", vocab=True), config.student_entropy,
            config.student_entropy_keep, student_temperature)
    return gates


def _keep_rates(keep_mask: torch.Tensor, gates: dict[str, torch.Tensor], kept: torch.Tensor,
                unclipped: Optional[torch.Tensor]) -> dict[str, float]:
    """Each gate's share of the masked-in tokens it keeps, and "all" (the product's); under the clip mode of the
    log-ratio gate, the share left unclipped (nothing is dropped)."""
    total = int(keep_mask.sum())

    def rate(gate: torch.Tensor) -> float:
        return int((gate & keep_mask).sum()) / total if total else 0.0

    keep_rates = {name: rate(gate) for name, gate in gates.items()}
    if unclipped is not None:
        keep_rates["log_ratio_clip"] = rate(unclipped)
    keep_rates["all"] = rate(kept)
    return keep_rates
