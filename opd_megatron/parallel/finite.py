"""One agreed answer to "is anything non-finite here?" across the TP group, so that every rank takes the same
branch (skipping a step, refusing to sample) and no collective is left waiting on a rank that bailed out."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def nonfinite_on_any_tp_rank(*shards: Optional[torch.Tensor]) -> bool:
    """True on every TP rank when any rank's shard holds NaN or +inf (-inf is a legal logit: padding, masked ids).
    Two reductions per tensor and one `[1]` all-reduce over the TP group."""
    present = [s for s in shards if s is not None]
    bad = torch.zeros(1, device=present[0].device if present else "cpu")
    for shard in present:
        detached = shard.detach()
        if bool(torch.isnan(detached).any()) or bool(torch.isposinf(detached).any()):
            bad[0] = 1.0
            break
    if parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group())
    return bool(bad.item())
