"""Vocab-parallel twins of `math/divergences.py` (the Route A divergences), `math/regularizers.py::entropy`, the
sampled-token log-probabilities and the log-normaliser, on tensor-parallel-sharded logits, never gathering the
vocabulary. The shard layout, the gradient convention (`ReduceFromTP` / `CopyToTP`), the input checks and the
chunking are `shard.py`'s.

Communication: only all-reduces of `[N]`-sized statistics over the TP group (MAX of the row maxima, SUM of the
exp-sums, SUM of per-rank partial sums), the pattern of megatron-core's `tensor_parallel/cross_entropy.py`.

Chunking: every function takes `chunk_size` (rows of `[N, V/tp]` at a time), so float temporaries are
`chunk x V/tp`. What each op saves for backward:
- token log-probs (`_TokenLogProbs`): the logits shard (a reference to the caller's tensor, no copy), the token ids
  and the normaliser `[N]`; backward recomputes the softmax per chunk. No communication in backward.
- reverse KL (`_ReverseKL`): both logits shards (references) and `[N]` statistics (the loss, the per-row
  corrections to the local normalisers); one pass over each chunk forward (local log-softmaxes, no separate
  normaliser passes), backward recomputes it per chunk, using `d RKL / d z_v = pi_v (log pi_v - log q_v - RKL)
  / tau_S`; with keep_softmax, `pi` and the log-ratio `[N, V/tp]` are kept instead and become the gradient in
  place. No communication in backward.
- the other dense divergences (`_Divergence`: forward KL, total variation, generalized JSD, skew forward and
  reverse KL, with their chunk kernels and closed-form gradients in `divergence_kernels.py`): both logits shards
  (references), the global normalisers `[2, N]` and the kernel's row statistics `[k, N]`; forward one
  log-softmax per side per chunk (plus, at tp > 1, the all-reduce MAX and SUM of the `[2, chunk]` local
  normalisers that correct them), backward recomputes the log-probs per chunk (one pass per side). No
  communication in backward.
- log-normaliser (`shard.LogNormalizer`): the logits shard (reference) and the normaliser `[N]`.
- the entropy (and the fused path's divergences) go through autograd on `[chunk, V/tp]` pieces: with `chunk_size` set
  and gradient enabled, each chunk runs under activation checkpointing (saves only its inputs, recomputes the
  chunk, all-reduces included, in backward); without `chunk_size`, autograd keeps its `[N, V/tp]` temporaries.

Inputs `[N, V/tp]` or `[B, T, V/tp]` (leading dims are flattened and restored). Half precision is computed in
float32, float64 stays float64, as in the references. Outside an initialised megatron model-parallel state (and
without `group`) the functions run as tp=1 without communication.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, TypedDict

import torch
import torch.distributed as dist
from typing_extensions import Unpack

from opd_megatron.math.checks import MathInputError, require_positive, require_positive_int
from opd_megatron.math.divergences import compute_dtype, divergence_from_log_probs, require_divergence_parameters
from opd_megatron.parallel import triton_divergences
from opd_megatron.parallel.divergence_kernels import (DivergenceKernel, ForwardKL, GeneralizedJSD, SkewForwardKL,
                                                      SkewReverseKL, TotalVariation, Zero, compiled,
                                                      compiled_kernels_enabled, gradient_from_logits,
                                                      local_normalizers, statistics_from_logits)
from opd_megatron.parallel.shard import (CopyToTP, LogNormalizer, ReduceFromTP, Shard, check_inputs, checked_rows,
                                         chunked_rows, debug_checks_enabled, flatten_rows, global_log_normalizer,
                                         require_some_mass, row_chunks, row_pieces)

# ---------------------------------------------------------------------------------------------------------------
# Autograd ops


class _TokenLogProbs(torch.autograd.Function):
    """`log p(y) = z_y / tau - logsumexp(z / tau)` `[N]`, replicated. Forward: local max -> all-reduce MAX ->
    local exp-sum -> all-reduce SUM (`global_log_normalizer`), and one all-reduce SUM of the owning rank's `z_y`.
    Saves the logits shard
    (reference), the ids and the normaliser `[N]`; backward `(onehot(y) - softmax) / tau` per chunk, no
    communication (the output is replicated, so each rank's gradient is already the full one)."""

    @staticmethod
    def forward(ctx, logits, token_ids, shard: Shard, temperature: float, chunk_size: Optional[int],
                keep_softmax: bool = False):
        dtype = compute_dtype(logits)
        ctx.softmax = torch.empty(logits.shape, dtype=dtype, device=logits.device) if keep_softmax else None
        lse = global_log_normalizer(shard, logits, temperature, dtype, chunk_size, softmax_out=ctx.softmax)
        owned, index = _owned_columns(shard, token_ids)
        # A gather and a where, not boolean indexing (whose result size is read on the host: a sync).
        picked = logits.gather(-1, index).squeeze(-1).to(dtype) / temperature
        picked = shard.all_reduce(torch.where(owned, picked, 0.0))
        ctx.save_for_backward(logits, token_ids, lse)
        ctx.shard, ctx.temperature, ctx.chunk_size = shard, temperature, chunk_size
        return picked - lse

    @staticmethod
    def backward(ctx, grad_out):
        logits, token_ids, lse = ctx.saved_tensors
        shard, tau = ctx.shard, ctx.temperature
        softmax, ctx.softmax = ctx.softmax, None  # consumed: it becomes the gradient (megatron CE does the same)
        grad = softmax if softmax is not None and softmax.dtype == logits.dtype else torch.empty_like(logits)
        for piece in row_chunks(logits.shape[0], ctx.chunk_size):
            g = grad_out[piece].to(lse.dtype) / tau
            # -softmax * g written in place into the output chunk (no extra [chunk, V/tp] temporaries).
            chunk_grad = grad[piece] if grad.dtype == lse.dtype else torch.empty(
                grad[piece].shape, dtype=lse.dtype, device=grad.device)
            if softmax is None:
                torch.sub(shard.scaled(logits[piece], tau, lse.dtype), lse[piece, None], out=chunk_grad)
                chunk_grad.exp_()
            elif chunk_grad.data_ptr() != softmax[piece].data_ptr():
                chunk_grad.copy_(softmax[piece])
            chunk_grad.mul_(-g[:, None])
            owned, index = _owned_columns(shard, token_ids[piece])
            chunk_grad.scatter_add_(-1, index, torch.where(owned, g, 0.0).unsqueeze(-1))
            if chunk_grad.data_ptr() != grad[piece].data_ptr():
                grad[piece] = chunk_grad.to(grad.dtype)
        return grad, None, None, None, None, None


def _owned_columns(shard: Shard, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ids `[n]`: whether this rank holds each one's column, and the column `[n, 1]` to gather from or
    scatter into (any in-range column where not owned: the caller masks those entries out)."""
    local = token_ids - shard.start
    return (local >= 0) & (local < shard.width), local.clamp(0, shard.width - 1).unsqueeze(-1)


def _local_log_softmax(shard: Shard, logits: torch.Tensor, temperature: float, out: torch.Tensor,
                       scratch: torch.Tensor) -> Optional[torch.Tensor]:
    """`_log_softmax_and_normalizer`, with the normaliser only where it is needed: None at tp = 1, where the local
    normaliser is the global one."""
    lse = _log_softmax_and_normalizer(shard, logits, temperature, out, scratch)
    return None if shard.tp == 1 else lse


def _reverse_kl_chunk(shard: Shard, student: torch.Tensor, teacher: torch.Tensor, taus: tuple[float, float],
                      probs: torch.Tensor, ratio: torch.Tensor, scratch: torch.Tensor):
    """One chunk of `_ReverseKL` in three buffers `[chunk, valid]`: `probs = exp(a)` and `ratio = a - b` with
    `a`, `b` this rank's local log-softmaxes of student and teacher, and `S1 = sum_v exp(a_v) (a_v - b_v)`
    `[chunk]`, plus the local normalisers (tp > 1). Where `exp(a_v) = 0` (masked or padded student entries,
    underflow) the ratio is set to 0, so `0 * inf` never makes a NaN; the cheap test is a NaN in `S1`, and only
    those rows are fixed (a NaN that stays comes from NaN/+inf inputs and is reported by the caller)."""
    lse_s = _local_log_softmax(shard, student, taus[0], probs, scratch)
    lse_t = _local_log_softmax(shard, teacher, taus[1], ratio, scratch)
    torch.sub(probs, ratio, out=ratio)
    probs.exp_()
    s1 = torch.mul(probs, ratio, out=scratch).sum(dim=-1)
    bad = torch.isnan(s1)
    if bool(bad.any()):
        fixed = ratio[bad].masked_fill_(probs[bad] == 0, 0.0)
        ratio[bad] = fixed
        s1[bad] = (probs[bad] * fixed).sum(dim=-1)
    return s1, lse_s, lse_t


class _ReverseKL(torch.autograd.Function):
    """`RKL = sum_v pi_v (log pi_v - log q_v)` `[N]`, replicated, in one pass over each chunk (no separate
    normaliser passes). Each rank works with its local log-softmaxes `a = z - lse_r^S`, `b = t - lse_r^T`; with
    the corrections `c = lse - lse_r` to the global normalisers, `log pi = a - c_S`, `log q = b - c_T` and
    rank r's share of the sum is `exp(-c_S) (S1_r - (c_S - c_T))`, `S1_r = sum_v exp(a_v) (a_v - b_v)`, since
    `sum_v exp(a_v) = 1` [Ours]. Communication: all-reduce MAX and SUM of the stacked `[2, N]` local normalisers,
    one all-reduce SUM of the shares (none at tp = 1).

    Backward: `pi_v (log pi_v - log q_v - RKL) g / tau_S` [Ours: `d log pi_u / d z_v = (delta_uv - pi_v) / tau_S`
    and `sum_u pi_u (delta_uv - pi_v) = 0`] `= exp(a_v) (a_v - b_v - shift) * scale` with the per-row
    `shift = c_S - c_T + RKL`, `scale = exp(-c_S) g / tau_S`. keep_softmax=False recomputes `exp(a)` and `a - b`
    per chunk (memory: three `[chunk, V/tp]` buffers); True keeps both `[N, V/tp]` from the forward and turns
    them into the gradient in place (megatron CE's trade, one pass over the logits in all). No communication."""

    @staticmethod
    def forward(ctx, student, teacher, shard: Shard, student_temperature: float, teacher_temperature: float,
                chunk_size: Optional[int], keep_softmax: bool = False):
        dtype = compute_dtype(student, teacher)
        rows, valid = student.shape[0], shard.valid_width
        taus = (student_temperature, teacher_temperature)
        pieces = row_chunks(rows, chunk_size)
        span = max(piece.stop - piece.start for piece in pieces)
        full = (rows, valid)
        probs = torch.empty(full if keep_softmax else (span, valid), dtype=dtype, device=student.device)
        ratio = torch.empty_like(probs)
        scratch = torch.empty(span, valid, dtype=dtype, device=student.device)
        s1 = torch.zeros(rows, dtype=dtype, device=student.device)
        local_lse = torch.full((2, rows), float("-inf"), dtype=dtype, device=student.device)
        if valid > 0:
            for piece in pieces:
                n = piece.stop - piece.start
                p_buf, r_buf = (probs[piece], ratio[piece]) if keep_softmax else (probs[:n], ratio[:n])
                s1[piece], lse_s, lse_t = _reverse_kl_chunk(shard, student[piece], teacher[piece], taus, p_buf,
                                                            r_buf, scratch[:n])
                if shard.tp > 1:
                    local_lse[0, piece], local_lse[1, piece] = lse_s, lse_t
        del scratch
        correction = _normalizer_corrections(shard, local_lse)
        if correction is None:
            rkl, shift, scale = s1, torch.zeros_like(s1), torch.ones_like(s1)
        else:
            c_s, c_t = correction
            here = ~torch.isneginf(local_lse[0])  # a rank without student mass on a row adds 0 there
            shift = torch.where(here, c_s - c_t, 0.0)
            scale = torch.where(here, (-c_s).exp(), 0.0)
            rkl = shard.all_reduce(torch.where(here, scale * (s1 - shift), 0.0))
        ctx.save_for_backward(student, teacher, rkl, shift, scale)
        ctx.shard, ctx.taus, ctx.chunk_size = shard, taus, chunk_size
        ctx.kept, ctx.keep_softmax = ((probs, ratio) if keep_softmax else None), keep_softmax
        return rkl

    @staticmethod
    def backward(ctx, grad_out):
        student, teacher, rkl, shift, scale = ctx.saved_tensors
        shard, kept, ctx.kept = ctx.shard, ctx.kept, None  # the kept buffers become the gradient
        if ctx.keep_softmax and kept is None:
            raise RuntimeError("vocab_parallel_reverse_kl(keep_softmax=True): backward ran twice; its buffers "
                               "became the first gradient (use keep_softmax=False to retain the graph)")
        dtype, valid = rkl.dtype, shard.valid_width
        row_shift = (shift + rkl)[:, None]
        row_scale = (scale * grad_out.to(dtype) / ctx.taus[0])[:, None]
        whole = valid == student.shape[1] and dtype == student.dtype
        if kept is not None:
            probs, ratio = kept
            grad_valid = ratio.sub_(row_shift).mul_(probs).mul_(row_scale)
            if whole:
                return grad_valid, None, None, None, None, None, None
            grad = torch.zeros_like(student)
            grad[:, :valid] = grad_valid.to(student.dtype)
            return grad, None, None, None, None, None, None
        grad = torch.empty_like(student) if whole else torch.zeros_like(student)
        pieces = row_chunks(student.shape[0], ctx.chunk_size)
        span = max(piece.stop - piece.start for piece in pieces)
        buffers = [torch.empty(span, valid, dtype=dtype, device=student.device) for _ in range(2 if whole else 3)]
        for piece in pieces if valid > 0 else []:
            n = piece.stop - piece.start
            probs, scratch = buffers[0][:n], buffers[1][:n]
            ratio = grad[piece] if whole else buffers[2][:n]
            _reverse_kl_chunk(shard, student[piece], teacher[piece], ctx.taus, probs, ratio, scratch)
            ratio.sub_(row_shift[piece]).mul_(probs).mul_(row_scale[piece])
            if not whole:
                grad[piece, :valid] = ratio.to(grad.dtype)
        return grad, None, None, None, None, None, None


def _normalizer_corrections(shard: Shard, local_lse: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """From the ranks' local log-normalisers `[k, N]` (-inf where a rank has no mass): the corrections
    `c = lse - lse_r` `[k, N]` to the global normalisers (all-reduce MAX, then one all-reduce SUM); None at
    tp = 1 (no correction). With the debug checks on, raises where a distribution has no mass at all."""
    if shard.tp == 1:
        return None
    return _global_normalizers(shard, local_lse) - local_lse


def _global_normalizers(shard: Shard, local_lse: torch.Tensor) -> torch.Tensor:
    """The global log-normalisers `[k, N]` from the ranks' local ones (-inf where a rank has no mass): all-reduce
    MAX, then one all-reduce SUM of the rescaled exp-sums. With the debug checks on, raises where a distribution
    has no mass at all."""
    top = shard.all_reduce(local_lse.clone(), dist.ReduceOp.MAX)
    require_some_mass(top)
    return top + shard.all_reduce(torch.where(torch.isneginf(local_lse), 0.0, (local_lse - top).exp())).log()


def _log_softmax_and_normalizer(shard: Shard, logits: torch.Tensor, temperature: float, out: torch.Tensor,
                                scratch: torch.Tensor) -> torch.Tensor:
    """`log_softmax(logits / tau)` over this rank's real columns into `out [chunk, valid]`, and this rank's
    log-normaliser `[chunk]`: `max_v x_v - max_v out_v` (log_softmax's own `-log sum exp(x - max)` at the
    maximum, no extra exp pass). A row that is all -inf here gets `out = -inf` and normaliser -inf."""
    x = logits[:, :shard.valid_width]
    if temperature != 1.0 or x.dtype != out.dtype or not x.is_contiguous():
        scratch.copy_(x)
        if temperature != 1.0:
            scratch.div_(temperature)
        x = scratch
    torch.log_softmax(x, -1, out=out)
    top = x.amax(dim=-1)  # two amax passes cost less than one max with indices (3x slower on the CPU)
    lse = top - out.amax(dim=-1)
    empty = torch.isneginf(top)
    if bool(empty.any()):
        out[empty] = float("-inf")
        lse[empty] = float("-inf")
    return lse


def global_log_probs(shard: Shard, logits: torch.Tensor, temperature: float, lse: torch.Tensor,
                      out: torch.Tensor) -> torch.Tensor:
    """`logits / tau - lse` over this rank's real columns into `out [chunk, valid]` (one pass)."""
    x = logits[:, :shard.valid_width]
    if temperature == 1.0:
        return torch.sub(x, lse[:, None], out=out)
    return torch.add(-lse[:, None], x, alpha=1.0 / temperature, out=out)


def divergence_chunk(kernel: DivergenceKernel, shard: Shard, student: torch.Tensor, teacher: torch.Tensor,
                      taus: tuple[float, float], lp: torch.Tensor, lq: torch.Tensor, scratch: list[torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward chunk of `_Divergence`: the global log-probs into `lp`, `lq` (local log-softmaxes, then, at
    tp > 1, the corrections from one all-reduce MAX and one SUM of the stacked `[2, chunk]` local normalisers),
    the kernel's row statistics `[k, chunk]` (rank-local partial sums), the global normalisers `[2, chunk]` and
    the rows whose statistics are NaN (recomputed with the kernel's `fix`, module docstring of
    `divergence_kernels.py`)."""
    n = student.shape[0]
    local = torch.full((2, n), float("-inf"), dtype=lp.dtype, device=lp.device)
    if shard.valid_width > 0:
        local[0] = _log_softmax_and_normalizer(shard, student, taus[0], lp, scratch[0])
        local[1] = _log_softmax_and_normalizer(shard, teacher, taus[1], lq, scratch[0])
    if shard.tp == 1:
        require_some_mass(local)
        lse = local
    else:
        lse = _global_normalizers(shard, local)
        correction = lse - local  # +inf where this rank has no mass: its log-probs stay -inf
        lp.sub_(correction[0, :, None])
        lq.sub_(correction[1, :, None])
    if shard.valid_width == 0:
        return lp.new_zeros(kernel.statistics, n), lse, torch.zeros(n, dtype=torch.bool, device=lp.device)
    stats = kernel.statistics_of(lp, lq, scratch, fix=False)
    bad = torch.isnan(stats).any(dim=0)
    if bool(bad.any()):
        stats[:, bad] = kernel.statistics_of(lp[bad], lq[bad], [b[:int(bad.sum())] for b in scratch], fix=True)
    return stats, lse, bad


def _compiled_divergence_chunk(kernel: DivergenceKernel, shard: Shard, student: torch.Tensor, teacher: torch.Tensor,
                               taus: tuple[float, float], dtype: torch.dtype, use_triton: bool = False
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`divergence_chunk` through the compiled kernels (`divergence_kernels.set_compiled_kernels`), or with
    `use_triton` the Triton kernels (`triton_divergences.py`, same functions): the local normalisers and the
    statistics each in one pass over the logits chunk, no `[chunk, V/tp]` buffers; rows whose statistics are NaN
    are recomputed by the eager kernel with `fix`."""
    n, valid = student.shape[0], shard.valid_width
    z, t = student[:, :valid], teacher[:, :valid]
    normalizers = triton_divergences.local_normalizers if use_triton else compiled(local_normalizers, kernel, dtype)
    statistics = (triton_divergences.statistics_from_logits if use_triton
                  else compiled(statistics_from_logits, kernel, dtype))
    if valid > 0:
        local = normalizers(z, t, taus[0], taus[1], dtype)
    else:
        local = torch.full((2, n), float("-inf"), dtype=dtype, device=student.device)
    if shard.tp == 1:
        require_some_mass(local)
        lse = local
    else:
        lse = _global_normalizers(shard, local)
    if valid == 0:
        return local.new_zeros(kernel.statistics, n), lse, torch.zeros(n, dtype=torch.bool, device=student.device)
    stats = statistics(kernel, z, t, lse, taus[0], taus[1])
    bad = torch.isnan(stats).any(dim=0)
    if bool(bad.any()):
        rows = int(bad.sum())
        lp, lq = (torch.empty(rows, valid, dtype=dtype, device=student.device) for _ in range(2))
        global_log_probs(shard, student[bad], taus[0], lse[0, bad], lp)
        global_log_probs(shard, teacher[bad], taus[1], lse[1, bad], lq)
        scratch = [torch.empty_like(lp) for _ in range(max(kernel.forward_buffers, 1))]
        stats[:, bad] = kernel.statistics_of(lp, lq, scratch, fix=True)
    return stats, lse, bad


class _Divergence(torch.autograd.Function):
    """A dense divergence `F = sum_v phi(pi_v, q_v)` `[N]`, replicated, through its chunk kernels
    (`divergence_kernels.py`: the statistics and the closed-form gradient `pi (h - H) / tau_S`, derived there).
    Forward, per chunk: one `log_softmax` of each side (this rank's log-softmaxes and normalisers), at tp > 1 the
    global normalisers (all-reduce MAX and SUM of the stacked `[2, chunk]` local ones) to correct them into the
    global log-probs, then the kernel's `[k, chunk]` row statistics; after the chunks, one all-reduce SUM of the
    `[k, N]` statistics. Saves both logits shards (references), the global normalisers `[2, N]` and the
    statistics `[k, N]`. Backward recomputes `lp = z / tau_S - lse_S`, `lq` (one pass each) per chunk and writes
    the kernel's gradient into the gradient buffer; no communication. (Keeping `lp`, `lq` `[N, V/tp]` from the
    forward instead, the reverse KL's keep_softmax trade, saved a few percent of the time here for two more `[N, V/tp]`
    buffers: measured and not kept, `docs/performance.md`.)

    Memory: `2 + kernel.forward_buffers` buffers `[chunk, V/tp]` in forward, `2 +
    kernel.backward_buffers` in backward (plus the gradient itself). The teacher is detached (no gradient)."""

    @staticmethod
    def forward(ctx, student, teacher, shard: Shard, kernel: DivergenceKernel, student_temperature: float,
                teacher_temperature: float, chunk_size: Optional[int]):
        dtype = compute_dtype(student, teacher)
        rows, valid, device = student.shape[0], shard.valid_width, student.device
        taus = (student_temperature, teacher_temperature)
        use_triton = triton_divergences.use_triton(student)
        # The Triton kernels keep no [chunk, V/tp] buffers: one launch per phase for all rows.
        pieces = [slice(0, rows)] if use_triton else row_chunks(rows, chunk_size)
        span = max(piece.stop - piece.start for piece in pieces)
        use_compiled = use_triton or compiled_kernels_enabled()
        stats = torch.empty(kernel.statistics, rows, dtype=dtype, device=device)
        lse = torch.empty(2, rows, dtype=dtype, device=device)
        bad = torch.zeros(rows, dtype=torch.bool, device=device)
        if use_compiled:
            for piece in pieces:
                stats[:, piece], lse[:, piece], bad[piece] = _compiled_divergence_chunk(
                    kernel, shard, student[piece], teacher[piece], taus, dtype, use_triton)
        else:
            log_probs = torch.empty(2, span, valid, dtype=dtype, device=device)
            scratch = [torch.empty(span, valid, dtype=dtype, device=device)
                       for _ in range(max(kernel.forward_buffers, 1))]
            for piece in pieces:
                n = piece.stop - piece.start
                lp, lq = log_probs[:, :n]
                stats[:, piece], lse[:, piece], bad[piece] = divergence_chunk(
                    kernel, shard, student[piece], teacher[piece], taus, lp, lq, [b[:n] for b in scratch])
            del scratch, log_probs
        stats = shard.all_reduce(stats)
        ctx.save_for_backward(student, teacher, lse, stats)
        ctx.shard, ctx.kernel, ctx.taus, ctx.chunk_size = shard, kernel, taus, chunk_size
        ctx.bad = bad if bool(bad.any()) else None
        ctx.use_compiled, ctx.use_triton = use_compiled, use_triton
        return kernel.value(stats)

    @staticmethod
    def backward(ctx, grad_out):
        student, teacher, lse, stats = ctx.saved_tensors
        shard, kernel = ctx.shard, ctx.kernel
        dtype, valid = lse.dtype, shard.valid_width
        scale = grad_out.to(dtype) / ctx.taus[0]
        if ctx.use_triton:  # all rows in one launch, written into the gradient's real columns in its dtype
            grad = torch.empty_like(student) if valid == student.shape[1] else torch.zeros_like(student)
            if valid > 0:
                out = triton_divergences.gradient_from_logits(
                    kernel, student[:, :valid], teacher[:, :valid], lse, stats, scale, ctx.taus[0], ctx.taus[1],
                    out=grad[:, :valid])
                if ctx.bad is not None:
                    out[ctx.bad] = out[ctx.bad].nan_to_num(nan=0.0, posinf=float("inf"), neginf=float("-inf"))
            return grad, None, None, None, None, None, None
        whole = valid == student.shape[1] and dtype == student.dtype
        grad = torch.empty_like(student) if whole else torch.zeros_like(student)
        pieces = row_chunks(student.shape[0], ctx.chunk_size)
        if ctx.use_compiled:
            for piece in pieces if valid > 0 else []:
                chunk_grad = compiled(gradient_from_logits, kernel, dtype)(
                    kernel, student[piece, :valid], teacher[piece, :valid], lse[:, piece], stats[:, piece],
                    scale[piece], ctx.taus[0], ctx.taus[1])
                if ctx.bad is not None and bool(ctx.bad[piece].any()):
                    chunk_grad[ctx.bad[piece]] = chunk_grad[ctx.bad[piece]].nan_to_num(
                        nan=0.0, posinf=float("inf"), neginf=float("-inf"))
                grad[piece, :valid] = chunk_grad
            return grad, None, None, None, None, None, None
        span = max(piece.stop - piece.start for piece in pieces)
        buffers = [torch.empty(span, valid, dtype=dtype, device=student.device)
                   for _ in range(2 + kernel.backward_buffers + (0 if whole else 1))]
        for piece in pieces if valid > 0 else []:
            n = piece.stop - piece.start
            lp = global_log_probs(shard, student[piece], ctx.taus[0], lse[0, piece], buffers[0][:n])
            lq = global_log_probs(shard, teacher[piece], ctx.taus[1], lse[1, piece], buffers[1][:n])
            scratch = [b[:n] for b in buffers[2:2 + kernel.backward_buffers]]
            out = grad[piece] if whole else buffers[-1][:n]
            kernel.gradient(lp, lq, stats[:, piece], scale[piece], scratch, out)
            if ctx.bad is not None and bool(ctx.bad[piece].any()):
                rows = ctx.bad[piece]
                out[rows] = out[rows].nan_to_num(nan=0.0, posinf=float("inf"), neginf=float("-inf"))
            if not whole:
                grad[piece, :valid] = out.to(grad.dtype)
        return grad, None, None, None, None, None, None


@functools.cache  # one kernel object per divergence: the compiled path's guards then hold across calls
def dense_kernel(kind: str, beta: Optional[float], alpha: Optional[float]) -> Optional[DivergenceKernel]:
    """The chunk kernel of `kind`, or None where the divergence is the reverse KL (`_ReverseKL`): generalized JSD
    at `beta = 1` and skew reverse KL at `alpha = 0` (the references' definitions; `beta = 0` and skew forward
    KL at `alpha = 0` are the forward KL; either skew at `alpha = 1` is 0)."""
    if kind == "reverse_kl" or (kind == "generalized_jsd" and beta == 1.0) or (
            kind == "skew_reverse_kl" and alpha == 0.0):
        return None
    if kind == "forward_kl" or (kind == "generalized_jsd" and beta == 0.0) or (
            kind == "skew_forward_kl" and alpha == 0.0):
        return ForwardKL()
    if kind == "total_variation":
        return TotalVariation()
    if kind == "generalized_jsd":
        return GeneralizedJSD(float(beta))
    if alpha == 1.0:
        return Zero()
    return SkewForwardKL(float(alpha)) if kind == "skew_forward_kl" else SkewReverseKL(float(alpha))


# ---------------------------------------------------------------------------------------------------------------
# The generic path: any divergence through autograd, chunk by chunk


def divergence_terms(kind: str, student_temperature: float, teacher_temperature: float,
                     beta: Optional[float] = None,
                     alpha: Optional[float] = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Check a divergence's arguments and return its per-entry terms `(log pi, log q) [n, w] -> [n]` summed over
    the given columns: every divergence of `math/divergences.py` is a sum over v of a term in `(pi_v, q_v)`, so
    a shard's sum is an exact partial of the whole-vocabulary value."""
    require_divergence_parameters(kind, beta, alpha)
    require_positive("student_temperature", student_temperature)
    require_positive("teacher_temperature", teacher_temperature)
    return lambda lp, lq: divergence_from_log_probs(kind, lp, lq, beta=beta, alpha=alpha)


def _entropy_terms(lp: torch.Tensor, _unused: torch.Tensor) -> torch.Tensor:
    """Local partial `-sum_v pi_v log pi_v`, `0 log 0 = 0` (as `regularizers.entropy`)."""
    zero = torch.isneginf(lp)
    safe = lp.masked_fill(zero, 0.0)
    return -(safe.exp() * safe).masked_fill(zero, 0.0).sum(dim=-1)


def divergence_rows(terms: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    student_rows: Callable[[slice], torch.Tensor], teacher: Optional[torch.Tensor], shard: Shard,
                    student_temperature: float, teacher_temperature: float, rows: int, dtype: torch.dtype,
                    chunk_size: Optional[int], differentiable: bool) -> torch.Tensor:
    """Per-position `sum_v term(log pi_v, log q_v)` `[rows]` through autograd, chunk by chunk (`chunked_rows`):
    `student_rows(piece)` gives the student's logits shard of the chunk (a slice of a given shard, or
    `hidden @ W.T` of the fused path); its normaliser is differentiable (`LogNormalizer`, then `CopyToTP` since
    the local terms use it), the teacher's is not; the local partial sums are summed over the ranks by
    `ReduceFromTP`."""
    teacher_lse = None if teacher is None else global_log_normalizer(shard, teacher, teacher_temperature, dtype,
                                                                      chunk_size)

    def one_chunk(piece: slice) -> torch.Tensor:
        student_piece = student_rows(piece)
        lse = CopyToTP.apply(LogNormalizer.apply(student_piece, shard, student_temperature, None), shard)
        lp = shard.scaled(student_piece, student_temperature, dtype) - lse[:, None]
        lq = lp if teacher is None else (
            shard.scaled(teacher[piece], teacher_temperature, dtype) - teacher_lse[piece, None])
        return ReduceFromTP.apply(terms(lp, lq), shard)

    return chunked_rows(one_chunk, rows, chunk_size, differentiable)


def _autograd_path(terms: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], student: torch.Tensor,
                   teacher: Optional[torch.Tensor], shard: Shard, student_temperature: float,
                   teacher_temperature: float, chunk_size: Optional[int]) -> torch.Tensor:
    dtype = compute_dtype(student) if teacher is None else compute_dtype(student, teacher)
    return divergence_rows(terms, row_pieces(student, chunk_size), teacher, shard, student_temperature,
                           teacher_temperature, student.shape[0], dtype, chunk_size, student.requires_grad)


# ---------------------------------------------------------------------------------------------------------------
# Public API


def vocab_parallel_log_normalizer(logits_shard: torch.Tensor, temperature: float = 1.0,
                                  true_vocab_size: Optional[int] = None, *, group=None,
                                  chunk_size: Optional[int] = None) -> torch.Tensor:
    """`log sum_v exp(z_v / tau)` over the whole (unpadded) vocabulary, logits `[..., V/tp]` -> `[...]`,
    replicated on the TP ranks, with gradient `softmax / tau` into the shard."""
    require_positive("temperature", temperature)
    flat, shard = checked_rows("logits_shard", logits_shard, true_vocab_size, group)
    return LogNormalizer.apply(flat, shard, float(temperature), chunk_size).reshape(logits_shard.shape[:-1])


def vocab_parallel_token_logprobs(logits_shard: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0,
                                  true_vocab_size: Optional[int] = None, *, group=None,
                                  chunk_size: Optional[int] = None, keep_softmax: bool = False) -> torch.Tensor:
    """`log softmax(z / tau)[y]` of the tokens `y` (global vocabulary ids `[...]`), logits `[..., V/tp]` ->
    `[...]`, with gradient into the shard (call under `torch.no_grad()` for a teacher). Equals
    `-vocab_parallel_cross_entropy` of megatron-core on the same shards (padding set to -inf).

    keep_softmax: False (default) saves only `[N]` statistics and recomputes the softmax per chunk in backward
    (memory flat in the chunk, two exp passes); True holds the `[N, V/tp]` softmax until backward and turns it
    into the gradient in place (megatron CE's trade: one exp pass, one `[N, V/tp]` buffer; backward only once)."""
    require_positive("temperature", temperature)
    flat = flatten_rows("logits_shard", logits_shard)
    shard = Shard(flat.shape[-1], true_vocab_size, group)
    if not isinstance(token_ids, torch.Tensor):
        raise MathInputError(f"token_ids: expected an integer tensor, got {type(token_ids).__name__}")
    if tuple(token_ids.shape) != tuple(logits_shard.shape[:-1]):
        raise MathInputError(f"token_ids: expected shape {tuple(logits_shard.shape[:-1])} (the positions of the "
                             f"logits), got {tuple(token_ids.shape)}")
    ids = token_ids.reshape(-1)
    check_inputs(shard, {"logits_shard": flat}, ids)
    keep = keep_softmax and torch.is_grad_enabled() and flat.requires_grad
    out = _TokenLogProbs.apply(flat, ids.to(torch.long), shard, float(temperature), chunk_size, keep)
    return out.reshape(logits_shard.shape[:-1])


def vocab_parallel_entropy(logits_shard: torch.Tensor, temperature: float = 1.0,
                           true_vocab_size: Optional[int] = None, *, group=None,
                           chunk_size: Optional[int] = None) -> torch.Tensor:
    """Entropy `-sum_v pi_v log pi_v` of `softmax(z / tau)` over the whole vocabulary, logits `[..., V/tp]` ->
    `[...]`, with gradient; twin of `regularizers.entropy`."""
    require_positive("temperature", temperature)
    flat, shard = checked_rows("logits_shard", logits_shard, true_vocab_size, group)
    if not (torch.is_grad_enabled() and flat.requires_grad):
        # The diagnostics' and the gates' entropy: no graph, so one pass over each chunk suffices.
        out = _entropy_without_grad(flat, shard, float(temperature), compute_dtype(flat), chunk_size)
    else:
        out = _autograd_path(_entropy_terms, flat, None, shard, float(temperature), 1.0, chunk_size)
    return out.reshape(logits_shard.shape[:-1])


# A shifted logit below this is exp() = 0 in float32 and float64 alike; clamping there makes `exp(d) d` 0, not
# `0 * -inf` = NaN, for masked (-inf) ids, and changes no term that is not already 0.
_ENTROPY_FLOOR = -1e4


@torch.no_grad()
def _entropy_without_grad(logits: torch.Tensor, shard: Shard, temperature: float, dtype: torch.dtype,
                          chunk_size: Optional[int]) -> torch.Tensor:
    """`H = -sum_v pi_v log pi_v` `[N]` of `softmax(z / tau)` without gradient: with `x = z / tau`, `m` a row's
    local maximum, `d = x - m`, `s = sum_v exp(d_v)` and `t = sum_v exp(d_v) d_v`, `H = log s - t / s` (since
    `log pi_v = d_v - log s`). Per chunk one max, then the shifted values (clamped at `_ENTROPY_FLOOR`), their exp
    and two row sums in two reused `[chunk, V/tp]` buffers; at TP > 1 each rank's `(s, t)` is moved to the global
    maximum `M` (`s e^(m - M)`, `(t + (m - M) s) e^(m - M)`) by one all-reduce MAX `[N]` and one SUM `[2, N]`."""
    rows, width = logits.shape[0], shard.valid_width
    local_max = torch.full((rows,), float("-inf"), dtype=dtype, device=logits.device)
    sums = torch.zeros(2, rows, dtype=dtype, device=logits.device)       # s, t at each rank's own shift
    if width > 0:
        pieces = row_chunks(rows, chunk_size)
        span = max(piece.stop - piece.start for piece in pieces)
        shifted = torch.empty(span, width, dtype=dtype, device=logits.device)
        exp = torch.empty_like(shifted)
        for piece in pieces:
            n = piece.stop - piece.start
            x = logits[piece, :width]
            top = x.amax(dim=-1).to(dtype) / temperature
            shift = top.masked_fill(torch.isneginf(top), 0.0)
            d = shifted[:n]
            torch.add(-shift[:, None], x, alpha=1.0 / temperature, out=d).clamp_(min=_ENTROPY_FLOOR)
            e = torch.exp(d, out=exp[:n])
            sums[0, piece] = e.sum(dim=-1)
            sums[1, piece] = e.mul_(d).sum(dim=-1)
            local_max[piece] = top
    row_max = shard.all_reduce(local_max.clone(), dist.ReduceOp.MAX)
    require_some_mass(row_max)
    if shard.tp > 1:
        own = local_max.masked_fill(torch.isneginf(local_max), 0.0)
        factor = torch.where(torch.isneginf(local_max), 0.0, (local_max - row_max).exp())
        sums = torch.stack([sums[0] * factor, (sums[1] + (own - row_max) * sums[0]) * factor])
        shard.all_reduce(sums)
    return sums[0].log() - sums[1] / sums[0]


def vocab_parallel_divergence(kind: str, student_logits_shard: torch.Tensor, teacher_logits_shard: torch.Tensor,
                              *, beta: Optional[float] = None, alpha: Optional[float] = None,
                              student_temperature: float = 1.0, teacher_temperature: float = 1.0,
                              true_vocab_size: Optional[int] = None, group=None, chunk_size: Optional[int] = None,
                              keep_softmax: bool = False) -> torch.Tensor:
    """Any full-vocabulary divergence of `math/divergences.py` (`forward_kl`, `reverse_kl`, `generalized_jsd`
    with `beta`, `skew_forward_kl` / `skew_reverse_kl` with `alpha`, `total_variation`) `[...]` of the student
    `softmax(z^S / tau_S)` against the teacher `softmax(z^T / tau_T)` (detached), from logits shards
    `[..., V/tp]`; twin of `divergence_from_log_probs` on the references' log-probs. Gradient into the student's
    shard.

    Each is a dedicated autograd Function with a closed-form gradient: the reverse KL `_ReverseKL` (one pass over
    each chunk), the others `_Divergence` with their chunk kernels (`divergence_kernels.py`; through
    `torch.compile` with `divergence_kernels.set_compiled_kernels(True)` or `OPD_COMPILE_KERNELS=1`). Memory: a
    few `[chunk, V/tp]` buffers. keep_softmax (reverse KL only): False (default) recomputes the chunk in backward;
    True keeps `pi` and `log pi - log q` (two `[N, V/tp]` buffers) until backward, which turns them into the
    gradient in place (megatron CE's trade). At an infinite value (the forward KL where the student masks a token
    the teacher has mass on, the reverse KL the other way round) the gradient is not the reference's."""
    divergence_terms(kind, student_temperature, teacher_temperature, beta, alpha)  # checks the arguments
    if keep_softmax and kind != "reverse_kl":
        raise MathInputError(f"keep_softmax: only the reverse KL keeps its softmax for backward, got kind {kind!r}")
    student = flatten_rows("student_logits_shard", student_logits_shard)
    teacher = flatten_rows("teacher_logits_shard", teacher_logits_shard).detach()
    shard = Shard(student.shape[-1], true_vocab_size, group)
    check_inputs(shard, {"student_logits_shard": student, "teacher_logits_shard": teacher})
    if chunk_size is not None:
        require_positive_int("chunk_size", chunk_size)
    tau_s, tau_t = float(student_temperature), float(teacher_temperature)
    kernel = dense_kernel(kind, None if beta is None else float(beta), None if alpha is None else float(alpha))
    if kernel is None:
        keep = keep_softmax and torch.is_grad_enabled() and student.requires_grad
        out = _ReverseKL.apply(student, teacher, shard, tau_s, tau_t, chunk_size, keep)
    else:
        out = _Divergence.apply(student, teacher, shard, kernel, tau_s, tau_t, chunk_size)
    # With the inputs checked finite, a NaN here is a row without mass (at tp = 1; tp > 1 raised above).
    if debug_checks_enabled() and bool(torch.isnan(out).any()):
        raise MathInputError("logits: every logit of the (unpadded) vocabulary is -inf at some position "
                             "(no distribution there)")
    return out.reshape(student_logits_shard.shape[:-1])


class DivergenceOptions(TypedDict, total=False):
    """The keyword options of the named divergences below, as `vocab_parallel_divergence` takes them."""

    student_temperature: float
    teacher_temperature: float
    true_vocab_size: Optional[int]
    group: Any
    chunk_size: Optional[int]


class ReverseKLOptions(DivergenceOptions, total=False):
    keep_softmax: bool


def vocab_parallel_forward_kl(student_logits_shard: torch.Tensor, teacher_logits_shard: torch.Tensor,
                              **options: Unpack[DivergenceOptions]) -> torch.Tensor:
    """Forward KL `KL(q || pi)` `[...]`; twin of `divergences.forward_kl`."""
    return vocab_parallel_divergence("forward_kl", student_logits_shard, teacher_logits_shard, **options)


def vocab_parallel_reverse_kl(student_logits_shard: torch.Tensor, teacher_logits_shard: torch.Tensor,
                              **options: Unpack[ReverseKLOptions]) -> torch.Tensor:
    """Reverse KL `KL(pi || q)` `[...]` (dedicated autograd Function, `keep_softmax` as in
    `vocab_parallel_divergence`); twin of `divergences.reverse_kl`."""
    return vocab_parallel_divergence("reverse_kl", student_logits_shard, teacher_logits_shard, **options)


def vocab_parallel_generalized_jsd(student_logits_shard: torch.Tensor, teacher_logits_shard: torch.Tensor,
                                   beta: float, **options: Unpack[DivergenceOptions]) -> torch.Tensor:
    """Generalized JSD, GKD/TRL convention (`beta = 0` IS forward KL, `beta = 1` IS reverse KL); twin of
    `divergences.generalized_jsd`. The mixture `log M_v` is local given both log-probs."""
    return vocab_parallel_divergence("generalized_jsd", student_logits_shard, teacher_logits_shard, beta=beta,
                                     **options)


def vocab_parallel_skew_forward_kl(student_logits_shard: torch.Tensor, teacher_logits_shard: torch.Tensor,
                                   alpha: float, **options: Unpack[DivergenceOptions]) -> torch.Tensor:
    """Skew forward KL `KL(q || alpha q + (1 - alpha) pi)`; twin of `divergences.skew_forward_kl`."""
    return vocab_parallel_divergence("skew_forward_kl", student_logits_shard, teacher_logits_shard, alpha=alpha,
                                     **options)


def vocab_parallel_skew_reverse_kl(student_logits_shard: torch.Tensor, teacher_logits_shard: torch.Tensor,
                                   alpha: float, **options: Unpack[DivergenceOptions]) -> torch.Tensor:
    """Skew reverse KL `KL(pi || alpha pi + (1 - alpha) q)`; twin of `divergences.skew_reverse_kl`."""
    return vocab_parallel_divergence("skew_reverse_kl", student_logits_shard, teacher_logits_shard, alpha=alpha,
                                     **options)


def vocab_parallel_total_variation(student_logits_shard: torch.Tensor, teacher_logits_shard: torch.Tensor,
                                   **options: Unpack[DivergenceOptions]) -> torch.Tensor:
    """Total variation `1/2 sum_v |q_v - pi_v|`; twin of `divergences.total_variation`."""
    return vocab_parallel_divergence("total_variation", student_logits_shard, teacher_logits_shard, **options)
