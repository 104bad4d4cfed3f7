"""Checkpoints through megatron-core's dist_checkpointing: model, optimizer state, LR schedule, RNG states, data
position and config, loadable at another TP/PP layout.

Layout on disk:
    <checkpoints>/iter_0000010/                a complete checkpoint (dist_checkpointing's torch_dist format)
    <checkpoints>/iter_0000010/manifest.json   its files' sizes (and sha256 with checkpoint.checksums)
    <checkpoints>/latest                       the iteration of the newest complete checkpoint
Atomicity: a checkpoint is written into `iter_XXXXXXX.partial-<pid>` and renamed to `iter_XXXXXXX` by rank 0 only
after every rank finished writing; `latest` is replaced atomically after that. A crash mid-save leaves a
`.partial-*` directory that is never loaded (and is removed by the next save), never a half-written `iter_*`. A save
that fails with an error (a full disk) removes its partial directory and raises `CheckpointSaveError` on every rank,
naming the directory and the cause; `latest` still names the previous complete checkpoint.

Verification: before a load, every file of the manifest must exist with its size (a stat per file: free), and with
checksums its sha256 must match (one extra read: each rank hashes its own shards at save, a share of the files at
load). A checkpoint that fails is named in `CheckpointCorruptError` with the files and what is wrong with them;
checkpoints written before manifests existed load unverified. Pruning (`keep_last`) never deletes the checkpoint just
saved (the one `latest` names), keeps the newest older ones that verify, and leaves newer iterations (of a timeline
the run went back from) alone.

dist_checkpointing spawns a helper process when saving ("spawn" start method): the entry script must be guarded by
`if __name__ == "__main__":` (the `opd-megatron` console script and `python -m opd_megatron` are).
"""

from __future__ import annotations

import hashlib
import json
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
from torch.distributed.checkpoint.api import CheckpointException

from opd_megatron.errors import ReportedError
from opd_megatron.student.distributed import ParallelContext
from opd_megatron.student.optimizer import TrainableStudent

log = logging.getLogger(__name__)

_ITER_DIR = re.compile(r"^iter_(\d{7})$")
LATEST_FILE = "latest"
MANIFEST_FILE = "manifest.json"
CORRUPT_SUFFIX = ".corrupt"


class CheckpointError(ReportedError, RuntimeError):
    """A checkpoint could not be saved or loaded; the message names the directory and the cause."""


class CheckpointSaveError(CheckpointError):
    """A save failed (a full disk, a write error): its partial directory is removed, `latest` is unchanged."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint's files do not match its manifest (missing, truncated, or another sha256), or cannot be read."""

    def __init__(self, path: Path, problems: list[str], hint: str = ""):
        self.path, self.problems = Path(path), list(problems)
        shown = "; ".join(self.problems[:5]) + (f"; and {len(self.problems) - 5} more" if len(self.problems) > 5
                                                else "")
        super().__init__(f"checkpoint {str(self.path)!r} is corrupt: {shown}{hint}")


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


def is_iteration_dir(path: Path) -> bool:
    """`path` names one checkpoint (iter_XXXXXXX), not a directory of them."""
    return _ITER_DIR.match(Path(path).name) is not None


def resolve_checkpoint(path: str | Path) -> Optional[Path]:
    """A checkpoint directory itself (iter_*), or a checkpoints directory (take the `latest` / newest complete one).
    None when the directory holds no complete checkpoint."""
    path = Path(path)
    if is_iteration_dir(path):
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


def iteration_of(path: Path) -> int:
    """The iteration of a checkpoint directory `iter_XXXXXXX`."""
    match = _ITER_DIR.match(Path(path).name)
    if match is None:
        raise ValueError(f"{str(path)!r} is not a checkpoint directory (expected a name iter_XXXXXXX)")
    return int(match.group(1))


def older_checkpoints(path: Path) -> list[Path]:
    """The complete checkpoints beside `path` (an iter_* directory) with a lower iteration, newest first: what a
    run falls back to when `path` proves corrupt."""
    path = Path(path)
    current = iteration_of(path)
    return [iteration_dir(path.parent, i) for i in reversed(complete_iterations(path.parent)) if i < current]


# -- the manifest: every file's size (and sha256) ------------------------------------------------------------------

def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _file_record(path: Path, checksums: bool) -> dict[str, Any]:
    record: dict[str, Any] = {"bytes": path.stat().st_size}
    if checksums:
        record["sha256"] = _sha256(path)
    return record


def _write_manifest(directory: Path, ctx: ParallelContext, checksums: bool) -> Optional[str]:
    """Collective. Each rank describes the shard files it wrote (`__<rank>_<n>.distcp`: hashing spreads over the
    ranks), rank 0 the rest (common.pt, .metadata, metadata.json) and writes `manifest.json`. Returns, on every
    rank, None or what failed (the same on every rank: no rank is left waiting in a collective)."""
    try:
        own: Any = {p.name: _file_record(p, checksums) for p in sorted(directory.glob(f"__{ctx.rank}_*.distcp"))}
    except OSError as exc:
        own = f"rank {ctx.rank}: {type(exc).__name__}: {exc}"
    gathered: Optional[list] = [None] * ctx.world_size if ctx.rank == 0 else None
    dist.gather_object(own, gathered, dst=0)
    outcome: list[Optional[str]] = [None]
    if ctx.rank == 0:
        failures = [part for part in gathered if isinstance(part, str)]
        try:
            if failures:
                raise OSError("; ".join(failures))
            files: dict[str, Any] = {}
            for part in gathered:
                files.update(part)
            for path in sorted(directory.iterdir()):
                if path.is_file() and path.name not in files and path.name != MANIFEST_FILE:
                    files[path.name] = _file_record(path, checksums)
            (directory / MANIFEST_FILE).write_text(json.dumps({"format": 1, "files": files}, indent=1,
                                                              sort_keys=True))
        except OSError as exc:
            outcome[0] = f"writing {MANIFEST_FILE}: {type(exc).__name__}: {exc}"
    dist.broadcast_object_list(outcome, src=0)
    return outcome[0]


def verify_checkpoint(path: Path, checksums: bool = False, share: tuple[int, int] = (0, 1)) -> list[str]:
    """What is wrong with the files of checkpoint `path` against its manifest, one line per file (empty: it
    verifies, or it predates manifests). Sizes of every file always; with `checksums` the sha256 of the files of
    this rank's `share` (index, count): file i is hashed when i % count == index, so the ranks split the reading."""
    path = Path(path)
    if not (path / "metadata.json").is_file():
        return ["metadata.json: missing (an incomplete save)"]
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        return []
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return [f"{MANIFEST_FILE}: unreadable ({exc})"]
    problems = []
    index, count = share
    for i, (name, record) in enumerate(sorted(files.items())):
        file = path / name
        if not file.is_file():
            problems.append(f"{name}: missing")
            continue
        size = file.stat().st_size
        if size != record["bytes"]:
            problems.append(f"{name}: {size} bytes, the manifest says {record['bytes']} (truncated or overwritten)")
        elif checksums and "sha256" in record and i % count == index and _sha256(file) != record["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest's (corrupt bytes)")
    return problems


def verify_on_all_ranks(path: Path, ctx: ParallelContext, checksums: bool) -> list[str]:
    """Collective when `checksums` (the ranks split the hashing and share what they found); the same answer on
    every rank."""
    if not checksums or ctx.world_size == 1:
        return verify_checkpoint(path, checksums)
    found = [None] * ctx.world_size
    dist.all_gather_object(found, verify_checkpoint(path, True, (ctx.rank, ctx.world_size)))
    return sorted({problem for part in found for problem in part})


def point_latest(checkpoints: Path, iteration: int) -> None:
    """`latest` names `iteration`, replaced atomically (a reader sees the old or the new one, never half)."""
    tmp_latest = Path(checkpoints) / f".{LATEST_FILE}.tmp"
    tmp_latest.write_text(str(iteration))
    os.replace(tmp_latest, Path(checkpoints) / LATEST_FILE)


def quarantine(path: Path) -> Path:
    """Rename a corrupt checkpoint out of the way (`iter_X.corrupt`, `.corrupt-2`, ...): never loaded, counted or
    pruned again, kept for inspection."""
    path = Path(path)
    target, n = path.with_name(path.name + CORRUPT_SUFFIX), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}-{n}")
    os.replace(path, target)
    return target


def prune(checkpoints: Path, keep_last: int, current: int) -> list[int]:
    """Delete old checkpoints after `current` was saved and became `latest`; returns the iterations deleted.
    Keeps `current` and the newest `keep_last - 1` older ones that verify (sizes); deletes the other older ones
    (corrupt ones first in line); never touches iterations above `current`."""
    if keep_last <= 0:
        return []
    older = [i for i in reversed(complete_iterations(checkpoints)) if i < current]
    verified = [i for i in older if not verify_checkpoint(iteration_dir(checkpoints, i))]
    keep = set(verified[:keep_last - 1])
    deleted = [i for i in older if i not in keep]
    for iteration in deleted:
        shutil.rmtree(iteration_dir(checkpoints, iteration), ignore_errors=True)
    return sorted(deleted)


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
                    rank_state: Optional[dict[str, Any]] = None, checksums: bool = False,
                    weights_only: bool = False) -> Path:
    """Save on every rank (collective). Returns the final directory. `data_state` is common state (rank 0's is
    written); `rank_state` is per-rank state, restored only at the same layout. A write that fails raises
    `CheckpointSaveError` on every rank (dist_checkpointing gathers a failed shard write to every rank) with the
    partial directory removed and `latest` unchanged."""
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
    # weights_only: a model converted from another format (`opd-megatron convert`), whose optimizer never stepped
    # and has no state to save; a load takes its weights and starts a fresh optimizer.
    state = _sharded_state(trainable, ctx, with_optimizer=not weights_only, is_loading=False, rank_state=rank_state)
    state["weights_only"] = weights_only
    state["has_rank_state"] = rank_state is not None
    # Plain (non-sharded) entries are common state, written once by rank 0.
    state["iteration"] = iteration
    state["scheduler"] = trainable.scheduler.state_dict()
    state["data_state"] = data_state
    state["config"] = config_dict
    state["layout"] = {"tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp}
    try:
        dist_checkpointing.save(state, str(partial))
    # CheckpointException (a failed shard write, gathered to every rank) derives from BaseException; a
    # KeyboardInterrupt still leaves its partial directory behind, as a crash does.
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - any write failure: clean up, name the cause
        raise _failed_save(checkpoints, partial, final, ctx, _write_failure(exc)) from exc
    manifest_failure = _write_manifest(partial, ctx, checksums)
    if manifest_failure is not None:
        raise _failed_save(checkpoints, partial, final, ctx, manifest_failure)
    dist.barrier()
    # Publishing is rank 0's alone (a rename, `latest`, pruning); its outcome is broadcast so that a failure there
    # (a full disk for the 3-byte `latest`) stops every rank instead of leaving the others in the next collective.
    published: list[Optional[str]] = [None]
    if ctx.rank == 0:
        try:
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            point_latest(checkpoints, iteration)
            prune(checkpoints, keep_last, iteration)
        except OSError as exc:
            published[0] = f"{type(exc).__name__}: {exc}"
    dist.broadcast_object_list(published, src=0)
    if published[0] is not None:
        raise CheckpointSaveError(f"publishing checkpoint {str(final)!r} failed on rank 0: {published[0]}; "
                                  f"{_latest_note(checkpoints)}")
    return final


def _write_failure(exc: BaseException) -> str:
    """One line of what failed: for dist_checkpointing's gathered failure, each failed rank and its innermost
    cause (its coordinator, rank 0, has them; the other ranks only learn that some rank failed)."""
    if isinstance(exc, CheckpointException):
        if not exc.failures:
            return "a shard write failed on another rank (rank 0's error names it)"
        causes = []
        for rank, (error, _) in sorted(exc.failures.items()):
            while error.__cause__ is not None:
                error = error.__cause__
            causes.append(f"rank {rank}: {type(error).__name__}: {str(error).strip().splitlines()[0][:300]}")
        return "; ".join(causes)
    return f"{type(exc).__name__}: {exc}"


def _latest_note(checkpoints: Path) -> str:
    previous = resolve_checkpoint(checkpoints)
    return (f"{checkpoints / LATEST_FILE} still names the last complete checkpoint {str(previous)!r}"
            if previous is not None else "there is no earlier complete checkpoint")


def _failed_save(checkpoints: Path, partial: Path, final: Path, ctx: ParallelContext,
                 cause: str) -> CheckpointSaveError:
    """Remove the partial directory (rank 0: every rank's writes have ended when dist_checkpointing raises, it
    gathers the failures first) and name the cause. The full cause is rank 0's: dist_checkpointing reports the
    failed ranks' exceptions on its coordinator only."""
    if ctx.rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
    first_line = cause.strip().splitlines()[0] if cause.strip() else "unknown error"
    return CheckpointSaveError(f"saving checkpoint {str(final)!r} failed: {first_line[:500]} (written into "
                               f"{str(partial)!r}, removed); {_latest_note(checkpoints)}")


def load_checkpoint(path: Path, trainable: TrainableStudent, ctx: ParallelContext,
                    load_optimizer: bool = True, checksums: bool = False) -> LoadedState:
    """Load on every rank (collective) into an already built model/optimizer at the current layout, whatever
    layout saved it. RNG states are restored only when the layout is the same (they are per rank). The files are
    verified against the checkpoint's manifest first (`CheckpointCorruptError` naming them)."""
    path = Path(path)
    problems = verify_on_all_ranks(path, ctx, checksums)
    if problems:
        raise CheckpointCorruptError(path, problems)
    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
    except Exception as exc:  # noqa: BLE001 - an unreadable common.pt is a corrupt checkpoint, named as one
        raise CheckpointCorruptError(path, [f"common.pt: unreadable ({type(exc).__name__}: {exc})"]) from exc
    load_optimizer = load_optimizer and not common.get("weights_only", False)
    saved_layout = common.get("layout", {})
    layout_changed = saved_layout != {"tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp}
    with_rank_state = load_optimizer and not layout_changed and bool(common.get("has_rank_state"))
    state = _sharded_state(trainable, ctx, with_optimizer=load_optimizer, is_loading=True,
                           rank_state={} if with_rank_state else None)
    if layout_changed:
        state.pop("rng_state")
    try:
        loaded = dist_checkpointing.load(state, str(path))
    except Exception as exc:
        exc.add_note(f"while loading checkpoint {str(path)!r}")
        raise
    trainable.module.load_state_dict(loaded["model"])
    if load_optimizer:
        trainable.optimizer.load_state_dict(loaded["optimizer"])
        trainable.scheduler.load_state_dict(common["scheduler"])
    else:
        # The optimizer's own copies of the weights (fp32 main parameters under bf16 / fp16) were taken when it
        # was built: refresh them, or the first step would train the initial weights instead of these.
        trainable.optimizer.reload_model_params()
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
           "saved_config", "LoadedState", "CheckpointError", "CheckpointSaveError", "CheckpointCorruptError",
           "verify_checkpoint", "verify_on_all_ranks", "older_checkpoints", "is_iteration_dir", "quarantine", "prune",
           "point_latest", "iteration_of"]
