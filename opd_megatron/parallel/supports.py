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
- renormalised mode: both sides' scaled logits at the ids, `shard.values_at_ids` (each rank's owned entries, 0
  elsewhere, then an all-reduce SUM through `ReduceFromTP`: backward identity, so the gradient of a support slot
  reaches only the rank owning its id), renormalised on the `[N, K]` slots;
- tail mode: the student's log-probs at the ids and its tail bucket from one autograd Function (`_SupportTail`,
  closed-form backward derived there), on `support_statistics`: per chunk the row maximum, `exp(x - max)` with
  the support's entries zeroed and one row sum, which is the complement's mass directly; a dense teacher's side
  is the same statistics without gradient. Communication: one all-reduce MAX `[N]` and one SUM of `[2, N]` and
  the `[N, K]` logits at the ids per side.
Communication per call: at most two top-k all-gathers of `[tp, N, k]`, the all-reduces above. Cost (CPU, V=32k,
k=64, tail): a served teacher's support about a megatron cross-entropy; a dense teacher adds its top-k and its
statistics (`docs/performance.md`).

Ids `>= true_vocab_size` (padding) never enter a support and carry no tail mass. The full-vocabulary support is
not offered here (its `[..., V]` result is what this module avoids): use `divergences.vocab_parallel_divergence`.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from opd_megatron.math.checks import MathInputError, require_choice, require_positive, require_positive_int
from opd_megatron.math.divergences import compute_dtype
from opd_megatron.math.supports import (MODES, SparseTeacherLogprobs, SupportedDistributions, check_sparse_request,
                                        check_sparse_teacher, log_normalize, sparse_tail, sparse_teacher_logprobs,
                                        sparse_teacher_topk, support_ids, top_k_among, top_k_positions)
from opd_megatron.parallel.shard import (Shard, check_inputs, debug_checks_enabled, flatten_rows, masked_logsumexp,
                                         require_some_mass, row_chunks, values_at_ids)
from opd_megatron.parallel.topk import vocab_parallel_topk

TOPK_SUPPORTS = ("teacher_topk", "student_topk", "union")


def vocab_parallel_build_support(student_logits_shard: torch.Tensor,
                                 teacher: torch.Tensor | SparseTeacherLogprobs, support: str, k: int,
                                 mode: str = "renormalized", *, student_temperature: float = 1.0,
                                 teacher_temperature: float = 1.0, true_vocab_size: Optional[int] = None,
                                 group=None, chunk_size: Optional[int] = None,
                                 keep_softmax: bool = False) -> SupportedDistributions:
    """`build_support` on TP shards: student logits `[..., V/tp]` (with gradient) and a teacher given either as
    its logits shard `[..., V/tp]` (a colocated teacher, detached) or as a `SparseTeacherLogprobs` (a server's
    answer, global ids, the same on every TP rank) -> `SupportedDistributions` with log-probs `[..., K(+1)]`,
    ids `[..., K]`, replicated on every TP rank and equal to the single-device `build_support` on the gathered,
    unpadded logits. The student's support log-probs carry gradient into each rank's own shard only.

    support: `teacher_topk`, `student_topk` or `union`; mode: `renormalized` or `tail`; the rules (k limits,
    sparse teacher needs, temperature with a sparse tail, ranking by the raw logits) are the reference's.
    `true_vocab_size`: the unpadded vocabulary (default: tp x V/tp). chunk_size: rows at a time for the passes
    over `[chunk, V/tp]` (the top-k selections, the tail's statistics and its gradient: one chunk's buffers at a
    time, and backward keeps only `[N, K]` / `[N]` tensors and a reference to the logits, so memory does not
    grow with N). keep_softmax (tail mode): the student's tail values `[N, V/tp]` are kept from forward and scaled
    into the gradient in place (`KeptTail`; one exp pass less in backward, and the logits are not kept), as
    megatron's cross-entropy keeps its softmax; the gradient is the same to rounding."""
    student, teacher_rows, shard, dtype = _checked_inputs(student_logits_shard, teacher, support, k, mode,
                                                          student_temperature, teacher_temperature,
                                                          true_vocab_size, group)
    tau_s, tau_t = float(student_temperature), float(teacher_temperature)
    sparse = isinstance(teacher, SparseTeacherLogprobs)
    pieces = row_chunks(student.shape[0], chunk_size)

    # The support and the teacher's side, chunk by chunk, without gradient.
    with torch.no_grad():
        if sparse and support == "teacher_topk":
            # The ids are chosen among the served ones: their log-probs come with them (the lookup among the served
            # and extra ids, `[N, K, k_t]` comparisons, would find the same values).
            ids, served_lq = _served_topk(teacher_rows(slice(None)), k)
        else:
            ids = torch.cat([_support_ids(shard, support, k, student[piece], teacher_rows(piece))
                             for piece in pieces])
    valid = ids >= 0
    safe_ids = ids.clamp_min(0)

    # The student: its scaled logits at the ids (renormalised: directly, as the reference, for precision; one
    # differentiable gather), or its global log-probs there and the tail bucket (`_SupportTail`).
    if mode == "tail":
        keep = keep_softmax and torch.is_grad_enabled() and student.requires_grad
        lp_s, tail_p = _SupportTail.apply(student, safe_ids, valid, shard, tau_s, dtype, chunk_size, keep)
    else:
        lp_s = values_at_ids(shard, student, safe_ids).to(dtype) / tau_s
    lp_s = lp_s.masked_fill(~valid, float("-inf"))

    with torch.no_grad():
        if sparse and support == "teacher_topk":
            lq_s = served_lq.to(dtype) / tau_t
            tail_q = sparse_tail(lq_s, tail_p) if mode == "tail" else None
        elif sparse:
            lq_s = torch.cat([sparse_teacher_logprobs(teacher_rows(piece), safe_ids[piece], valid[piece], support, k,
                                                      tau_t, dtype, require_found=debug_checks_enabled())
                              for piece in pieces])
            tail_q = sparse_tail(lq_s, tail_p) if mode == "tail" else None
        elif mode == "tail":
            teacher_flat = teacher_rows(slice(None))
            at_ids, lse_t, complement_t = support_statistics(shard, teacher_flat, safe_ids, valid, tau_t, dtype,
                                                             chunk_size)
            lq_s = (at_ids - lse_t[:, None]).masked_fill(~valid, float("-inf"))
            tail_q = (complement_t - lse_t)[:, None]
        else:
            lq_s = (values_at_ids(shard, teacher_rows(slice(None)), safe_ids).to(dtype) / tau_t).masked_fill(
                ~valid, float("-inf"))

    if mode == "renormalized":
        lp_s, lq_s = log_normalize(lp_s), log_normalize(lq_s)
    else:
        lp_s = torch.cat([lp_s, tail_p], dim=-1)
        lq_s = torch.cat([lq_s, tail_q], dim=-1)
    leading, slots = tuple(student_logits_shard.shape[:-1]), lp_s.shape[-1]
    return SupportedDistributions(lp_s.reshape(*leading, slots), lq_s.reshape(*leading, slots),
                                  ids.reshape(*leading, ids.shape[-1]), support, k, mode, sparse)


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


def _served_topk(teacher: SparseTeacherLogprobs, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`sparse_teacher_topk` (the teacher's top-k among the served ids, ascending, ties to the lower id) `[N, k]`
    and the served log-probs at them, read off the same positions."""
    by_id = torch.argsort(teacher.ids, dim=-1, stable=True)
    sorted_ids, sorted_logprobs = teacher.ids.gather(-1, by_id), teacher.logprobs.detach().gather(-1, by_id)
    chosen = top_k_positions(sorted_logprobs, k)
    return sorted_ids.gather(-1, chosen).long(), sorted_logprobs.gather(-1, chosen)


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




# ---------------------------------------------------------------------------------------------------------------
# The tail mode's statistics and the student's autograd Function


def _owned_slots(shard: Shard, ids: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For support ids `[n, K]`: whether this rank holds each valid one's column, and the local column (clamped
    into the shard where not owned: the caller masks those slots)."""
    local = ids - shard.start
    owned = valid & (local >= 0) & (local < shard.valid_width)
    return owned, local.clamp(0, max(shard.valid_width - 1, 0))


def support_statistics(shard: Shard, logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor,
                       temperature: float, dtype: torch.dtype, chunk_size: Optional[int],
                       kept: Optional["KeptTail"] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a support's tail mode needs of one side, without gradient: with `x = logits / tau` (in `dtype`) and S
    the valid support ids `[N, K]` (distinct, clamped to 0 where not valid), returns `x` at the ids `[N, K]`
    (valid slots; 0 elsewhere), the global log-normaliser `lse = log sum_v exp(x_v)` `[N]` and the log of the
    complement's mass `log C = log sum_{v not in S} exp(x_v)` `[N]` over the unpadded vocabulary (-inf where S
    covers it or every entry outside S is -inf), replicated. So `log p_S = x_S - lse` and the tail bucket is
    `log C - lse`, the reference's `log_softmax` at the ids and `safe_logsumexp` of its complement.

    Per chunk, one pass to find the local row maximum `m_r`, then `exp(x - m_r)` into a buffer `[chunk, V/tp + 1]`
    (two passes: shift, exp), the S entries set to 0 there (a scatter of K per row into the spare last column where
    this rank does not own the id) and one row sum: the complement's partial sum directly, a sum of positive
    terms, not `total - sum_S`, so a tail of mass 1e-30 keeps its digits. The support's own partial mass is
    summed from the gathered `x` `[n, K]`. Communication (tp > 1): one all-reduce MAX of `m_r` `[N]` and one
    all-reduce SUM of the rescaled partial sums `[2, N]` and the owners' `x` at the ids `[N, K]`, for all chunks
    at once. A complement whose shifted terms underflow (mass below `2^-100` of the row maximum's in float32) is
    recomputed for those rows with its own maximum as shift (`masked_logsumexp`: a host read of the row test, a
    collective every rank runs alike since the test is on replicated values).

    kept: where given (`_SupportTail` with `keep_softmax`), the exp values stay in `kept.exp` `[N, V/tp]` (all
    rows, not one chunk's reused buffer; the S entries zeroed, padding columns 0) with the shift each row used in
    `kept.shift` `[N]`: its local maximum, or where the complement is so small against it that the kept values
    would underflow (`shift - log C` above half of the dtype's exponent range), `log C` itself, those rows
    recomputed at the end. So `exp(x_v - log C) = kept.exp[v] * exp(kept.shift - log C)` for every v off S, each
    factor finite, for the gradient."""
    rows, width = logits.shape[0], shard.valid_width
    device = logits.device
    local_max = torch.full((rows,), float("-inf"), dtype=dtype, device=device)
    partial = torch.zeros(2, rows, dtype=dtype, device=device)  # [complement, whole] exp-sums shifted by m_r
    at_ids = torch.zeros(ids.shape, dtype=dtype, device=device)
    owned, local = _owned_slots(shard, ids, valid)
    if kept is not None:
        column, _, _ = kept.columns(owned, local)
    if width > 0:
        pieces = row_chunks(rows, chunk_size)
        span = max(piece.stop - piece.start for piece in pieces)
        buffer = torch.empty(span, width + 1, dtype=dtype, device=device) if kept is None else None
        for piece in pieces:
            n = piece.stop - piece.start
            x = logits[piece, :width]
            top = x.amax(dim=-1).to(dtype) / temperature  # max commutes with the (monotone) division
            shift = top.masked_fill(torch.isneginf(top), 0.0)
            if kept is None:
                exp_x = buffer[:n, :width]
                _shifted(x, shift, temperature, exp_x).exp_()
                buffer[:n].scatter_(-1, torch.where(owned[piece], local[piece], width), 0.0)
            else:
                exp_x = kept.exp[piece, :width]
                _shifted(x, shift, temperature, exp_x).exp_()
                kept.zero_support(exp_x, column[piece], owned[piece])
                kept.shift[piece] = shift
            picked = x.gather(-1, local[piece]).to(dtype) / temperature
            at_ids[piece] = torch.where(owned[piece], picked, 0.0)
            in_support = torch.where(owned[piece], (picked - shift[:, None]).exp(), 0.0).sum(dim=-1)
            complement = exp_x.sum(dim=-1)
            local_max[piece] = top
            partial[0, piece], partial[1, piece] = complement, complement + in_support
        del buffer
    if shard.tp > 1:
        row_max = shard.all_reduce(local_max.clone(), dist.ReduceOp.MAX)
        partial.mul_(torch.where(torch.isneginf(local_max), 0.0, (local_max - row_max).exp()))
        reduced = shard.all_reduce(torch.cat([partial.reshape(-1), at_ids.reshape(-1)]))
        partial, at_ids = reduced[:2 * rows].reshape(2, rows), reduced[2 * rows:].reshape(ids.shape)
    else:
        row_max = local_max
    require_some_mass(row_max)
    shift = row_max.masked_fill(torch.isneginf(row_max), 0.0)
    lse = shift + partial[1].log()
    log_complement = shift + partial[0].log()
    # Underflow: no shifted complement term survived (or only denormals), though S leaves ids out.
    outside = shard.true_vocab_size - valid.sum(dim=-1)
    underflow = (partial[0] < torch.finfo(dtype).tiny * 2.0 ** 26) & (outside > 0)
    if bool(underflow.any()):
        rows_at = underflow.nonzero().squeeze(-1)
        scaled = shard.scaled(logits[rows_at], temperature, dtype)
        members = torch.ones(rows_at.shape[0], shard.width + 1, dtype=torch.bool, device=device)
        members.scatter_(-1, torch.where(owned[rows_at], local[rows_at], shard.width), False)
        log_complement[rows_at] = masked_logsumexp(shard, scaled, members[:, :shard.width])
    if kept is not None and width > 0:
        kept.shift_rows_to_complement(shard, logits, log_complement, column, owned, temperature)
    return at_ids, lse, log_complement


class KeptTail:
    """The student's tail values kept from forward for backward (`_SupportTail` with `keep_softmax`): `exp`
    `[N, V/tp]` in the compute dtype, `exp(x - shift)` with the support's entries zeroed and padding columns 0,
    and `shift` `[N]`; `support_statistics` fills both. Backward scales `exp` in place into the gradient, so the
    buffer the forward fills is the one returned (megatron's cross-entropy trade: one `[N, V/tp]` buffer from
    forward to backward, instead of the logits kept and two passes recomputed)."""

    def __init__(self, shard: Shard, rows: int, dtype: torch.dtype, device) -> None:
        self.exp = torch.empty(rows, shard.width, dtype=dtype, device=device)
        if shard.valid_width < shard.width:
            self.exp[:, shard.valid_width:] = 0.0
        self.shift = torch.zeros(rows, dtype=dtype, device=device)

    @staticmethod
    def columns(owned: torch.Tensor, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A column per support slot `[n, K]` for scatters into `[n, V/tp]` rows without a spare column: its own
        where this rank owns the id, else the row's first owned column (written with that column's value), or
        column 0 where the row owns none (written with its own value): duplicates always carry equal values."""
        first = owned.to(torch.int8).argmax(dim=-1, keepdim=True)
        any_owned = owned.any(dim=-1, keepdim=True)
        return torch.where(owned, local, torch.where(any_owned, local.gather(-1, first), 0)), first, any_owned

    @staticmethod
    def zero_support(exp_x: torch.Tensor, column: torch.Tensor, owned: torch.Tensor) -> None:
        """Zero the owned support entries of `exp_x` `[n, V/tp']` in place (see `columns`)."""
        any_owned = owned.any(dim=-1, keepdim=True)
        fill = torch.where(any_owned, 0.0, exp_x[:, :1])
        exp_x.scatter_(-1, column, torch.where(owned, 0.0, fill))

    def shift_rows_to_complement(self, shard: Shard, logits: torch.Tensor, log_complement: torch.Tensor,
                                 column: torch.Tensor, owned: torch.Tensor, temperature: float) -> None:
        """Rows whose complement is tiny against their maximum (`shift - log C` > half the exponent range: the
        kept values of the tail could underflow where its gradient `exp(x_v - log C)` is not small) are recomputed
        with `log C` as their shift (values <= 1); a rank-local choice, no communication."""
        limit = -math.log(torch.finfo(self.exp.dtype).tiny) / 2.0
        far = torch.isfinite(log_complement) & (self.shift - log_complement > limit)
        if not bool(far.any()):
            return
        rows_at = far.nonzero().squeeze(-1)
        width = shard.valid_width
        values = torch.empty(rows_at.shape[0], width, dtype=self.exp.dtype, device=self.exp.device)
        _shifted(logits[rows_at, :width], log_complement[rows_at], temperature, values).exp_()
        self.zero_support(values, column[rows_at], owned[rows_at])
        self.exp[rows_at, :width] = values
        self.shift[rows_at] = log_complement[rows_at]


def _shifted(x: torch.Tensor, shift: torch.Tensor, temperature: float, out: torch.Tensor) -> torch.Tensor:
    """`x / tau - shift[:, None]` into `out` in one pass (`x * (1 / tau)`, which may differ from `x / tau` in the
    last bit)."""
    if temperature == 1.0:
        return torch.sub(x, shift[:, None], out=out)
    return torch.add(-shift[:, None], x, alpha=1.0 / temperature, out=out)


class ChunkedGradient:
    """The gradient `[N, V/tp]` of a logits shard, written chunk by chunk: `chunks()` yields each chunk's rows and
    the `[chunk, valid]` tensor to write their gradient into (this rank's real columns), and `grad` is the result.
    Where the real columns are the whole shard and the dtypes agree, that tensor is the gradient's own rows (no
    copy, and `grad` is `empty`: every entry is written); otherwise one reused `[chunk, valid]` buffer, copied into
    a zero-filled gradient (padding columns stay 0) after the caller's work on the chunk. Shared by the backward
    passes of `_SupportTail` and `cr_opd._NormalizerAndLogits`."""

    def __init__(self, logits: torch.Tensor, valid: int, dtype: torch.dtype, chunk_size: Optional[int]) -> None:
        self.whole = valid == logits.shape[1] and dtype == logits.dtype
        self.grad = torch.empty_like(logits) if self.whole else torch.zeros_like(logits)
        self.valid, self.dtype, self.pieces = valid, dtype, row_chunks(logits.shape[0], chunk_size)

    def chunks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        if self.valid == 0:
            return
        span = max(piece.stop - piece.start for piece in self.pieces)
        buffer = None if self.whole else torch.empty(span, self.valid, dtype=self.dtype, device=self.grad.device)
        for piece in self.pieces:
            out = self.grad[piece] if buffer is None else buffer[:piece.stop - piece.start]
            yield piece, out
            if buffer is not None:
                self.grad[piece, :self.valid] = out.to(self.grad.dtype)


class _SupportTail(torch.autograd.Function):
    """The student's side of a tail-mode support: `log pi` at the support ids `[N, K]` and the tail bucket
    `log sum_{v not in S} pi_v` `[N, 1]`, replicated (`support_statistics`; unused slots hold an arbitrary
    finite value, which the caller masks to -inf). Saves the logits shard (a reference), the ids, `[N, K]` and
    `[N]` statistics.

    Gradient [Ours]. With `x = z / tau`, `lse` the global normaliser, `C = sum_{v not in S} exp(x_v)`,
    `P = C / exp(lse)` the tail mass and `pi_v = exp(x_v - lse)`: `d log pi_u / d x_v = delta_uv - pi_v` and
    `d log P / d x_v = [v not in S] exp(x_v) / C - pi_v`. So for upstream gradients `g_j` (slot j, id `s_j`) and
    `g_T` (tail), with `G = sum_j g_j + g_T`:

        d L / d z_v = (g_j - G pi_v) / tau                                  v = s_j in S,
        d L / d z_v = exp(x_v - log C) (g_T - G P) / tau                    v not in S,

    the second since `g_T exp(x_v) / C - G pi_v = exp(x_v - log C) (g_T - G exp(log C - lse))`. Written this way
    nothing overflows: `exp(x_v - log C) <= 1` off S and `P <= 1`, even where the tail's mass is far below
    float32's range relative to `pi` (as 1 / P would not be). A row whose tail is empty (`log C = -inf`: S covers
    the vocabulary or the rest is masked) has, as the reference's `safe_logsumexp`, zero gradient through the
    tail, so `g_T` is dropped there. Backward, per chunk: `exp(x - log C)` (two passes) times the row factor (one
    pass) into the gradient, then the K entries of S overwritten with their own formula (a scatter); no
    communication, no `[N, V/tp]` temporaries beyond the gradient."""

    @staticmethod
    def forward(ctx, logits, ids, valid, shard: Shard, temperature: float, dtype: torch.dtype,
                chunk_size: Optional[int], keep_softmax: bool = False):
        kept = KeptTail(shard, logits.shape[0], dtype, logits.device) if keep_softmax else None
        at_ids, lse, log_complement = support_statistics(shard, logits, ids, valid, temperature, dtype, chunk_size,
                                                         kept)
        log_p = at_ids - lse[:, None]
        tail = (log_complement - lse)[:, None]
        if kept is None:
            ctx.save_for_backward(logits, ids, valid, log_p, lse, log_complement)
        else:       # the logits are not needed again: the kept values replace them
            ctx.save_for_backward(kept.exp, ids, valid, log_p, lse, log_complement, kept.shift)
            ctx.logits_dtype = logits.dtype
        ctx.kept = kept is not None
        ctx.shard, ctx.temperature, ctx.chunk_size = shard, temperature, chunk_size
        return log_p, tail

    @staticmethod
    def backward(ctx, grad_log_p, grad_tail):
        if ctx.kept:
            try:
                kept_exp, ids, valid, log_p, lse, log_complement, kept_shift = ctx.saved_tensors
            except RuntimeError as exc:     # autograd's version check: an earlier backward scaled them in place
                raise RuntimeError("the support's tail values kept from forward (keep_softmax=True) became the "
                                   "gradient of an earlier backward through this graph; a second backward "
                                   "(retain_graph, gradcheck) needs keep_softmax=False") from exc
            logits = None
        else:
            logits, ids, valid, log_p, lse, log_complement = ctx.saved_tensors
        shard, tau = ctx.shard, ctx.temperature
        dtype, width = lse.dtype, shard.valid_width
        empty = torch.isneginf(log_complement)
        grad_slots = torch.where(valid, grad_log_p.to(dtype), 0.0)
        grad_tail = torch.where(empty, 0.0, grad_tail.to(dtype).squeeze(-1))
        total = grad_slots.sum(dim=-1) + grad_tail
        factor = torch.where(empty, 0.0, (grad_tail - total * (log_complement - lse).exp()) / tau)
        base = torch.where(empty, lse, log_complement)
        on_support = (grad_slots - total[:, None] * log_p.exp()) / tau
        owned, local = _owned_slots(shard, ids, valid)
        # Rows with no owned slot write column 0's own value back (it is not in S on this rank): a scatter needs
        # an index for every slot, and duplicates must carry equal values.
        column, first, any_owned = KeptTail.columns(owned, local)

        if ctx.kept:
            # exp(x_v - log C) factor = kept * exp(shift - log C) factor off S (KeptTail); 0 on empty-tail rows.
            scale = torch.where(empty, 0.0, (kept_shift - base).exp() * factor)
            # A rank holding only padding columns (width 0) has nothing to scale: its gradient is the zeros it kept.
            for piece in row_chunks(kept_exp.shape[0], ctx.chunk_size) if width > 0 else ():
                out = kept_exp[piece, :width]
                out.mul_(scale[piece, None])
                keep_first = torch.where(any_owned[piece], on_support[piece].gather(-1, first[piece]), out[:, :1])
                out.scatter_(-1, column[piece], torch.where(owned[piece], on_support[piece], keep_first))
            return kept_exp.to(ctx.logits_dtype), None, None, None, None, None, None, None
        grad = ChunkedGradient(logits, width, dtype, ctx.chunk_size)
        for piece, out in grad.chunks():
            _shifted(logits[piece, :width], base[piece], tau, out).exp_().mul_(factor[piece, None])
            keep_first = torch.where(any_owned[piece], on_support[piece].gather(-1, first[piece]), out[:, :1])
            out.scatter_(-1, column[piece], torch.where(owned[piece], on_support[piece], keep_first))
        return grad.grad, None, None, None, None, None, None, None
