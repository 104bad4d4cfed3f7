"""The vocabulary shard and what every vocab-parallel op builds on: where this rank's slice of the vocabulary
sits (`Shard`), the input checks (cheap by default, collective under the debug switch), the chunking of rows,
the global log-normaliser and the two TP autograd ops.

Layout (megatron's `ColumnParallelLinear` output): TP rank `r` of `tp` holds logits `[..., V/tp]` for the
contiguous slice `[r * V/tp, (r + 1) * V/tp)` of the padded vocabulary. Ids `>= true_vocab_size` are padding:
they are set to -inf before any arithmetic, so they carry no probability mass and receive zero gradient.
Outside an initialised megatron model-parallel state (and without `group`) a shard is the whole vocabulary
(tp = 1) and nothing is communicated.

Gradient convention (megatron's): every result is replicated on all TP ranks and the caller forms the same loss
on each; the gradient that reaches each rank's shard is the gradient of that one loss wrt the shard. Two
autograd ops follow from it [Ours]:
- `ReduceFromTP` (forward all-reduce SUM of per-rank partial sums, backward identity): the output is used
  identically on every rank, so its gradient is already the full one on each rank, and the partial sum of rank
  `r` only depends on rank `r`'s shard (plus replicated statistics).
- `CopyToTP` (forward identity, backward all-reduce SUM): a replicated statistic (the normaliser) consumed by
  rank-local partial terms; each rank's gradient wrt it is only its own terms' share, so the shares are summed.

Input checks. The hot path runs only the checks that need neither another rank nor the host to wait for the
device: types, dtypes, shapes on this rank, scalar arguments. The checks that do (every rank's shard shape
agreeing, one all-reduce; token ids in range, `.min()`/`.max()` read on the host; no NaN/+inf, one read of each
tensor and a host read; a row without any mass) run only with the debug switch on: `OPD_DEBUG_CHECKS=1` in the
environment (read once, at import) or `set_debug_checks(True)`. They are then agreed on by all TP ranks with one
small all-reduce, so a bad shard on one rank makes every rank raise the same `MathInputError` instead of leaving
the others waiting in a collective. Without them, as in megatron's `vocab_parallel_cross_entropy`, a token id
outside the vocabulary reads a padding column or no logit at all, NaN/+inf logits give NaN results (the loop tests
its logits with `finite.nonfinite_on_any_tp_rank` before the loss, and the teachers check the ids they serve),
and shards of different shapes on different ranks fail or hang in the first collective.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from opd_megatron.math.checks import MathInputError, require_binary_mask, require_positive_int
from opd_megatron.math.divergences import compute_dtype

DEBUG_CHECKS_ENV = "OPD_DEBUG_CHECKS"
_debug_checks = os.environ.get(DEBUG_CHECKS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def set_debug_checks(enabled: bool) -> bool:
    """Turn the collective / host-syncing input checks on or off for this process; returns the previous setting
    (so a caller can restore it). Every TP rank must use the same setting: the checks are collectives."""
    global _debug_checks
    previous, _debug_checks = _debug_checks, bool(enabled)
    return previous


def debug_checks_enabled() -> bool:
    return _debug_checks


@contextlib.contextmanager
def debug_checks(enabled: bool = True) -> Iterator[None]:
    """`set_debug_checks(enabled)` for the block; the previous setting is restored after it."""
    previous = set_debug_checks(enabled)
    try:
        yield
    finally:
        set_debug_checks(previous)


# ---------------------------------------------------------------------------------------------------------------
# Layout


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


# ---------------------------------------------------------------------------------------------------------------
# Input checks


def flatten_rows(name: str, logits: torch.Tensor) -> torch.Tensor:
    """`[..., V/tp]` -> `[N, V/tp]` (a view where possible), after checking it is a floating tensor of rows."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise MathInputError(f"{name}: expected a floating-point tensor [..., V/tp]")
    if logits.dim() < 2 or logits.shape[-1] < 1:
        raise MathInputError(f"{name}: expected shape [N, V/tp] or [B, T, V/tp], got {tuple(logits.shape)}")
    return logits.reshape(-1, logits.shape[-1])


def require_integer_ids(name: str, ids: torch.Tensor) -> None:
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise MathInputError(f"{name}: expected an integer tensor of token ids, got dtype {ids.dtype}")


def ids_outside(ids: torch.Tensor, low: int, high: int) -> bool:
    """Whether any id lies outside `[low, high)`: two reductions read on the host (a debug check)."""
    return bool(ids.numel()) and (int(ids.min()) < low or int(ids.max()) >= high)


def has_nan_or_posinf(tensor: torch.Tensor) -> bool:
    """NaN or +inf anywhere (-inf is a legal logit): one reduction, no `[N, V/tp]` temporary, since max()
    propagates NaN and +inf is the max. Read on the host (a debug check)."""
    return bool(tensor.numel()) and not bool(tensor.max() < float("inf"))


def flags_on_any_rank(shard: Shard, flags: list[bool], dims: list[int]) -> tuple[list[bool], list[int], list[int]]:
    """One all-reduce MAX over the TP group: whether each flag is set on some rank, and the smallest and largest
    value of each of `dims` over the ranks (equal where every rank agrees)."""
    stacked = torch.tensor([float(flag) for flag in flags] + dims + [-d for d in dims], dtype=torch.float64)
    shard.all_reduce(stacked, dist.ReduceOp.MAX)
    n, k = len(flags), len(dims)
    return ([bool(flag) for flag in stacked[:n]], [-int(d) for d in stacked[n + k:]],
            [int(d) for d in stacked[n:n + k]])


def check_inputs(shard: Shard, logits: dict[str, torch.Tensor], token_ids: Optional[torch.Tensor] = None) -> None:
    """Shapes equal between the given `[N, V/tp]` tensors (student and teacher) and, for `token_ids`, an integer
    tensor of N ids: local and free. With the debug switch on, also (agreed on by the TP ranks with one small
    all-reduce, so every rank raises the same error): the same shard shape on every rank, no NaN/+inf, token ids
    in `[0, true_vocab_size)`."""
    names = list(logits)
    shapes = [tuple(t.shape) for t in logits.values()]
    if len(set(shapes)) > 1:
        raise MathInputError("expected equal shapes, got " + ", ".join(f"{n} {s}" for n, s in zip(names, shapes)))
    rows, width = shapes[0]
    if token_ids is not None:
        require_integer_ids("token_ids", token_ids)
        if token_ids.numel() != rows:
            raise MathInputError(f"token_ids: expected {rows} ids (the positions of the logits), got shape "
                                 f"{tuple(token_ids.shape)}")
    if not debug_checks_enabled():
        return
    bad = [has_nan_or_posinf(t) for t in logits.values()]
    ids_bad = token_ids is not None and ids_outside(token_ids, 0, shard.true_vocab_size)
    flags, low, high = flags_on_any_rank(shard, bad + [ids_bad], [rows, width])
    if low != high:
        raise MathInputError(f"{names[0]}: expected the same shard shape [N, V/tp] on every TP rank; this rank "
                             f"has {(rows, width)}, the ranks' N range over [{low[0]}, {high[0]}] "
                             f"and V/tp over [{low[1]}, {high[1]}]")
    for name, flag in zip(names, flags):
        if flag:
            raise MathInputError(f"{name}: expected finite values (or -inf for masked entries), found NaN/+inf "
                                 "on some TP rank")
    if flags[-1]:
        raise MathInputError(f"token_ids: expected token ids in [0, {shard.true_vocab_size}) (the true "
                             f"vocabulary), got values in [{int(token_ids.min())}, {int(token_ids.max())}]")


def checked_rows(name: str, logits_shard: torch.Tensor, true_vocab_size: Optional[int],
                 group) -> tuple[torch.Tensor, Shard]:
    """One logits shard `[..., V/tp]` as rows `[N, V/tp]`, with its `Shard`, checked (`check_inputs`)."""
    flat = flatten_rows(name, logits_shard)
    shard = Shard(flat.shape[-1], true_vocab_size, group)
    check_inputs(shard, {name: flat})
    return flat, shard


def token_mask(name: str, mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 (or bool) token mask as bool. That it holds only 0 and 1 is read on the host, so it is checked
    only with the debug switch on; otherwise every nonzero entry counts as 1."""
    if mask.dtype == torch.bool:
        return mask
    return require_binary_mask(name, mask) if debug_checks_enabled() else mask != 0


def require_some_mass(row_max: torch.Tensor) -> None:
    """Debug check: a row whose largest (global) logit is -inf has no distribution."""
    if debug_checks_enabled() and bool(torch.isneginf(row_max).any()):
        raise MathInputError("logits: every logit of the (unpadded) vocabulary is -inf at some position "
                             "(no distribution there)")


# ---------------------------------------------------------------------------------------------------------------
# Chunking: rows of `[N, V/tp]` at a time, so float temporaries are `chunk x V/tp`


def row_chunks(rows: int, chunk_size: Optional[int]) -> list[slice]:
    if chunk_size is None:
        return [slice(0, rows)]
    require_positive_int("chunk_size", chunk_size)
    return [slice(i, min(i + chunk_size, rows)) for i in range(0, rows, chunk_size)] or [slice(0, 0)]


def _concat_rows(parts: list) -> Any:
    """Concatenate per-chunk results along the rows: tensors, tuples of results, or a dataclass's tensor fields
    (its other fields are the first chunk's)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts) if len(parts) > 1 else first
    if dataclasses.is_dataclass(first):
        return dataclasses.replace(first, **{field.name: _concat_rows([getattr(part, field.name) for part in parts])
                                            for field in dataclasses.fields(first)
                                            if isinstance(getattr(first, field.name), torch.Tensor)})
    if isinstance(first, tuple):
        return tuple(_concat_rows(list(column)) for column in zip(*parts))
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
        return _concat_rows([rows_fn(piece) for piece in pieces])
    with set_checkpoint_early_stop(False):
        return _concat_rows([checkpoint(rows_fn, piece, use_reentrant=False) for piece in pieces])


def row_pieces(tensor: torch.Tensor, chunk_size: Optional[int]) -> Callable[[slice], torch.Tensor]:
    """`piece -> tensor[piece]` for the pieces of `row_chunks`, through one `torch.split`: autograd then joins the
    chunks' gradients once (one `[N, ...]` buffer) instead of zero-filling a full-size gradient per chunk and
    adding them up, as indexing each chunk would (that cost grows with the number of chunks times N)."""
    if chunk_size is None:
        return lambda piece: tensor[piece]
    require_positive_int("chunk_size", chunk_size)
    parts = {index * chunk_size: part for index, part in enumerate(tensor.split(chunk_size))}
    return lambda piece: parts[piece.start] if piece.start in parts else tensor[piece]


# ---------------------------------------------------------------------------------------------------------------
# The global log-normaliser


def global_log_normalizer(shard: Shard, logits: torch.Tensor, temperature: float, dtype: torch.dtype,
                          chunk_size: Optional[int], softmax_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`logsumexp_v(z_v / tau)` over the whole vocabulary `[N]` (no gradient): local max -> all-reduce MAX ->
    local exp-sum -> all-reduce SUM, each local step on `[chunk, V/tp]`.

    softmax_out: an `[N, V/tp]` buffer in `dtype` that receives `softmax(z / tau)` (megatron CE's trade: one exp
    pass in all, the softmax held until backward): the shifted logits are written into it, exponentiated and
    divided in place, so it is the only `[N, V/tp]` temporary."""
    rows = logits.shape[0]
    row_max = torch.empty(rows, dtype=dtype, device=logits.device)
    with torch.no_grad():
        for piece in row_chunks(rows, chunk_size):
            row_max[piece] = shard.scaled(logits[piece], temperature, dtype).amax(dim=-1)
        shard.all_reduce(row_max, dist.ReduceOp.MAX)
        require_some_mass(row_max)
        sum_exp = torch.empty_like(row_max)
        for piece in row_chunks(rows, chunk_size):
            scaled = shard.scaled(logits[piece], temperature, dtype)
            if softmax_out is None:
                shifted = scaled - row_max[piece, None]
            else:
                shifted = torch.sub(scaled, row_max[piece, None], out=softmax_out[piece])
            sum_exp[piece] = shifted.exp_().sum(dim=-1)  # in place: one [chunk, V/tp] temporary, not two
        shard.all_reduce(sum_exp)
        if softmax_out is not None:
            softmax_out.div_(sum_exp[:, None])
    return row_max + sum_exp.log()


# ---------------------------------------------------------------------------------------------------------------
# Reductions over the whole vocabulary at given ids or members (differentiable through `ReduceFromTP`)


def values_at_ids(shard: Shard, values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`values [N, V/tp]` at the global ids `[N]` or `[N, k]` (in the vocabulary), replicated: the owner's entry,
    all-reduced; the gradient (if any) reaches only the owner's column."""
    local = ids - shard.start
    owned = (local >= 0) & (local < shard.width)
    index = local.clamp(0, shard.width - 1)
    picked = values.gather(-1, index if ids.dim() == 2 else index.unsqueeze(-1))
    picked = picked if ids.dim() == 2 else picked.squeeze(-1)
    return ReduceFromTP.apply(torch.where(owned, picked, torch.zeros_like(picked)), shard)


def masked_logsumexp(shard: Shard, values: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """`log sum_{v in members} exp(values_v)` over all ranks `[N]`, replicated and differentiable (gradient the
    softmax over the members, only into each rank's own members); -inf with zero gradient for a row without
    members (as `supports.safe_logsumexp`)."""
    masked = torch.where(members, values, float("-inf"))
    with torch.no_grad():
        shift = shard.all_reduce(masked.amax(dim=-1), dist.ReduceOp.MAX)
        shift = shift.masked_fill(torch.isneginf(shift), 0.0)
    total = ReduceFromTP.apply((masked - shift.unsqueeze(-1)).exp().sum(dim=-1), shard)
    empty = total == 0
    return torch.where(empty, torch.full_like(total, float("-inf")),
                       shift + torch.log(torch.where(empty, torch.ones_like(total), total)))


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
