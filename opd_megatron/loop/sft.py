"""The training loop: data -> megatron student at TP/PP -> optimizer -> checkpoints -> logs.

`algorithm: sft` trains on a fixed dataset (the baseline of comparisons, and how the teachers of the synthetic
tasks are made). `algorithm: opd` is the on-policy distillation loop of `opd_train.py`: its batches come from
rollouts and its loss from `objective.py`, through the same `forward_backward`, optimizer step and checkpoints.

Each rank reads the same dataset and takes its data-parallel share of each global batch; every TP/PP rank of a
data-parallel replica sees the same micro-batches.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import yaml

from opd_megatron.config import RunConfig
from opd_megatron.data import build_dataset
from opd_megatron.data.jsonl import collate
from opd_megatron.data.batch_indices import GlobalBatchSampler, split_for_rank
from opd_megatron.data.tokenizer import check_vocab_fits, load_tokenizer
from opd_megatron.errors import NonFiniteLossError
from opd_megatron.loop.metrics import MetricsWriter
from opd_megatron.student.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from opd_megatron.student.distributed import destroy_parallel, init_parallel
from opd_megatron.student.lm_loss import token_cross_entropy_sum
from opd_megatron.student.model import build_student
from opd_megatron.student.optimizer import current_lr, optimizer_step, wrap_for_training, zero_grads
from opd_megatron.student.schedule import forward_backward

log = logging.getLogger("opd_megatron.loop.sft")


class StopRequest:
    """SIGTERM (what Slurm sends before a time limit) or SIGINT: finish the current step, save, exit 0.
    The flag is agreed across ranks each step so all ranks stop at the same step."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def agreed(self) -> bool:
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class TrainResult:
    """What a run did, as the logging rank saw it."""
    start_step: int
    final_step: int
    losses: list[float] = field(default_factory=list)   # per step, from start_step + 1
    stopped_by_signal: bool = False
    checkpoint: Optional[str] = None
    wall_s: float = 0.0


def train(cfg: RunConfig) -> TrainResult:
    """`run.algorithm: sft` here; `opd` in `opd_train.py` (same student, optimizer, checkpoints, signals)."""
    ctx = init_parallel(cfg)
    try:
        if cfg.run.algorithm == "opd":
            from opd_megatron.loop.opd import train_opd
            stop = StopRequest()
            try:
                return train_opd(cfg, ctx, stop)
            finally:
                stop.restore()
        return _train(cfg, ctx)
    finally:
        destroy_parallel()


def _train(cfg: RunConfig, ctx) -> TrainResult:
    started = time.perf_counter()
    run_dir = cfg.run.run_dir
    checkpoints = run_dir / "checkpoints"
    if ctx.is_logging_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    check_vocab_fits(tokenizer, cfg.model.vocab_size)
    dataset = build_dataset(cfg.data, tokenizer)
    sampler = GlobalBatchSampler(len(dataset), cfg.parallel.global_batch_size, cfg.run.seed, cfg.data.shuffle)

    student = build_student(cfg.model, cfg.parallel, ctx.device)
    trainable = wrap_for_training(student, cfg.optim, cfg.model, cfg.run.train_steps)

    step = 0
    to_load = cfg.checkpoint.load
    if to_load is None and cfg.checkpoint.resume:
        to_load = checkpoints if resolve_checkpoint(checkpoints) is not None else None
    if to_load is not None:
        path = resolve_checkpoint(to_load)
        if path is None:
            raise FileNotFoundError(f"checkpoint.load={str(to_load)!r}: no complete checkpoint there")
        loaded = load_checkpoint(path, trainable, ctx, load_optimizer=cfg.checkpoint.load_optimizer)
        step = loaded.iteration
        if "sampler" in loaded.data_state:
            sampler.load_state_dict(loaded.data_state["sampler"])
        if ctx.is_logging_rank:
            print(f"[opd-megatron] loaded checkpoint {path} (step {step})", flush=True)

    result = TrainResult(start_step=step, final_step=step)
    writer = MetricsWriter(run_dir, cfg.run.train_steps, step, ctx.is_logging_rank, cfg.logging.tensorboard,
                           cfg.logging.progress_bar)
    if ctx.is_logging_rank and getattr(dataset, "num_skipped", 0):
        writer.message(f"[opd-megatron] data: skipped {dataset.num_skipped} malformed lines (data.skip_malformed)")
    stop = StopRequest()
    seq_length, mbs = cfg.data.seq_length, cfg.parallel.micro_batch_size
    true_vocab = cfg.model.vocab_size

    def loss_fn(logits, micro_batch):
        return token_cross_entropy_sum(logits, micro_batch.labels.to(logits.device),
                                       micro_batch.loss_mask.to(logits.device), true_vocab)

    def save(at_step: int) -> str:
        path = save_checkpoint(checkpoints, at_step, trainable, ctx, {"sampler": sampler.state_dict()},
                               cfg.to_dict(), keep_last=cfg.checkpoint.keep_last)
        return str(path)

    saved_at = step if to_load is not None else -1
    try:
        while step < cfg.run.train_steps:
            step_started = time.perf_counter()
            global_indices = next(sampler)
            micro_batches = [collate([dataset[i] for i in ids])
                             for ids in split_for_rank(global_indices, ctx.dp_rank, ctx.dp, mbs)]
            zero_grads(trainable)
            loss_sum, num_tokens = forward_backward(trainable.ddp, micro_batches, loss_fn, seq_length, mbs)
            loss = loss_sum / max(num_tokens, 1.0)
            if not torch.isfinite(torch.tensor(loss)):
                raise NonFiniteLossError(
                    f"step {step + 1}: loss is {loss} (non-finite); not saving over the last checkpoint "
                    f"{resolve_checkpoint(checkpoints)}. Lower optim.lr or check the data.")
            lr = current_lr(trainable.optimizer)
            stepped, grad_norm = optimizer_step(trainable)
            step += 1
            step_s = time.perf_counter() - step_started
            result.losses.append(loss)
            result.final_step = step
            if step % cfg.logging.log_interval == 0 or step == cfg.run.train_steps:
                writer.log(step, {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": num_tokens,
                                  "step_s": step_s, "tokens_per_s": num_tokens / step_s,
                                  "skipped_step": 0.0 if stepped else 1.0})
            writer.advance()
            if stop.agreed():
                result.checkpoint = save(step)
                saved_at = step
                result.stopped_by_signal = True
                writer.message(f"[opd-megatron] received signal {stop.received or 'on another rank'}: finished step "
                               f"{step}, saved checkpoint {result.checkpoint}, exiting cleanly")
                break
            if cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0:
                result.checkpoint = save(step)
                saved_at = step
        if cfg.checkpoint.save_at_end and saved_at != step and not result.stopped_by_signal:
            result.checkpoint = save(step)
    finally:
        stop.restore()
        writer.close()
    result.wall_s = time.perf_counter() - started
    if ctx.is_logging_rank:
        summary = {"start_step": result.start_step, "final_step": result.final_step,
                   "stopped_by_signal": result.stopped_by_signal, "checkpoint": result.checkpoint,
                   "wall_s": round(result.wall_s, 3),
                   "first_loss": result.losses[0] if result.losses else None,
                   "last_loss": result.losses[-1] if result.losses else None,
                   "layout": {"tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp}}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return result


__all__ = ["train", "TrainResult", "NonFiniteLossError"]
