"""Vocab-parallel twin of `math/cr_opd.py::cr_opd_loss` (CR-OPD) on tensor-parallel-sharded logits, never gathering
the vocabulary. [Ours, after Survey]: the loss and its definitions are the reference's; this file only shards it.
Both routed forms (`RoutingConfig.form`): "matched" (default), `L_t = |A_t| (1 - sg pi(y_t)) sum_{v in C_t}
rho_t(v) (z_{y_t} - z_v)` (= `... [log pi(y_t) - sum_C rho log pi(v)]`), and "kl_target", the restricted
`|A_t| sg(P_t) KL(p~^S_t || pi^S_t)`; the plain PG term where `A_t >= 0` or `C_t` is empty.

Layout and gradient convention as in `shard.py`: TP rank `r` holds logits `[N, V/tp]` for the padded ids
`[r * V/tp, (r + 1) * V/tp)`; ids `>= true_vocab_size` are padding (-inf, never a member of any set, zero
gradient). Every result is replicated on the TP ranks; the gradient reaching each rank's shard is that of the one
(replicated) loss wrt the shard.

Two implementations of the same loss (equal value, gradient and statistics, both held to the reference):
- on ids (`_routed_rows_on_ids`: teacher top-k support, student top-k or top-p reach, the default config): the
  sets are lists of global ids (replicated), `S_t` has at most `teacher_top_k + 1` members, and the only passes
  over `[N, V/tp]` (chunk by chunk, into one reused buffer) are the two normalisers, the two distributed top-k
  selections and the student normaliser's softmax in backward. The student is read differentiably once, by
  `_NormalizerAndLogits`: its normaliser and its logits at `[y_t, teacher top-k]` (`[N, k + 1]`, owner's entry
  all-reduced), with a closed-form backward that writes the softmax and scatters the `k + 1` entries' gradients
  into the same buffer; everything else is `[N, k]`. A top-p nucleus is found on a top-k widened until it holds
  it: cheap for a peaked student, up to a full sort for a near-uniform one.
- on masks (`_routed_rows`: a threshold support or reach, whose sets are not bounded by a k), described below.

How each piece is formed on masks:
- membership masks are local `[N, V/tp]` booleans. Thresholds read local probabilities built from the
  all-reduced normalisers; top-k sets come from `topk.vocab_parallel_topk` (global ids, replicated), scattered to
  the owning ranks; the student nucleus from `topk.vocab_parallel_top_p_mask` on a top-k that is widened until
  it holds the nucleus (so it is exact, whatever `student_top_k`); a sparse teacher answer is replicated, each
  rank keeps the ids it owns.
- `C_t = Supp_T & Reach_S` minus `y_t`, local. `|C_t|`, the routing weights' normaliser over `C_t`,
  `P_t = sum_S pi`, `pi(y_t)`, `pi^S(y_t)` and the logsumexp over `S_t` are `[N]` all-reduces.
- matched: `sum_C rho (z_y - z_v)` is a per-rank partial sum over this rank's members of `C_t`, all-reduced by
  `ReduceFromTP`; the replicated `z_{y_t}` (the owner's entry, all-reduced) enters the per-rank terms through
  `CopyToTP`, so the owner's column of `y_t` receives `|A_t| (1 - pi(y_t))` and each rank's members of `C_t`
  `-|A_t| (1 - pi(y_t)) rho_t(v)`, every other column exactly 0.
- kl_target: the restricted KL over `S_t` is a per-rank partial sum, all-reduced by `ReduceFromTP`; the
  logsumexp over `S_t` is replicated and enters the per-rank terms through `CopyToTP`, so each rank's shard
  receives `|A_t| (pi_v - p~_v)` on its own members of `S_t` and exactly 0 elsewhere (the terms read only `z_S`).
- the fallback `-A_t log pi(y_t)` uses the full-vocabulary logsumexp (partial exp-sums all-reduced) and the
  owning rank's `z_{y_t}`.
Communication: `[N]`-sized all-reduces and the top-k all-gathers (`[tp, N, k]`); nothing of size V.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from opd_megatron.math.checks import MathInputError, require_floating, require_positive, require_positive_int
from opd_megatron.math.cr_opd import RoutingConfig, RoutingStats
from opd_megatron.math.divergences import compute_dtype
from opd_megatron.parallel.shard import (CopyToTP, ReduceFromTP, Shard, check_inputs, chunked_rows,
                                         debug_checks_enabled, flatten_rows, ids_outside, masked_logsumexp,
                                         row_chunks, row_pieces, token_mask, values_at_ids)
from opd_megatron.parallel.supports import ChunkedGradient, support_statistics
from opd_megatron.parallel.topk import (scatter_sparse_to_shards, top_p_mask_on_candidates, vocab_parallel_top_p_mask,
                                        vocab_parallel_topk)


def _local_mask(shard: Shard, ids: torch.Tensor, chosen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean `[N, V/tp]`: this rank's columns among the global `ids [N, k]` (only where `chosen` is set).
    Entries this rank does not own are written to a scratch column that is dropped."""
    local = ids - shard.start
    owned = (local >= 0) & (local < shard.width)
    if chosen is not None:
        owned &= chosen
    members = torch.zeros(ids.shape[0], shard.width + 1, dtype=torch.bool, device=ids.device)
    members.scatter_(-1, torch.where(owned, local, shard.width), True)
    return members[:, :shard.width]


def _teacher_support(shard: Shard, config: RoutingConfig, keep: torch.Tensor, *,
                     teacher_logits: Optional[torch.Tensor], teacher_topk_ids: Optional[torch.Tensor],
                     teacher_topk_logprobs: Optional[torch.Tensor], teacher_temperature: float,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Local `Supp_T [N, V/tp]` and teacher log-probs `[N, V/tp]` (-inf off the sparse answer and on padding),
    as `math/cr_opd.py::teacher_support`."""
    if teacher_logits is not None:
        raw = torch.where(keep.unsqueeze(-1), teacher_logits, 0.0)
        scaled = shard.scaled(raw, teacher_temperature, dtype)
        logq = scaled - masked_logsumexp(shard, scaled, torch.ones_like(scaled, dtype=torch.bool)).unsqueeze(-1)
        if config.teacher_support == "topk":
            _, top = vocab_parallel_topk(raw.to(dtype) / teacher_temperature, config.teacher_top_k,
                                         shard.true_vocab_size, shard.group)
            support = _local_mask(shard, top)
    else:
        ids = torch.where(keep.unsqueeze(-1), teacher_topk_ids, 0).long()
        owned = scatter_sparse_to_shards(ids, teacher_topk_logprobs, shard.start, shard.start + shard.width,
                                         shard.true_vocab_size)
        logq = torch.full((ids.shape[0], shard.width + 1), -math.inf, dtype=dtype, device=ids.device)
        logq.scatter_(-1, torch.where(owned.owned, owned.local_positions, shard.width),
                      teacher_topk_logprobs.to(dtype))
        logq = logq[:, :shard.width]
        if config.teacher_support == "topk":
            chosen = teacher_topk_logprobs.topk(config.teacher_top_k, dim=-1).indices
            support = _local_mask(shard, ids.gather(-1, chosen))
    if config.teacher_support == "threshold":
        support = logq >= math.log(config.teacher_min_prob)
    return support & (logq > -math.inf), logq


def _student_reach(shard: Shard, config: RoutingConfig, logits: torch.Tensor, logp: torch.Tensor
                   ) -> torch.Tensor:
    """Local `Reach_S [N, V/tp]` from the tempered student logits and log-probs (no gradient), as
    `math/cr_opd.py::student_reach`. top_p: the nucleus from the student's top-k, k doubled until every row's top-k
    holds mass `>= top_p` (the nucleus then lies inside it, exactly) or k covers the vocabulary."""
    if config.student_reach == "threshold":
        reach = logp >= math.log(config.student_min_prob)
    elif config.student_reach == "topk":
        _, top = vocab_parallel_topk(logits, config.student_top_k, shard.true_vocab_size, shard.group)
        reach = _local_mask(shard, top)
    else:
        k = min(config.student_top_k, shard.true_vocab_size)
        while True:
            ids, _, in_nucleus, complete = vocab_parallel_top_p_mask(logits, k, config.student_top_p,
                                                                     shard.true_vocab_size, shard.group)
            if bool(complete.all()) or k == shard.true_vocab_size:  # replicated values: every rank agrees
                break
            k = min(2 * k, shard.true_vocab_size)
        reach = _local_mask(shard, ids, in_nucleus)
    return reach & (logp > -math.inf)


def vocab_parallel_cr_opd_loss(student_logits_shard: torch.Tensor, sampled_ids: torch.Tensor,
                               advantages: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                               teacher_logits_shard: Optional[torch.Tensor] = None,
                               teacher_topk_ids: Optional[torch.Tensor] = None,
                               teacher_topk_logprobs: Optional[torch.Tensor] = None,
                               config: RoutingConfig = RoutingConfig(), student_temperature: float = 1.0,
                               teacher_temperature: float = 1.0, true_vocab_size: Optional[int] = None,
                               group=None, chunk_size: Optional[int] = None) -> tuple[torch.Tensor, RoutingStats]:
    """Per-position CR-OPD loss `[...]` and its `RoutingStats`, from TP-sharded logits; twin of
    `math/cr_opd.py::cr_opd_loss` (same value, same gradient wrt the student logits, same statistics), replicated on
    every TP rank.

    Inputs: `student_logits_shard [..., V/tp]` (differentiable), `sampled_ids [...]` (global ids `y_t`),
    `advantages [...]` (`A_t`, used as `sg(A_t)`), `mask [...]` (1 on training tokens; default all), and the
    teacher either dense (`teacher_logits_shard [..., V/tp]`, sharded like the student) or sparse
    (`teacher_topk_ids`, `teacher_topk_logprobs [..., K]`: a server's answer, global ids, the same on every
    rank). `true_vocab_size`: the unpadded vocabulary (default: tp x V/tp, no padding); `group`: the TP group
    (default megatron's, else tp = 1).

    Gradient: routed positions send `|A_t| (1 - pi(y_t)) (e_{y_t} - rho_t)` (form "matched") or
    `|A_t| (pi - p~_t)` (form "kl_target") into each rank's own columns of `S_t = {y_t} U C_t` and exactly 0 to
    every other column; fallback positions (`A_t >= 0` or `C_t` empty) `-A_t (e_{y_t} - pi)`;
    masked positions nothing.

    chunk_size: rows at a time: the `[chunk, V/tp]` temporaries of one chunk live at a time. On ids, backward
    keeps only `[N, k]` / `[N]` tensors and a reference to the logits; on masks (`shard.chunked_rows`) each chunk
    is recomputed in backward. Either way memory does not grow with N beyond the gradient.
    """
    inputs = _checked_inputs(student_logits_shard, sampled_ids, advantages, mask, teacher_logits_shard,
                             teacher_topk_ids, teacher_topk_logprobs, config, student_temperature,
                             teacher_temperature, true_vocab_size, group)
    # Teacher top-k support with a top-k or top-p student reach: every set is a list of ids (`_routed_rows_on_ids`,
    # the default config's fast path); a threshold on either side needs the `[N, V/tp]` masks (`_routed_rows`).
    on_ids = config.teacher_support == "topk" and config.student_reach in ("topk", "top_p")
    if on_ids:
        # The ids path keeps only `[N, k]` / `[N]` tensors and a reference to the logits for backward: it runs on
        # all rows at once, its passes over `[chunk, V/tp]` chunked inside.
        if chunk_size is not None:
            require_positive_int("chunk_size", chunk_size)
        loss, stats = _routed_rows_on_ids(inputs.shard, config, inputs.student, inputs.ids, inputs.advantages,
                                          inputs.keep, inputs.teacher, float(student_temperature),
                                          float(teacher_temperature), chunk_size)
    else:
        student_rows = row_pieces(inputs.student, chunk_size)

        def rows(piece: slice) -> tuple[torch.Tensor, RoutingStats]:
            rows_teacher = {name: None if value is None else value[piece] for name, value in inputs.teacher.items()}
            return _routed_rows(inputs.shard, config, student_rows(piece), inputs.ids[piece],
                                inputs.advantages[piece], inputs.keep[piece], rows_teacher,
                                float(student_temperature), float(teacher_temperature))

        # The masks path keeps `[n, V/tp]` masks, so its chunks are recomputed in backward.
        loss, stats = chunked_rows(rows, inputs.student.shape[0], chunk_size, inputs.student.requires_grad)
    leading = tuple(student_logits_shard.shape[:-1])
    return loss.reshape(leading), dataclasses.replace(stats, **{
        field.name: getattr(stats, field.name).reshape(leading) for field in dataclasses.fields(stats)})


@dataclasses.dataclass
class _RoutingInputs:
    """Checked, flattened inputs: the student `[N, V/tp]`, `ids`, `advantages` `[N]` (zero on masked rows),
    `keep` `[N]` and the teacher as `_routed_rows` takes it (dense `[N, V/tp]` or sparse `[N, K]` fields)."""

    student: torch.Tensor
    shard: Shard
    ids: torch.Tensor
    advantages: torch.Tensor
    keep: torch.Tensor
    teacher: dict


def _checked_inputs(student_logits_shard: torch.Tensor, sampled_ids: torch.Tensor, advantages: torch.Tensor,
                    mask: Optional[torch.Tensor], teacher_logits_shard: Optional[torch.Tensor],
                    teacher_topk_ids: Optional[torch.Tensor], teacher_topk_logprobs: Optional[torch.Tensor],
                    config: RoutingConfig, student_temperature: float, teacher_temperature: float,
                    true_vocab_size: Optional[int], group) -> _RoutingInputs:
    """`vocab_parallel_cr_opd_loss`'s argument checks: the reference's rules, those that need the values (finite
    advantages, ids in the vocabulary, log-probabilities <= 0) and the ranks' agreement only with the debug
    checks on (`shard.py`)."""
    require_floating("student_logits_shard", student_logits_shard)
    flat = flatten_rows("student_logits_shard", student_logits_shard)
    leading, n = tuple(student_logits_shard.shape[:-1]), flat.shape[0]
    shard = Shard(flat.shape[-1], true_vocab_size, group)
    for name, tensor in (("sampled_ids", sampled_ids), ("advantages", advantages)):
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != leading:
            given = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise MathInputError(f"{name}: expected shape {leading} (the positions of the logits), got {given}")
    require_floating("advantages", advantages)
    if mask is None:
        mask = torch.ones(leading, dtype=torch.bool, device=flat.device)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != leading:
        raise MathInputError(f"mask: expected shape {leading} (the positions of the logits)")
    keep = token_mask("mask", mask).reshape(n)
    require_positive("student_temperature", student_temperature)
    require_positive("teacher_temperature", teacher_temperature)
    dense = teacher_logits_shard is not None
    if dense == (teacher_topk_ids is not None or teacher_topk_logprobs is not None):
        raise MathInputError("teacher_logits_shard / teacher_topk_ids+teacher_topk_logprobs: expected exactly one "
                             "teacher input, dense logits shard or sparse top-k ids with their log-probs")
    ids = torch.where(keep, sampled_ids.reshape(n), 0).long()
    adv = torch.where(keep, advantages.reshape(n).detach(), 0.0)
    if debug_checks_enabled() and not torch.isfinite(adv).all():
        raise MathInputError("advantages: expected finite values on unmasked positions, found NaN/inf")
    shards = {"student_logits_shard": flat}
    if dense:
        require_floating("teacher_logits_shard", teacher_logits_shard)
        shards["teacher_logits_shard"] = flatten_rows("teacher_logits_shard", teacher_logits_shard)
    check_inputs(shard, shards, ids)
    if config.student_reach == "topk":
        require_positive_int("student_top_k", config.student_top_k, at_most=shard.true_vocab_size,
                             what="the vocabulary size V")
    if dense:
        if config.teacher_support == "topk":
            require_positive_int("teacher_top_k", config.teacher_top_k, at_most=shard.true_vocab_size,
                                 what="the vocabulary size V")
        teacher = dict(teacher_logits=shards["teacher_logits_shard"], teacher_topk_ids=None,
                       teacher_topk_logprobs=None)
    else:
        teacher = _checked_sparse_teacher(teacher_topk_ids, teacher_topk_logprobs, leading, keep, config,
                                          teacher_temperature, shard.true_vocab_size)
    return _RoutingInputs(flat, shard, ids, adv, keep, teacher)


def _checked_sparse_teacher(teacher_topk_ids: Optional[torch.Tensor], teacher_topk_logprobs: Optional[torch.Tensor],
                            leading: tuple[int, ...], keep: torch.Tensor, config: RoutingConfig,
                            teacher_temperature: float, vocab: int) -> dict:
    """A server's answer `[..., K]` checked and flattened to `[N, K]` (ids in the vocabulary on unmasked rows
    and log-probabilities <= 0: debug checks)."""
    if teacher_topk_ids is None or teacher_topk_logprobs is None:
        raise MathInputError("teacher_topk_ids / teacher_topk_logprobs: the sparse teacher needs both")
    if tuple(teacher_topk_ids.shape[:-1]) != leading or teacher_topk_ids.dim() != len(leading) + 1 \
            or tuple(teacher_topk_logprobs.shape) != tuple(teacher_topk_ids.shape):
        raise MathInputError(f"teacher_topk_ids / teacher_topk_logprobs: expected equal shapes "
                             f"{leading + ('K',)}, got {tuple(teacher_topk_ids.shape)} and "
                             f"{tuple(teacher_topk_logprobs.shape)}")
    require_floating("teacher_topk_logprobs", teacher_topk_logprobs)
    if debug_checks_enabled() and (torch.isnan(teacher_topk_logprobs).any() or (teacher_topk_logprobs > 1e-6).any()):
        raise MathInputError("teacher_topk_logprobs: expected log-probabilities (<= 0, no NaN)")
    if teacher_temperature != 1.0:
        raise MathInputError("teacher_temperature: sparse teacher log-probs are used as the server gave them; "
                             f"expected 1.0, got {teacher_temperature}")
    n, k = keep.shape[0], teacher_topk_ids.shape[-1]
    if teacher_topk_ids.is_floating_point() or (
            debug_checks_enabled() and ids_outside(teacher_topk_ids.reshape(n, k)[keep], 0, vocab)):
        raise MathInputError(f"teacher_topk_ids: expected integer global vocabulary ids in [0, "
                             f"{vocab}) (the student's vocabulary) on unmasked positions")
    if config.teacher_support == "topk":
        require_positive_int("teacher_top_k", config.teacher_top_k, at_most=k,
                             what="the K ids the sparse teacher gave")
    return dict(teacher_logits=None, teacher_topk_ids=teacher_topk_ids.reshape(n, k),
                teacher_topk_logprobs=teacher_topk_logprobs.reshape(n, k).detach())


def _routed_rows(shard: Shard, config: RoutingConfig, flat: torch.Tensor, ids: torch.Tensor, adv: torch.Tensor,
                 keep: torch.Tensor, teacher: dict, student_temperature: float, teacher_temperature: float
                 ) -> tuple[torch.Tensor, RoutingStats]:
    """The CR-OPD loss `[n]` and its statistics on `n` rows of checked, flattened inputs (`ids`, `adv` zero on
    masked rows); rows are independent, so `vocab_parallel_cr_opd_loss` runs this on chunks of rows."""
    # --- the student: masked rows become zeros (as in the reference), padding -inf ----------------------------
    dtype = compute_dtype(flat)
    z = shard.scaled(torch.where(keep.unsqueeze(-1), flat, 0.0), student_temperature, dtype)
    everything = torch.ones_like(z, dtype=torch.bool)
    log_norm = masked_logsumexp(shard, z, everything)  # differentiable (the fallback's normaliser)
    logp_sampled = values_at_ids(shard, z, ids) - log_norm  # differentiable log pi(y_t)
    if debug_checks_enabled() and torch.isneginf(logp_sampled.detach()).any():
        raise MathInputError("student_logits_shard: the sampled token (sampled_ids) has a -inf logit at an "
                             "unmasked position; pi(y_t) = 0 cannot have been sampled")

    with torch.no_grad():
        zd = z.detach()
        logp = zd - log_norm.detach().unsqueeze(-1)
        support, logq = _teacher_support(shard, config, keep, teacher_temperature=teacher_temperature,
                                         dtype=dtype, **teacher)
        # Ranking inputs for the top-k helpers: finite tempered logits (padding is masked by true_vocab_size).
        ranked = torch.where(keep.unsqueeze(-1), flat.detach(), 0.0).to(dtype) / student_temperature
        reach = _student_reach(shard, config, ranked, logp)
        onehot = _local_mask(shard, ids.unsqueeze(-1))
        candidates = support & reach & ~onehot & keep.unsqueeze(-1)
        count = shard.all_reduce(candidates.sum(dim=-1))
        negative = keep & (adv < 0)
        routed = negative & (count > 0)

        # Routing weights rho on C_t: a softmax of the log-weights over C_t (all ranks' members).
        if config.weights == "q":
            log_weight = logq
        elif config.weights == "sqrt_q_pi":
            log_weight = 0.5 * (logq + logp)
        else:
            log_weight = torch.zeros_like(logp)
        weight_norm = masked_logsumexp(shard, log_weight, candidates)
        weight_norm = torch.where(count > 0, weight_norm, 0.0)
        rho = torch.where(candidates, (log_weight - weight_norm.unsqueeze(-1)).exp(), 0.0)

    if config.form == "matched":
        # sum_{v in C} rho (z_y - z_v) as per-rank partial sums, all-reduced; z_y is replicated, so its gradient
        # shares are summed over the ranks (`CopyToTP`) before reaching the owner's column.
        with torch.no_grad():
            moved = torch.where(routed, adv.abs() * -torch.expm1(logp_sampled.detach()), 0.0)
        z_y = CopyToTP.apply(values_at_ids(shard, z, ids), shard)
        gap = torch.where(candidates, z_y.unsqueeze(-1) - z, 0.0)
        routed_loss = moved * ReduceFromTP.apply((rho * gap).sum(dim=-1), shard)
    else:
        moved, routed_loss = _kl_target_rows(shard, config, z, logp, ids, adv, onehot, candidates, rho, routed,
                                             logp_sampled.detach())
    pg_loss = -adv * logp_sampled
    loss = torch.where(keep, torch.where(routed, routed_loss, pg_loss), 0.0)

    stats = RoutingStats(routed_mass=moved, candidate_count=count, empty_candidates=keep & (count == 0),
                         routed=routed, negative_advantage=negative)
    return loss, stats


def _kl_target_rows(shard: Shard, config: RoutingConfig, z: torch.Tensor, logp: torch.Tensor, ids: torch.Tensor,
                    adv: torch.Tensor, onehot: torch.Tensor, candidates: torch.Tensor, rho: torch.Tensor,
                    routed: torch.Tensor, logp_sampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kl_target form on masks: `(delta [n], loss [n])` from the tempered logits `z [n, V/tp]`
    (differentiable), their log-probs, the local masks of `y_t` and `C_t` and `rho [n, V/tp]`."""
    with torch.no_grad():
        zd = z.detach()
        delta = torch.where(routed, logp_sampled.exp() * -torch.expm1(config.eta * adv.clamp(max=0.0)), 0.0)
        in_s = onehot | candidates
        mass_s = shard.all_reduce(torch.where(in_s, logp.exp(), 0.0).sum(dim=-1))
        # p~^S = pi^S + pi^S(y) (1 - exp(eta A)) (rho - e_y), from pi^S (exact when P underflows), as the reference.
        pi_s = (zd - masked_logsumexp(shard, zd, in_s).unsqueeze(-1)).exp().masked_fill(~in_s, 0.0)
        moved_s = torch.where(routed, values_at_ids(shard, pi_s, ids) * -torch.expm1(config.eta * adv.clamp(max=0.0)),
                              0.0)
        target_s = pi_s + moved_s.unsqueeze(-1) * (rho - onehot.to(z.dtype))

    # Restricted routed loss: per-rank partial KL over this rank's members of S, all-reduced; the logsumexp over
    # S is replicated, so its gradient shares are summed over the ranks (`CopyToTP`).
    log_norm_s = CopyToTP.apply(masked_logsumexp(shard, z, in_s), shard)
    logp_s = torch.where(in_s, z, -math.inf) - log_norm_s.unsqueeze(-1)
    kl_partial = torch.where(in_s, torch.xlogy(target_s, target_s) - target_s * logp_s, 0.0).sum(dim=-1)
    return delta, adv.abs() * mass_s * ReduceFromTP.apply(kl_partial, shard)


def _members(ids: torch.Tensor, pool: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """`[n, k]` bool: whether each of `ids [n, k]` is one of the chosen entries of `pool [n, m]` (a sorted
    search per row, so a wide top-p pool costs `m log m`, not `k m`)."""
    sorted_pool = torch.where(chosen, pool, -1).sort(dim=-1).values
    where = torch.searchsorted(sorted_pool, ids).clamp_max(pool.shape[-1] - 1)
    return sorted_pool.gather(-1, where) == ids


def _routed_rows_on_ids(shard: Shard, config: RoutingConfig, flat: torch.Tensor, ids: torch.Tensor,
                        adv: torch.Tensor, keep: torch.Tensor, teacher: dict, student_temperature: float,
                        teacher_temperature: float, chunk_size: Optional[int]) -> tuple[torch.Tensor, RoutingStats]:
    """`_routed_rows` for a teacher top-k support and a student top-k / top-p reach, on lists of ids: `S_t` has
    at most `teacher_top_k + 1` members, so after the normalisers and the two top-k selections (the only passes
    over `[N, V/tp]`, chunk by chunk, plus the normaliser's softmax in backward) everything is `[N, k]`,
    replicated. Slot 0 of `S_t` is `y_t`, slots `1..k` the teacher's top-k ids masked to `C_t`. Same value,
    gradient and statistics as `_routed_rows` (and the reference)."""
    dtype = compute_dtype(flat)
    pieces = row_chunks(flat.shape[0], chunk_size)
    if not bool(keep.all()):  # masked rows become zeros, as in the reference (whatever they held)
        flat = torch.where(keep.unsqueeze(-1), flat, 0.0)

    with torch.no_grad():
        top_ids, logq = _teacher_topk_on_ids(shard, config, teacher, keep, pieces, teacher_temperature, dtype,
                                             chunk_size)
    # The one differentiable read of the student's logits: its normaliser and its logits at [y_t, top-k ids], in
    # one Function (backward: the softmax plus a sparse scatter into the same gradient buffer).
    log_norm, raw_s = _NormalizerAndLogits.apply(flat, torch.cat([ids.unsqueeze(-1), top_ids], dim=-1), shard,
                                                 student_temperature, dtype, chunk_size)
    z_s = raw_s.to(dtype) / student_temperature
    logp_sampled = z_s[:, 0] - log_norm
    with torch.no_grad():
        lse = log_norm.detach()
        logp_y = logp_sampled.detach()
        logp = z_s[:, 1:].detach() - lse.unsqueeze(-1)
    if debug_checks_enabled() and torch.isneginf(logp_y).any():
        raise MathInputError("student_logits_shard: the sampled token (sampled_ids) has a -inf logit at an "
                             "unmasked position; pi(y_t) = 0 cannot have been sampled")

    with torch.no_grad():
        reachable = torch.cat([_student_reach_on_ids(shard, config, shard.scaled(flat[piece].detach(),
                                                                                 student_temperature, dtype),
                                                     lse[piece], top_ids[piece]) for piece in pieces])
        candidates = ((logq > -math.inf) & (logp > -math.inf) & reachable
                      & (top_ids != ids.unsqueeze(-1)) & keep.unsqueeze(-1))
        count = candidates.sum(dim=-1)
        negative = keep & (adv < 0)
        routed = negative & (count > 0)
        log_weight = {"q": logq, "sqrt_q_pi": 0.5 * (logq + logp)}.get(config.weights, torch.zeros_like(logp))
        log_weight = torch.where(candidates, log_weight, -math.inf)
        shift = log_weight.amax(dim=-1, keepdim=True)
        rho = (log_weight - torch.where(torch.isneginf(shift), 0.0, shift)).exp()
        rho = rho / torch.where(count > 0, rho.sum(dim=-1), 1.0).unsqueeze(-1)
        in_s = torch.cat([torch.ones_like(candidates[:, :1]), candidates], dim=-1)  # slot 0: y_t

    if config.form == "matched":
        # sum_{v in C} rho (z_y - z_v), on the replicated [n, k] slots (`math/cr_opd.py::matched_routed_loss`).
        moved = torch.where(routed, adv.abs() * -torch.expm1(logp_y), 0.0)
        gap = torch.where(candidates, z_s[:, :1] - z_s[:, 1:], 0.0)
        routed_loss = moved * (rho * gap).sum(dim=-1)
    else:
        moved, routed_loss = _kl_target_on_ids(config, z_s, in_s, log_norm, logp_y, adv, rho, routed)
    loss = torch.where(keep, torch.where(routed, routed_loss, -adv * logp_sampled), 0.0)
    stats = RoutingStats(routed_mass=moved, candidate_count=count, empty_candidates=keep & (count == 0),
                         routed=routed, negative_advantage=negative)
    return loss, stats


class _NormalizerAndLogits(torch.autograd.Function):
    """`(logsumexp_v(z_v / tau) [N] in dtype, z at ids [N, m] in the logits' dtype)`, replicated, from the logits
    shard `[N, V/tp]` and global ids `[N, m]` (repeats allowed). Forward: `supports.support_statistics` with an
    empty support (per chunk: row max, `exp(x - max)` into one reused buffer, row sum; at tp > 1 one all-reduce
    MAX and one SUM of `[N]`) and the owners' logits at the ids, all-reduced. Saves the logits (a reference), the
    ids and the normaliser.

    Backward [Ours]: `d lse / d z_v = softmax(z / tau)_v / tau` and `d z_{i_j} / d z_v = [v = i_j]`, so the
    gradient is `exp(z / tau - lse) g_lse / tau` (per chunk: two passes and a row scale, written into the gradient
    itself) plus each owned id's `g_j`, added with one `scatter_add_` into the same buffer; no communication, no
    other `[N, V/tp]` tensor (the separate normaliser and gather of before built a zero-filled gradient for the
    gather and added the two)."""

    @staticmethod
    def forward(ctx, logits, ids, shard: Shard, temperature: float, dtype: torch.dtype, chunk_size: Optional[int]):
        no_ids = ids[:, :0]
        _, lse, _ = support_statistics(shard, logits, no_ids, no_ids >= 0, temperature, dtype, chunk_size)
        at_ids = values_at_ids(shard, logits, ids)
        ctx.save_for_backward(logits, ids, lse)
        ctx.shard, ctx.temperature, ctx.chunk_size = shard, temperature, chunk_size
        return lse, at_ids

    @staticmethod
    def backward(ctx, grad_lse, grad_at_ids):
        logits, ids, lse = ctx.saved_tensors
        shard, tau = ctx.shard, ctx.temperature
        width, dtype = shard.valid_width, lse.dtype
        grad = ChunkedGradient(logits, width, dtype, ctx.chunk_size)
        factor = (torch.zeros_like(lse) if grad_lse is None else grad_lse.to(dtype)) / tau
        local = ids - shard.start
        owned = (local >= 0) & (local < width)
        column = local.clamp(0, width - 1)
        for piece, out in grad.chunks():
            if tau == 1.0:
                torch.sub(logits[piece, :width], lse[piece, None], out=out)
            else:
                torch.add(-lse[piece, None], logits[piece, :width], alpha=1.0 / tau, out=out)
            out.exp_().mul_(factor[piece, None])
            if grad_at_ids is not None:
                out.scatter_add_(-1, column[piece], torch.where(owned[piece], grad_at_ids[piece].to(dtype), 0.0))
        return grad.grad, None, None, None, None, None


def _teacher_topk_on_ids(shard: Shard, config: RoutingConfig, teacher: dict, keep: torch.Tensor,
                         pieces: list[slice], temperature: float, dtype: torch.dtype,
                         chunk_size: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k ids `[N, k]` (global, replicated) and its log-probs there: from its logits shard (a
    distributed top-k per chunk of rows, and the global normaliser, `supports.support_statistics` over all rows
    in one reused buffer) or among a server's answer. Masked rows read zeros (their normaliser is `log V`)."""
    if teacher["teacher_logits"] is not None:
        logits = teacher["teacher_logits"]
        everything = bool(keep.all())
        top_logits, top_ids = [], []
        for piece in pieces:
            raw = logits[piece] if everything else torch.where(keep[piece].unsqueeze(-1), logits[piece], 0.0)
            values, ids = vocab_parallel_topk(shard.scaled(raw, temperature, dtype), config.teacher_top_k,
                                              shard.true_vocab_size, shard.group, check_values=False)
            top_logits.append(values)
            top_ids.append(ids)
        no_ids = torch.cat(top_ids)[:, :0]
        _, lse, _ = support_statistics(shard, logits, no_ids, no_ids >= 0, temperature, dtype, chunk_size)
        if not everything:  # a masked row is a row of zeros: log V (whatever the given row held)
            lse = torch.where(keep, lse, math.log(shard.true_vocab_size))
        return torch.cat(top_ids), torch.cat(top_logits) - lse.unsqueeze(-1)
    served = torch.where(keep.unsqueeze(-1), teacher["teacher_topk_ids"], 0).long()
    logprobs = teacher["teacher_topk_logprobs"]
    chosen = logprobs.topk(config.teacher_top_k, dim=-1).indices
    return served.gather(-1, chosen), logprobs.gather(-1, chosen).to(dtype)


def _student_reach_on_ids(shard: Shard, config: RoutingConfig, logits: torch.Tensor, log_normalizer: torch.Tensor,
                          ids: torch.Tensor) -> torch.Tensor:
    """Whether each of `ids [n, k]` is in the student's reach (its top-k for a top-k reach; its top-p nucleus
    otherwise, found on a top-k widened until every row's holds the nucleus), from the tempered logits
    `[n, V/tp]` and their global log-normaliser `[n]`."""
    vocab = shard.true_vocab_size
    k = min(config.student_top_k, vocab)
    while True:
        values, reach_ids = vocab_parallel_topk(logits, k, vocab, shard.group, check_values=False)
        if config.student_reach == "topk":
            return _members(ids, reach_ids, torch.ones_like(reach_ids, dtype=torch.bool))
        in_reach, complete = top_p_mask_on_candidates(values - log_normalizer.unsqueeze(-1), reach_ids,
                                                      config.student_top_p)
        if bool(complete.all()) or k == vocab:  # replicated values: every rank agrees
            return _members(ids, reach_ids, in_reach)
        k = min(2 * k, vocab)


def _kl_target_on_ids(config: RoutingConfig, z_s: torch.Tensor, in_s: torch.Tensor, log_norm: torch.Tensor,
                      logp_y: torch.Tensor, adv: torch.Tensor, rho: torch.Tensor,
                      routed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kl_target form on the replicated slots of `S_t` (slot 0 `y_t`): `(delta [n], loss [n])` from the
    tempered student logits at the slots `z_s [n, k+1]` (differentiable), their membership `in_s`, the global
    log-normaliser `[n]`, `log pi(y_t)` (no gradient) and the routing weights `rho [n, k]`."""
    step = -torch.expm1(config.eta * adv.clamp(max=0.0))
    moved = torch.where(routed, logp_y.exp() * step, 0.0)  # delta_t
    masked_s = torch.where(in_s, z_s, -math.inf)
    log_norm_s = torch.logsumexp(masked_s, dim=-1)
    logp_s = masked_s - log_norm_s.unsqueeze(-1)
    with torch.no_grad():
        mass_s = (log_norm_s - log_norm).exp()
        pi_s = logp_s.exp()
        moved_s = torch.where(routed, pi_s[:, 0] * step, 0.0)
        target_s = pi_s + moved_s.unsqueeze(-1) * torch.cat([-torch.ones_like(moved_s).unsqueeze(-1), rho], dim=-1)
        target_s = torch.where(in_s, target_s, 0.0)
    kl = torch.where(in_s, torch.xlogy(target_s, target_s) - target_s * logp_s, 0.0).sum(dim=-1)
    return moved, adv.abs() * mass_s * kl
