"""Vocabulary statistics for gates and diagnostics from TP-sharded logits `[..., V/tp]`, without gradient and
without gathering the vocabulary: per position `[...]`, replicated on every TP rank, each equal to the
single-device definition of `gates.py` / `diagnostics.py` on the gathered, unpadded logits.

- `vocab_parallel_teacher_confidence`: `max_v q_v` (the `teacher_confidence` gate keeps `>= c`): the local max
  and the normaliser, two all-reduces (MAX, SUM) of `[N]` plus one MAX.
- `vocab_parallel_vocab_entropy`: `H(p)` of teacher or student (the `teacher_entropy` gate keeps `H(q) <= h`;
  `entropy/teacher`, `entropy/student`): `divergences.vocab_parallel_entropy` without gradient.
- `vocab_parallel_topk_overlap`: `|topk_q & topk_pi| / k` (`agreement/topk_overlap`): two distributed top-k
  (all-gathers of `[tp, N, k]`), then a replicated `[N, k, k]` comparison.
- `vocab_parallel_student_mass_on_teacher_support`: `sum_{v in topk_q} pi_v`
  (`agreement/student_mass_on_teacher_support`): the student's logits at the teacher's top-k ids (all-reduce of
  `[N, k]`) minus its normaliser.
The teacher is a logits shard (colocated) or, for the top-k statistics, a `SparseTeacherLogprobs` (a server's
answer, replicated): its top-k is then chosen among the served ids. Top-k ties go to the lower id (as
`vocab_parallel_topk`); `diagnostics.py` uses `torch.topk`, whose tie order is unspecified, so the two agree
wherever the k-th value is not tied.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from opd_megatron.math.checks import MathInputError, require_positive, require_positive_int
from opd_megatron.math.divergences import compute_dtype
from opd_megatron.math.supports import SparseTeacherLogprobs, check_sparse_teacher, sparse_teacher_topk
from opd_megatron.parallel.divergences import vocab_parallel_entropy
from opd_megatron.parallel.shard import (Shard, check_inputs, checked_rows, debug_checks_enabled, flatten_rows,
                                         global_log_normalizer, values_at_ids)
from opd_megatron.parallel.topk import vocab_parallel_topk


@torch.no_grad()
def vocab_parallel_teacher_confidence(teacher_logits_shard: torch.Tensor, teacher_temperature: float = 1.0,
                                      true_vocab_size: Optional[int] = None, *, group=None) -> torch.Tensor:
    """`max_v q_v` of `q = softmax(z^T / tau_T)`, teacher logits `[..., V/tp]` -> `[...]` in (0, 1]; the
    `teacher_confidence_gate` keeps positions with `>= c`."""
    require_positive("teacher_temperature", teacher_temperature)
    flat, shard = checked_rows("teacher_logits_shard", teacher_logits_shard, true_vocab_size, group)
    dtype = compute_dtype(flat)
    lse = global_log_normalizer(shard, flat, float(teacher_temperature), dtype, None)
    top1 = shard.all_reduce(shard.scaled(flat, teacher_temperature, dtype).amax(dim=-1), dist.ReduceOp.MAX)
    return (top1 - lse).exp().reshape(teacher_logits_shard.shape[:-1])


@torch.no_grad()
def vocab_parallel_vocab_entropy(logits_shard: torch.Tensor, temperature: float = 1.0,
                                 true_vocab_size: Optional[int] = None, *, group=None,
                                 chunk_size: Optional[int] = None) -> torch.Tensor:
    """`H(p) = -sum_v p_v log p_v` (nats) of `softmax(z / tau)`, logits `[..., V/tp]` -> `[...]`, no gradient:
    the teacher's for the `teacher_entropy` gate, either side's for `entropy/*`."""
    return vocab_parallel_entropy(logits_shard, temperature, true_vocab_size, group=group, chunk_size=chunk_size)


def _teacher_topk_ids(shard: Shard, teacher: torch.Tensor | SparseTeacherLogprobs, student: torch.Tensor,
                      k: int, leading: tuple[int, ...]) -> torch.Tensor:
    """Checks both inputs and returns the teacher's top-k ids `[N, k]` (ascending, replicated)."""
    vocab = shard.true_vocab_size
    if isinstance(teacher, SparseTeacherLogprobs):
        check_inputs(shard, {"student_logits_shard": student})
        check_sparse_teacher(teacher, leading, vocab, values=debug_checks_enabled())
        require_positive_int("k", k, at_most=teacher.ids.shape[-1],
                             what="the teacher top-k returned (teacher.ids per position)")
        return sparse_teacher_topk(teacher, k).reshape(-1, k)
    if not isinstance(teacher, torch.Tensor):
        raise MathInputError(f"teacher: expected a teacher logits shard [..., V/tp] (a tensor) or "
                             f"SparseTeacherLogprobs, got {type(teacher).__name__}")
    teacher_flat = flatten_rows("teacher", teacher)
    check_inputs(shard, {"student_logits_shard": student, "teacher_logits_shard": teacher_flat})
    require_positive_int("k", k, at_most=vocab, what=f"the vocabulary size V = {vocab}")
    return vocab_parallel_topk(teacher_flat, k, vocab, shard.group)[1]


@torch.no_grad()
def vocab_parallel_topk_overlap(student_logits_shard: torch.Tensor,
                                teacher: torch.Tensor | SparseTeacherLogprobs, k: int,
                                true_vocab_size: Optional[int] = None, *, group=None) -> torch.Tensor:
    """`|topk_q & topk_pi| / k` `[...]` from student logits `[..., V/tp]` and the teacher (logits shard, or a
    server's top-k answer with at least k ids). Rankings by the raw logits (a temperature does not change them)."""
    student = flatten_rows("student_logits_shard", student_logits_shard)
    shard = Shard(student.shape[-1], true_vocab_size, group)
    teacher_ids = _teacher_topk_ids(shard, teacher, student, k, tuple(student_logits_shard.shape[:-1]))
    student_ids = vocab_parallel_topk(student, k, shard.true_vocab_size, shard.group)[1]
    shared = (student_ids.unsqueeze(-1) == teacher_ids.unsqueeze(-2)).any(dim=-1).sum(dim=-1)
    return (shared.double() / k).reshape(student_logits_shard.shape[:-1])


@torch.no_grad()
def vocab_parallel_student_mass_on_teacher_support(student_logits_shard: torch.Tensor,
                                                   teacher: torch.Tensor | SparseTeacherLogprobs, k: int,
                                                   student_temperature: float = 1.0,
                                                   true_vocab_size: Optional[int] = None, *,
                                                   group=None) -> torch.Tensor:
    """`sum_{v in topk_q} pi_v` `[...]`, `pi = softmax(z^S / tau_S)` from student logits `[..., V/tp]`, over the
    teacher's top-k ids (from its logits shard, or among a server's answer)."""
    require_positive("student_temperature", student_temperature)
    student = flatten_rows("student_logits_shard", student_logits_shard)
    shard = Shard(student.shape[-1], true_vocab_size, group)
    teacher_ids = _teacher_topk_ids(shard, teacher, student, k, tuple(student_logits_shard.shape[:-1]))
    dtype = compute_dtype(student)
    lse = global_log_normalizer(shard, student, float(student_temperature), dtype, None)
    at_ids = values_at_ids(shard, shard.scaled(student, student_temperature, dtype), teacher_ids)
    return (at_ids - lse.unsqueeze(-1)).exp().sum(dim=-1).reshape(student_logits_shard.shape[:-1])
