"""Process bodies for the checkpoint tests (importable: spawned processes load them)."""

import shutil
from unittest import mock

from megatron.core import dist_checkpointing

from opd_megatron.student import checkpoint
from opd_megatron.student.distributed import init_parallel
from opd_megatron.student.model import build_student
from opd_megatron.student.optimizer import wrap_for_training
from tests.student.parity_workers import tiny_config


def _trainable(tp: int = 1):
    cfg = tiny_config(tp, 1)
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


def _expect(error_type, call) -> str:
    """`Type: message` of the `error_type` that `call()` raises (an AssertionError when nothing is raised)."""
    try:
        call()
    except error_type as exc:
        return f"{type(exc).__name__}: {exc}"
    raise AssertionError(f"expected {error_type.__name__}, nothing was raised")


def checkpoint_faults(ckpts: str) -> dict:
    """On 2 ranks, one after another on the same checkpoints directory (one spawn for all the cases):
    1. a save whose shard write fails on rank 1 only (RLIMIT_FSIZE: a file larger than the limit fails with EFBIG,
       as a full disk fails a write) -> the error on both ranks, no partial directory, `latest` unchanged;
    2. keep_last=1 with a stale higher iteration beside it (a timeline the run went back from) -> the checkpoint
       just saved, which `latest` names, is kept;
    3. a truncated shard -> a load names the checkpoint and the file.
    At TP=2, so that each rank writes shards of its own."""
    import resource
    from pathlib import Path

    import torch.distributed as dist

    cfg, ctx, trainable = _trainable(tp=2)
    root = Path(ckpts)
    seen: dict = {}
    checkpoint.save_checkpoint(root, 1, trainable, ctx, {}, cfg.to_dict())
    # 1. rank 1's shard files (~400 kB each) exceed a 64 kB file-size limit; rank 0 writes fine.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if ctx.rank == 1:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        seen["save_error"] = _expect(Exception, lambda: checkpoint.save_checkpoint(root, 2, trainable, ctx, {},
                                                                                    cfg.to_dict()))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    dist.barrier()
    seen["after_failed_save"] = sorted(p.name for p in root.iterdir())
    seen["latest_after_failed_save"] = (root / "latest").read_text()
    dist.barrier()  # both ranks have listed the directory before rank 0 adds iteration 9 to it
    # 2. a complete iteration 9 beside (a copy of iteration 1), then a save of iteration 3 with keep_last=1.
    if ctx.rank == 0:
        shutil.copytree(root / "iter_0000001", root / "iter_0000009")
    dist.barrier()
    checkpoint.save_checkpoint(root, 3, trainable, ctx, {}, cfg.to_dict(), keep_last=1)
    seen["after_keep_last"] = sorted(p.name for p in root.iterdir())
    seen["resolved_after_keep_last"] = str(checkpoint.resolve_checkpoint(root))
    dist.barrier()  # both ranks have listed and resolved before rank 0 truncates a shard of iteration 3
    # 3. truncate one of rank 1's shards of iteration 3 (the one `latest` names).
    if ctx.rank == 0:
        shard = root / "iter_0000003" / "__1_0.distcp"
        shard.write_bytes(shard.read_bytes()[:1000])
    dist.barrier()
    seen["truncated_load_error"] = _expect(Exception, lambda: checkpoint.load_checkpoint(root / "iter_0000003",
                                                                                          trainable, ctx))
    if ctx.rank == 0:
        shutil.rmtree(root / "iter_0000009")
    dist.barrier()
    _corrupt_resume_and_nan_guard(cfg, ctx, trainable, root, seen)
    return seen


def _corrupt_resume_and_nan_guard(cfg, ctx, trainable, root, seen: dict) -> None:
    """4. iterations 4 and 5 saved with checksums, then one byte of a rank-1 shard of 5 flipped (its size kept): a
       resume names it (sha256), and with checkpoint.fallback_to_previous loads 4, renames 5 out of the way and
       points `latest` at 4;
    5. a NaN in rank 1's weights: the save is refused on both ranks, nothing is written."""
    import torch
    import torch.distributed as dist

    from opd_megatron.errors import NonFiniteLossError
    from opd_megatron.loop.common import Checkpointer, LoadMeaning, starting_point

    # Weights only: an optimizer that has not stepped has no Adam moments to save or load.
    cfg.checkpoint.checksums, cfg.checkpoint.keep_last, cfg.checkpoint.load_optimizer = True, 0, False
    checkpointer = Checkpointer(cfg, ctx, trainable, root, shared={})
    for step in (4, 5):
        checkpointer.save(step)
    if ctx.rank == 0:
        shard = root / "iter_0000005" / "__1_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    dist.barrier()
    start = starting_point(cfg.checkpoint, root, LoadMeaning.CONTINUE)
    seen["no_fallback_error"] = _expect(Exception, lambda: checkpointer.restore(start))
    cfg.checkpoint.fallback_to_previous = True
    start = starting_point(cfg.checkpoint, root, LoadMeaning.CONTINUE)
    seen["fallbacks"] = [str(p) for p in start.fallbacks]
    checkpointer.restore(start)
    dist.barrier()
    seen["after_fallback"] = sorted(p.name for p in root.iterdir())
    seen["latest_after_fallback"] = (root / "latest").read_text()
    if ctx.rank == 1:
        with torch.no_grad():
            next(trainable.module.parameters()).view(-1)[0] = float("nan")
    seen["nan_save_error"] = _expect(NonFiniteLossError, lambda: checkpointer.save(6))
    dist.barrier()
    seen["after_nan_save"] = sorted(p.name for p in root.iterdir())


def sgd_momentum_round_trip(ckpts: str) -> dict:
    """SGD with momentum: its momentum buffers saved with a checkpoint come back on a full resume (megatron's SGD
    has no state initialiser; a resume once failed with "'NoneType' object is not callable")."""
    import torch

    cfg, ctx, trainable = _trainable()
    cfg.optim.optimizer = "sgd"
    trainable = wrap_for_training(build_student(cfg.model, cfg.parallel, ctx.device), cfg.optim, cfg.model, 10)
    inner = trainable.optimizer.chained_optimizers[0].optimizer
    generator = torch.Generator().manual_seed(0)
    saved = []
    for group in inner.param_groups:
        for param in group["params"]:
            buffer = torch.randn(param.shape, generator=generator)
            inner.state[param]["momentum_buffer"] = buffer
            saved.append(buffer.clone())
    checkpoint.save_checkpoint(ckpts, 1, trainable, ctx, {}, cfg.to_dict())
    fresh = wrap_for_training(build_student(cfg.model, cfg.parallel, ctx.device), cfg.optim, cfg.model, 10)
    checkpoint.load_checkpoint(checkpoint.resolve_checkpoint(ckpts), fresh, ctx, load_optimizer=True)
    loaded_inner = fresh.optimizer.chained_optimizers[0].optimizer
    loaded = [loaded_inner.state[p]["momentum_buffer"] for g in loaded_inner.param_groups for p in g["params"]]
    return {"equal": len(loaded) == len(saved) and all(torch.equal(a, b) for a, b in zip(saved, loaded))}
