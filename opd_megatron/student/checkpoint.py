"""Checkpoints through megatron-core's dist_checkpointing: model, optimizer state, LR schedule, RNG states, data
position and config, loadable at another TP/PP layout.

Layout on disk:
    <checkpoints>/iter_0000010/        a complete checkpoint (dist_checkpointing's torch_dist format)
    <checkpoints>/latest                the iteration of the newest complete checkpoint
Atomicity: a checkpoint is written into `iter_XXXXXXX.partial-<pid>` and renamed to `iter_XXXXXXX` by rank 0 only
after every rank finished writing; `latest` is replaced atomically after that. A crash mid-save leaves a
`.partial-*` directory that is never loaded (and is removed by the next save), never a half-written `iter_*`.

dist_checkpointing spawns a helper process when saving ("spawn" start method): the entry script must be guarded by
`if __name__ == "__main__":` (the `opd-megatron` console script and `python -m opd_megatron` are).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel import random as megatron_random

from opd_megatron.student.distributed import ParallelContext
from opd_megatron.student.optimizer import TrainableStudent

log = logging.getLogger(__name__)

_ITER_DIR = re.compile(r"^iter_(\d{7})$")
LATEST_FILE = "latest"


def iteration_dir(checkpoints: Path, iteration: int) -> Path:
    return Path(checkpoints) / f"iter_{iteration:07d}"


def complete_iterations(checkpoints: Path) -> list[int]:
    """Iterations with a complete checkpoint under `checkpoints`, ascending."""
    checkpoints = Path(checkpoints)
    if not checkpoints.is_dir():
        return []
    found = []
    for child in checkpoints.iterdir():
        match = _ITER_DIR.match(child.name)
        if match and (child / "metadata.json").is_file():
            found.append(int(match.group(1)))
    return sorted(found)


def resolve_checkpoint(path: str | Path) -> Optional[Path]:
    """A checkpoint directory itself (iter_*), or a checkpoints directory (take the `latest` / newest complete one).
    None when the directory holds no complete checkpoint."""
    path = Path(path)
    if _ITER_DIR.match(path.name):
        if not (path / "metadata.json").is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} is incomplete or not a dist_checkpointing "
                                    f"checkpoint (no metadata.json)")
        return path
    latest = path / LATEST_FILE
    if latest.is_file():
        candidate = iteration_dir(path, int(latest.read_text().strip()))
        if (candidate / "metadata.json").is_file():
            return candidate
    iterations = complete_iterations(path)
    return iteration_dir(path, iterations[-1]) if iterations else None


@dataclass
class LoadedState:
    """What a checkpoint restores beside the weights: where the run was."""
    iteration: int
    data_state: dict[str, Any]
    layout_changed: bool
    path: Path
    rank_state: Optional[dict[str, Any]] = None


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state(),
             "tracker": megatron_random.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    megatron_random.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _sharded_state(trainable: TrainableStudent, ctx: ParallelContext, with_optimizer: bool,
                   is_loading: bool, rank_state: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    # The unwrapped module's sharded_state_dict: a DDP-wrapped one would prefix every key with "module.".
    model_sd = trainable.module.sharded_state_dict()
    state: dict[str, Any] = {"model": model_sd}
    if with_optimizer:
        state["optimizer"] = trainable.optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
    # RNG states differ per rank: one shard per (pp, tp, dp) coordinate, each its own replica (replica_id 0).
    state["rng_state"] = ShardedObject("rng_state", _rng_state(), (ctx.pp, ctx.tp, ctx.dp),
                                       (ctx.pp_rank, ctx.tp_rank, ctx.dp_rank), replica_id=0)
    if rank_state is not None:
        # Per-rank run state (a value head on the last stage, a data-parallel rank's pending rollouts): one shard
        # per coordinate, like the RNG.
        state["rank_state"] = ShardedObject("rank_state", rank_state, (ctx.pp, ctx.tp, ctx.dp),
                                            (ctx.pp_rank, ctx.tp_rank, ctx.dp_rank), replica_id=0)
    return state


def save_checkpoint(checkpoints: Path, iteration: int, trainable: TrainableStudent, ctx: ParallelContext,
                    data_state: dict[str, Any], config_dict: dict[str, Any], keep_last: int = 0,
                    rank_state: Optional[dict[str, Any]] = None) -> Path:
    """Save on every rank (collective). Returns the final directory. `data_state` is common state (rank 0's is
    written); `rank_state` is per-rank state, restored only at the same layout."""
    checkpoints = Path(checkpoints)
    final = iteration_dir(checkpoints, iteration)
    # One name for all ranks: rank 0 picks it and broadcasts it.
    names = [f"{final.name}.partial-{os.getpid()}" if ctx.rank == 0 else None]
    dist.broadcast_object_list(names, src=0)
    partial = checkpoints / names[0]
    if ctx.rank == 0:
        checkpoints.mkdir(parents=True, exist_ok=True)
        for stale in checkpoints.glob("iter_*.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        partial.mkdir()
    dist.barrier()
    state = _sharded_state(trainable, ctx, with_optimizer=True, is_loading=False, rank_state=rank_state)
    state["has_rank_state"] = rank_state is not None
    # Plain (non-sharded) entries are common state, written once by rank 0.
    state["iteration"] = iteration
    state["scheduler"] = trainable.scheduler.state_dict()
    state["data_state"] = data_state
    state["config"] = config_dict
    state["layout"] = {"tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp}
    dist_checkpointing.save(state, str(partial))
    dist.barrier()
    if ctx.rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        tmp_latest = checkpoints / f".{LATEST_FILE}.tmp"
        tmp_latest.write_text(str(iteration))
        os.replace(tmp_latest, checkpoints / LATEST_FILE)
        if keep_last > 0:
            for old in complete_iterations(checkpoints)[:-keep_last]:
                shutil.rmtree(iteration_dir(checkpoints, old), ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: Path, trainable: TrainableStudent, ctx: ParallelContext,
                    load_optimizer: bool = True) -> LoadedState:
    """Load on every rank (collective) into an already built model/optimizer at the current layout, whatever
    layout saved it. RNG states are restored only when the layout is the same (they are per rank)."""
    path = Path(path)
    common = dist_checkpointing.load_common_state_dict(str(path))
    saved_layout = common.get("layout", {})
    layout_changed = saved_layout != {"tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp}
    with_rank_state = load_optimizer and not layout_changed and bool(common.get("has_rank_state"))
    state = _sharded_state(trainable, ctx, with_optimizer=load_optimizer, is_loading=True,
                           rank_state={} if with_rank_state else None)
    if layout_changed:
        state.pop("rng_state")
    loaded = dist_checkpointing.load(state, str(path))
    trainable.module.load_state_dict(loaded["model"])
    if load_optimizer:
        trainable.optimizer.load_state_dict(loaded["optimizer"])
        trainable.scheduler.load_state_dict(common["scheduler"])
    if not layout_changed:
        _set_rng_state(loaded["rng_state"])
    elif ctx.is_logging_rank:
        log.info("checkpoint %s was saved at layout %s, loading at tp=%d pp=%d dp=%d: weights and optimizer "
                 "resharded, per-rank RNG states not restored", path, saved_layout, ctx.tp, ctx.pp, ctx.dp)
    return LoadedState(iteration=int(common["iteration"]) if load_optimizer else 0,
                       data_state=common.get("data_state", {}) if load_optimizer else {},
                       layout_changed=layout_changed, path=path,
                       rank_state=loaded.get("rank_state") if with_rank_state else None)


def saved_config(path: Path) -> dict[str, Any]:
    return dist_checkpointing.load_common_state_dict(str(path)).get("config", {})


__all__ = ["save_checkpoint", "load_checkpoint", "resolve_checkpoint", "complete_iterations", "iteration_dir",
           "saved_config", "LoadedState"]
