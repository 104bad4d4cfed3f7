"""Process body for the GPU tests: NCCL, TransformerEngine layer spec (when installed), bf16."""

import torch

from opd_megatron.student.model import transformer_engine_available
from opd_megatron.student.optimizer import optimizer_step, wrap_for_training, zero_grads
from opd_megatron.student.distributed import init_parallel
from opd_megatron.student.model import build_student
from opd_megatron.student.schedule import forward_backward
from tests.student.parity_workers import SEQ, _loss_fn, _micro_batches, global_batch, tiny_config


def bf16_steps(tp: int, steps: int) -> dict:
    cfg = tiny_config(tp, 1, ("model.dtype=bf16", "run.device=auto"))
    ctx = init_parallel(cfg)
    student = build_student(cfg.model, cfg.parallel, ctx.device)
    trainable = wrap_for_training(student, cfg.optim, cfg.model, steps)
    losses = []
    for step in range(steps):
        zero_grads(trainable)
        loss_sum, tokens = forward_backward(trainable.ddp, _micro_batches(global_batch(step), ctx, 2), _loss_fn(),
                                            SEQ, 2)
        optimizer_step(trainable)
        losses.append(loss_sum / tokens)
    layer = type(student.module.decoder.layers[0].self_attention.linear_qkv).__name__
    return {"device": str(ctx.device), "backend": torch.distributed.get_backend(), "losses": losses,
            "param_dtype": str(next(student.module.parameters()).dtype), "qkv_layer": layer,
            "te": transformer_engine_available()}
