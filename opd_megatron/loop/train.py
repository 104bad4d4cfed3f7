"""`train(cfg)`: the entry point of both loops (`opd-megatron train`, the quickstart): the parallel state around
the loop that `run.algorithm` names, `sft.py` or `opd.py`, and the stop request both honour."""

from __future__ import annotations

from opd_megatron.config import RunConfig
from opd_megatron.loop.common import StopRequest, TrainResult
from opd_megatron.loop.opd import train_opd
from opd_megatron.loop.sft import train_sft
from opd_megatron.student.distributed import destroy_parallel, init_parallel


def train(cfg: RunConfig) -> TrainResult:
    ctx = init_parallel(cfg)
    stop = StopRequest()
    try:
        loop = train_opd if cfg.run.algorithm == "opd" else train_sft
        return loop(cfg, ctx, stop)
    finally:
        stop.restore()
        destroy_parallel()
