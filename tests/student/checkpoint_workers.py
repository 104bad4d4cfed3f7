"""Process bodies for the checkpoint tests (importable: spawned processes load them)."""

from unittest import mock

from megatron.core import dist_checkpointing

from opd_megatron.student import checkpoint
from opd_megatron.student.distributed import init_parallel
from opd_megatron.student.model import build_student
from opd_megatron.student.optimizer import wrap_for_training
from tests.student.parity_workers import tiny_config


def _trainable():
    cfg = tiny_config(1, 1)
    ctx = init_parallel(cfg)
    return cfg, ctx, wrap_for_training(build_student(cfg.model, cfg.parallel, ctx.device), cfg.optim, cfg.model, 10)


def save_then_crash_in_second_save(ckpts: str) -> None:
    cfg, ctx, trainable = _trainable()
    checkpoint.save_checkpoint(ckpts, 1, trainable, ctx, {}, cfg.to_dict())
    real_save = dist_checkpointing.save

    def save_then_die(state, directory, *args, **kwargs):
        real_save(state, directory, *args, **kwargs)  # every file written ...
        raise KeyboardInterrupt("simulated crash before the checkpoint is published")

    with mock.patch.object(checkpoint.dist_checkpointing, "save", save_then_die):
        try:
            checkpoint.save_checkpoint(ckpts, 2, trainable, ctx, {}, cfg.to_dict())
        except KeyboardInterrupt:
            return
    raise AssertionError("the simulated crash did not happen")


def save_again(ckpts: str, iteration: int) -> None:
    cfg, ctx, trainable = _trainable()
    checkpoint.save_checkpoint(ckpts, iteration, trainable, ctx, {}, cfg.to_dict())
