"""The OPD objective of one micro-batch on the student's last pipeline stage, from TP-sharded logits.

`OpdObjective.micro_batch_loss(logits_shard [B, S, V/tp], mb)` returns `(loss_sum, token_count, stats)` in
megatron's per-token-loss contract: the schedule sums `loss_sum` and `token_count` over micro-batches and
data-parallel ranks and divides the gradients by the total count. The normaliser of the spec (token mean, sequence
mean, constant) is folded into per-token coefficients `mb.loss_weights` computed for the whole global batch
(`normalizer_weights`), so every normaliser comes out exact whatever the micro-batching:
`loss = sum_t c_t l_t / N` with `c_t = N * (1/Z)_t`.

Routes (docs/opd-math.md, "The loss of one step"):
- `divergence` (route A): FKL / RKL / JSD(beta) / skew KLs / TV per position, on the full vocabulary from the
  teacher's logits shard, or on a top-k / union support (dense shard or a server's sparse answer).
- `policy_gradient` (route B): `r_t = log q(y_t) - log pi(y_t)` (no gradient), credit `A_t` by the configured
  estimator (rows are whole inside a micro-batch, so returns and GAE need nothing from other micro-batches; group
  and batch baselines take `mb.advantages` computed beforehand on the whole batch), optional verifier hybrid, then
  the log-prob or PPO-ratio loss.
- `cr_opd`: route B's advantages with CR-OPD routing of negative advantages.
Gates multiply into w_t; an entropy bonus is optional. Nothing here gathers the vocabulary: every vocabulary sum
is a vocab-parallel op of `opd_megatron.parallel`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from megatron.core import parallel_state

from opd_megatron.config import OpdSection, TeacherSection
from opd_megatron.math.credit import advantages as credit_advantages
from opd_megatron.math.credit import gae_advantages, outcome_hybrid
from opd_megatron.math.gates import clip_log_ratio, token_weights
from opd_megatron.math.policy_gradient import policy_gradient_loss
from opd_megatron.math.regularizers import reference_kl
from opd_megatron.math.supports import SparseTeacherLogprobs, divergence_on_support
from opd_megatron.parallel import divergences as vp
from opd_megatron.parallel.cr_opd import vocab_parallel_cr_opd_loss
from opd_megatron.parallel.diagnostics import (vocab_parallel_student_mass_on_teacher_support,
                                               vocab_parallel_teacher_confidence, vocab_parallel_topk_overlap)
from opd_megatron.parallel.supports import vocab_parallel_build_support
from opd_megatron.parallel.finite import nonfinite_on_any_tp_rank
from opd_megatron.parallel.topk import vocab_parallel_topk, vocab_shard_range
from opd_megatron.rollout.batch import RolloutBatch
from opd_megatron.teachers.base import NonFiniteTeacherError, Teacher, TeacherScores

_DIVERGENCES = {"reverse_kl": vp.vocab_parallel_reverse_kl, "forward_kl": vp.vocab_parallel_forward_kl,
                "tv": vp.vocab_parallel_total_variation}
_OVERLAP_K = 8


def normalizer_weights(mask: torch.Tensor, normalizer: str, total_tokens: float, total_sequences: float,
                       total_rows: float, max_new_tokens: int) -> torch.Tensor:
    """Per-token coefficients `c_t = N * (1/Z)_t` `[B, T]` for this rank's rows, from global counts: `N` masked
    tokens and `total_sequences` rows with a token over all data-parallel ranks, `total_rows` rows in all.
    token_mean: 1; sequence_mean: `N / (n_b * #sequences)`; constant: `N / (#rows * max_new_tokens)`, i.e.
    `Z = global batch rows x rollout.max_new_tokens`, the same on every rank and every step (Dr. GRPO's choice;
    docs/opd-math.md, "Normalisers") [Survey]. Never a rank's own padded length: that differs between ranks and
    steps."""
    mask = mask.float()
    if normalizer == "token_mean":
        return mask.clone()
    if normalizer == "sequence_mean":
        per_row = mask.sum(dim=1, keepdim=True).clamp_min(1.0)
        return mask * (total_tokens / (per_row * max(total_sequences, 1.0)))
    if normalizer == "constant":
        return mask * (total_tokens / (max(total_rows, 1.0) * max_new_tokens))
    raise ValueError(f"unknown normalizer {normalizer!r}")


@dataclass
class StudentInput:
    """One micro-batch as megatron's pipeline schedule reads it (`tokens`: the student's inputs `[B, L-1]`) with
    the rollout rows behind it, which the loss reads."""
    tokens: torch.Tensor
    rollout: RolloutBatch

    @staticmethod
    def of(batch: RolloutBatch, micro_batch_size: int) -> list["StudentInput"]:
        """`batch` in micro-batches of `micro_batch_size` rows, in row order."""
        return [StudentInput(tokens=mb.input_tokens, rollout=mb) for mb in batch.micro_batches(micro_batch_size)]


@dataclass
class MicroBatchStats:
    """Detached per-token tensors `[B, S]` and counters of one micro-batch, for the step's diagnostics."""
    mask: torch.Tensor
    log_ratio: Optional[torch.Tensor]          # None on a step without diagnostics whose loss does not read it
    student_logprobs: Optional[torch.Tensor]
    old_logprobs: Optional[torch.Tensor] = None     # pi_theta_old(y_t) under the loss's distribution
    advantages: Optional[torch.Tensor] = None
    per_token_loss: Optional[torch.Tensor] = None
    rkl_exact: Optional[torch.Tensor] = None
    student_entropy: Optional[torch.Tensor] = None
    teacher_entropy: Optional[torch.Tensor] = None
    top1_match: Optional[torch.Tensor] = None
    topk_overlap: Optional[torch.Tensor] = None
    mass_on_teacher: Optional[torch.Tensor] = None
    routing: Optional[object] = None
    gate_keep: dict = field(default_factory=dict)
    pg: dict = field(default_factory=dict)
    values: Optional[torch.Tensor] = None
    value_targets: Optional[torch.Tensor] = None
    value_loss_sum: float = 0.0
    reference_kl: Optional[torch.Tensor] = None
    freed_mass: Optional[torch.Tensor] = None              # route B, A_t < 0: the logit-gradient mass taken from y_t
    freed_mass_on_support: Optional[torch.Tensor] = None   # the part of it given to the teacher's top-k
    nonfinite: bool = False       # NaN/inf logits (student or teacher): this micro-batch contributed nothing

    def diagnostic_tensors(self) -> dict[str, Optional[torch.Tensor]]:
        """The per-token tensors `[B, S]` the step's diagnostics read, by name (None where not measured)."""
        return {"mask": self.mask, "log_ratio": self.log_ratio, "student_logprobs": self.student_logprobs,
                "old_logprobs": self.old_logprobs, "advantages": self.advantages, "values": self.values,
                "value_targets": self.value_targets, "rkl_exact": self.rkl_exact,
                "student_entropy": self.student_entropy, "teacher_entropy": self.teacher_entropy,
                "top1_match": self.top1_match, "topk_overlap": self.topk_overlap,
                "mass_on_teacher": self.mass_on_teacher, "reference_kl": self.reference_kl,
                "freed_mass": self.freed_mass, "freed_mass_on_support": self.freed_mass_on_support}


class OpdObjective:
    """Builds the per-micro-batch loss from the run config. `teacher` scores micro-batches on the last stage
    when it gives dense logits (colocated, in-process); served teachers' scores arrive on `mb.teacher`."""

    def __init__(self, opd: OpdSection, teacher_cfg: TeacherSection, true_vocab_size: int,
                 teacher: Optional[Teacher] = None, value_head: Optional[torch.nn.Module] = None):
        self.opd = opd
        self.teacher_cfg = teacher_cfg
        self.vocab = true_vocab_size
        self.teacher = teacher
        self.value_head = value_head
        self.gates = opd.gates
        self.routing = opd.cr_opd
        self.dense_teacher = teacher is not None and teacher.gives_full_logits
        self._loss_is_full_rkl = (self.dense_teacher and opd.loss == "divergence" and opd.route_a.support == "full"
                                  and opd.route_a.divergence == "reverse_kl")
        # What reads the sampled tokens' log-ratio r_t (and pi(y_t)) besides the diagnostics: route B and CR-OPD
        # (the advantages), the gates on r_t or on pi / mu, and the reference-KL regulariser. A route A step that
        # is not logged skips it: a log-sum-exp over the vocabulary for the student and one for a dense teacher.
        gates = opd.gates
        self._loss_reads_log_ratio = (opd.loss != "divergence" or gates.sign is not None
                                      or gates.log_ratio_clip is not None or gates.truncated_is is not None
                                      or bool(opd.regularizers.reference_kl_coef))

    # -- the teacher's view of a micro-batch -------------------------------------------------------------------
    def teacher_scores(self, mb: RolloutBatch, logits_shard: torch.Tensor) -> TeacherScores:
        if mb.teacher is not None:
            return mb.teacher
        if self.teacher is None:
            raise RuntimeError("the micro-batch has no teacher scores and no in-loop teacher was given")
        scores = self.teacher.score(mb.teacher_request(topk=0))
        if scores.logits_shard is None:
            raise RuntimeError(f"{self.teacher.name} returned no logits; full-vocabulary losses need a colocated "
                               f"or in-process teacher")
        scores.logits_shard = _to_shard(scores.logits_shard, logits_shard.shape[-1]).to(logits_shard.device)
        return scores

    def teacher_token_logprobs(self, scores: TeacherScores, labels: torch.Tensor) -> torch.Tensor:
        """`log q(y_t)` `[B, S]` of the sampled tokens: from the logits shard (dense teachers, at the teacher
        temperature) or as served."""
        if scores.logits_shard is not None:
            return vp.vocab_parallel_token_logprobs(scores.logits_shard.detach(), labels, self.teacher_cfg.temperature,
                                                    self.vocab, chunk_size=self.opd.chunk_size)
        return scores.sampled_logprobs.to(labels.device)

    def credit_log_ratio(self, log_ratio: torch.Tensor) -> torch.Tensor:
        """`kappa * r_t` `[B, S]` as every credit estimator sees it (the loss and the whole-batch pre-pass alike):
        clamped to `[-c, c]` first under `opd.gates.log_ratio_clip_mode=clip` [Survey]."""
        gates = self.gates
        if gates.log_ratio_clip is not None and gates.log_ratio_clip_mode == "clip":
            log_ratio = clip_log_ratio(log_ratio, gates.log_ratio_clip)
        return log_ratio * self.opd.kl_coef

    def old_logprobs(self, mb: RolloutBatch, student_logp: torch.Tensor, staleness: int) -> torch.Tensor:
        """`log pi_theta_old(y_t)` `[B, S]`: the sampled tokens' log-probs at the weights that sampled them, under
        the loss's distribution (full softmax at opd.student_temperature). With fresh data (staleness 0) those are
        the current weights, so the current log-probs (detached) are used and the PPO ratio is exactly 1; stale
        data (teacher.overlap) needs the values the sampler recorded (`mb.old_logprobs`). docs/opd-math.md, Route B."""
        if staleness == 0:
            return student_logp.detach()
        if mb.old_logprobs is None:
            raise RuntimeError(f"the batch is {staleness} update(s) stale but carries no old_logprobs (the sampling "
                               f"weights' log-probs); the PPO ratio and the staleness correction need them")
        return mb.old_logprobs.to(student_logp.device)

    @property
    def credit_gamma(self) -> float:
        """The discount the configured estimator uses (return-to-go is gamma = 1 by definition)."""
        credit = self.opd.credit
        return credit.gamma if credit.estimator in ("discounted", "baseline", "single_step") else 1.0

    # -- the loss ------------------------------------------------------------------------------------------------
    def micro_batch_loss(self, logits_shard: torch.Tensor, mb: RolloutBatch, hidden: Optional[torch.Tensor] = None,
                         *, staleness: int, diagnostics: bool = True) -> tuple[torch.Tensor, torch.Tensor,
                                                                              MicroBatchStats]:
        """logits_shard `[B, S, V/tp]` (S = L - 1, with gradient), mb the micro-batch (`loss_weights` set).
        hidden `[B, S, H]` (detached final hidden states) is needed only by a value head. staleness: optimizer
        updates since the weights that sampled `mb` (0: fresh on-policy data). diagnostics: False on a step the run
        does not log: the per-token vocabulary statistics (entropies, top-k overlap, mass on the teacher's
        support, exact reverse KL; a pass over `[B, S, V/tp]` each) are not computed, nor the sampled tokens'
        log-ratios where the loss does not read them; the loss and its gradient are the same."""
        opd, vocab, chunk = self.opd, self.vocab, self.opd.chunk_size
        device = logits_shard.device
        mask = mb.loss_mask.to(device)
        keep = mask > 0
        coef = mb.loss_weights.to(device)
        labels = mb.labels.to(device)
        try:
            scores = self.teacher_scores(mb, logits_shard)
        except NonFiniteTeacherError:
            scores = None
        teacher_shard = None if scores is None else scores.logits_shard
        if scores is None or nonfinite_on_any_tp_rank(logits_shard, teacher_shard):
            # NaN/inf logits: contribute a zero loss with a zero gradient, keeping every rank of the pipeline and
            # of the TP group in step; the loop sees the flag and skips (or stops) the whole optimizer step.
            zeros = torch.zeros_like(mask)
            stats = MicroBatchStats(mask=mask.detach(), log_ratio=zeros, student_logprobs=zeros, nonfinite=True)
            return torch.nan_to_num(logits_shard, 0.0, 0.0, 0.0).sum() * 0.0, mask.sum(), stats
        tau_s = opd.student_temperature
        if teacher_shard is not None:
            teacher_shard = teacher_shard.detach()
        sparse = None if teacher_shard is not None else _sparse_teacher(scores, keep)
        student_logp = log_ratio = old_logp = None
        if diagnostics or self._loss_reads_log_ratio:
            teacher_logp = torch.where(keep, self.teacher_token_logprobs(scores, labels), 0.0)
            student_logp = vp.vocab_parallel_token_logprobs(logits_shard, labels, tau_s, vocab, chunk_size=chunk)
            log_ratio = torch.where(keep, teacher_logp - student_logp.detach(), 0.0)
            sampled = mb.behaviour_logprobs is not None and bool(mb.on_policy.all())
            old_logp = torch.where(keep, self.old_logprobs(mb, student_logp, staleness), 0.0) if sampled else None
        stats = MicroBatchStats(mask=mask.detach(), log_ratio=None if log_ratio is None else log_ratio.detach(),
                                student_logprobs=None if student_logp is None else student_logp.detach(),
                                old_logprobs=old_logp)

        if diagnostics:
            with torch.no_grad():
                self._vocab_diagnostics(stats, logits_shard, teacher_shard, sparse, labels, keep)
        weights = self._token_weights(mb, mask, log_ratio, student_logp, old_logp, logits_shard, teacher_shard,
                                      sparse, stats) * coef

        if opd.loss == "divergence":
            per_token = self._divergence(logits_shard, teacher_shard, sparse) * opd.kl_coef
            # Unscored columns hold filler (or padding's -inf) values: select, never multiply, them away.
            per_token = torch.where(keep, per_token, 0.0)
            loss_sum = (per_token * weights).sum()
            stats.per_token_loss = per_token.detach()
            if self._loss_is_full_rkl:
                stats.rkl_exact = stats.per_token_loss / opd.kl_coef
        else:
            loss_sum = self._route_b_loss(logits_shard, mb, log_ratio, student_logp, old_logp, teacher_shard, sparse,
                                          weights, stats, hidden)
            if diagnostics:
                self._freed_mass(stats, logits_shard, teacher_shard, sparse, labels, stats.advantages, keep)
        loss_sum = self._added_terms(loss_sum, logits_shard, mb, student_logp, teacher_shard, weights, stats)
        return loss_sum, mask.sum(), stats

    def _token_weights(self, mb: RolloutBatch, mask: torch.Tensor, log_ratio: Optional[torch.Tensor],
                       student_logp: Optional[torch.Tensor], old_logp: Optional[torch.Tensor],
                       logits_shard: torch.Tensor, teacher_shard: Optional[torch.Tensor],
                       sparse: Optional[SparseTeacherLogprobs], stats: MicroBatchStats) -> torch.Tensor:
        """The gates' per-token weights `w_t` `[B, S]` (their keep rates go to `stats`)."""
        opd = self.opd
        # Truncated IS corrects what the PPO ratio does not (docs/opd-math.md, Route B): with
        # opd.policy_gradient.ratio=ppo the ratio carries pi_theta / pi_theta_old, so the weight is the sampler
        # mismatch pi_theta_old / mu; otherwise the weight is the whole pi_theta / mu (staleness and sampler
        # mismatch). Never both: that weighs by rho^2.
        is_numerator = old_logp if self._ppo else None if student_logp is None else student_logp.detach()
        behaviour = None if mb.behaviour_logprobs is None else mb.behaviour_logprobs.to(mask.device)
        gate = token_weights(self.gates, mask, log_ratio=log_ratio,
                             teacher_topk_logprobs=None if sparse is None else sparse.logprobs,
                             student_logprobs=is_numerator, behaviour_logprobs=behaviour,
                             student_temperature=opd.student_temperature,
                             teacher_temperature=self.teacher_cfg.temperature,
                             **self._gate_inputs(stats, logits_shard, teacher_shard, mask > 0))
        stats.gate_keep = {k: v for k, v in gate.keep_rates.items()}
        return gate.weights

    @property
    def _ppo(self) -> bool:
        return self.opd.loss == "policy_gradient" and self.opd.policy_gradient.ratio == "ppo"

    def _route_b_loss(self, logits_shard: torch.Tensor, mb: RolloutBatch, log_ratio: torch.Tensor,
                      student_logp: torch.Tensor, old_logp: Optional[torch.Tensor],
                      teacher_shard: Optional[torch.Tensor], sparse: Optional[SparseTeacherLogprobs],
                      weights: torch.Tensor, stats: MicroBatchStats, hidden: Optional[torch.Tensor]) -> torch.Tensor:
        """Route B (policy_gradient) and CR-OPD: the advantages from `kappa r_t`, the loss summed over tokens, plus
        the value head's loss."""
        opd, pg_cfg = self.opd, self.opd.policy_gradient
        mask = mb.loss_mask.to(logits_shard.device)
        adv, value_loss = self._advantages(mb, self.credit_log_ratio(log_ratio), mask, stats, hidden)
        stats.advantages = adv
        if opd.loss == "policy_gradient":
            # PPO ratio pi_theta / pi_theta_old, both under the loss's distribution: 1 on fresh data.
            loss_mean, pg = policy_gradient_loss(
                student_logp, adv, mask, old_logp=old_logp if self._ppo else None, weights=weights,
                normalizer="token_mean", clip_eps_low=pg_cfg.clip_eps_low, clip_eps_high=pg_cfg.clip_eps_high,
                dual_clip=pg_cfg.dual_clip)
            loss_sum = loss_mean * mask.sum()
            stats.pg = {k: float(v) for k, v in asdict(pg).items() if isinstance(v, (int, float, torch.Tensor))
                        and (not isinstance(v, torch.Tensor) or v.numel() == 1)}
        else:
            per_token, routing_stats = vocab_parallel_cr_opd_loss(
                logits_shard, mb.labels.to(logits_shard.device), adv, mask, teacher_logits_shard=teacher_shard,
                teacher_topk_ids=None if sparse is None else sparse.ids,
                teacher_topk_logprobs=None if sparse is None else sparse.logprobs,
                config=self.routing, student_temperature=opd.student_temperature,
                teacher_temperature=self.teacher_cfg.temperature, true_vocab_size=self.vocab)
            loss_sum = (torch.where(mask > 0, per_token, 0.0) * weights).sum()
            stats.routing = routing_stats
        if value_loss is not None:
            stats.value_loss_sum = float(value_loss.detach())
            loss_sum = loss_sum + opd.credit.value_coef * value_loss
        return loss_sum

    @torch.no_grad()
    def _freed_mass(self, stats: MicroBatchStats, student: torch.Tensor, teacher: Optional[torch.Tensor],
                    sparse: Optional[SparseTeacherLogprobs], labels: torch.Tensor, adv: torch.Tensor,
                    keep: torch.Tensor) -> None:
        """Where the mass a negative advantage takes from `y_t` goes, per token `[B, S]` (docs/opd-math.md,
        "Vocabulary routing"): the logit gradient of `-A_t log pi(y_t)` is `|A_t| (e_{y_t} - pi)`, so descent takes
        `|A_t| (1 - pi(y_t))` from `z_{y_t}` and gives each other token `|A_t| pi_v`; the part given to the teacher's
        support `S` (its top `opd.cr_opd.teacher_top_k`, CR-OPD's `Supp_T`) is `|A_t| (pi(S) - pi(y_t) [y_t in S])`.
        Where CR-OPD routed (`A_t < 0`, `C_t` non-empty), all of it (its routed mass) goes to `C_t`, inside `S`.
        Not measured for a threshold support (`opd.cr_opd.teacher_support=threshold`)."""
        routing = self.routing
        k = min(routing.teacher_top_k, self.vocab if teacher is not None else sparse.ids.shape[-1])
        if routing.teacher_support != "topk" or k < 1:
            return
        reference = teacher if teacher is not None else sparse
        mass_on_support = vocab_parallel_student_mass_on_teacher_support(
            student.detach(), reference, k, self.opd.student_temperature, self.vocab).to(adv.dtype)
        if teacher is not None:
            support_ids = vocab_parallel_topk(teacher, k, self.vocab)[1]
        else:
            support_ids = sparse.ids.gather(-1, sparse.logprobs.topk(k, dim=-1).indices)
        sampled_in_support = (support_ids == labels.unsqueeze(-1)).any(dim=-1)
        pi_sampled = stats.student_logprobs.exp().to(adv.dtype)
        negative = keep & (adv < 0)
        freed = torch.where(negative, adv.abs() * (1.0 - pi_sampled), 0.0)
        on_support = adv.abs() * (mass_on_support - torch.where(sampled_in_support, pi_sampled, 0.0))
        on_support = torch.where(negative, on_support.clamp(min=0.0), 0.0)
        if stats.routing is not None:
            routed = stats.routing.routed.bool() & negative
            moved = stats.routing.routed_mass.to(adv.dtype)
            freed = torch.where(routed, moved, freed)
            on_support = torch.where(routed, moved, on_support)
        stats.freed_mass, stats.freed_mass_on_support = freed, on_support

    def _added_terms(self, loss_sum: torch.Tensor, logits_shard: torch.Tensor, mb: RolloutBatch,
                     student_logp: torch.Tensor, teacher_shard: Optional[torch.Tensor], weights: torch.Tensor,
                     stats: MicroBatchStats) -> torch.Tensor:
        """`loss_sum` plus the terms any route may add, in this order: MiniLLM's single-step term, the entropy
        bonus, the KL to the frozen reference."""
        opd, reg, vocab, chunk = self.opd, self.opd.regularizers, self.vocab, self.opd.chunk_size
        tau_s = opd.student_temperature
        keep = mb.loss_mask.to(logits_shard.device) > 0
        if opd.loss != "divergence" and opd.credit.estimator == "single_step":
            # MiniLLM's single-step decomposition: the PG term above carries the future (gamma G_(t+1)); the step-t
            # term is the exact reverse KL over the vocabulary at the visited state [MiniLLM].
            step_term = vp.vocab_parallel_reverse_kl(logits_shard, teacher_shard, student_temperature=tau_s,
                                                     teacher_temperature=self.teacher_cfg.temperature,
                                                     true_vocab_size=vocab, chunk_size=chunk)
            loss_sum = loss_sum + opd.kl_coef * (torch.where(keep, step_term, 0.0) * weights).sum()
        if reg.entropy_coef:
            entropy = vp.vocab_parallel_entropy(logits_shard, tau_s, vocab, chunk_size=chunk)
            loss_sum = loss_sum - reg.entropy_coef * (entropy * weights).sum()
        if reg.reference_kl_coef:
            ref = mb.reference_logprobs.to(logits_shard.device)
            per_token = reference_kl(torch.where(keep, student_logp, 0.0), torch.where(keep, ref, 0.0),
                                     reg.reference_kl_estimator)
            stats.reference_kl = torch.where(keep, per_token.detach(), 0.0)
            loss_sum = loss_sum + reg.reference_kl_coef * (torch.where(keep, per_token, 0.0) * weights).sum()
        return loss_sum

    def _divergence(self, student: torch.Tensor, teacher: Optional[torch.Tensor],
                    sparse: Optional[SparseTeacherLogprobs]) -> torch.Tensor:
        opd, a = self.opd, self.opd.route_a
        tau_s, tau_t = opd.student_temperature, self.teacher_cfg.temperature
        kind = {"jsd": "generalized_jsd", "tv": "total_variation"}.get(a.divergence, a.divergence)
        if a.support == "full":
            common = dict(student_temperature=tau_s, teacher_temperature=tau_t, true_vocab_size=self.vocab,
                          chunk_size=opd.chunk_size)
            if a.divergence == "jsd":
                return vp.vocab_parallel_generalized_jsd(student, teacher, a.jsd_beta, **common)
            if a.divergence == "skew_forward_kl":
                return vp.vocab_parallel_skew_forward_kl(student, teacher, a.skew_alpha, **common)
            if a.divergence == "skew_reverse_kl":
                return vp.vocab_parallel_skew_reverse_kl(student, teacher, a.skew_alpha, **common)
            return _DIVERGENCES[a.divergence](student, teacher, **common)
        supported = vocab_parallel_build_support(
            student, teacher if teacher is not None else sparse, a.support, a.support_k, a.support_mode,
            student_temperature=tau_s, teacher_temperature=tau_t if teacher is not None else 1.0,
            true_vocab_size=self.vocab, chunk_size=opd.chunk_size, keep_softmax=True)
        beta = a.jsd_beta if a.divergence == "jsd" else None
        alpha = a.skew_alpha if a.divergence.startswith("skew") else None
        return divergence_on_support(kind, supported, beta=beta, alpha=alpha)

    def _advantages(self, mb: RolloutBatch, log_ratio: torch.Tensor, mask: torch.Tensor, stats: MicroBatchStats,
                    hidden: Optional[torch.Tensor]):
        """`A_t` `[B, S]` of the micro-batch from `kappa r_t` (`credit_log_ratio`), and the value head's loss.
        Group / batch baselines arrive precomputed on the whole batch (`mb.advantages`); the outcome term
        `R - b_R` too (`mb.outcome_advantages`): a micro-batch may split a group."""
        opd, credit = self.opd, self.opd.credit
        value_loss = None
        values = None
        if self.value_head is not None:
            if hidden is None:
                raise RuntimeError("the value head needs the final hidden states")
            values = self.value_head(hidden.detach().float()).squeeze(-1) * mask
        if mb.advantages is not None:                    # computed on the whole batch (group / batch baselines)
            adv = mb.advantages.to(log_ratio.device)
        elif credit.estimator == "gae":
            out = gae_advantages(log_ratio, mask, values.detach(), gamma=credit.gamma, lam=credit.gae_lambda)
            adv = out.advantages
            targets = out.value_targets
            value_loss = 0.5 * (((values - targets.detach()) ** 2) * mask).sum()
            stats.values, stats.value_targets = values.detach(), targets.detach()
        else:
            kwargs = {}
            if credit.baseline == "reverse_kl":
                # b(s_t) = -kappa RKL_t: the baseline is in the units of the scaled reward kappa r_t [vOPD].
                kwargs["reverse_kl"] = stats.rkl_exact * opd.kl_coef
            if credit.baseline == "value":
                kwargs["values"] = values.detach()
                returns = credit_advantages(log_ratio, mask, "discounted", gamma=credit.gamma)
                value_loss = 0.5 * (((values - returns) ** 2) * mask).sum()
                stats.values, stats.value_targets = values.detach(), returns
            if credit.estimator == "single_step":
                kwargs["length_normalized"] = credit.length_normalized
            adv = credit_advantages(log_ratio, mask, credit.estimator, self.credit_gamma, baseline=credit.baseline,
                                    **kwargs)
        if credit.outcome_beta:
            if mb.outcome_advantages is None:
                raise RuntimeError("opd.credit.outcome_beta > 0 needs the batch's centred rewards "
                                   "(outcome_advantages), computed on the whole batch before the micro-batches")
            # A_t = alpha A_t^OPD + beta (R - b_R), with R - b_R from the whole batch [Survey].
            adv = outcome_hybrid(adv, mask, mb.outcome_advantages.to(adv.device), credit.outcome_alpha,
                                 credit.outcome_beta, reward_baseline="none")
        return adv.detach(), value_loss

    def _gate_inputs(self, stats: MicroBatchStats, student: torch.Tensor, teacher: Optional[torch.Tensor],
                     keep: torch.Tensor) -> dict:
        """Per-position vocabulary statistics for the gates, from the shards (never a `[..., V]` tensor): the
        diagnostics' entropies where this step computed them, else their own (a step the run does not log)."""
        g, out = self.gates, {}
        chunk = self.opd.chunk_size
        if g.teacher_confidence is not None and teacher is not None:
            out["teacher_confidence"] = vocab_parallel_teacher_confidence(teacher, self.teacher_cfg.temperature,
                                                                          self.vocab)
        with torch.no_grad():
            if g.teacher_entropy is not None:
                if stats.teacher_entropy is None and teacher is not None:
                    stats.teacher_entropy = torch.where(keep, vp.vocab_parallel_entropy(
                        teacher, self.teacher_cfg.temperature, self.vocab, chunk_size=chunk), 0.0)
                out["teacher_entropy"] = stats.teacher_entropy
            if g.student_entropy is not None:
                if stats.student_entropy is None:
                    stats.student_entropy = torch.where(keep, vp.vocab_parallel_entropy(
                        student.detach(), self.opd.student_temperature, self.vocab, chunk_size=chunk), 0.0)
                out["student_entropy"] = stats.student_entropy
        return out

    @torch.no_grad()
    def _vocab_diagnostics(self, stats: MicroBatchStats, student, teacher, sparse, labels, keep) -> None:
        vocab, tau_s, tau_t = self.vocab, self.opd.student_temperature, self.teacher_cfg.temperature
        zero = lambda x: torch.where(keep, x, 0.0)  # noqa: E731
        stats.student_entropy = zero(vp.vocab_parallel_entropy(student.detach(), tau_s, vocab,
                                                               chunk_size=self.opd.chunk_size))
        if teacher is not None and not self._loss_is_full_rkl:     # otherwise the loss itself is the exact RKL
            stats.rkl_exact = zero(vp.vocab_parallel_reverse_kl(student.detach(), teacher, student_temperature=tau_s,
                                                                teacher_temperature=tau_t, true_vocab_size=vocab,
                                                                chunk_size=self.opd.chunk_size))
        if teacher is not None:
            stats.teacher_entropy = zero(vp.vocab_parallel_entropy(teacher, tau_t, vocab,
                                                                   chunk_size=self.opd.chunk_size))
            top1 = vocab_parallel_topk(teacher, 1, vocab)[1][..., 0]
            reference = teacher
        else:
            top1 = sparse.ids[..., 0] if sparse.ids.shape[-1] else None
            reference = sparse if sparse.ids.shape[-1] >= _OVERLAP_K else None
        if top1 is not None:
            stats.top1_match = zero((top1 == labels).float())
        if reference is not None:
            stats.topk_overlap = zero(vocab_parallel_topk_overlap(student.detach(), reference, _OVERLAP_K, vocab))
            stats.mass_on_teacher = zero(vocab_parallel_student_mass_on_teacher_support(
                student.detach(), reference, _OVERLAP_K, tau_s, vocab))


def _to_shard(logits: torch.Tensor, shard_width: int) -> torch.Tensor:
    """A dense teacher's logits: already this rank's shard (colocated), or the full vocabulary (an in-process
    model at TP=1 semantics): then pad to tp x shard with -inf and take this rank's columns."""
    if logits.shape[-1] == shard_width:
        return logits
    tp = parallel_state.get_tensor_model_parallel_world_size()
    padded = tp * shard_width
    if logits.shape[-1] > padded:
        raise RuntimeError(f"teacher logits have {logits.shape[-1]} columns, more than the student's padded "
                           f"vocabulary {padded}")
    if logits.shape[-1] < padded:
        filler = logits.new_full(logits.shape[:-1] + (padded - logits.shape[-1],), float("-inf"))
        logits = torch.cat([logits, filler], dim=-1)
    start, end = vocab_shard_range(shard_width)
    return logits[..., start:end]


def _sparse_teacher(scores: TeacherScores, keep: torch.Tensor) -> SparseTeacherLogprobs:
    """A served teacher's answer as the math's sparse teacher: its top-k, and, when the loop asked for them
    (student_topk / union supports), its log-probs on the student's top-k ids, which are also the ids the loss's
    student top-k is taken from (`SparseTeacherLogprobs.student_ids`: the loop ranked them with the weights of
    this step, or one update earlier with teacher.overlap). Unscored columns get a harmless uniform filler
    (distinct ids 0..k-1 and 0..e-1, each log(1/(k+e+1)), so any support there leaves the tail bucket a positive
    mass) so the math's checks hold there; they are selected out of every sum."""
    device, valid = keep.device, keep.unsqueeze(-1)
    k = 0 if scores.topk_ids is None else scores.topk_ids.shape[-1]
    e = 0 if scores.extra_ids is None else scores.extra_ids.shape[-1]
    filler = -math.log(k + e + 1)

    def filled(ids: torch.Tensor, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, logprobs = ids.to(device).long(), logprobs.to(device)
        return (torch.where(valid, ids, torch.arange(ids.shape[-1], device=device).expand_as(ids)),
                torch.where(valid, logprobs, torch.full_like(logprobs, filler)))

    if k:
        ids, logprobs = filled(scores.topk_ids, scores.topk_logprobs)
    else:
        ids = torch.zeros(keep.shape + (0,), dtype=torch.long, device=device)
        logprobs = ids.float()
    if not e:
        return SparseTeacherLogprobs(ids=ids, logprobs=logprobs)
    extra_ids, extra_logprobs = filled(scores.extra_ids, scores.extra_logprobs)
    return SparseTeacherLogprobs(ids=ids, logprobs=logprobs, extra_ids=extra_ids, extra_logprobs=extra_logprobs,
                                 student_ids=extra_ids)
