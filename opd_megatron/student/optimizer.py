"""Gradient sync and optimizer: megatron-core's DistributedDataParallel, get_megatron_optimizer and
OptimizerParamScheduler, on the CPU (with the shims of cpu_shims.py) and on the GPU alike.

On the CPU the optimizer is megatron's non-distributed fp32 optimizer over torch.optim.AdamW (megatron falls back to
it when neither TransformerEngine nor apex is importable). The distributed optimizer and bf16/fp16 master weights are
GPU paths, selected by `optim.use_distributed_optimizer` and `model.dtype`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import ChainedOptimizer, MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from opd_megatron.config import ModelSection, OptimSection
from opd_megatron.student.model import StudentModel


@dataclass
class TrainableStudent:
    """The DDP-wrapped student stage with its optimizer and learning-rate schedule."""
    student: StudentModel
    ddp: DistributedDataParallel
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler

    @property
    def module(self):
        return self.student.module


def wrap_for_training(student: StudentModel, optim: OptimSection, model_cfg: ModelSection,
                      train_steps: int) -> TrainableStudent:
    config = student.config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=optim.use_distributed_optimizer,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=student.module)
    # The pipeline schedule calls these: finalize_model_grads all-reduces grads across DP (and the tied
    # embedding across the first/last stage) and divides them by the global token count.
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer=optim.optimizer,
            lr=optim.lr,
            min_lr=optim.min_lr,
            weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1,
            adam_beta2=optim.adam_beta2,
            adam_eps=optim.adam_eps,
            sgd_momentum=optim.sgd_momentum,
            clip_grad=optim.clip_grad,
            bf16=model_cfg.dtype == "bf16",
            fp16=model_cfg.dtype == "fp16",
            params_dtype=config.params_dtype,
            use_distributed_optimizer=optim.use_distributed_optimizer,
        ),
        [ddp],
    )
    if optim.optimizer == "sgd":
        # megatron-core 0.16 gives SGD no state initialiser, and loading a checkpoint's optimizer state calls it
        # ("'NoneType' object is not callable"): a resumed SGD run could not start. Adam's creates its moments.
        for inner in optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]:
            if inner.init_state_fn is None:
                inner.init_state_fn = _init_sgd_state
    if model_cfg.dtype == "fp16":
        config.grad_scale_func = optimizer.scale_loss
    decay_steps = optim.decay_steps or train_steps
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.warmup_steps > 0 else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=max(decay_steps, optim.warmup_steps + 1),
        lr_decay_style=optim.decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(decay_steps, 1),
        wd_incr_style="constant",
        # The checkpoint's schedule wins over the config's on resume (megatron's default).
        use_checkpoint_opt_param_scheduler=True,
    )
    return TrainableStudent(student=student, ddp=ddp, optimizer=optimizer, scheduler=scheduler)


def _init_sgd_state(optimizer: torch.optim.Optimizer, config=None) -> None:
    """torch SGD's state as a step creates it (a momentum buffer per parameter when momentum is on), so that a
    checkpoint's buffers have somewhere to load into."""
    for group in optimizer.param_groups:
        if group.get("momentum", 0) == 0:
            continue
        for param in group["params"]:
            if "momentum_buffer" not in optimizer.state[param]:
                optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param.data)


def current_lr(optimizer: MegatronOptimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def zero_grads(trainable: TrainableStudent) -> None:
    trainable.ddp.zero_grad_buffer()
    trainable.optimizer.zero_grad()


def optimizer_step(trainable: TrainableStudent) -> tuple[bool, float]:
    """One optimizer step and one scheduler step. Returns (stepped, grad_norm); a step skipped for non-finite
    gradients (fp16 overflow, NaN) returns stepped=False."""
    stepped, grad_norm, _ = trainable.optimizer.step()
    if stepped:
        trainable.scheduler.step(increment=1)
    return bool(stepped), float(grad_norm) if grad_norm is not None else float("nan")


__all__ = ["TrainableStudent", "wrap_for_training", "optimizer_step", "zero_grads", "current_lr"]
