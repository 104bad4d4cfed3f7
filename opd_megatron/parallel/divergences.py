"""Vocab-parallel twins of the Route A math (`math/divergences.py`, `math/regularizers.py::entropy`) on
tensor-parallel-sharded logits, never gathering the vocabulary.

Layout (megatron's `ColumnParallelLinear` output): TP rank `r` of `tp` holds logits `[..., V/tp]` for the
contiguous slice `[r * V/tp, (r + 1) * V/tp)` of the padded vocabulary. Ids `>= true_vocab_size` are padding:
they are set to -inf before any arithmetic, so they carry no probability mass and receive zero gradient.

Communication: only all-reduces of `[N]`-sized statistics over the TP group (MAX of the row maxima, SUM of the
exp-sums, SUM of per-rank partial sums), the pattern of megatron-core's `tensor_parallel/cross_entropy.py`.

Gradient convention (megatron's): every result is replicated on all TP ranks and the caller forms the same loss
on each; the gradient that reaches each rank's shard is the gradient of that one loss wrt the shard. Two
autograd ops follow from it [Ours]:
- `ReduceFromTP` (forward all-reduce SUM of per-rank partial sums, backward identity): the output is used
  identically on every rank, so its gradient is already the full one on each rank, and the partial sum of rank
  `r` only depends on rank `r`'s shard (plus replicated statistics).
- `CopyToTP` (forward identity, backward all-reduce SUM): a replicated statistic (the normaliser) consumed by
  rank-local partial terms; each rank's gradient wrt it is only its own terms' share, so the shares are summed.

Chunking: every function takes `chunk_size` (rows of `[N, V/tp]` at a time), so float temporaries are
`chunk x V/tp`. What each op saves for backward:
- token log-probs (`_TokenLogProbs`): the logits shard (a reference to the caller's tensor, no copy), the token ids
  and the normaliser `[N]`; backward recomputes the softmax per chunk. No communication in backward.
- reverse KL (`_ReverseKL`): both logits shards (references) and `[N]` statistics (the loss, the per-row
  corrections to the local normalisers); one pass over each chunk forward (local log-softmaxes, no separate
  normaliser passes), backward recomputes it per chunk, using `d RKL / d z_v = pi_v (log pi_v - log q_v - RKL)
  / tau_S`; with keep_softmax, `pi` and the log-ratio `[N, V/tp]` are kept instead and become the gradient in
  place. No communication in backward.
- log-normaliser (`LogNormalizer`): the logits shard (reference) and the normaliser `[N]`.
- the other divergences and the entropy go through autograd on `[chunk, V/tp]` pieces: with `chunk_size` set
  and gradient enabled, each chunk runs under activation checkpointing (saves only its inputs, recomputes the
  chunk, all-reduces included, in backward); without `chunk_size`, autograd keeps its `[N, V/tp]` temporaries.

Inputs `[N, V/tp]` or `[B, T, V/tp]` (leading dims are flattened and restored). Half precision is computed in
float32, float64 stays float64, as in the references. Outside an initialised megatron model-parallel state (and
without `group`) the functions run as tp=1 without communication.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from opd_megatron.math.divergences import DIVERGENCES, compute_dtype, divergence_from_log_probs
from opd_megatron.math.checks import (MathInputError, require_choice, require_in_range, require_positive,
                                      require_positive_int)

# ---------------------------------------------------------------------------------------------------------------
# Layout and input checks


class Shard:
    """Where this rank's vocabulary slice sits: `start`, the local width, `tp`, and the local padding mask."""

    def __init__(self, width: int, true_vocab_size: Optional[int], group) -> None:
        self.group = group
        if group is None:
            from megatron.core import parallel_state
            if parallel_state.model_parallel_is_initialized():
                self.group = parallel_state.get_tensor_model_parallel_group()
        distributed = self.group is not None and dist.is_available() and dist.is_initialized()
        self.tp = dist.get_world_size(self.group) if distributed else 1
        self.rank = dist.get_rank(self.group) if distributed else 0
        self.width = width
        self.start = self.rank * width
        padded = self.tp * width
        self.true_vocab_size = padded if true_vocab_size is None else true_vocab_size
        if not isinstance(self.true_vocab_size, int) or not 1 <= self.true_vocab_size <= padded:
            raise MathInputError(f"true_vocab_size: expected an integer in [1, {padded}] (tp x shard width "
                                 f"{self.tp} x {width}), got {true_vocab_size!r}")
        self.valid_width = min(max(self.true_vocab_size - self.start, 0), width)  # local columns that are real

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.tp > 1:
            dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def scaled(self, logits: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
        """`logits / temperature` in `dtype`, padding columns -inf (differentiable). When there is nothing to do
        (tau = 1, same dtype, no padding on this rank) it is the input itself, not a copy: callers never write
        into it."""
        if temperature == 1.0 and logits.dtype == dtype and self.valid_width == self.width:
            return logits
        z = logits.to(dtype) / temperature
        if self.valid_width < self.width:
            pad = torch.zeros(self.width, dtype=torch.bool, device=z.device)
            pad[self.valid_width:] = True
            z = z.masked_fill(pad, float("-inf"))
        return z


def flatten_rows(name: str, logits: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise MathInputError(f"{name}: expected a floating-point tensor [..., V/tp]")
    if logits.dim() < 2 or logits.shape[-1] < 1:
        raise MathInputError(f"{name}: expected shape [N, V/tp] or [B, T, V/tp], got {tuple(logits.shape)}")
    return logits.reshape(-1, logits.shape[-1])


def check_inputs(shard: Shard, logits: dict[str, torch.Tensor], token_ids: Optional[torch.Tensor] = None,
                 check_values: bool = True) -> None:
    """Checks agreed on by all TP ranks with one small all-reduce, so a bad shard on one rank makes every rank
    raise the same error instead of leaving the others waiting in a collective: shapes equal across ranks and
    between student and teacher, no NaN/+inf, token ids in `[0, true_vocab_size)`. check_values=False skips the
    NaN/+inf pass (one read of each tensor), for an op whose replicated result turns NaN on bad values and that
    calls the full check only then."""
    names = list(logits)
    shapes = [tuple(t.shape) for t in logits.values()]
    if len(set(shapes)) > 1:
        raise MathInputError("expected equal shapes, got " + ", ".join(f"{n} {s}" for n, s in zip(names, shapes)))
    rows, width = shapes[0]
    # One reduction pass per tensor and no [N, V/tp] temporaries: max() propagates NaN, and +inf is the max.
    bad = [float(check_values and bool(t.numel()) and not bool(t.max() < float("inf"))) for t in logits.values()]
    ids_bad = 0.0
    if token_ids is not None:
        if token_ids.is_floating_point() or token_ids.is_complex() or token_ids.dtype == torch.bool:
            raise MathInputError(f"token_ids: expected an integer tensor of token ids, got dtype {token_ids.dtype}")
        if token_ids.numel() != rows:
            raise MathInputError(f"token_ids: expected {rows} ids (the positions of the logits), got shape "
                                 f"{tuple(token_ids.shape)}")
        ids_bad = float(bool(token_ids.numel()) and (int(token_ids.min()) < 0
                                                    or int(token_ids.max()) >= shard.true_vocab_size))
    flags = torch.tensor(bad + [ids_bad, rows, width, -rows, -width], dtype=torch.float64)
    shard.all_reduce(flags, dist.ReduceOp.MAX)
    if flags[-4] != -flags[-2] or flags[-3] != -flags[-1]:
        raise MathInputError(f"{names[0]}: expected the same shard shape [N, V/tp] on every TP rank; this rank "
                             f"has {(rows, width)}, the ranks' N range over [{-int(flags[-2])}, {int(flags[-4])}] "
                             f"and V/tp over [{-int(flags[-1])}, {int(flags[-3])}]")
    for name, flag in zip(names, flags[:len(names)]):
        if flag:
            raise MathInputError(f"{name}: expected finite values (or -inf for masked entries), found NaN/+inf "
                                 "on some TP rank")
    if flags[len(names)]:
        raise MathInputError(f"token_ids: expected token ids in [0, {shard.true_vocab_size}) (the true "
                             f"vocabulary), got values in [{int(token_ids.min())}, {int(token_ids.max())}]")


def row_chunks(rows: int, chunk_size: Optional[int]) -> list[slice]:
    if chunk_size is None:
        return [slice(0, rows)]
    require_positive_int("chunk_size", chunk_size)
    return [slice(i, min(i + chunk_size, rows)) for i in range(0, rows, chunk_size)] or [slice(0, 0)]


def global_log_normalizer(shard: Shard, logits: torch.Tensor, temperature: float, dtype: torch.dtype,
                chunk_size: Optional[int]) -> torch.Tensor:
    """`logsumexp_v(z_v / tau)` over the whole vocabulary `[N]` (no gradient): local max -> all-reduce MAX ->
    local exp-sum -> all-reduce SUM, each local step on `[chunk, V/tp]`."""
    rows = logits.shape[0]
    row_max = torch.empty(rows, dtype=dtype, device=logits.device)
    with torch.no_grad():
        for piece in row_chunks(rows, chunk_size):
            row_max[piece] = shard.scaled(logits[piece], temperature, dtype).amax(dim=-1)
        shard.all_reduce(row_max, dist.ReduceOp.MAX)
        if torch.isneginf(row_max).any():
            raise MathInputError("logits: every logit of the (unpadded) vocabulary is -inf at some position "
                                 "(no distribution there)")
        sum_exp = torch.empty_like(row_max)
        for piece in row_chunks(rows, chunk_size):
            shifted = shard.scaled(logits[piece], temperature, dtype) - row_max[piece, None]
            sum_exp[piece] = shifted.exp_().sum(dim=-1)  # in place: one [chunk, V/tp] temporary, not two
        shard.all_reduce(sum_exp)
    return row_max + sum_exp.log()


def _normalizer_keeping_softmax(shard: Shard, logits: torch.Tensor, temperature: float, dtype: torch.dtype,
                                chunk_size: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`global_log_normalizer` that also returns `softmax(z / tau)` `[N, V/tp]` (megatron CE's trade: one exp pass in all,
    the softmax held until backward), built in one buffer: shifted logits, exp in place, divided in place."""
    rows = logits.shape[0]
    row_max = torch.empty(rows, dtype=dtype, device=logits.device)
    softmax = torch.empty(logits.shape, dtype=dtype, device=logits.device)
    with torch.no_grad():
        for piece in row_chunks(rows, chunk_size):
            row_max[piece] = shard.scaled(logits[piece], temperature, dtype).amax(dim=-1)
        shard.all_reduce(row_max, dist.ReduceOp.MAX)
        if torch.isneginf(row_max).any():
            raise MathInputError("logits: every logit of the (unpadded) vocabulary is -inf at some position "
                                 "(no distribution there)")
        sum_exp = torch.empty_like(row_max)
        for piece in row_chunks(rows, chunk_size):
            out = softmax[piece]
            torch.sub(shard.scaled(logits[piece], temperature, dtype), row_max[piece, None], out=out)
            sum_exp[piece] = out.exp_().sum(dim=-1)
        shard.all_reduce(sum_exp)
        softmax.div_(sum_exp[:, None])
    return row_max + sum_exp.log(), softmax


# ---------------------------------------------------------------------------------------------------------------
# Autograd ops


class ReduceFromTP(torch.autograd.Function):
    """All-reduce SUM of per-rank partial sums; backward identity (module docstring)."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, shard: Shard) -> torch.Tensor:
        return shard.all_reduce(partial.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class CopyToTP(torch.autograd.Function):
    """Identity on a replicated statistic; backward all-reduce SUM of the ranks' gradient shares."""

    @staticmethod
    def forward(ctx, replicated: torch.Tensor, shard: Shard) -> torch.Tensor:
        ctx.shard = shard
        return replicated.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.shard.all_reduce(grad.clone()), None


class LogNormalizer(torch.autograd.Function):
    """`logsumexp(z / tau)` `[N]`, replicated; gradient `softmax(z / tau) / tau` on the shard. Saves the logits
    shard (reference) and the normaliser; backward recomputes the softmax per chunk, no communication."""

    @staticmethod
    def forward(ctx, logits, shard: Shard, temperature: float, chunk_size: Optional[int]):
        dtype = compute_dtype(logits)
        lse = global_log_normalizer(shard, logits, temperature, dtype, chunk_size)
        ctx.save_for_backward(logits, lse)
        ctx.shard, ctx.temperature, ctx.chunk_size = shard, temperature, chunk_size
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        logits, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for piece in row_chunks(logits.shape[0], ctx.chunk_size):
            z = ctx.shard.scaled(logits[piece], ctx.temperature, lse.dtype)
            # softmax * g / tau written in place (into the gradient itself when the dtypes agree).
            probs = torch.sub(z, lse[piece, None], out=grad[piece]) if grad.dtype == lse.dtype else z - lse[piece, None]
            probs.exp_().mul_((grad_lse[piece] / ctx.temperature).to(lse.dtype)[:, None])
            if probs.data_ptr() != grad[piece].data_ptr():
                grad[piece] = probs.to(grad.dtype)
        return grad, None, None, None


class _TokenLogProbs(torch.autograd.Function):
    """`log p(y) = z_y / tau - logsumexp(z / tau)` `[N]`, replicated. Forward: local max -> all-reduce MAX ->
    one all-reduce SUM of the stacked `[2, N]` (local exp-sums, the owning rank's `z_y`). Saves the logits shard
    (reference), the ids and the normaliser `[N]`; backward `(onehot(y) - softmax) / tau` per chunk, no
    communication (the output is replicated, so each rank's gradient is already the full one)."""

    @staticmethod
    def forward(ctx, logits, token_ids, shard: Shard, temperature: float, chunk_size: Optional[int],
                keep_softmax: bool = False):
        dtype = compute_dtype(logits)
        ctx.softmax = None
        if keep_softmax:
            lse, ctx.softmax = _normalizer_keeping_softmax(shard, logits, temperature, dtype, chunk_size)
        else:
            lse = global_log_normalizer(shard, logits, temperature, dtype, chunk_size)
        local = token_ids - shard.start
        owned = (local >= 0) & (local < shard.width)
        rows = torch.arange(logits.shape[0], device=logits.device)
        picked = torch.zeros(logits.shape[0], dtype=dtype, device=logits.device)
        picked[owned] = logits[rows[owned], local[owned]].to(dtype) / temperature
        shard.all_reduce(picked)
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
            local = token_ids[piece] - shard.start
            owned = (local >= 0) & (local < shard.width)
            rows = torch.arange(chunk_grad.shape[0], device=grad.device)
            chunk_grad[rows[owned], local[owned]] += g[owned]
            if chunk_grad.data_ptr() != grad[piece].data_ptr():
                grad[piece] = chunk_grad.to(grad.dtype)
        return grad, None, None, None, None, None


def _local_log_softmax(shard: Shard, logits: torch.Tensor, temperature: float, out: torch.Tensor,
                       scratch: torch.Tensor) -> Optional[torch.Tensor]:
    """`log_softmax` of `logits / tau` over this rank's real columns only, written into `out [chunk, valid]`
    (padding columns are never read). Returns this rank's log-normaliser `lse_r [chunk]` when tp > 1 (None at
    tp = 1, where the local normaliser is the global one): `max_v z_v - max_v out_v` (the largest local log-prob
    is `-log sum_v exp(z_v - max)`, so no extra exp pass). A row that is all -inf here gets `out = -inf` and
    `lse_r = -inf` (no mass on this rank)."""
    x = logits[:, :shard.valid_width]
    if temperature != 1.0 or x.dtype != out.dtype or not x.is_contiguous():
        scratch.copy_(x)
        if temperature != 1.0:
            scratch.div_(temperature)
        x = scratch
    torch.log_softmax(x, -1, out=out)
    if shard.tp == 1:
        return None
    lse = x.amax(dim=-1)
    empty = torch.isneginf(lse)
    lse.sub_(out.amax(dim=-1))
    if bool(empty.any()):
        out[empty] = float("-inf")
        lse[empty] = float("-inf")
    return lse


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
    tp = 1 (no correction). Raises where a distribution has no mass at all."""
    if shard.tp == 1:
        return None
    top = shard.all_reduce(local_lse.clone(), dist.ReduceOp.MAX)
    if torch.isneginf(top).any():
        raise MathInputError("logits: every logit of the (unpadded) vocabulary is -inf at some position "
                             "(no distribution there)")
    total = top + shard.all_reduce(torch.where(torch.isneginf(local_lse), 0.0, (local_lse - top).exp())).log()
    return total - local_lse


# ---------------------------------------------------------------------------------------------------------------
# Public API


def vocab_parallel_log_normalizer(logits_shard: torch.Tensor, temperature: float = 1.0,
                                  true_vocab_size: Optional[int] = None, *, group=None,
                                  chunk_size: Optional[int] = None) -> torch.Tensor:
    """`log sum_v exp(z_v / tau)` over the whole (unpadded) vocabulary, logits `[..., V/tp]` -> `[...]`,
    replicated on the TP ranks, with gradient `softmax / tau` into the shard."""
    require_positive("temperature", temperature)
    flat = flatten_rows("logits_shard", logits_shard)
    shard = Shard(flat.shape[-1], true_vocab_size, group)
    check_inputs(shard, {"logits_shard": flat})
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
    # NaN/+inf logits make the replicated result NaN on every rank: the full check (one more read of the
    # shard) runs only then, as for the reverse KL.
    check_inputs(shard, {"logits_shard": flat}, ids, check_values=False)
    keep = keep_softmax and torch.is_grad_enabled() and flat.requires_grad
    out = _TokenLogProbs.apply(flat, ids.to(torch.long), shard, float(temperature), chunk_size, keep)
    if bool(torch.isnan(out).any()):
        check_inputs(shard, {"logits_shard": flat}, ids)
    return out.reshape(logits_shard.shape[:-1])


def _entropy_terms(lp: torch.Tensor, _unused: torch.Tensor) -> torch.Tensor:
    """Local partial `-sum_v pi_v log pi_v`, `0 log 0 = 0` (as `regularizers.entropy`)."""
    zero = torch.isneginf(lp)
    safe = lp.masked_fill(zero, 0.0)
    return -(safe.exp() * safe).masked_fill(zero, 0.0).sum(dim=-1)


def _concat(parts: list) -> Any:
    """Concatenate per-chunk results along the rows: tensors, tuples of results, or a dataclass's tensor fields
    (its other fields are the first chunk's)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts) if len(parts) > 1 else first
    if dataclasses.is_dataclass(first):
        return dataclasses.replace(first, **{field.name: _concat([getattr(part, field.name) for part in parts])
                                            for field in dataclasses.fields(first)
                                            if isinstance(getattr(first, field.name), torch.Tensor)})
    if isinstance(first, tuple):
        return tuple(_concat(list(column)) for column in zip(*parts))
    return first


def chunked_rows(rows_fn: Callable[[slice], Any], rows: int, chunk_size: Optional[int],
                 differentiable: bool) -> Any:
    """`rows_fn(piece)` for each chunk of `chunk_size` rows, the results concatenated along the rows (tensors,
    tuples of them, dataclass tensor fields): the chunking of every op whose rows are independent.

    With `chunk_size` set and `differentiable` (an input needs a gradient, and gradient is enabled), each chunk
    runs under activation checkpointing: autograd keeps only what the chunk reads from outside (references to
    the caller's tensors), so memory stays at one chunk's temporaries whatever N, and backward recomputes the
    chunk, its collectives included. Every rank runs the same chunks in the same order, and early stopping of
    the recomputation is off, so the recomputed collectives meet on all ranks even where the ranks' graphs save
    different tensors (padding is masked on the last rank only)."""
    pieces = row_chunks(rows, chunk_size)
    if chunk_size is None or not (differentiable and torch.is_grad_enabled()):
        return _concat([rows_fn(piece) for piece in pieces])
    with set_checkpoint_early_stop(False):
        return _concat([checkpoint(rows_fn, piece, use_reentrant=False) for piece in pieces])


def row_pieces(tensor: torch.Tensor, chunk_size: Optional[int]) -> Callable[[slice], torch.Tensor]:
    """`piece -> tensor[piece]` for the pieces of `row_chunks`, through one `torch.split`: autograd then joins the
    chunks' gradients once (one `[N, ...]` buffer) instead of zero-filling a full-size gradient per chunk and
    adding them up, as indexing each chunk would (that cost grows with the number of chunks times N)."""
    if chunk_size is None:
        return lambda piece: tensor[piece]
    require_positive_int("chunk_size", chunk_size)
    parts = {index * chunk_size: part for index, part in enumerate(tensor.split(chunk_size))}
    return lambda piece: parts[piece.start] if piece.start in parts else tensor[piece]


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


def vocab_parallel_entropy(logits_shard: torch.Tensor, temperature: float = 1.0,
                           true_vocab_size: Optional[int] = None, *, group=None,
                           chunk_size: Optional[int] = None) -> torch.Tensor:
    """Entropy `-sum_v pi_v log pi_v` of `softmax(z / tau)` over the whole vocabulary, logits `[..., V/tp]` ->
    `[...]`, with gradient; twin of `regularizers.entropy`."""
    require_positive("temperature", temperature)
    flat = flatten_rows("logits_shard", logits_shard)
    shard = Shard(flat.shape[-1], true_vocab_size, group)
    check_inputs(shard, {"logits_shard": flat})
    out = _autograd_path(_entropy_terms, flat, None, shard, float(temperature), 1.0, chunk_size)
    return out.reshape(logits_shard.shape[:-1])


def divergence_terms(kind: str, student_temperature: float, teacher_temperature: float,
                     beta: Optional[float] = None,
                     alpha: Optional[float] = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Check a divergence's arguments and return its per-entry terms `(log pi, log q) [n, w] -> [n]` summed over
    the given columns: every divergence of `distributional` is a sum over v of a term in `(pi_v, q_v)`, so a
    shard's sum is an exact partial of the whole-vocabulary value."""
    require_choice("kind", kind, DIVERGENCES)
    require_positive("student_temperature", student_temperature)
    require_positive("teacher_temperature", teacher_temperature)
    for name, value in (("beta", beta), ("alpha", alpha)):
        if value is not None:
            require_in_range(name, float(value), 0.0, 1.0)
    return lambda lp, lq: divergence_from_log_probs(kind, lp, lq, beta=beta, alpha=alpha)


def _divergence(kind: str, student_logits_shard: torch.Tensor, teacher_logits_shard: torch.Tensor,
                student_temperature: float, teacher_temperature: float, true_vocab_size: Optional[int], group,
                chunk_size: Optional[int], beta: Optional[float] = None,
                alpha: Optional[float] = None, keep_softmax: bool = False) -> torch.Tensor:
    terms = divergence_terms(kind, student_temperature, teacher_temperature, beta, alpha)
    student = flatten_rows("student_logits_shard", student_logits_shard)
    teacher = flatten_rows("teacher_logits_shard", teacher_logits_shard).detach()
    shard = Shard(student.shape[-1], true_vocab_size, group)
    tensors = {"student_logits_shard": student, "teacher_logits_shard": teacher}
    tau_s, tau_t = float(student_temperature), float(teacher_temperature)
    if kind == "reverse_kl":
        # Values are checked after the fact: NaN/+inf inputs (and only they, or a row with no mass) make the
        # replicated result NaN on every rank, so the full check (one pass per tensor) runs only then.
        check_inputs(shard, tensors, check_values=False)
        keep = keep_softmax and torch.is_grad_enabled() and student.requires_grad
        out = _ReverseKL.apply(student, teacher, shard, tau_s, tau_t, chunk_size, keep)
        if bool(torch.isnan(out).any()):
            check_inputs(shard, tensors)
            raise MathInputError("logits: every logit of the (unpadded) vocabulary is -inf at some position "
                                 "(no distribution there)")
    else:
        check_inputs(shard, tensors)
        out = _autograd_path(terms, student, teacher, shard, tau_s, tau_t, chunk_size)
    return out.reshape(student_logits_shard.shape[:-1])


def vocab_parallel_forward_kl(student_logits_shard: torch.Tensor, teacher_logits_shard: torch.Tensor, *,
                              student_temperature: float = 1.0, teacher_temperature: float = 1.0,
                              true_vocab_size: Optional[int] = None, group=None,
                              chunk_size: Optional[int] = None) -> torch.Tensor:
    """Forward KL `KL(q || pi)` `[...]` from sharded logits `[..., V/tp]`; twin of `distributional.forward_kl`."""
    return _divergence("forward_kl", student_logits_shard, teacher_logits_shard, student_temperature,
                       teacher_temperature, true_vocab_size, group, chunk_size)


def vocab_parallel_reverse_kl(student_logits_shard: torch.Tensor, teacher_logits_shard: torch.Tensor, *,
                              student_temperature: float = 1.0, teacher_temperature: float = 1.0,
                              true_vocab_size: Optional[int] = None, group=None,
                              chunk_size: Optional[int] = None, keep_softmax: bool = False) -> torch.Tensor:
    """Reverse KL `KL(pi || q)` `[...]` from sharded logits `[..., V/tp]` (dedicated autograd Function, one pass
    over each chunk); twin of `distributional.reverse_kl`. keep_softmax: False (default) recomputes the chunk in
    backward (memory three `[chunk, V/tp]` buffers); True keeps `pi` and `log pi - log q` (two `[N, V/tp]`
    buffers) until backward, which turns them into the gradient in place (megatron CE's trade)."""
    return _divergence("reverse_kl", student_logits_shard, teacher_logits_shard, student_temperature,
                       teacher_temperature, true_vocab_size, group, chunk_size, keep_softmax=keep_softmax)


def vocab_parallel_generalized_jsd(student_logits_shard: torch.Tensor, teacher_logits_shard: torch.Tensor,
                                   beta: float, *, student_temperature: float = 1.0,
                                   teacher_temperature: float = 1.0, true_vocab_size: Optional[int] = None,
                                   group=None, chunk_size: Optional[int] = None) -> torch.Tensor:
    """Generalized JSD, GKD/TRL convention (`beta = 0` IS forward KL, `beta = 1` IS reverse KL); twin of
    `distributional.generalized_jsd`. The mixture `log M_v` is local given both log-probs."""
    return _divergence("generalized_jsd", student_logits_shard, teacher_logits_shard, student_temperature,
                       teacher_temperature, true_vocab_size, group, chunk_size, beta=beta)


def vocab_parallel_skew_forward_kl(student_logits_shard: torch.Tensor, teacher_logits_shard: torch.Tensor,
                                   alpha: float, *, student_temperature: float = 1.0,
                                   teacher_temperature: float = 1.0, true_vocab_size: Optional[int] = None,
                                   group=None, chunk_size: Optional[int] = None) -> torch.Tensor:
    """Skew forward KL `KL(q || alpha q + (1 - alpha) pi)`; twin of `distributional.skew_forward_kl`."""
    return _divergence("skew_forward_kl", student_logits_shard, teacher_logits_shard, student_temperature,
                       teacher_temperature, true_vocab_size, group, chunk_size, alpha=alpha)


def vocab_parallel_skew_reverse_kl(student_logits_shard: torch.Tensor, teacher_logits_shard: torch.Tensor,
                                   alpha: float, *, student_temperature: float = 1.0,
                                   teacher_temperature: float = 1.0, true_vocab_size: Optional[int] = None,
                                   group=None, chunk_size: Optional[int] = None) -> torch.Tensor:
    """Skew reverse KL `KL(pi || alpha pi + (1 - alpha) q)`; twin of `distributional.skew_reverse_kl`."""
    return _divergence("skew_reverse_kl", student_logits_shard, teacher_logits_shard, student_temperature,
                       teacher_temperature, true_vocab_size, group, chunk_size, alpha=alpha)


def vocab_parallel_total_variation(student_logits_shard: torch.Tensor, teacher_logits_shard: torch.Tensor, *,
                                   student_temperature: float = 1.0, teacher_temperature: float = 1.0,
                                   true_vocab_size: Optional[int] = None, group=None,
                                   chunk_size: Optional[int] = None) -> torch.Tensor:
    """Total variation `1/2 sum_v |q_v - pi_v|`; twin of `distributional.total_variation`."""
    return _divergence("total_variation", student_logits_shard, teacher_logits_shard, student_temperature,
                       teacher_temperature, true_vocab_size, group, chunk_size)
