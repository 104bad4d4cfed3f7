"""The hang watchdog: a rank whose run stops moving ends with one line naming the rank and the step it waits on, and
a non-zero exit, instead of holding the job's GPUs until its time limit.

A rank can hang without dying: stopped (SIGSTOP, a frozen node), in a collective that a peer never joins, in Python
(a teacher call that never returns), or in C++ holding the interpreter. The collective timeout
(`run.collective_timeout_s`) ends only the second, and its message names neither the step nor the rank that is
missing. So every rank runs a watchdog thread:
- the loop reports progress (`Watchdog.progress(step, doing)`) at every step, save and evaluation (`common.run_steps`);
- at every progress and every `poll_s` the thread publishes this rank's heartbeat (step, what it does, when it last
  progressed, now) to the job's rendezvous store, through a client connection of its own
  (`student/distributed.py::heartbeat_store`);
- when this rank has not progressed for `run.hang_timeout_s`, the thread reads every rank's heartbeat, prints one line
  that names the ranks it waits on (silent ones first: stopped, or stuck without releasing the interpreter; then
  missing ones; then ranks at an earlier step), dumps this rank's Python stacks to stderr, and exits with
  `HUNG_EXIT_CODE` at once (`os._exit`: no clean-up that could hang in turn; a checkpoint is only ever published by a
  rename after every rank wrote it, so the last complete checkpoint is untouched);
- a backstop that needs no interpreter (`faulthandler.dump_traceback_later(..., exit=True)`, a C thread) ends the
  process at twice the timeout if the watchdog thread itself never got to run.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

import torch.distributed as dist

from opd_megatron.student.checkpoint import resolve_checkpoint
from opd_megatron.student.distributed import abort_process, heartbeat_store

#: EX_TEMPFAIL (sysexits.h): a temporary failure, worth a requeue. torchrun reports any failed worker as its own
#: exit code 1; the line above it names the cause.
HUNG_EXIT_CODE = 75
#: At most this many suspect ranks are named (the rest are counted).
NAMED_RANKS = 8


def heartbeat_key(rank: int) -> str:
    return f"rank{rank}"


class Watchdog:
    """One rank's watchdog (see the module docstring); a context manager around the loop. `timeout_s <= 0`: off
    (progress() does nothing). `store`: the heartbeats' store (None: this rank's own only). `exit_process` and
    `backstop` are
    for tests, which must not end their own process."""

    def __init__(self, rank: int, world_size: int, timeout_s: float, store: Optional[dist.Store] = None,
                 checkpoints: Optional[Path] = None, poll_s: Optional[float] = None,
                 exit_process: Callable[[int], Any] = abort_process, out: TextIO = sys.stderr, backstop: bool = True):
        self.rank, self.world_size, self.timeout_s = rank, world_size, float(timeout_s)
        self.store, self.checkpoints, self.out = store, checkpoints, out
        # Often enough that a stopped rank's heartbeat is plainly stale by the time the timeout comes.
        self.poll_s = poll_s if poll_s is not None else min(max(self.timeout_s / 10, 0.2), 30.0)
        self._exit, self._backstop = exit_process, backstop
        self.step, self.doing = 0, "starting"
        self._progress_at = time.monotonic()
        self._progress_wall = time.time()
        self._stopped = threading.Event()
        self._moved = threading.Event()     # progress: publish it now, not at the next poll
        self._thread: Optional[threading.Thread] = None
        self.fired: Optional[str] = None

    @classmethod
    def for_run(cls, timeout_s: float, checkpoints: Path) -> "Watchdog":
        """This rank's watchdog with the job's heartbeat store (none for a world of one)."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        store = None
        if timeout_s > 0 and world > 1:
            try:
                store = heartbeat_store(timeout_s=10.0)
            except (RuntimeError, OSError, ValueError) as exc:
                # Without the store the watchdog still ends this rank; it cannot name the others.
                print(f"[opd-megatron] watchdog: rank {rank} runs without the other ranks' heartbeats (the store "
                      f"at MASTER_ADDR:MASTER_PORT did not connect: {exc})", file=sys.stderr, flush=True)
        return cls(rank, world, timeout_s, store, checkpoints)

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def progress(self, step: int, doing: str) -> None:
        """The run moved: it is now at `step`, doing `doing` (e.g. "training step 3"). Main thread."""
        if not self.enabled:
            return
        self.step, self.doing = step, doing
        self._progress_at, self._progress_wall = time.monotonic(), time.time()
        self._moved.set()
        if self._backstop:
            faulthandler.dump_traceback_later(2 * self.timeout_s, exit=True)

    def __enter__(self) -> "Watchdog":
        if self.enabled:
            self.progress(self.step, self.doing)
            self._thread = threading.Thread(target=self._watch, name="opd-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopped.set()
        self._moved.set()
        if self._backstop and self.enabled:
            faulthandler.cancel_dump_traceback_later()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s + 15.0)
            # Its last word: a peer still waiting must not take this rank's silence for a hang.
            self._publish(left=True)

    # -- the thread -------------------------------------------------------------------------------------------------
    def _record(self, left: bool = False) -> dict[str, Any]:
        return {"step": self.step, "doing": self.doing, "progress_at": self._progress_wall, "alive_at": time.time(),
                "left": left}

    def _publish(self, left: bool = False) -> None:
        if self.store is None:
            return
        try:
            self.store.set(heartbeat_key(self.rank), json.dumps(self._record(left)))
        except Exception:  # noqa: BLE001 - a store that does not answer is reported when the watchdog fires
            pass

    def _watch(self) -> None:
        while True:
            self._moved.wait(self.poll_s)
            self._moved.clear()
            if self._stopped.is_set():
                return
            self._publish()
            stalled_s = time.monotonic() - self._progress_at
            if stalled_s > self.timeout_s and not self._stopped.is_set():
                self._fire(stalled_s)
                return

    def _peers(self) -> dict[int, Optional[dict[str, Any]]]:
        """Every other rank's last heartbeat (None: never published), read within a few seconds: a store whose
        host is the hung rank does not answer, and then the peers are unknown (an exception)."""
        peers: dict[int, Optional[dict[str, Any]]] = {}
        deadline = time.monotonic() + 10.0
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            if time.monotonic() > deadline:
                break
            key = heartbeat_key(rank)
            peers[rank] = json.loads(self.store.get(key)) if self.store.check([key]) else None
        return peers

    def describe(self, stalled_s: float, peers: Optional[dict[int, Optional[dict[str, Any]]]],
                 peers_error: str = "", now: Optional[float] = None) -> str:
        """The one line: this rank, its step and what it does; the ranks it waits on."""
        now = time.time() if now is None else now
        line = (f"[opd-megatron] watchdog: rank {self.rank} made no progress for {stalled_s:.0f} s at step "
                f"{self.step} ({self.doing}); ")
        if peers is None:
            line += f"the other ranks' heartbeats are unknown ({peers_error})"
        elif not peers:
            line += "it is the only rank"
        else:
            line += _suspects(peers, self.step, self.doing, now, silent_after_s=max(4 * self.poll_s, 2.0))
        return line

    def _fire(self, stalled_s: float) -> None:
        peers, error = None, "no heartbeat store"
        if self.store is not None:
            # In a thread of its own, bounded: the store's host may be the hung rank.
            box: dict[str, Any] = {}

            def read() -> None:
                try:
                    box["peers"] = self._peers()
                except Exception as exc:  # noqa: BLE001 - any store failure is reported, not raised
                    box["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            reader.join(timeout=15.0)
            peers = box.get("peers")
            error = box.get("error", "the store did not answer within 15 s: rank 0, its host, may be the hung one")
        line = self.describe(stalled_s, peers, error)
        line += f"; exiting with code {HUNG_EXIT_CODE} so that the job can be requeued"
        if self.checkpoints is not None:
            try:
                line += f"; the last complete checkpoint is untouched: {resolve_checkpoint(self.checkpoints)}"
            except (OSError, ValueError):
                pass
        self.fired = line
        print(line, file=self.out, flush=True)
        _leave_hang_marker(line)
        if self._backstop:
            print(f"[opd-megatron] watchdog: the Python stacks of rank {self.rank}:", file=self.out, flush=True)
            faulthandler.dump_traceback(file=self.out, all_threads=True)
            self.out.flush()
        self._exit(HUNG_EXIT_CODE)


# A launcher that wants to requeue a hung job names a file here (launch/slurm/opd.sbatch does): torchrun reports
# every failed worker as exit code 1, so the watchdog's own exit code does not reach the batch script.
HANG_MARKER_ENV = "OPD_HANG_MARKER"


def _leave_hang_marker(line: str) -> None:
    marker = os.environ.get(HANG_MARKER_ENV)
    if not marker:
        return
    try:
        with open(marker, "a") as handle:
            handle.write(line + "\n")
    except OSError as exc:  # the exit must happen whatever the file system does
        print(f"[opd-megatron] watchdog: cannot write {HANG_MARKER_ENV}={marker}: {exc}", file=sys.stderr, flush=True)


def _suspects(peers: dict[int, Optional[dict[str, Any]]], own_step: int, own_doing: str, now: float,
              silent_after_s: float) -> str:
    """The ranks this one is likely waiting on, by evidence: silent (no heartbeat for `silent_after_s`: stopped, or
    stuck without releasing the interpreter), missing (never published one), or behind (at an earlier step)."""
    silent, missing, behind, left = [], [], [], []
    for rank, record in sorted(peers.items()):
        if record is None:
            missing.append(rank)
        elif record.get("left"):
            left.append(f"rank {rank} (after step {record['step']}: {record['doing']})")
        elif now - record["alive_at"] > silent_after_s:
            silent.append(f"rank {rank} (silent for {now - record['alive_at']:.0f} s, last at step {record['step']}: "
                          f"{record['doing']})")
        elif record["step"] < own_step:
            behind.append(f"rank {rank} (at step {record['step']}: {record['doing']}, for "
                          f"{now - record['progress_at']:.0f} s)")
    parts = []
    if silent:
        parts.append(f"waiting on {_named(silent)}: stopped, or stuck without releasing the interpreter")
    if missing:
        parts.append(f"no heartbeat ever from rank{'s' if len(missing) > 1 else ''} "
                     f"{_named([str(r) for r in missing])}")
    if behind:
        parts.append(f"behind it: {_named(behind)}")
    if left:
        parts.append(f"out of the training loop (an error, or done): {_named(left)}")
    if not parts:
        return (f"every other rank is alive at step {own_step} or later: all wait on something outside the job "
                f"(a teacher server, the filesystem) or on this rank ({own_doing})")
    return "; ".join(parts)


def _named(items: list[str]) -> str:
    shown = ", ".join(items[:NAMED_RANKS])
    return shown + (f" and {len(items) - NAMED_RANKS} more" if len(items) > NAMED_RANKS else "")


__all__ = ["Watchdog", "HUNG_EXIT_CODE"]
