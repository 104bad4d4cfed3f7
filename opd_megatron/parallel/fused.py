"""Fused output layer + vocab-parallel loss: the student's logits shard `hidden @ weight_shard.T` `[N, V/tp]` is
never held in full. The idea is Liger-Kernel's fused linear cross-entropy (one GPU), here vocabulary-parallel and
written from the math below, not from their code.

Inputs: the final hidden states `hidden` `[N, H]` (or `[B, T, H]`), replicated on the TP ranks (what megatron's
output layer sees after `copy_to_tensor_model_parallel_region`, or after the all-gather of the sequence-parallel
layout), and this rank's output-layer weight shard `weight_shard` `[V/tp, H]` (rows `[r V/tp, (r+1) V/tp)` of the
padded vocabulary, megatron's `ColumnParallelLinear` layout, bias-free as in GPT output layers). Rows
`>= true_vocab_size` are padding: they are left out of the matmul, so they carry no mass and get zero gradient.

Forward, chunk by chunk over tokens: `z = hidden[c] @ weight_valid.T / tau` `[chunk, V/tp]`, then what the loss
needs from the chunk. The token log-prob: the chunk's local row max `m_r`, its exp-sum relative to that max
`s_r = sum_v exp(z_v - m_r)` and the target logit, rescaled to the global max afterwards (`s_r exp(m_r - M)`, `M`
= all-reduce MAX of `m_r`) instead of a second pass over the logits, so its only communication is two all-reduces
of `[N]`-sized statistics. The divergences (`_FusedDivergence`): the forward chunk of `divergences._Divergence` on
`z` (one `log_softmax` per side, at tp > 1 all-reduces of the `[2, chunk]` normalisers, the kernel's row
statistics), then one all-reduce of the `[k, N]` statistics. Saved for backward: `hidden` and `weight_shard`
(references to the caller's tensors, no copies), the token ids or teacher logits, and `[N]` statistics. Backward
recomputes each chunk's logits and accumulates `grad_hidden[c] = dz @ weight_valid` and `grad_weight += dz.T @
hidden[c]`, with `dz` the gradient wrt the chunk's logits (the formula of `divergences.py`'s `_TokenLogProbs`, or
a divergence kernel's closed form, `divergence_kernels.py`). Peak memory is a few `chunk x V/tp` buffers for the
logits and their gradient, whatever `N`.

Composition with megatron's tensor parallelism. Each rank's `grad_hidden` from its shard is only a partial:
`d loss / d hidden = sum_r dz_r @ W_r` sums over the vocabulary shards. In megatron's own output layer that sum is
the backward all-reduce of `copy_to_tensor_model_parallel_region` (or the reduce-scatter of
`gather_from_sequence_parallel_region` under sequence parallelism). Hence `reduce_grad_hidden`:
- `True` (default): the op all-reduces `grad_hidden` over the TP group itself, so `hidden` is used as a plain
  replicated tensor and its gradient is the full one on every rank (as for `ReduceFromTP`'s replicated outputs).
- `False`: the op returns this rank's partial, for a caller that passes `hidden` through megatron's
  `copy_to_tensor_model_parallel_region(hidden)` (or, with sequence parallelism,
  `gather_from_sequence_parallel_region(hidden)`), whose backward does the sum. Doing both would sum twice.
`grad_weight_shard` is always this rank's own and needs no communication. The loss itself is replicated on the TP
ranks (megatron's convention, see `shard.py`); the pipeline's last stage runs it like any other loss.

Dtypes: the matmuls run in the inputs' dtype (bf16 stays bf16, as megatron's output layer); the softmax statistics
are computed in float32 for half inputs and float64 for float64. Outside an initialised megatron state (and
without `group`) the functions run as tp=1 without communication.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from opd_megatron.math.checks import MathInputError, require_positive, require_positive_int
from opd_megatron.math.divergences import compute_dtype
# The dense divergences' chunk kernels and their forward chunk (`divergences._Divergence`'s), shared so the fused
# path computes exactly what the op on a given logits shard computes.
from opd_megatron.parallel.divergence_kernels import DivergenceKernel, ReverseKL
from opd_megatron.parallel.divergences import dense_kernel, divergence_chunk, global_log_probs, divergence_terms
from opd_megatron.parallel.shard import (Shard, debug_checks_enabled, flags_on_any_rank,
                                         has_nan_or_posinf, ids_outside, require_integer_ids,
                                         row_chunks)

DEFAULT_CHUNK_SIZE = 1024  # tokens per chunk: 1024 x V/tp floats of logits live at a time
_REVERSE_KL = ReverseKL()

# ---------------------------------------------------------------------------------------------------------------
# Shared pieces


def _logits(shard: Shard, hidden: torch.Tensor, weight: torch.Tensor, piece: slice, temperature: float,
            dtype: torch.dtype) -> torch.Tensor:
    """`hidden[piece] @ weight_valid.T / tau` `[chunk, valid_width]` in `dtype` (padding rows never computed); the
    division in place (the product is a fresh tensor), so one `[chunk, V/tp]` tensor is allocated, not two."""
    logits = (hidden[piece] @ weight[:shard.valid_width].T).to(dtype)
    return logits if temperature == 1.0 else logits.div_(temperature)


def _global_normalizer(shard: Shard, local_max: torch.Tensor, local_sums: torch.Tensor,
                       plain: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """From per-rank `m_r` `[N]` and sums relative to it `[k, N]`: the global max `M` and the sums rescaled to
    `M` and summed over the ranks `[k, N]`, plus the rank sums of `plain` `[j, N]` (not rescaled) stacked below
    them: all-reduce MAX, then one all-reduce SUM. A rank whose shard is all padding has `m_r = -inf`, sums 0."""
    global_max = shard.all_reduce(local_max.clone(), dist.ReduceOp.MAX)
    if debug_checks_enabled() and bool(torch.isneginf(global_max).any()):  # a host sync: a debug check
        raise MathInputError("weight_shard: no vocabulary entry is left after removing padding (true_vocab_size)")
    scale = torch.where(torch.isneginf(local_max), torch.zeros_like(local_max), (local_max - global_max).exp())
    stacked = local_sums * scale if plain is None else torch.cat([local_sums * scale, plain])
    return global_max, shard.all_reduce(stacked)


def _backward(shard: Shard, hidden: torch.Tensor, weight: torch.Tensor, chunk_size: Optional[int],
              reduce_grad_hidden: bool, logits_grad: Callable[[slice, torch.Tensor], torch.Tensor]):
    """Recompute each chunk's logits `z`, ask `logits_grad(piece, z)` for `d loss / d (hidden @ W.T)` of the
    chunk, and accumulate the gradients of `hidden` (this rank's partial, all-reduced if asked) and of the weight
    shard (padding rows 0)."""
    dtype = compute_dtype(hidden, weight)
    valid = weight[:shard.valid_width]
    grad_hidden = torch.zeros_like(hidden)
    grad_valid = torch.zeros(valid.shape, dtype=dtype, device=weight.device)
    for piece in row_chunks(hidden.shape[0], chunk_size):
        dz = logits_grad(piece, (hidden[piece] @ valid.T).to(dtype)).to(hidden.dtype)
        grad_hidden[piece] = dz @ valid
        grad_valid += (dz.T @ hidden[piece]).to(dtype)
        del dz  # before the next chunk's logits exist: one chunk's buffers at a time, not two
    if reduce_grad_hidden:
        shard.all_reduce(grad_hidden)
    grad_weight = torch.zeros_like(weight)
    grad_weight[:shard.valid_width] = grad_valid.to(weight.dtype)
    return grad_hidden, grad_weight


class _GatherSequence(torch.autograd.Function):
    """Megatron's sequence-parallel layout `[S/tp, B, H]` per rank -> the whole sequence `[S, B, H]`, replicated:
    all-gather along dim 0 forward; backward reduce-scatter of the gradient (each rank's is a partial over its
    vocabulary shard, summed, and each rank keeps its own sequence slice), as megatron's
    `gather_from_sequence_parallel_region`. gloo has no reduce-scatter: there it is an all-reduce and a slice."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, shard: Shard) -> torch.Tensor:
        ctx.shard = shard
        parts = [torch.empty_like(local) for _ in range(shard.tp)]
        dist.all_gather(parts, local.contiguous(), group=shard.group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shard = ctx.shard
        grad = grad.contiguous()
        rows = grad.shape[0] // shard.tp
        if dist.get_backend(shard.group) == "gloo":
            return shard.all_reduce(grad.clone())[shard.rank * rows:(shard.rank + 1) * rows], None
        out = torch.empty((rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        dist.reduce_scatter_tensor(out, grad, group=shard.group)
        return out, None


def _prepare(hidden: torch.Tensor, weight_shard: torch.Tensor, true_vocab_size: Optional[int], group,
             chunk_size: Optional[int], others: dict[str, torch.Tensor], token_ids: Optional[torch.Tensor] = None,
             sequence_parallel: bool = False) -> tuple[torch.Tensor, Shard, tuple[int, ...]]:
    """Flatten `hidden` to `[N, H]` (after gathering the sequence under sequence parallelism) and check the
    inputs: types and shapes on this rank always; with the debug checks on (`shard.py`), also what can differ
    between ranks or needs a host read (every rank's shapes, NaN/inf, token ids in the vocabulary), agreed on
    with small all-reduces so every rank raises the same error. Returns the flat hidden, the shard and the
    leading shape of the result."""
    for name, tensor in (("hidden", hidden), ("weight_shard", weight_shard)):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise MathInputError(f"{name}: expected a floating-point tensor")
    if hidden.dim() < 2:
        raise MathInputError(f"hidden: expected shape [N, H] or [B, T, H], got {tuple(hidden.shape)}")
    if weight_shard.dim() != 2 or weight_shard.shape[1] != hidden.shape[-1] or weight_shard.shape[0] < 1:
        raise MathInputError(f"weight_shard: expected shape [V/tp, H] with H = {hidden.shape[-1]} (the hidden "
                             f"size of hidden), got {tuple(weight_shard.shape)}")
    if chunk_size is not None:
        require_positive_int("chunk_size", chunk_size)
    shard = Shard(weight_shard.shape[0], true_vocab_size, group)
    if sequence_parallel and shard.tp > 1:
        if debug_checks_enabled():
            _, low, high = flags_on_any_rank(shard, [], list(hidden.shape) + [hidden.dim()])
            if low != high:
                raise MathInputError(f"hidden: expected the same sequence-parallel shape [S/tp, B, H] on every TP "
                                     f"rank; this rank has {tuple(hidden.shape)}")
        hidden = _GatherSequence.apply(hidden, shard)
    flat = hidden.reshape(-1, hidden.shape[-1])
    rows, width = flat.shape[0], weight_shard.shape[0]
    for name, tensor in others.items():
        if tuple(tensor.shape) != (rows, width):
            raise MathInputError(f"{name}: expected shape {(rows, width)} ([N, V/tp] of hidden and weight_shard), "
                                 f"got {tuple(tensor.shape)}")
    if token_ids is not None:
        require_integer_ids("token_ids", token_ids)
        if tuple(token_ids.shape) != tuple(hidden.shape[:-1]):
            raise MathInputError(f"token_ids: expected shape {tuple(hidden.shape[:-1])} (the positions of hidden), "
                                 f"got {tuple(token_ids.shape)}")
    if debug_checks_enabled():
        _check_across_ranks(shard, {"hidden": flat, "weight_shard": weight_shard}, others, token_ids)
    return flat, shard, tuple(hidden.shape[:-1])


def _check_across_ranks(shard: Shard, finite: dict[str, torch.Tensor], others: dict[str, torch.Tensor],
                        token_ids: Optional[torch.Tensor]) -> None:
    """The debug checks of `_prepare`, with one all-reduce: the same N, V/tp and H on every rank, `finite`
    tensors without NaN/inf, `others` (logits) without NaN/+inf, token ids in the vocabulary."""
    (rows, hidden_size), width = finite["hidden"].shape, finite["weight_shard"].shape[0]
    bad = [bool((~torch.isfinite(t)).any()) for t in finite.values()] + [has_nan_or_posinf(t) for t in others.values()]
    ids_bad = token_ids is not None and ids_outside(token_ids, 0, shard.true_vocab_size)
    flags, low, high = flags_on_any_rank(shard, bad + [ids_bad], [rows, width, hidden_size])
    if low != high:
        raise MathInputError(f"hidden/weight_shard: expected the same N, V/tp and H on every TP rank; this rank "
                             f"has N={rows}, V/tp={width}, H={hidden_size}")
    for name, flag in zip([*finite, *others], flags):
        if flag:
            raise MathInputError(f"{name}: expected finite values, found NaN/inf on some TP rank"
                                 + (" (-inf is allowed)" if name in others else ""))
    if flags[-1]:
        raise MathInputError(f"token_ids: expected token ids in [0, {shard.true_vocab_size}) (the true "
                             f"vocabulary) on every TP rank")


# ---------------------------------------------------------------------------------------------------------------
# Autograd ops


class _FusedTokenLogProbs(torch.autograd.Function):
    """`log softmax(hidden @ W.T / tau)[y]` `[N]`, replicated. Backward per chunk
    `dz = (onehot(y) - softmax) * grad / tau` on the recomputed logits."""

    @staticmethod
    def forward(ctx, hidden, weight, token_ids, shard: Shard, temperature: float, chunk_size: Optional[int],
                reduce_grad_hidden: bool):
        dtype = compute_dtype(hidden, weight)
        rows = hidden.shape[0]
        local_max = torch.full((rows,), float("-inf"), dtype=dtype, device=hidden.device)
        sums = torch.zeros(2, rows, dtype=dtype, device=hidden.device)  # [exp-sum relative to m_r, z_y]
        local_ids = token_ids - shard.start
        owned = (local_ids >= 0) & (local_ids < shard.valid_width)
        if shard.valid_width > 0:
            for piece in row_chunks(rows, chunk_size):
                z = _logits(shard, hidden, weight, piece, temperature, dtype)
                local_max[piece] = z.amax(dim=-1)
                sums[0, piece] = (z - local_max[piece, None]).exp().sum(dim=-1)
                here = owned[piece]
                picked = z.gather(-1, local_ids[piece].clamp(0, shard.valid_width - 1)[:, None])[:, 0]
                sums[1, piece] = torch.where(here, picked, torch.zeros_like(picked))  # only the owner's z_y
                del z  # one chunk's logits at a time
        global_max, (sum_exp, target) = _global_normalizer(shard, local_max, sums[:1], plain=sums[1:])
        lse = global_max + sum_exp.log()
        ctx.save_for_backward(hidden, weight, token_ids, lse)
        ctx.shard, ctx.temperature, ctx.chunk_size, ctx.reduce = shard, temperature, chunk_size, reduce_grad_hidden
        return target - lse

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, token_ids, lse = ctx.saved_tensors
        shard, tau = ctx.shard, ctx.temperature
        local_ids = token_ids - shard.start
        owned = (local_ids >= 0) & (local_ids < shard.valid_width)
        index = local_ids.clamp(0, max(shard.valid_width - 1, 0)).unsqueeze(-1)

        def logits_grad(piece: slice, logits: torch.Tensor) -> torch.Tensor:
            g = grad_out[piece].to(lse.dtype) / tau
            dz = -(logits / tau - lse[piece, None]).exp() * g[:, None]
            if shard.valid_width > 0:  # the owner's `+g` at y, by a scatter (boolean indexing syncs with the host)
                dz.scatter_add_(-1, index[piece], torch.where(owned[piece], g, 0.0).unsqueeze(-1))
            return dz

        grad_hidden, grad_weight = _backward(shard, hidden, weight, ctx.chunk_size, ctx.reduce, logits_grad)
        return grad_hidden, grad_weight, None, None, None, None, None


class _FusedDivergence(torch.autograd.Function):
    """A dense divergence `F = sum_v phi(pi_v, q_v)` `[N]`, replicated, of `pi = softmax(hidden @ W.T / tau_S)`,
    through the chunk kernels of `divergences._Divergence` (`divergence_kernels.py`: the row statistics and the
    closed-form gradient `pi (h - H) / tau_S`). Forward per chunk: the chunk's logits `z = hidden[c] @ W.T / tau_S`,
    then `_Divergence`'s forward chunk on them (one `log_softmax` per side, at tp > 1 the all-reduce MAX and SUM of
    the `[2, chunk]` local normalisers, the kernel's `[k, chunk]` statistics); one all-reduce SUM of the `[k, N]`
    statistics at the end. Saves `hidden`, `weight_shard`, the teacher (references), the global normalisers
    `[2, N]` and the statistics `[k, N]`. Backward recomputes each chunk's logits and log-probs and writes the
    kernel's gradient `dz` into one reused `[chunk, V/tp]` buffer, accumulated into the hidden and weight
    gradients by `_backward`; no communication but `reduce_grad_hidden`'s. Memory: the chunk's logits plus `2 +
    kernel.forward_buffers` `[chunk, V/tp]` buffers forward, `3 + kernel.backward_buffers` backward, whatever N."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher, shard: Shard, kernel: DivergenceKernel, tau_s: float, tau_t: float,
                chunk_size: Optional[int], reduce_grad_hidden: bool):
        dtype = compute_dtype(hidden, weight, teacher)
        rows, valid, device = hidden.shape[0], shard.valid_width, hidden.device
        pieces = row_chunks(rows, chunk_size)
        span = max(piece.stop - piece.start for piece in pieces)
        stats = torch.empty(kernel.statistics, rows, dtype=dtype, device=device)
        lse = torch.empty(2, rows, dtype=dtype, device=device)
        bad = torch.zeros(rows, dtype=torch.bool, device=device)
        log_probs = torch.empty(2, span, valid, dtype=dtype, device=device)
        scratch = [torch.empty(span, valid, dtype=dtype, device=device) for _ in range(max(kernel.forward_buffers, 1))]
        for piece in pieces:
            n = piece.stop - piece.start
            lp, lq = log_probs[:, :n]
            z = _logits(shard, hidden, weight, piece, tau_s, dtype)  # already divided by tau_S
            stats[:, piece], lse[:, piece], bad[piece] = divergence_chunk(
                kernel, shard, z, teacher[piece], (1.0, tau_t), lp, lq, [b[:n] for b in scratch])
            del z  # one chunk's logits at a time
        del scratch, log_probs
        stats = shard.all_reduce(stats)
        ctx.save_for_backward(hidden, weight, teacher, lse, stats)
        ctx.shard, ctx.kernel, ctx.temperatures = shard, kernel, (tau_s, tau_t)
        ctx.chunk_size, ctx.reduce = chunk_size, reduce_grad_hidden
        ctx.bad = bad if bool(bad.any()) else None
        return kernel.value(stats)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, teacher, lse, stats = ctx.saved_tensors
        shard, kernel, (tau_s, tau_t) = ctx.shard, ctx.kernel, ctx.temperatures
        dtype, valid = lse.dtype, shard.valid_width
        scale = grad_out.to(dtype) / tau_s
        span = max(piece.stop - piece.start for piece in row_chunks(hidden.shape[0], ctx.chunk_size))
        buffers = [torch.empty(span, valid, dtype=dtype, device=hidden.device)
                   for _ in range(3 + kernel.backward_buffers)]

        def logits_grad(piece: slice, logits: torch.Tensor) -> torch.Tensor:
            n = piece.stop - piece.start
            lp = global_log_probs(shard, logits, tau_s, lse[0, piece], buffers[0][:n])
            lq = global_log_probs(shard, teacher[piece], tau_t, lse[1, piece], buffers[1][:n])
            out = buffers[2][:n]
            kernel.gradient(lp, lq, stats[:, piece], scale[piece], [b[:n] for b in buffers[3:]], out)
            if ctx.bad is not None and bool(ctx.bad[piece].any()):  # the `0 * inf` rows (divergence_kernels.py)
                rows = ctx.bad[piece]
                out[rows] = out[rows].nan_to_num(nan=0.0, posinf=float("inf"), neginf=float("-inf"))
            return out

        grad_hidden, grad_weight = _backward(shard, hidden, weight, ctx.chunk_size, ctx.reduce, logits_grad)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# Public API


def fused_token_logprobs(hidden: torch.Tensor, weight_shard: torch.Tensor, token_ids: torch.Tensor, *,
                         temperature: float = 1.0, true_vocab_size: Optional[int] = None,
                         chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE, reduce_grad_hidden: bool = True,
                         sequence_parallel: bool = False, group=None) -> torch.Tensor:
    """`log softmax(hidden @ W.T / tau)[y]` of the tokens `y` (global vocabulary ids `[...]`) from the hidden
    states `[..., H]` and this rank's output-layer shard `[V/tp, H]` -> `[...]`, replicated on the TP ranks, with
    gradients into `hidden` and `weight_shard` (module docstring for `reduce_grad_hidden`). Equals
    `vocab_parallel_token_logprobs(hidden @ weight_shard.T, ...)` without holding that `[N, V/tp]` tensor.

    sequence_parallel: `hidden` is megatron's sequence-parallel layout `[S/tp, B, H]` (this rank's slice of the
    sequence); the op all-gathers it to `[S, B, H]` and reduce-scatters the hidden gradient in backward, so the
    gradient reaching `hidden` is the full one for this rank's slice (`reduce_grad_hidden` is then moot).
    `token_ids [S, B]` and the result cover the whole sequence."""
    require_positive("temperature", temperature)
    if not isinstance(token_ids, torch.Tensor):
        raise MathInputError(f"token_ids: expected an integer tensor, got {type(token_ids).__name__}")
    flat, shard, leading = _prepare(hidden, weight_shard, true_vocab_size, group, chunk_size, {}, token_ids,
                                    sequence_parallel)
    ids = token_ids.reshape(-1).to(torch.long)
    out = _FusedTokenLogProbs.apply(flat, weight_shard, ids, shard, float(temperature), chunk_size,
                                    bool(reduce_grad_hidden) and not sequence_parallel)
    return out.reshape(leading)


def _teacher_rows(teacher_logits_shard: torch.Tensor) -> torch.Tensor:
    if not isinstance(teacher_logits_shard, torch.Tensor) or not teacher_logits_shard.is_floating_point() \
            or teacher_logits_shard.dim() < 2:
        raise MathInputError("teacher_logits_shard: expected a floating-point tensor [..., V/tp]")
    return teacher_logits_shard.detach().reshape(-1, teacher_logits_shard.shape[-1])


def fused_reverse_kl(hidden: torch.Tensor, weight_shard: torch.Tensor, teacher_logits_shard: torch.Tensor, *,
                     student_temperature: float = 1.0, teacher_temperature: float = 1.0,
                     true_vocab_size: Optional[int] = None, chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE,
                     reduce_grad_hidden: bool = True, sequence_parallel: bool = False, group=None) -> torch.Tensor:
    """Reverse KL `KL(pi || q)` `[...]` of the student `pi = softmax(hidden @ W.T / tau_S)` (hidden `[..., H]`,
    shard `[V/tp, H]`) from the teacher's logits shard `[..., V/tp]` (detached; a colocated teacher's own
    shard), with gradients into `hidden` and `weight_shard`. Equals
    `vocab_parallel_reverse_kl(hidden @ weight_shard.T, teacher_logits_shard, ...)` without holding the student's
    `[N, V/tp]` logits or their gradient; the teacher's shard is the caller's tensor and is only read.
    sequence_parallel: as `fused_token_logprobs` (the teacher shard covers the whole sequence)."""
    require_positive("student_temperature", student_temperature)
    require_positive("teacher_temperature", teacher_temperature)
    teacher = _teacher_rows(teacher_logits_shard)
    flat, shard, leading = _prepare(hidden, weight_shard, true_vocab_size, group, chunk_size,
                                    {"teacher_logits_shard": teacher}, sequence_parallel=sequence_parallel)
    out = _FusedDivergence.apply(flat, weight_shard, teacher, shard, _REVERSE_KL, float(student_temperature),
                                 float(teacher_temperature), chunk_size,
                                 bool(reduce_grad_hidden) and not sequence_parallel)
    return out.reshape(leading)


def fused_divergence(kind: str, hidden: torch.Tensor, weight_shard: torch.Tensor,
                     teacher_logits_shard: torch.Tensor, *, beta: Optional[float] = None,
                     alpha: Optional[float] = None, student_temperature: float = 1.0,
                     teacher_temperature: float = 1.0, true_vocab_size: Optional[int] = None,
                     chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE, reduce_grad_hidden: bool = True,
                     sequence_parallel: bool = False, group=None) -> torch.Tensor:
    """Any full-vocabulary divergence of `math/divergences.py` (`forward_kl`, `reverse_kl`, `generalized_jsd` with
    `beta`, `skew_forward_kl` / `skew_reverse_kl` with `alpha`, `total_variation`) `[...]` of the student
    `softmax(hidden @ W.T / tau_S)` against the teacher's logits shard `[..., V/tp]`, with gradients into
    `hidden` and `weight_shard`; equals `vocab_parallel_<kind>(hidden @ weight_shard.T, teacher_logits_shard)`.

    Every divergence through `_FusedDivergence` with its chunk kernel: the one `divergences._Divergence` uses
    (forward KL also for JSD `beta = 0` and skew forward KL `alpha = 0`; either skew at `alpha = 1` is 0), and
    for the reverse KL (also JSD `beta = 1`, skew reverse KL `alpha = 0`) `divergence_kernels.ReverseKL`, as
    `fused_reverse_kl`. With `chunk_size` set only one chunk's `[chunk, V/tp]` logits and buffers
    live at a time, forward and backward (which recomputes the chunk's matmul). reduce_grad_hidden /
    sequence_parallel: as `fused_token_logprobs`."""
    divergence_terms(kind, student_temperature, teacher_temperature, beta, alpha)  # checks the arguments
    kernel = dense_kernel(kind, None if beta is None else float(beta), None if alpha is None else float(alpha))
    if kernel is None:
        return fused_reverse_kl(hidden, weight_shard, teacher_logits_shard, student_temperature=student_temperature,
                                teacher_temperature=teacher_temperature, true_vocab_size=true_vocab_size,
                                chunk_size=chunk_size, reduce_grad_hidden=reduce_grad_hidden,
                                sequence_parallel=sequence_parallel, group=group)
    teacher = _teacher_rows(teacher_logits_shard)
    flat, shard, leading = _prepare(hidden, weight_shard, true_vocab_size, group, chunk_size,
                                    {"teacher_logits_shard": teacher}, sequence_parallel=sequence_parallel)
    out = _FusedDivergence.apply(flat, weight_shard, teacher, shard, kernel, float(student_temperature),
                                 float(teacher_temperature), chunk_size,
                                 bool(reduce_grad_hidden) and not sequence_parallel)
    return out.reshape(leading)
