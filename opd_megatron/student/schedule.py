"""One forward-backward pass over a list of micro-batches through megatron's pipeline schedule.

`get_forward_backward_func()` picks the no-pipelining schedule at pp=1 and 1F1B at pp>1 (p2p over gloo on the
CPU, NCCL on the GPU). Every stage calls this with the same micro-batches; the first stage reads `tokens`, the last
stage reads `labels` and `loss_mask` and calls `loss_fn`.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from opd_megatron.config import ConfigError
from opd_megatron.student.model import transformer_engine_available

# loss_fn(logits [B, S, V/tp], micro_batch) -> (loss_sum 0-dim, num_tokens 0-dim)
LossFn = Callable[[torch.Tensor, object], tuple[torch.Tensor, torch.Tensor]]
# model_inputs(micro_batch, device) -> (input ids [B, S], position ids [B, S], attention mask [B, 1, S, S] bool, True
# where a query may not attend to a key, or None: the attention's own causal mask). SftBatch.model_inputs gives
# packed documents their own positions and attention (data.reset_position_ids / data.reset_attention_mask).
ModelInputs = Callable[[object, torch.device], tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]


def causal_inputs(micro_batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, None]:
    """`micro_batch.tokens` at positions 0..S-1 under the plain causal mask."""
    tokens = micro_batch.tokens.to(device)
    return tokens, torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens), None


def forward_backward(model, micro_batches: Sequence, loss_fn: LossFn, seq_length: int, micro_batch_size: int,
                     forward_only: bool = False, model_inputs: ModelInputs = causal_inputs) -> tuple[float, float]:
    """Runs the schedule and returns (loss_sum, num_tokens) summed over micro-batches and data-parallel ranks,
    the same on every rank. Gradients (unless forward_only) are left in the DDP buffers, already divided by the
    global token count by finalize_model_grads."""
    totals = torch.zeros(2, dtype=torch.float64)

    def loss_func(micro_batch, logits):
        loss_sum, num_tokens = loss_fn(logits, micro_batch)
        totals[0] += loss_sum.detach().double().cpu()
        totals[1] += num_tokens.detach().double().cpu()
        # megatron's per-token-loss contract: (loss summed over tokens, token count as int, reporting dict).
        return loss_sum, num_tokens.to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), num_tokens])}

    def forward_step(data_iterator, model):
        micro_batch = next(data_iterator)
        device = next(model.parameters()).device
        tokens, position_ids, attention_mask = model_inputs(micro_batch, device)
        if attention_mask is not None and device.type == "cuda" and transformer_engine_available():
            # TransformerEngine's attention with megatron's causal mask type ignores an explicit mask: documents
            # would silently see each other.
            raise ConfigError("data.reset_attention_mask=true needs megatron-core's local layer spec; "
                              "TransformerEngine's causal attention ignores a per-document mask. Set "
                              "data.reset_attention_mask=false (the loss still stops at document boundaries with "
                              "data.eod_mask_loss)")
        # attention_mask None: causal masking inside the attention (megatron's default causal mask type).
        logits = model(tokens, position_ids, attention_mask)
        return logits, partial(loss_func, micro_batch)

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    # Only the last stage saw the loss; TP ranks of that stage saw the same value: count tp_rank 0 once.
    if not (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0):
        totals.zero_()
    dist.all_reduce(totals)
    return float(totals[0]), float(totals[1])
