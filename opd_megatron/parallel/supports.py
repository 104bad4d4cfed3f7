"""Vocab-parallel twin of `math/supports.py::build_support`: both distributions on a top-k support (teacher top-k,
student top-k or their union; renormalised or with a tail bucket) from TP-sharded logits, never gathering the
vocabulary. The result is the reference's `SupportedDistributions` (`[..., K(+1)]`, replicated on every TP rank),
so `math/supports.py::divergence_on_support` applies to it unchanged.

How each piece is formed (layout and gradient convention as in `shard.py`):
- support ids: `topk.vocab_parallel_topk` of the teacher or student logits shard (one all-gather of k candidates
  per rank; ascending ids, ties to the lower id, as `top_k_positions`), or for a sparse teacher the reference's
  selection on the server answer, which every rank holds; with a sparse teacher's `student_ids` (the ids a
  served teacher scored for the student), the reference's `top_k_among` on the student's logits at those ids
  (gathered as below, exact: the same ranking as `vocab_parallel_topk` on the same logits);
- the logits at the ids: `shard.values_at_ids`, each rank's owned entries (0 elsewhere), then an all-reduce SUM
  (`ReduceFromTP`: backward identity, so the gradient of a support slot reaches only the rank owning its id);
- tail mode: the global normaliser (`vocab_parallel_log_normalizer`, gradient `softmax / tau` into the shard) and
  the complement mass `sum_{v not in S} exp(z_v / tau)`: a local partial over this rank's columns outside S, one
  all-reduce MAX (shift) and one all-reduce SUM, both `[N]`.
Communication per call: at most two top-k all-gathers of `[tp, N, k]`, all-reduces of `[N, K]` and `[N]`.

Ids `>= true_vocab_size` (padding) never enter a support and carry no tail mass. The full-vocabulary support is
not offered here (its `[..., V]` result is what this module avoids): use `divergences.vocab_parallel_divergence`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from opd_megatron.math.checks import MathInputError, require_choice, require_positive, require_positive_int
from opd_megatron.math.divergences import compute_dtype
from opd_megatron.math.supports import (MODES, SparseTeacherLogprobs, SupportedDistributions, check_sparse_request,
                                        check_sparse_teacher, log_normalize, sparse_tail, sparse_teacher_logprobs,
                                        sparse_teacher_topk, support_ids, top_k_among)
from opd_megatron.parallel.divergences import vocab_parallel_log_normalizer
from opd_megatron.parallel.shard import (Shard, check_inputs, chunked_rows, debug_checks_enabled, flatten_rows,
                                         masked_logsumexp, row_pieces, values_at_ids)
from opd_megatron.parallel.topk import vocab_parallel_topk

TOPK_SUPPORTS = ("teacher_topk", "student_topk", "union")


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
    (`shard.chunked_rows`: one chunk's `[chunk, V/tp]` temporaries at a time; with gradient each chunk is
    recomputed in backward, so memory does not grow with N)."""
    student, teacher_rows, shard, dtype = _checked_inputs(student_logits_shard, teacher, support, k, mode,
                                                          student_temperature, teacher_temperature,
                                                          true_vocab_size, group)
    taus = (float(student_temperature), float(teacher_temperature))
    student_rows = row_pieces(student, chunk_size)

    def rows_of_inputs(piece: slice) -> SupportedDistributions:
        return _support_rows(shard, support, k, mode, student_rows(piece), teacher_rows(piece), taus, dtype)

    out = chunked_rows(rows_of_inputs, student.shape[0], chunk_size, student.requires_grad)
    leading, slots = tuple(student_logits_shard.shape[:-1]), out.student_logp.shape[-1]
    return dataclasses.replace(out, student_logp=out.student_logp.reshape(*leading, slots),
                               teacher_logp=out.teacher_logp.reshape(*leading, slots),
                               ids=out.ids.reshape(*leading, out.ids.shape[-1]))


def _checked_inputs(student_logits_shard: torch.Tensor, teacher: torch.Tensor | SparseTeacherLogprobs,
                    support: str, k: int, mode: str, student_temperature: float, teacher_temperature: float,
                    true_vocab_size: Optional[int], group
                    ) -> tuple[torch.Tensor, Callable[[slice], torch.Tensor | SparseTeacherLogprobs], Shard,
                               torch.dtype]:
    """`vocab_parallel_build_support`'s argument checks (the reference's rules; those that need the values only
    with the debug checks on). Returns the flat student `[N, V/tp]`, the teacher's rows of a chunk (`piece ->`
    logits `[n, V/tp]` or a `SparseTeacherLogprobs` of `[n, k_t]` fields), the shard and the compute dtype."""
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
    vocab, rows = shard.true_vocab_size, student.shape[0]
    if isinstance(teacher, SparseTeacherLogprobs):
        check_inputs(shard, {"student_logits_shard": student})
        check_sparse_teacher(teacher, leading, vocab, values=debug_checks_enabled())
        require_positive_int("k", k, at_most=vocab, what=f"the vocabulary size V = {vocab}")
        check_sparse_request(teacher, support, k, mode, teacher_temperature)
        # reshape(rows, width), not (rows, -1): a teacher without a top-k has width 0 (only extra ids).
        fields = [None if t is None else t.reshape(rows, t.shape[-1])
                  for t in (teacher.ids, teacher.logprobs, teacher.extra_ids, teacher.extra_logprobs,
                            teacher.student_ids)]
        return student, (lambda piece: SparseTeacherLogprobs(*(None if t is None else t[piece] for t in fields))), \
            shard, compute_dtype(student, teacher.logprobs)
    if not isinstance(teacher, torch.Tensor):
        raise MathInputError(f"teacher: expected a teacher logits shard [..., V/tp] (a tensor) or "
                             f"SparseTeacherLogprobs, got {type(teacher).__name__}")
    teacher_flat = flatten_rows("teacher", teacher).detach()
    check_inputs(shard, {"student_logits_shard": student, "teacher_logits_shard": teacher_flat})
    require_positive_int("k", k, at_most=vocab, what=f"the vocabulary size V = {vocab}")
    return student, (lambda piece: teacher_flat[piece]), shard, compute_dtype(student, teacher_flat)


def _support_rows(shard: Shard, support: str, k: int, mode: str, student: torch.Tensor,
                  teacher: torch.Tensor | SparseTeacherLogprobs, taus: tuple[float, float],
                  dtype: torch.dtype) -> SupportedDistributions:
    """`vocab_parallel_build_support` on `n` rows of checked, flattened inputs (a sparse teacher's fields
    `[n, k_t]`); rows are independent, so the public function runs this on chunks of rows."""
    student_temperature, teacher_temperature = taus
    sparse = isinstance(teacher, SparseTeacherLogprobs)
    ids = _support_ids(shard, support, k, student, teacher)
    valid = ids >= 0
    safe_ids = ids.clamp_min(0)

    # Student: scaled logits at the ids (renormalised: directly, as the reference, for precision), or global
    # log-probs (tail) with the complement bucket.
    scaled_s = shard.scaled(student, student_temperature, dtype)
    lp_s = values_at_ids(shard, scaled_s, safe_ids)
    if mode == "tail":
        lse_s = vocab_parallel_log_normalizer(student, student_temperature, shard.true_vocab_size,
                                              group=shard.group).to(dtype)
        lp_s = lp_s - lse_s.unsqueeze(-1)
        tail_p = _complement_logsumexp(shard, scaled_s, safe_ids, valid) - lse_s.unsqueeze(-1)
    lp_s = lp_s.masked_fill(~valid, float("-inf"))

    with torch.no_grad():
        if sparse:
            lq_s = sparse_teacher_logprobs(teacher, safe_ids, valid, support, k, teacher_temperature, dtype,
                                           require_found=debug_checks_enabled())
            tail_q = sparse_tail(lq_s, tail_p) if mode == "tail" else None
        else:
            lq_s, tail_q = _dense_teacher_on_support(shard, teacher, safe_ids, valid, mode, teacher_temperature,
                                                     dtype)

    if mode == "renormalized":
        lp_s, lq_s = log_normalize(lp_s), log_normalize(lq_s)
    else:
        lp_s = torch.cat([lp_s, tail_p], dim=-1)
        lq_s = torch.cat([lq_s, tail_q], dim=-1)
    return SupportedDistributions(lp_s, lq_s, ids, support, k, mode, sparse)


def _support_ids(shard: Shard, support: str, k: int, student: torch.Tensor,
                 teacher: torch.Tensor | SparseTeacherLogprobs) -> torch.Tensor:
    """Support ids `[n, K]`, replicated: ranked by the raw logits, as the reference."""
    sparse = isinstance(teacher, SparseTeacherLogprobs)
    vocab, group = shard.true_vocab_size, shard.group
    teacher_ids = student_ids = None
    if support in ("teacher_topk", "union"):
        teacher_ids = (sparse_teacher_topk(teacher, k).reshape(-1, k) if sparse
                       else vocab_parallel_topk(teacher, k, vocab, group)[1])
    if support in ("student_topk", "union"):
        if sparse and teacher.student_ids is not None:
            candidates = teacher.student_ids.long()
            at_candidates = values_at_ids(shard, student.detach(), candidates.clamp_min(0))
            student_ids = top_k_among(at_candidates, candidates, k)
        else:
            student_ids = vocab_parallel_topk(student.detach(), k, vocab, group)[1]
    return support_ids(support, teacher_ids, student_ids)


def _dense_teacher_on_support(shard: Shard, teacher: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor,
                              mode: str, temperature: float,
                              dtype: torch.dtype) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A teacher logits shard's scaled logits (renormalised mode) or log-probs (tail) at the support ids
    `[n, K]`, -inf on unused slots, and its tail bucket `[n, 1]` (tail mode, else None)."""
    scaled_t = shard.scaled(teacher, temperature, dtype)
    lq_s = values_at_ids(shard, scaled_t, ids)
    tail_q = None
    if mode == "tail":
        lse_t = vocab_parallel_log_normalizer(teacher, temperature, shard.true_vocab_size,
                                              group=shard.group).to(dtype).unsqueeze(-1)
        lq_s = lq_s - lse_t
        tail_q = _complement_logsumexp(shard, scaled_t, ids, valid) - lse_t
    return lq_s.masked_fill(~valid, float("-inf")), tail_q


def _complement_logsumexp(shard: Shard, scaled: torch.Tensor, ids: torch.Tensor,
                          valid: torch.Tensor) -> torch.Tensor:
    """`log sum_{v not in S} exp(scaled_v)` `[N, 1]` over the unpadded vocabulary (padding is -inf in `scaled`),
    S = `ids[valid]`; -inf with zero gradient where S covers the vocabulary (as `safe_logsumexp`)."""
    local = ids - shard.start
    mine = valid & (local >= 0) & (local < shard.width)
    in_support = torch.zeros(scaled.shape, dtype=torch.int32, device=scaled.device)
    in_support = in_support.scatter_add(-1, torch.where(mine, local, 0), mine.to(torch.int32)) > 0
    return masked_logsumexp(shard, scaled, ~in_support).unsqueeze(-1)
