"""One agreed answer to "is anything non-finite here?" across the TP group, so that every rank takes the same
branch (skipping a step, refusing to sample) and no collective is left waiting on a rank that bailed out."""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def nonfinite_on_any_tp_rank(*shards: Optional[torch.Tensor]) -> bool:
    """True on every TP rank when any rank's shard holds NaN or +inf (-inf is a legal logit: padding, masked ids).
    One reduction per tensor (two more only when its sum is +inf or NaN) and one `[1]` all-reduce over the TP
    group."""
    present = [s for s in shards if s is not None]
    bad = torch.zeros(1, device=present[0].device if present else "cpu")
    for shard in present:
        detached = shard.detach()
        # The sum is finite or -inf exactly when no element is NaN or +inf, except that finite values may overflow
        # it to +inf: a NaN stays NaN, +inf meets -inf as NaN, so a finite or -inf sum proves the shard clean, and
        # only a +inf or NaN sum (rare) needs the element-wise check. One read of the shard instead of three
        # passes and two boolean buffers of its size (`isnan`, `isposinf`).
        total = float(detached.sum())
        if (math.isnan(total) or total == math.inf) and _has_nan_or_posinf(detached):
            bad[0] = 1.0
            break
    if parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group())
    return bool(bad.item())


def _has_nan_or_posinf(tensor: torch.Tensor) -> bool:
    return bool(torch.isnan(tensor).any()) or bool(torch.isposinf(tensor).any())


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite (no NaN, +inf or -inf): one reduction per tensor and one
    host read, then the element-wise check only when the sum of sums is not finite (a non-finite element, or
    finite values overflowing the sum, which the check tells apart). The loop's test of every gradient."""
    tensors = [t.detach() for t in tensors]
    if not tensors:
        return True
    if math.isfinite(float(torch.stack([t.sum(dtype=torch.float32) for t in tensors]).sum())):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)
