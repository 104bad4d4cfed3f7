"""The hang watchdog (`loop/watchdog.py`) in one process: a main thread that stops making progress is reported with
its rank, step and what it was doing, and the ranks it waits on, then ended with HUNG_EXIT_CODE. The real thing, a
rank SIGSTOPped mid-step in a 2-process run, is tests/loop/test_faults.py."""

from __future__ import annotations

import io
import json
import threading

import torch.distributed as dist

from opd_megatron.loop.watchdog import HUNG_EXIT_CODE, Watchdog, heartbeat_key


def _heartbeat(store, rank: int, step: int, doing: str, alive_at: float, progress_at: float) -> None:
    store.set(heartbeat_key(rank), json.dumps({"step": step, "doing": doing, "alive_at": alive_at,
                                               "progress_at": progress_at}))


def test_a_rank_stuck_in_python_is_reported_and_ended():
    store = dist.HashStore()
    # Rank 0 stopped publishing long ago (stopped, or stuck holding the interpreter); rank 2 never published.
    _heartbeat(store, 0, 3, "training step 3", alive_at=0.0, progress_at=0.0)
    exits: list[int] = []
    ended = threading.Event()

    def exit_process(code: int) -> None:
        exits.append(code)
        ended.set()

    out = io.StringIO()
    watchdog = Watchdog(rank=1, world_size=3, timeout_s=0.5, store=store, poll_s=0.05, exit_process=exit_process,
                        out=out, backstop=False)
    with watchdog:
        watchdog.progress(3, "training step 3")
        # The main thread is "stuck": it waits (bounded) for the watchdog to end it.
        assert ended.wait(timeout=60), "the watchdog did not fire"
    assert exits == [HUNG_EXIT_CODE]
    line = out.getvalue().strip()
    assert line.count("\n") == 0 and line == watchdog.fired
    assert line.startswith("[opd-megatron] watchdog: rank 1 made no progress for ")
    assert "at step 3 (training step 3)" in line
    assert "waiting on rank 0 (silent for " in line and "last at step 3: training step 3" in line
    assert "no heartbeat ever from rank 2" in line and f"exiting with code {HUNG_EXIT_CODE}" in line
    # It published its own heartbeat for the others to read.
    assert json.loads(store.get(heartbeat_key(1)))["step"] == 3


def test_the_line_is_left_where_a_launcher_asked_for_it(tmp_path, monkeypatch):
    """launch/slurm/opd.sbatch requeues a hung job by this file (torchrun turns the watchdog's exit code into 1)."""
    marker = tmp_path / "hung-restart-0"
    monkeypatch.setenv("OPD_HANG_MARKER", str(marker))
    exits: list[int] = []
    ended = threading.Event()
    watchdog = Watchdog(rank=0, world_size=1, timeout_s=0.3, poll_s=0.05, out=io.StringIO(), backstop=False,
                        exit_process=lambda code: (exits.append(code), ended.set()))
    with watchdog:
        watchdog.progress(1, "training step 1")
        assert ended.wait(timeout=60), "the watchdog did not fire"
    assert exits == [HUNG_EXIT_CODE] and marker.read_text() == watchdog.fired + "\n"


def test_the_suspects_by_evidence():
    watchdog = Watchdog(rank=0, world_size=4, timeout_s=60, poll_s=1.0, backstop=False)
    watchdog.step, watchdog.doing = 5, "training step 5"
    now = 1000.0
    behind = {1: {"step": 4, "doing": "saving the checkpoint of step 4", "alive_at": now - 0.5,
                  "progress_at": now - 70},
              2: {"step": 5, "doing": "training step 5", "alive_at": now - 0.5, "progress_at": now - 61},
              3: {"step": 6, "doing": "training step 6", "alive_at": now - 1.0, "progress_at": now - 61}}
    line = watchdog.describe(61, behind, now=now)
    assert line.endswith("behind it: rank 1 (at step 4: saving the checkpoint of step 4, for 70 s)"), line
    gone = {1: {**behind[1], "left": True}}
    assert "out of the training loop (an error, or done): rank 1 (after step 4: saving the checkpoint of step 4)" in \
        watchdog.describe(61, gone, now=now)
    alive = {2: behind[2], 3: behind[3]}
    assert "every other rank is alive at step 5 or later" in watchdog.describe(61, alive, now=now)
    unknown = watchdog.describe(61, None, "TimeoutError: store timeout")
    assert "heartbeats are unknown (TimeoutError: store timeout)" in unknown


def test_progress_keeps_it_quiet_and_zero_turns_it_off():
    exits: list[int] = []
    watchdog = Watchdog(rank=0, world_size=1, timeout_s=600, poll_s=0.01, exit_process=exits.append,
                        backstop=False)
    with watchdog:
        for step in range(1, 20):
            watchdog.progress(step, f"training step {step}")
    assert exits == [] and watchdog.fired is None
    store = dist.HashStore()
    with Watchdog(rank=1, world_size=2, timeout_s=600, store=store, poll_s=0.01, backstop=False) as leaving:
        leaving.progress(7, "training step 7")
    assert json.loads(store.get(heartbeat_key(1)))["left"] is True
    off = Watchdog(rank=0, world_size=1, timeout_s=0, exit_process=exits.append, backstop=False)
    with off:
        off.progress(1, "training step 1")
    assert not off.enabled and exits == []
