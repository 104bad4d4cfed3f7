"""Process bodies for tests/loop/test_faults.py, started as torchrun starts ranks (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT in the environment): `python -c "from tests.loop.fault_workers import X; X(...)"`."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

from opd_megatron.loop.common import Checkpointer, RunDirectory, StepLoop, StopRequest, run_steps
from opd_megatron.student.distributed import destroy_parallel, init_parallel
from opd_megatron.student.model import build_student
from opd_megatron.student.optimizer import optimizer_step, wrap_for_training, zero_grads
from opd_megatron.student.schedule import forward_backward
from opd_megatron.data.batch_indices import split_for_rank
from opd_megatron.data.jsonl import collate
from tests.student.parity_workers import SEQ, VOCAB, global_batch, tiny_config


class _TinySftLoop(StepLoop):
    """Real data-parallel steps of the tiny model (the gradient all-reduce is the collective a peer waits in);
    rank `stop_rank` stops itself (SIGSTOP) in the loss of step `stop_at`: after its forward, before its backward."""

    def __init__(self, cfg, ctx, stop_rank: int, stop_at: int):
        self.cfg, self.ctx, self.stop_rank, self.stop_at = cfg, ctx, stop_rank, stop_at
        self.trainable = wrap_for_training(build_student(cfg.model, cfg.parallel, ctx.device), cfg.optim, cfg.model,
                                           cfg.run.train_steps)
        self.step = 0

    def _loss(self, logits, micro_batch):
        from opd_megatron.student.lm_loss import token_cross_entropy_sum
        if self.ctx.rank == self.stop_rank and self.step + 1 == self.stop_at:
            os.kill(os.getpid(), signal.SIGSTOP)
        return token_cross_entropy_sum(logits, micro_batch.labels, micro_batch.loss_mask, VOCAB)

    def advance(self):
        mbs = self.cfg.parallel.micro_batch_size
        samples = global_batch(self.step)
        micro_batches = [collate([samples[i] for i in ids])
                         for ids in split_for_rank(list(range(len(samples))), self.ctx.dp_rank, self.ctx.dp, mbs)]
        zero_grads(self.trainable)
        loss_sum, tokens = forward_backward(self.trainable.ddp, micro_batches, self._loss, SEQ, mbs)
        optimizer_step(self.trainable)
        self.step += 1
        return {"loss": loss_sum / max(tokens, 1.0)}


def run_with_a_stopped_rank(run_dir: str, stop_rank: int, stop_at: int, hang_timeout_s: float) -> None:
    """Data-parallel training at dp=2 with a checkpoint every 2 steps, under the watchdog; `stop_rank` stops in step
    `stop_at`. Never returns normally: the watchdog ends the ranks that wait."""
    cfg = tiny_config(1, 1, (f"run.hang_timeout_s={hang_timeout_s}", "run.collective_timeout_s=300",
                             "run.train_steps=1000", "checkpoint.save_interval=2", "checkpoint.keep_last=2",
                             f"run.output_dir={Path(run_dir).parent}", f"run.name={Path(run_dir).name}",
                             "logging.tensorboard=false", "logging.progress_bar=false"))
    ctx = init_parallel(cfg)
    # dist_checkpointing starts a helper process at its first save (seconds on shared cores): started here, so that a
    # short hang timeout measures the steps, not that start.
    from megatron.core.dist_checkpointing.strategies.filesystem_async import _get_write_results_queue
    _get_write_results_queue()
    stop = StopRequest()
    try:
        loop = _TinySftLoop(cfg, ctx, stop_rank, stop_at)
        directory = RunDirectory(cfg, ctx.is_logging_rank)
        checkpointer = Checkpointer(cfg, ctx, loop.trainable, directory.checkpoints, shared={})
        with directory.metrics_writer(0) as writer:
            run_steps(loop, cfg, checkpointer, writer, stop)
    finally:
        stop.restore()
        destroy_parallel()
    raise AssertionError("the run finished: the stopped rank was not waited on")




def collective_timeout(timeout_s: float) -> str:
    """Rank 0 all-reduces over megatron's data-parallel group; rank 1 never joins (it sleeps past the timeout).
    Returns rank 0's error (megatron made its groups with a 30-minute timeout of its own before)."""
    import time

    import torch.distributed as dist
    from megatron.core import parallel_state

    ctx = init_parallel(tiny_config(1, 1, (f"run.collective_timeout_s={timeout_s}",)))
    if ctx.rank == 1:
        time.sleep(3 * timeout_s)
        return "slept"
    started = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=parallel_state.get_data_parallel_group())
    except RuntimeError as exc:
        return f"after {time.monotonic() - started:.1f} s: {exc}"
    return "the all-reduce returned"
