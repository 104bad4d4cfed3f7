"""Next-token cross-entropy on vocab-sharded logits, as the (sum, count) pair megatron's per-token loss wants."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy


def mask_padded_vocab(logits: torch.Tensor, true_vocab_size: int) -> torch.Tensor:
    """logits `[..., V/tp]` of this TP rank -> the same with ids >= true_vocab_size set to -inf, so vocabulary
    padding (added to split the vocabulary evenly over TP ranks) carries no probability mass. Returns the input
    unchanged (no copy) on ranks whose shard holds no padding."""
    shard = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    n_real = true_vocab_size - start
    if n_real >= shard:
        return logits
    keep = torch.arange(shard, device=logits.device) < n_real
    return logits.masked_fill(~keep, float("-inf"))


def token_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                            true_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits `[B, S, V/tp]`, labels `[B, S]` (global ids), loss_mask `[B, S]` ->
    (sum over masked tokens of -log p(label), number of masked tokens), both 0-dim float32.

    Uses megatron-core's vocab_parallel_cross_entropy (local max, all-reduce MAX, local exp-sum, all-reduce SUM):
    the vocabulary is never gathered."""
    logits = mask_padded_vocab(logits, true_vocab_size)
    # vocab_parallel_cross_entropy wants [S, B, V/tp] and [S, B].
    per_token = vocab_parallel_cross_entropy(logits.transpose(0, 1).float().contiguous(),
                                             labels.transpose(0, 1).contiguous()).transpose(0, 1)
    mask = loss_mask.float()
    return (per_token * mask).sum(), mask.sum()
