"""Process bodies for the parallel-parity, resharding and optimizer tests (importable: spawned processes load them).

All layouts train the same tiny model from the same checkpoint on the same synthetic global batches; each returns
its per-step losses and gradient norms and, from a forward-only pass on a fixed batch, the full-vocabulary logits
(gathered over TP here in the test only, to compare with TP=1)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from opd_megatron.config import load_config
from opd_megatron.data.jsonl import collate, make_sample
from opd_megatron.data.batch_indices import split_for_rank
from opd_megatron.student.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from opd_megatron.student.distributed import init_parallel
from opd_megatron.student.lm_loss import token_cross_entropy_sum
from opd_megatron.student.model import build_student, parameter_count
from opd_megatron.student.optimizer import optimizer_step, wrap_for_training, zero_grads
from opd_megatron.student.schedule import forward_backward

VOCAB = 300  # padded to 384 at every tp: exercises the padded-vocabulary mask
SEQ = 16
TINY = ["model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
        "model.num_query_groups=2", f"model.vocab_size={VOCAB}", "model.max_position_embeddings=32",
        f"data.seq_length={SEQ}", "parallel.micro_batch_size=2", "parallel.global_batch_size=8",
        "optim.lr=1e-3", "optim.warmup_steps=1", "optim.decay_style=cosine", "optim.clip_grad=1.0",
        "optim.weight_decay=0.01", "run.seed=7"]
# Plain SGD without momentum, clipping, warm-up or weight decay: the update is -lr * gradient, so a constant factor
# on the gradient (a data-parallel sum instead of a mean, an all-reduce applied twice) changes every weight update
# and the gradient norm by that factor. Adam (whose update m / sqrt(v) is invariant to a gradient scale), clipping
# to a norm and a first step at lr 0 would all hide it.
SGD = ("optim.optimizer=sgd", "optim.sgd_momentum=0", "optim.clip_grad=0", "optim.warmup_steps=0",
       "optim.weight_decay=0", "optim.decay_style=constant", "optim.lr=0.5")


def tiny_config(tp: int, pp: int, extra: tuple[str, ...] = ()):
    return load_config(None, TINY + [f"parallel.tp={tp}", f"parallel.pp={pp}", *extra])


def global_batch(step: int, size: int = 8):
    """Deterministic synthetic samples for `step`: random tokens, response masks of varying length."""
    gen = torch.Generator().manual_seed(1000 + step)
    samples = []
    for _ in range(size):
        length = int(torch.randint(SEQ // 2, SEQ + 2, (1,), generator=gen))
        ids = torch.randint(0, VOCAB, (length,), generator=gen).tolist()
        first = int(torch.randint(1, 5, (1,), generator=gen))
        samples.append(make_sample(ids, first, SEQ, pad_id=0))
    return samples


def _loss_fn(captured: Optional[list] = None):
    def loss_fn(logits, mb):
        if captured is not None:
            captured.append(logits.detach().clone())
        return token_cross_entropy_sum(logits, mb.labels, mb.loss_mask, VOCAB)
    return loss_fn


def _micro_batches(samples, ctx, mbs):
    return [collate([samples[i] for i in ids]) for ids in split_for_rank(list(range(len(samples))), ctx.dp_rank,
                                                                         ctx.dp, mbs)]


def _gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, logits.contiguous(), group=group)
    return torch.cat(shards, dim=-1)[..., :VOCAB]


def train_layout(tp: int, pp: int, init: Optional[str], save_to: Optional[str], steps: int,
                 extra: tuple[str, ...] = (), load_optimizer: bool = False, first_step: int = 0) -> dict:
    """Train `steps` steps on the batches of steps first_step.. and report the losses, the gradient norms (before
    any clipping, the same on every rank) and eval logits.
    `init`: a checkpoint to start from: weights only (an initial model), or with optimizer and schedule (a resume)."""
    cfg = tiny_config(tp, pp, extra)
    ctx = init_parallel(cfg)
    trainable = wrap_for_training(build_student(cfg.model, cfg.parallel, ctx.device), cfg.optim, cfg.model, 10)
    if init is not None:
        # An initial checkpoint holds weights only: a fresh optimizer has no state yet.
        load_checkpoint(resolve_checkpoint(init), trainable, ctx, load_optimizer=load_optimizer)
    mbs = cfg.parallel.micro_batch_size
    losses, grad_norms = [], []
    for step in range(first_step, first_step + steps):
        zero_grads(trainable)
        loss_sum, tokens = forward_backward(trainable.ddp, _micro_batches(global_batch(step), ctx, mbs),
                                            _loss_fn(), SEQ, mbs)
        _, grad_norm = optimizer_step(trainable)
        losses.append(loss_sum / tokens)
        grad_norms.append(grad_norm)
    captured: list = []
    eval_batch = global_batch(99, size=2 * ctx.dp)
    forward_backward(trainable.ddp, _micro_batches(eval_batch, ctx, 2), _loss_fn(captured), SEQ, 2,
                     forward_only=True)
    logits = None
    if ctx.is_last_stage:
        full = _gather_vocab(captured[0])
        if ctx.tp_rank == 0 and ctx.dp_rank == 0:
            logits = full
    if save_to is not None:
        save_checkpoint(save_to, first_step + steps, trainable, ctx, {}, cfg.to_dict())
    return {"losses": losses, "grad_norms": grad_norms, "logits": logits,
            "lr": trainable.optimizer.param_groups[0]["lr"], "parameters": parameter_count(trainable.module)}


def full_weights(paths: list[str]) -> list[dict[str, torch.Tensor]]:
    """Load each checkpoint's weights at TP=1 PP=1 (one process) and return the whole model's weights (weights only:
    an initial checkpoint has no optimizer state, and an SGD run's differs from this Adam model's)."""
    cfg = tiny_config(1, 1)
    ctx = init_parallel(cfg)
    trainable = wrap_for_training(build_student(cfg.model, cfg.parallel, ctx.device), cfg.optim, cfg.model, 10)
    out = []
    for path in paths:
        load_checkpoint(resolve_checkpoint(path), trainable, ctx, load_optimizer=False)
        out.append({k: v.detach().clone() for k, v in trainable.module.state_dict().items()
                    if isinstance(v, torch.Tensor) and "_extra_state" not in k})
    return out
