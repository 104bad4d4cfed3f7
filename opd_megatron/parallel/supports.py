"""Vocab-parallel twin of `opd_megatron/math/supports.py::build_support`: both distributions on a top-k support (teacher
top-k, student top-k or their union; renormalised or with a tail bucket) from TP-sharded logits, never gathering
the vocabulary. The result is the reference's `SupportedDistributions` (`[..., K(+1)]`, replicated on every TP
rank), so `losses.supports.divergence_on_support` applies to it unchanged.

How each piece is formed (layout and gradient convention as in `vocab_parallel.py`):
- support ids: `topk.vocab_parallel_topk` of the teacher or student logits shard (one all-gather of k candidates
  per rank; ascending ids, ties to the lower id, as `top_k_positions`), or for a sparse teacher the reference's
  selection on the server answer, which every rank holds; with a sparse teacher's `student_ids` (the ids a
  served teacher scored for the student), the reference's `top_k_among` on the student's logits at those ids
  (gathered as below, exact: the same ranking as `vocab_parallel_topk` on the same logits);
- the logits at the ids: `scatter_sparse_to_shards` + `gather_owned(fill=0)` on each rank, then an all-reduce SUM
  (`ReduceFromTP`: backward identity, so the gradient of a support slot reaches only the rank owning its id);
- tail mode: the global normaliser (`vocab_parallel_log_normalizer`, gradient `softmax / tau` into the shard) and
  the complement mass `sum_{v not in S} exp(z_v / tau)`: a local partial over this rank's columns outside S, one
  all-reduce MAX (shift) and one all-reduce SUM, both `[N]`.
Communication per call: at most two top-k all-gathers of `[tp, N, k]`, all-reduces of `[N, K]` and `[N]`.

Ids `>= true_vocab_size` (padding) never enter a support and carry no tail mass. The full-vocabulary support is
not offered here (its `[..., V]` result is what this module avoids): use `vocab_parallel.vocab_parallel_*`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist

from opd_megatron.math.divergences import compute_dtype
from opd_megatron.math.supports import (MODES, SparseTeacherLogprobs, SupportedDistributions,
                                        check_sparse_teacher, log_normalize, lookup_ids, safe_logsumexp,
                                        support_ids, top_k_among, top_k_positions)
from opd_megatron.parallel.topk import gather_owned, scatter_sparse_to_shards, vocab_parallel_topk
from opd_megatron.parallel.divergences import (check_inputs, chunked_rows, flatten_rows, ReduceFromTP, row_pieces,
                                               Shard, vocab_parallel_log_normalizer)
from opd_megatron.math.checks import MathInputError, require_choice, require_positive, require_positive_int

TOPK_SUPPORTS = ("teacher_topk", "student_topk", "union")


def _at_ids(shard: Shard, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`logits[n, ids[n, j]]` `[N, K]` over the whole vocabulary from this rank's `logits [N, V/tp]` (ids valid,
    `< true_vocab_size`), replicated; gradient (if any) only into the owned entries of this rank's shard."""
    owned = scatter_sparse_to_shards(ids, ids, shard.start, shard.start + shard.width, shard.true_vocab_size)
    return ReduceFromTP.apply(gather_owned(logits, owned.local_positions, owned.owned, fill=0.0), shard)


def _complement_logsumexp(shard: Shard, scaled: torch.Tensor, ids: torch.Tensor,
                          valid: torch.Tensor) -> torch.Tensor:
    """`log sum_{v not in S} exp(scaled_v)` `[N, 1]` over the unpadded vocabulary (padding is -inf in `scaled`),
    S = `ids[valid]`; -inf with zero gradient where S covers the vocabulary (as `safe_logsumexp`)."""
    local = ids - shard.start
    mine = valid & (local >= 0) & (local < shard.width)
    in_support = torch.zeros(scaled.shape, dtype=torch.int32, device=scaled.device)
    in_support = in_support.scatter_add(-1, torch.where(mine, local, 0), mine.to(torch.int32)) > 0
    rest = scaled.masked_fill(in_support, float("-inf"))
    shift = rest.detach().amax(dim=-1, keepdim=True)
    shard.all_reduce(shift, dist.ReduceOp.MAX)
    shift = shift.masked_fill(torch.isneginf(shift), 0.0)
    total = ReduceFromTP.apply((rest - shift).exp().sum(dim=-1, keepdim=True), shard)
    empty = total == 0
    return torch.where(empty, torch.full_like(total, float("-inf")),
                       shift + torch.log(torch.where(empty, torch.ones_like(total), total)))


def _sparse_teacher_topk(teacher: SparseTeacherLogprobs, k: int) -> torch.Tensor:
    """The teacher's top-k ids among the served ones, ascending, ties to the lower id (as `build_support`)."""
    by_id = torch.argsort(teacher.ids, dim=-1, stable=True)
    sorted_ids = teacher.ids.gather(-1, by_id)
    chosen = top_k_positions(teacher.logprobs.gather(-1, by_id), k)
    return sorted_ids.gather(-1, chosen).long()


def vocab_parallel_build_support(student_logits_shard: torch.Tensor,
                                 teacher: torch.Tensor | SparseTeacherLogprobs, support: str, k: int,
                                 mode: str = "renormalized", *, student_temperature: float = 1.0,
                                 teacher_temperature: float = 1.0, true_vocab_size: Optional[int] = None,
                                 group=None, chunk_size: Optional[int] = None) -> SupportedDistributions:
    """`build_support` on TP shards: student logits `[..., V/tp]` (with gradient) and a teacher given either as
    its logits shard `[..., V/tp]` (a colocated teacher, detached) or as a `SparseTeacherLogprobs` (a server's
    answer, global ids, the same on every TP rank) -> `SupportedDistributions` with log-probs `[..., K(+1)]`,
    ids `[..., K]`, replicated on every TP rank and equal to the single-device `build_support` on the gathered,
    unpadded logits. The student's support log-probs carry gradient into each rank's own shard only.

    support: `teacher_topk`, `student_topk` or `union`; mode: `renormalized` or `tail`; the rules (k limits,
    sparse teacher needs, temperature with a sparse tail, ranking by the raw logits) are the reference's.
    `true_vocab_size`: the unpadded vocabulary (default: tp x V/tp). chunk_size: rows at a time
    (`vocab_parallel.chunked_rows`: one chunk's `[chunk, V/tp]` temporaries at a time; with gradient each chunk is
    recomputed in backward, so memory does not grow with N)."""
    if support == "full":
        raise MathInputError("support: 'full' is not built vocab-parallel (it would be [..., V]); use the "
                             "full-vocabulary divergences of opd_megatron.parallel.divergences, or one of "
                             f"{TOPK_SUPPORTS}")
    require_choice("support", support, TOPK_SUPPORTS)
    require_choice("mode", mode, MODES)
    require_positive("student_temperature", student_temperature)
    require_positive("teacher_temperature", teacher_temperature)
    student = flatten_rows("student_logits_shard", student_logits_shard)
    leading = tuple(student_logits_shard.shape[:-1])
    shard = Shard(student.shape[-1], true_vocab_size, group)
    vocab = shard.true_vocab_size
    sparse = isinstance(teacher, SparseTeacherLogprobs)
    if sparse:
        check_inputs(shard, {"student_logits_shard": student})
        check_sparse_teacher(teacher, leading, vocab)
        dtype = compute_dtype(student, teacher.logprobs)
    elif isinstance(teacher, torch.Tensor):
        teacher_flat = flatten_rows("teacher", teacher).detach()
        check_inputs(shard, {"student_logits_shard": student, "teacher_logits_shard": teacher_flat})
        dtype = compute_dtype(student, teacher_flat)
    else:
        raise MathInputError(f"teacher: expected a teacher logits shard [..., V/tp] (a tensor) or "
                             f"SparseTeacherLogprobs, got {type(teacher).__name__}")
    require_positive_int("k", k, at_most=vocab, what=f"the vocabulary size V = {vocab}")
    if sparse:
        k_teacher = teacher.ids.shape[-1]
        if support in ("teacher_topk", "union") and k > k_teacher:
            raise MathInputError(f"k: expected at most {k_teacher} (the teacher top-k returned: teacher.ids has "
                                 f"{k_teacher} per position) for support {support!r}, got {k}")
        if mode == "tail" and teacher_temperature != 1.0:
            raise MathInputError(f"teacher_temperature: a sparse teacher's tail mass is unknown at temperature "
                                 f"{teacher_temperature}; expected 1.0 with mode 'tail', or use mode "
                                 f"'renormalized'")
    taus = (float(student_temperature), float(teacher_temperature))
    rows = student.shape[0]
    student_rows = row_pieces(student, chunk_size)

    def rows_of_inputs(piece: slice) -> SupportedDistributions:
        if sparse:
            # reshape(rows, width), not (rows, -1): a teacher without a top-k has width 0 (only extra ids).
            piece_teacher = SparseTeacherLogprobs(*(None if t is None else t.reshape(rows, t.shape[-1])[piece]
                                                    for t in (teacher.ids, teacher.logprobs, teacher.extra_ids,
                                                              teacher.extra_logprobs, teacher.student_ids)))
        else:
            piece_teacher = teacher_flat[piece]
        return _support_rows(shard, support, k, mode, student_rows(piece), piece_teacher, taus, dtype)

    out = chunked_rows(rows_of_inputs, rows, chunk_size, student.requires_grad)
    slots = out.student_logp.shape[-1]
    return dataclasses.replace(out, student_logp=out.student_logp.reshape(*leading, slots),
                               teacher_logp=out.teacher_logp.reshape(*leading, slots),
                               ids=out.ids.reshape(*leading, out.ids.shape[-1]))


def _support_rows(shard: Shard, support: str, k: int, mode: str, student: torch.Tensor,
                  teacher: torch.Tensor | SparseTeacherLogprobs, taus: tuple[float, float],
                  dtype: torch.dtype) -> SupportedDistributions:
    """`vocab_parallel_build_support` on `n` rows of checked, flattened inputs (a sparse teacher's fields
    `[n, k_t]`); rows are independent, so the public function runs this on chunks of rows."""
    student_temperature, teacher_temperature = taus
    sparse = isinstance(teacher, SparseTeacherLogprobs)
    teacher_flat = None if sparse else teacher
    vocab, group = shard.true_vocab_size, shard.group
    neg_inf = float("-inf")

    # Support ids `[N, K]`, replicated: ranked by the raw logits, as the reference.
    teacher_ids = student_ids = None
    if support in ("teacher_topk", "union"):
        teacher_ids = (_sparse_teacher_topk(teacher, k).reshape(-1, k) if sparse
                       else vocab_parallel_topk(teacher_flat, k, vocab, group)[1])
    if support in ("student_topk", "union"):
        if sparse and teacher.student_ids is not None:
            candidates = teacher.student_ids.long()
            student_ids = top_k_among(_at_ids(shard, student.detach(), candidates.clamp_min(0)), candidates, k)
        else:
            student_ids = vocab_parallel_topk(student.detach(), k, vocab, group)[1]
    ids = support_ids(support, teacher_ids, student_ids)
    valid = ids >= 0
    safe_ids = ids.clamp_min(0)

    # Student: scaled logits at the ids (renormalised: directly, as the reference, for precision), or global
    # log-probs (tail) with the complement bucket.
    scaled_s = shard.scaled(student, student_temperature, dtype)
    lp_s = _at_ids(shard, scaled_s, safe_ids)
    if mode == "tail":
        lse_s = vocab_parallel_log_normalizer(student, student_temperature, vocab, group=group).to(dtype)
        lp_s = lp_s - lse_s.unsqueeze(-1)
        tail_p = _complement_logsumexp(shard, scaled_s, safe_ids, valid) - lse_s.unsqueeze(-1)
    lp_s = lp_s.masked_fill(~valid, neg_inf)

    with torch.no_grad():
        if sparse:
            all_ids, all_lp = teacher.ids.long(), teacher.logprobs.detach().to(dtype)
            if teacher.extra_ids is not None:
                all_ids = torch.cat([all_ids, teacher.extra_ids.long()], dim=-1)
                all_lp = torch.cat([all_lp, teacher.extra_logprobs.detach().to(dtype)], dim=-1)
            lq_s, found = lookup_ids(safe_ids, all_ids.reshape(-1, all_ids.shape[-1]),
                                  all_lp.reshape(-1, all_lp.shape[-1]))
            missing = int((valid & ~found).sum())
            if missing:
                raise MathInputError(f"teacher: support {support!r} needs the teacher's logprobs on the student's "
                                     f"top-{k} ids; {missing} of them are in neither teacher.ids nor "
                                     f"teacher.extra_ids (request them from the server as extra_ids/"
                                     f"extra_logprobs, or use support 'teacher_topk')")
            lq_s = (lq_s / teacher_temperature).masked_fill(~valid, neg_inf)
            if mode == "tail":
                covered = safe_logsumexp(lq_s, keepdim=True).clamp_max(0.0)
                tail_q = torch.log(-torch.expm1(covered)).masked_fill(torch.isneginf(tail_p), neg_inf)
        else:
            scaled_t = shard.scaled(teacher_flat, teacher_temperature, dtype)
            lq_s = _at_ids(shard, scaled_t, safe_ids)
            if mode == "tail":
                lse_t = vocab_parallel_log_normalizer(teacher_flat, teacher_temperature, vocab,
                                                      group=group).to(dtype).unsqueeze(-1)
                lq_s = lq_s - lse_t
                tail_q = _complement_logsumexp(shard, scaled_t, safe_ids, valid) - lse_t
            lq_s = lq_s.masked_fill(~valid, neg_inf)

    if mode == "renormalized":
        lp_s, lq_s = log_normalize(lp_s), log_normalize(lq_s)
    else:
        lp_s = torch.cat([lp_s, tail_p], dim=-1)
        lq_s = torch.cat([lq_s, tail_q], dim=-1)
    return SupportedDistributions(lp_s, lq_s, ids, support, k, mode, sparse)
