"""What the two training loops share (`sft.py`, `opd.py`): the run directory, the parts whose state a checkpoint
keeps, and one policy for starting, saving and stopping a run.

The policy:
- the run directory (`RunDirectory`) gets `config.yaml` before anything is built, `metrics.jsonl` / TensorBoard as
  the steps go (`MetricsWriter`), `checkpoints/`, and `summary.json` at the end (the logging rank writes them);
- a run starts (`starting_point`) from the newest complete checkpoint of its own `checkpoints/` when
  `checkpoint.resume` finds one (so a requeued run goes on where it saved), else from `checkpoint.load`; whether
  `checkpoint.load` continues that run or only gives the starting weights is the loop's `LoadMeaning`;
- restoring a run restores the step, the optimizer and schedule (`checkpoint.load_optimizer`), and the state of
  every registered part (`Checkpointer`); weights alone restore nothing else;
- `run_steps` saves every `checkpoint.save_interval` steps; when a stop is agreed (SIGTERM / SIGINT on any rank,
  `StopRequest`) it finishes the step, saves and returns; at the end it saves once more (`checkpoint.save_at_end`)
  unless the last step already has a checkpoint (a run that starts where it should end saves nothing);
- a save never writes non-finite weights (`Checkpointer.save`), and one that fails leaves `latest` as it was
  (`student/checkpoint.py`); a corrupt checkpoint is named at the load, and with `checkpoint.fallback_to_previous`
  the run loads the newest older one that verifies instead (`Checkpointer.restore`);
- a rank that makes no progress (no step, save or evaluation finishing) for `run.hang_timeout_s` names itself, its
  step and the ranks it waits on, and exits non-zero (`watchdog.py`).

A checkpoint holds the student (weights, optimizer, schedule, RNG: `student/checkpoint.py`), the `shared` parts'
states by name (one copy, the same on every rank, restored at any layout) and the `per_rank` part's state (one shard
per rank, restored at the same layout only).
"""

from __future__ import annotations

import abc
import enum
import json
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol

import torch
import torch.distributed as dist
import yaml

from opd_megatron.config import CheckpointSection, RunConfig
from opd_megatron.errors import NonFiniteLossError
from opd_megatron.loop.metrics import MetricsWriter
from opd_megatron.loop.watchdog import Watchdog
from opd_megatron.student.checkpoint import (CheckpointCorruptError, LoadedState, is_iteration_dir, iteration_of,
                                             load_checkpoint, older_checkpoints, point_latest, quarantine,
                                             resolve_checkpoint, save_checkpoint)
from opd_megatron.student.distributed import ParallelContext
from opd_megatron.student.hf_bridge import load_hf_weights
from opd_megatron.student.optimizer import TrainableStudent


class Stateful(Protocol):
    """A part of a run whose state a checkpoint keeps (the data sampler, the rollout engine, a teacher, ...)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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

    @property
    def first_loss(self) -> Optional[float]:
        return self.losses[0] if self.losses else None

    @property
    def last_loss(self) -> Optional[float]:
        return self.losses[-1] if self.losses else None


class RunDirectory:
    """`<run.output_dir>/<run.name>`: config.yaml, metrics, checkpoints/, summary.json. Only the logging rank
    writes files; every rank knows the paths."""

    def __init__(self, cfg: RunConfig, is_logging_rank: bool):
        self.cfg = cfg
        self.path = cfg.run.run_dir
        self.checkpoints = self.path / "checkpoints"
        self.is_logging_rank = is_logging_rank

    def write_config(self) -> None:
        """The run's whole config, before anything is built (what `opd-megatron eval --config` reads back)."""
        if self.is_logging_rank:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))

    def metrics_writer(self, start_step: int) -> MetricsWriter:
        logging = self.cfg.logging
        return MetricsWriter(self.path, self.cfg.run.train_steps, start_step, self.is_logging_rank,
                             logging.tensorboard, logging.progress_bar)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.is_logging_rank:
            (self.path / "summary.json").write_text(json.dumps(summary, indent=2))


class LoadMeaning(enum.Enum):
    """What `checkpoint.load` means to a loop."""
    #: SFT: continue that run here (its step, optimizer and data position, as checkpoint.load_optimizer says)
    #: until the run has checkpoints of its own, which then win.
    CONTINUE = "continue"
    #: OPD: the starting weights (e.g. an SFT warm start); the run's own checkpoints, when there are any, win.
    WEIGHTS = "weights"


@dataclass(frozen=True)
class StartingPoint:
    """The checkpoint a run starts from (None: the initialised weights) and whether it restores the run's state
    (step, optimizer, parts) or only its weights. `fallbacks`: the older complete checkpoints beside it, newest first,
    to load instead when it proves corrupt (checkpoint.fallback_to_previous; empty otherwise); `own`: it is one of the
    run's own checkpoints (a corrupt one is renamed out of the way when the run falls back)."""
    path: Optional[Path]
    restores_run: bool
    fallbacks: tuple[Path, ...] = ()
    own: bool = False


def starting_point(checkpoint: CheckpointSection, checkpoints: Path, load_meaning: LoadMeaning) -> StartingPoint:
    own = checkpoint.resume and resolve_checkpoint(checkpoints) is not None
    # The run's own newest checkpoint always wins: a run that Slurm stopped and requeued must go on from where it
    # saved, not from `checkpoint.load` again (which would silently discard every step since).
    target = checkpoints if own else checkpoint.load
    restores_run = own or load_meaning is LoadMeaning.CONTINUE
    if target is None:
        return StartingPoint(None, False)
    path = resolve_checkpoint(target)
    if path is None:
        raise FileNotFoundError(f"checkpoint.load={str(target)!r}: no complete checkpoint there")
    # A checkpoint named by its own directory is that one; a directory of checkpoints may fall back to older ones.
    falls_back = checkpoint.fallback_to_previous and not is_iteration_dir(Path(target))
    return StartingPoint(path, restores_run, tuple(older_checkpoints(path)) if falls_back else (), own)


class Checkpointer:
    """Saves and restores a run: the student (weights, optimizer, schedule, RNG) and its registered parts.

    shared: parts whose state is the same on every rank (rank 0's copy is written), by name: the checkpoint's
        `data_state[name]`, restored at any layout.
    per_rank: the part whose state differs per rank (a value head on the last stage, a pending batch per
        data-parallel rank): one shard per rank, restored at the same layout only. None: the checkpoint has none.
    Both save and restore are collective: every rank calls them, and the parts' `state_dict` may communicate.
    """

    def __init__(self, cfg: RunConfig, ctx: ParallelContext, trainable: TrainableStudent, checkpoints: Path,
                 shared: Mapping[str, Stateful], per_rank: Optional[Stateful] = None):
        self.cfg, self.ctx, self.trainable = cfg, ctx, trainable
        self.checkpoints = checkpoints
        self.shared = dict(shared)
        self.per_rank = per_rank

    def save(self, step: int) -> str:
        """A checkpoint of `step` (collective), never of non-finite weights: a NaN or inf in any rank's parameters
        stops the run with the last checkpoint untouched (a skipped step leaves the weights finite; this is the
        guard for whatever else would put one there)."""
        self._require_finite_weights(step)
        data_state = {name: part.state_dict() for name, part in self.shared.items()}
        rank_state = None if self.per_rank is None else self.per_rank.state_dict()
        path = save_checkpoint(self.checkpoints, step, self.trainable, self.ctx, data_state, self.cfg.to_dict(),
                               keep_last=self.cfg.checkpoint.keep_last, rank_state=rank_state,
                               checksums=self.cfg.checkpoint.checksums)
        return str(path)

    def _require_finite_weights(self, step: int) -> None:
        # One flag per parameter, stacked: a single host sync for the whole model.
        flags = [torch.isfinite(p).all() for p in self.trainable.module.parameters()]
        bad = torch.zeros(1, dtype=torch.int32, device=self.ctx.device)
        if flags and not bool(torch.stack(flags).all()):
            bad[0] = 1
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            raise NonFiniteLossError(f"step {step}: the student's weights hold NaN/inf (non-finite); not saving over "
                                     f"the last checkpoint {resolve_checkpoint(self.checkpoints)}. Lower optim.lr "
                                     f"or check the data.")

    def restore(self, start: StartingPoint) -> int:
        """Load `start` into the student and the parts; returns the step the run continues from (0 unless the
        run's state was restored with its optimizer)."""
        if start.path is None:
            if self.cfg.model.from_hf is not None:
                # A new run from a Hugging Face checkpoint: its weights (each rank reads its own slices), and the
                # optimizer's copies of them (its fp32 main parameters under bf16 were taken at construction).
                load_hf_weights(self.trainable.module, self.cfg.model, self.cfg.model.from_hf)
                self.trainable.optimizer.reload_model_params()
            return 0
        loaded = self._load_verified(start)
        for name, part in self.shared.items():
            if name in loaded.data_state:
                part.load_state_dict(loaded.data_state[name])
        if self.per_rank is not None and loaded.rank_state is not None:
            self.per_rank.load_state_dict(loaded.rank_state)
        return loaded.iteration

    def _load_verified(self, start: StartingPoint) -> LoadedState:
        """Load `start.path`, or, when it proves corrupt and the run may fall back, the newest of its fallbacks that
        loads (each corrupt one of the run's own is renamed to iter_X.corrupt). Every rank reaches the same verdict
        (sizes are the same files for all; checksums are shared)."""
        load_optimizer = start.restores_run and self.cfg.checkpoint.load_optimizer
        corrupt: list[CheckpointCorruptError] = []
        for path in (start.path, *start.fallbacks):
            try:
                loaded = load_checkpoint(path, self.trainable, self.ctx, load_optimizer=load_optimizer,
                                         checksums=self.cfg.checkpoint.checksums)
            except CheckpointCorruptError as exc:
                if not start.fallbacks:
                    raise CheckpointCorruptError(exc.path, exc.problems,
                                                 hint="; set checkpoint.fallback_to_previous=true to load the newest "
                                                      "older checkpoint that verifies") from exc
                corrupt.append(exc)
                dist.barrier()       # every rank has read it before rank 0 renames it
                if start.own and self.ctx.rank == 0:
                    quarantine(path)
                continue
            if corrupt and start.own and self.ctx.rank == 0:
                point_latest(path.parent, iteration_of(path))   # not at a newer iteration of an older timeline
            if corrupt and self.ctx.is_logging_rank:
                print(f"[opd-megatron] {'; '.join(str(exc) for exc in corrupt)}; loaded the previous complete "
                      f"checkpoint {path} instead (checkpoint.fallback_to_previous)", flush=True)
            return loaded
        raise CheckpointCorruptError(start.path, [f"{exc.path.name}/{problem}" for exc in corrupt
                                                  for problem in exc.problems],
                                     hint="; no older checkpoint beside it verifies either")


class StepLoop(abc.ABC):
    """One loop's steps, as `run_steps` drives them. `step` counts the optimizer steps taken (applied or skipped)."""

    step: int

    @abc.abstractmethod
    def advance(self) -> Optional[dict[str, float]]:
        """One step (`step` moves by one); its metrics, `loss` among them, on the ranks that report them (the
        logging rank at least), None on the others."""

    def before_steps(self, writer: MetricsWriter) -> None:
        """Before the first step of this process (e.g. a baseline evaluation)."""

    def after_steps(self, writer: MetricsWriter) -> None:
        """After the last step, when the run was not stopped (e.g. the final evaluation); before the final save."""


def logged_step(cfg: RunConfig, step: int) -> bool:
    """Whether step `step` (1-based) is written to the metrics: every `logging.log_interval` steps and the last.
    The loops compute the per-step vocabulary diagnostics only on those (`OpdRun.train_step(diagnostics=...)`);
    a step that evaluated is written too, with whatever metrics it has."""
    return step % cfg.logging.log_interval == 0 or step == cfg.run.train_steps


def run_steps(loop: StepLoop, cfg: RunConfig, checkpointer: Checkpointer, writer: MetricsWriter,
              stop: StopRequest) -> TrainResult:
    """Drive `loop` to run.train_steps with the policy of the module docstring (logging, checkpoints, stopping),
    under this rank's hang watchdog (`watchdog.py`, run.hang_timeout_s): every step, save and evaluation is progress.
    `wall_s` is left to the caller, who knows when the run began."""
    with Watchdog.for_run(cfg.run.hang_timeout_s, checkpointer.checkpoints) as watchdog:
        return _drive(loop, cfg, checkpointer, writer, stop, watchdog)


def _drive(loop: StepLoop, cfg: RunConfig, checkpointer: Checkpointer, writer: MetricsWriter, stop: StopRequest,
           watchdog: Watchdog) -> TrainResult:
    result = TrainResult(start_step=loop.step, final_step=loop.step)
    watchdog.progress(loop.step, "before the first step (e.g. the baseline evaluation)")
    loop.before_steps(writer)
    saved_at = loop.step           # the starting checkpoint, or nothing to save before the first step
    while loop.step < cfg.run.train_steps:
        watchdog.progress(loop.step + 1, f"training step {loop.step + 1}")
        metrics = loop.advance()
        step = result.final_step = loop.step
        if metrics is not None:
            result.losses.append(metrics["loss"])
            # An evaluation is written whatever the interval: eval.interval need not be a multiple of it.
            if logged_step(cfg, step) or any(key.startswith("eval/") for key in metrics):
                writer.log(step, metrics)
        writer.advance()
        watchdog.progress(step, f"agreeing on a stop request after step {step}")
        if stop.agreed():
            watchdog.progress(step, f"saving the checkpoint of step {step} after a stop request")
            result.checkpoint = checkpointer.save(step)
            result.stopped_by_signal = True
            writer.message(f"[opd-megatron] received signal {stop.received or 'on another rank'}: finished step "
                           f"{step}, saved checkpoint {result.checkpoint}, exiting cleanly")
            return result
        if cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0:
            watchdog.progress(step, f"saving the checkpoint of step {step}")
            result.checkpoint = checkpointer.save(step)
            saved_at = step
    watchdog.progress(loop.step, "after the last step (e.g. the final evaluation)")
    loop.after_steps(writer)
    if cfg.checkpoint.save_at_end and saved_at != loop.step:
        watchdog.progress(loop.step, f"saving the checkpoint of step {loop.step}")
        result.checkpoint = checkpointer.save(loop.step)
    return result
