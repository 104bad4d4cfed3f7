"""The supervised fine-tuning loop (`run.algorithm: sft`): data -> megatron student at TP/PP -> optimizer.

The baseline of comparisons, and how the teachers of the synthetic tasks are made. Checkpoints, resume, signals,
metrics and summary follow the one policy of `common.py`; `checkpoint.load` continues that run (its step, optimizer
and data position).

Each rank reads the same dataset and takes its data-parallel share of each global batch; every TP/PP rank of a
data-parallel replica sees the same micro-batches.
"""

from __future__ import annotations

import time

import torch

from opd_megatron.config import RunConfig
from opd_megatron.data import build_batch_sampler, build_dataset
from opd_megatron.data.batch_indices import split_for_rank
from opd_megatron.data.jsonl import JsonlDataset, SftBatch, collate
from opd_megatron.data.tokenizer import check_vocab_fits, load_tokenizer
from opd_megatron.errors import NonFiniteLossError
from opd_megatron.loop.common import (Checkpointer, LoadMeaning, RunDirectory, StepLoop, StopRequest, TrainResult,
                                      run_steps, starting_point)
from opd_megatron.student.checkpoint import resolve_checkpoint
from opd_megatron.student.distributed import ParallelContext
from opd_megatron.student.lm_loss import token_cross_entropy_sum
from opd_megatron.student.model import build_student
from opd_megatron.student.optimizer import current_lr, optimizer_step, wrap_for_training, zero_grads
from opd_megatron.student.schedule import forward_backward


class SftLoop(StepLoop):
    """The dataset, its global-batch order (the checkpoint's `sampler` state) and the student on this rank."""

    def __init__(self, cfg: RunConfig, ctx: ParallelContext, run_dir: RunDirectory):
        self.cfg, self.ctx, self.run_dir = cfg, ctx, run_dir
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        check_vocab_fits(tokenizer, cfg.model.vocab_size)
        self.dataset = build_dataset(cfg.data, tokenizer, seed=cfg.run.seed)
        self.sampler = build_batch_sampler(self.dataset, cfg.parallel.global_batch_size, cfg.run.seed,
                                           cfg.data.shuffle)
        student = build_student(cfg.model, cfg.parallel, ctx.device)
        self.trainable = wrap_for_training(student, cfg.optim, cfg.model, cfg.run.train_steps)
        self.checkpointer = Checkpointer(cfg, ctx, self.trainable, run_dir.checkpoints,
                                         shared={"sampler": self.sampler})
        self.step = 0
        self.steps_s = 0.0      # seconds over this process's steps (time/cumulative/wall_s)

    @property
    def skipped_lines(self) -> int:
        """Malformed lines the JSONL reader skipped (data.skip_malformed); an indexed corpus skips none."""
        return self.dataset.num_skipped if isinstance(self.dataset, JsonlDataset) else 0

    def loss(self, logits: torch.Tensor, micro_batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed token cross-entropy and the token count of one micro-batch (megatron's per-token contract)."""
        return token_cross_entropy_sum(logits, micro_batch.labels.to(logits.device),
                                       micro_batch.loss_mask.to(logits.device), self.cfg.model.vocab_size)

    def advance(self) -> dict[str, float]:
        cfg, mbs = self.cfg, self.cfg.parallel.micro_batch_size
        started = time.perf_counter()
        global_indices = next(self.sampler)
        micro_batches = [collate([self.dataset[i] for i in ids])
                         for ids in split_for_rank(global_indices, self.ctx.dp_rank, self.ctx.dp, mbs)]
        zero_grads(self.trainable)
        # SftBatch.model_inputs: packed documents' own positions and attention where the data asks for them.
        loss_sum, num_tokens = forward_backward(self.trainable.ddp, micro_batches, self.loss, cfg.data.seq_length, mbs,
                                                model_inputs=SftBatch.model_inputs)
        loss = loss_sum / max(num_tokens, 1.0)
        if not torch.isfinite(torch.tensor(loss)):
            raise NonFiniteLossError(
                f"step {self.step + 1}: loss is {loss} (non-finite); not saving over the last checkpoint "
                f"{resolve_checkpoint(self.run_dir.checkpoints)}. Lower optim.lr or check the data.")
        lr = current_lr(self.trainable.optimizer)
        stepped, grad_norm = optimizer_step(self.trainable)
        self.step += 1
        step_s = time.perf_counter() - started
        self.steps_s += step_s
        # time/step/*: this step's seconds; time/cumulative/*: their sums over this process's steps (as in OPD).
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": num_tokens, "time/step/wall_s": step_s,
                "time/cumulative/wall_s": self.steps_s, "tokens_per_s": num_tokens / step_s,
                "skipped_step": 0.0 if stepped else 1.0}


def train_sft(cfg: RunConfig, ctx: ParallelContext, stop: StopRequest) -> TrainResult:
    """Run SFT on this rank (called by `loop.train.train` with the parallel state initialised)."""
    started = time.perf_counter()
    run_dir = RunDirectory(cfg, ctx.is_logging_rank)
    run_dir.write_config()
    loop = SftLoop(cfg, ctx, run_dir)
    start = starting_point(cfg.checkpoint, run_dir.checkpoints, LoadMeaning.CONTINUE)
    loop.step = loop.checkpointer.restore(start)
    if start.path is not None and ctx.is_logging_rank:
        print(f"[opd-megatron] loaded checkpoint {start.path} (step {loop.step})", flush=True)
    with run_dir.metrics_writer(loop.step) as writer:
        if ctx.is_logging_rank and loop.skipped_lines:
            writer.message(f"[opd-megatron] data: skipped {loop.skipped_lines} malformed lines (data.skip_malformed)")
        result = run_steps(loop, cfg, loop.checkpointer, writer, stop)
    result.wall_s = time.perf_counter() - started
    run_dir.write_summary({"start_step": result.start_step, "final_step": result.final_step,
                           "stopped_by_signal": result.stopped_by_signal, "checkpoint": result.checkpoint,
                           "wall_s": round(result.wall_s, 3), "first_loss": result.first_loss,
                           "last_loss": result.last_loss, "layout": {"tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp}})
    return result


__all__ = ["SftLoop", "train_sft"]
