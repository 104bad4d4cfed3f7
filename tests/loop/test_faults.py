"""Faults of a real multi-process run, started as torchrun starts ranks: a rank that hangs instead of dying."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from opd_megatron.loop.watchdog import HUNG_EXIT_CODE
from opd_megatron.student.checkpoint import complete_iterations, verify_checkpoint
from opd_megatron.student.distributed import free_port

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_collective_a_peer_never_joins_times_out_after_the_configured_time():
    """run.collective_timeout_s=4 holds for megatron's data-parallel group too (it made its groups with a 30-minute
    timeout of its own): rank 0's all-reduce raises instead of waiting; the harness gives it 120 s."""
    from tests.harness import run_distributed
    from tests.loop import fault_workers
    error, slept = run_distributed(fault_workers.collective_timeout, 2, args=(4.0,), timeout_s=120)
    assert slept == "slept"
    assert error.startswith("after ") and "the all-reduce returned" not in error, error
    assert "timed out" in error.lower() or "timeout" in error.lower(), error


def _start_ranks(body: str, world_size: int, logs: Path) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPOSITORY)}
        with open(logs / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-c", body], cwd=REPOSITORY, env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
    return procs


@pytest.mark.slow
def test_a_rank_stopped_mid_step_ends_the_job_with_its_name_and_step(tmp_path):
    """Rank 1 is SIGSTOPped in step 3 (after its forward, before the gradient all-reduce); rank 0 waits in that
    all-reduce. Rank 0's watchdog (run.hang_timeout_s=6; the collective timeout is 300 s) prints one line naming rank
    1 and step 3 and exits with HUNG_EXIT_CODE; the checkpoint of step 2 is complete, verified and `latest`."""
    run_dir = tmp_path / "run"
    body = (f"from tests.loop.fault_workers import run_with_a_stopped_rank; "
            f"run_with_a_stopped_rank({str(run_dir)!r}, stop_rank=1, stop_at=3, hang_timeout_s=6)")
    procs = _start_ranks(body, 2, tmp_path)
    try:
        # Generous: two cold starts of torch + megatron on shared cores, two steps, one save, then the timeout.
        returncode = procs[0].wait(timeout=400)
        log = (tmp_path / "rank0.log").read_text()
        assert returncode == HUNG_EXIT_CODE, log[-3000:]
        line = next(line for line in log.splitlines() if line.startswith("[opd-megatron] watchdog: rank 0"))
        assert "at step 3 (training step 3)" in line, line
        assert "waiting on rank 1 (silent for " in line and "last at step 3: training step 3)" in line, line
        checkpoints = run_dir / "checkpoints"
        assert f"the last complete checkpoint is untouched: {checkpoints / 'iter_0000002'}" in line, line
        assert procs[1].poll() is None              # still stopped: its launcher (torchrun, srun) ends it
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
    assert complete_iterations(checkpoints) == [2]
    assert (checkpoints / "latest").read_text() == "2"
    assert verify_checkpoint(checkpoints / "iter_0000002") == []
    assert not any(".partial-" in p.name for p in checkpoints.iterdir())
