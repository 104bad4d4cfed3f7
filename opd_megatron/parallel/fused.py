"""Fused output layer + vocab-parallel loss: the student's logits shard `hidden @ weight_shard.T` `[N, V/tp]` is
never held in full. The idea is Liger-Kernel's fused linear cross-entropy (one GPU), here vocabulary-parallel and
written from the math below, not from their code.

Inputs: the final hidden states `hidden` `[N, H]` (or `[B, T, H]`), replicated on the TP ranks (what megatron's
output layer sees after `copy_to_tensor_model_parallel_region`, or after the all-gather of the sequence-parallel
layout), and this rank's output-layer weight shard `weight_shard` `[V/tp, H]` (rows `[r V/tp, (r+1) V/tp)` of the
padded vocabulary, megatron's `ColumnParallelLinear` layout, bias-free as in GPT output layers). Rows
`>= true_vocab_size` are padding: they are left out of the matmul, so they carry no mass and get zero gradient.

Forward, chunk by chunk over tokens: `z = hidden[c] @ weight_valid.T / tau` `[chunk, V/tp]`, then the chunk's
local row max `m_r`, its exp-sum relative to that max `s_r = sum_v exp(z_v - m_r)` and what the loss needs from
the chunk (the target logit; for reverse KL `a_r = sum_v exp(z_v - m_r) (z_v - log q_v)`). One matmul per chunk:
the local statistics are rescaled to the global max afterwards (`s_r exp(m_r - M)`, `M` = all-reduce MAX of
`m_r`) instead of a second pass over the logits, so the only communication is two all-reduces of `[N]`-sized
statistics. Saved for backward: `hidden` and `weight_shard` (references to the caller's tensors, no copies), the
token ids or teacher logits, and `[N]` statistics. Backward recomputes each chunk's logits and softmax and
accumulates `grad_hidden[c] = dz @ weight_valid` and `grad_weight += dz.T @ hidden[c]`, with `dz` the gradient
wrt the chunk's logits (the formulas of `divergences.py`'s `_TokenLogProbs` and `_ReverseKL`). Peak memory is
`chunk x V/tp` floats for the logits and their gradient, whatever `N`.

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
from opd_megatron.parallel.divergences import divergence_rows, divergence_terms
from opd_megatron.parallel.shard import (CopyToTP, Shard, debug_checks_enabled, flags_on_any_rank,
                                         global_log_normalizer, has_nan_or_posinf, ids_outside, require_integer_ids,
                                         row_chunks)

DEFAULT_CHUNK_SIZE = 1024  # tokens per chunk: 1024 x V/tp floats of logits live at a time

# ---------------------------------------------------------------------------------------------------------------
# Shared pieces


def _logits(shard: Shard, hidden: torch.Tensor, weight: torch.Tensor, piece: slice, temperature: float,
            dtype: torch.dtype) -> torch.Tensor:
    """`hidden[piece] @ weight_valid.T / tau` `[chunk, valid_width]` in `dtype` (padding rows never computed)."""
    return (hidden[piece] @ weight[:shard.valid_width].T).to(dtype) / temperature


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


class _FusedReverseKL(torch.autograd.Function):
    """`RKL = sum_v pi_v (log pi_v - log q_v)` `[N]`, replicated, `pi = softmax(hidden @ W.T / tau_S)`. With
    `S = sum_v exp(z_v - M)`: `RKL = (1/S) sum_v exp(z_v - M) (z_v - log q_v) - log S - M`, so the forward needs
    only the per-rank sums `s_r` and `a_r` (module docstring). Backward per chunk
    `dz = pi (log pi - log q - RKL) * grad / tau_S` (as `divergences._ReverseKL`)."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher, shard: Shard, tau_s: float, tau_t: float, chunk_size: Optional[int],
                reduce_grad_hidden: bool):
        dtype = compute_dtype(hidden, weight, teacher)
        rows = hidden.shape[0]
        lse_t = global_log_normalizer(shard, teacher, tau_t, dtype, chunk_size)
        local_max = torch.full((rows,), float("-inf"), dtype=dtype, device=hidden.device)
        sums = torch.zeros(2, rows, dtype=dtype, device=hidden.device)  # [s_r, a_r], both relative to m_r
        if shard.valid_width > 0:
            for piece in row_chunks(rows, chunk_size):
                z = _logits(shard, hidden, weight, piece, tau_s, dtype)
                log_q = teacher[piece, :shard.valid_width].to(dtype) / tau_t - lse_t[piece, None]
                local_max[piece] = z.amax(dim=-1)
                e = (z - local_max[piece, None]).exp()
                sums[0, piece] = e.sum(dim=-1)
                sums[1, piece] = (e * (z - log_q)).sum(dim=-1)
                del z, e, log_q  # one chunk's buffers at a time
        global_max, (sum_exp, weighted) = _global_normalizer(shard, local_max, sums)
        lse_s = global_max + sum_exp.log()
        rkl = weighted / sum_exp - lse_s
        ctx.save_for_backward(hidden, weight, teacher, lse_s, lse_t, rkl)
        ctx.shard, ctx.temperatures, ctx.chunk_size, ctx.reduce = shard, (tau_s, tau_t), chunk_size, reduce_grad_hidden
        return rkl

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, teacher, lse_s, lse_t, rkl = ctx.saved_tensors
        shard, (tau_s, tau_t) = ctx.shard, ctx.temperatures

        def logits_grad(piece: slice, logits: torch.Tensor) -> torch.Tensor:
            log_p = logits / tau_s - lse_s[piece, None]
            log_q = teacher[piece, :shard.valid_width].to(lse_s.dtype) / tau_t - lse_t[piece, None]
            g = grad_out[piece].to(lse_s.dtype) / tau_s
            return log_p.exp() * (log_p - log_q - rkl[piece, None]) * g[:, None]

        grad_hidden, grad_weight = _backward(shard, hidden, weight, ctx.chunk_size, ctx.reduce, logits_grad)
        return grad_hidden, grad_weight, None, None, None, None, None, None


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
    out = _FusedReverseKL.apply(flat, weight_shard, teacher, shard, float(student_temperature),
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

    One generic path: `divergences.divergence_rows` with the chunk's logits computed from `hidden` inside each
    chunk, so with `chunk_size` set only one chunk's `[chunk, V/tp]` logits and temporaries live at a time and
    backward recomputes them (matmul included) through autograd. `fused_reverse_kl` is the dedicated (faster)
    reverse KL. reduce_grad_hidden / sequence_parallel: as `fused_token_logprobs`."""
    terms = divergence_terms(kind, student_temperature, teacher_temperature, beta, alpha)
    teacher = _teacher_rows(teacher_logits_shard)
    flat, shard, leading = _prepare(hidden, weight_shard, true_vocab_size, group, chunk_size,
                                    {"teacher_logits_shard": teacher}, sequence_parallel=sequence_parallel)
    # The hidden gradient of each rank is a partial over its vocabulary shard: CopyToTP sums it (backward).
    replicated = CopyToTP.apply(flat, shard) if reduce_grad_hidden and not sequence_parallel else flat
    out = divergence_rows(terms, lambda piece: replicated[piece] @ weight_shard.T, teacher, shard,
                          float(student_temperature), float(teacher_temperature), flat.shape[0],
                          compute_dtype(flat, weight_shard, teacher), chunk_size,
                          flat.requires_grad or weight_shard.requires_grad)
    return out.reshape(leading)
