"""Process body for tests/opd/test_opd_timing.py: a three-step OPD run (`train_opd`, as `opd-megatron train` runs
it) with a colocated teacher on one gloo process, and what it wrote."""

from __future__ import annotations

import json

from opd_megatron.loop.common import StopRequest
from opd_megatron.loop.metrics import read_metrics
from opd_megatron.loop.opd import train_opd
from opd_megatron.student.distributed import destroy_parallel, init_parallel
from tests.opd.numbers_workers import config, make_checkpoints


def colocated_run(root: str) -> dict:
    make_checkpoints(root)
    cfg = config(root, "timing", ["run.train_steps=3", "checkpoint.save_at_end=false", "opd.loss=divergence"])
    ctx = init_parallel(cfg)
    stop = StopRequest()
    try:
        train_opd(cfg, ctx, stop)
    finally:
        stop.restore()
        destroy_parallel()
    run_dir = cfg.run.run_dir
    return {"metrics": read_metrics(run_dir), "summary": json.loads((run_dir / "summary.json").read_text()),
            "report": (run_dir / "report.md").read_text()}
