"""SIGTERM (what Slurm sends before a time limit) and SIGINT (Ctrl-C) both ask the loop to stop the same way:
`loop/common.py::StopRequest` records the signal, the ranks agree on it at the end of the step, and the loop saves and
exits 0 (end to end for SIGTERM: tests/test_train_cli.py and tests/opd/test_opd_loop.py). In-process, one gloo rank;
the handlers installed before are put back afterwards."""

from __future__ import annotations

import os
import signal

import pytest
import torch.distributed as dist

from opd_megatron.loop.common import StopRequest


@pytest.fixture
def one_rank(tmp_path):
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    if started:
        dist.destroy_process_group()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_are_a_stop_request_not_a_crash(one_rank, signum):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    stop = StopRequest()
    try:
        assert not stop.agreed()
        os.kill(os.getpid(), signum)              # delivered to the main thread before the next bytecode
        assert stop.received == signum            # no KeyboardInterrupt, no exit: the step goes on
        assert stop.agreed()
    finally:
        stop.restore()
    assert {sig: signal.getsignal(sig) for sig in before} == before
