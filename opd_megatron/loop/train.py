"""`train(cfg)`: the entry point of both loops (`opd-megatron train`, the quickstart): the parallel state around
the loop that `run.algorithm` names, `sft.py` or `opd.py`, and the stop request both honour."""

from __future__ import annotations

from opd_megatron.config import RunConfig
from opd_megatron.loop.common import StopRequest, TrainResult
from opd_megatron.loop.opd import train_opd
from opd_megatron.loop.sft import train_sft
from opd_megatron.student.distributed import destroy_parallel, init_parallel
from opd_megatron.student.hf_export import export_checkpoint


def train(cfg: RunConfig) -> TrainResult:
    ctx = init_parallel(cfg)
    stop = StopRequest()
    try:
        loop = train_opd if cfg.run.algorithm == "opd" else train_sft
        result = loop(cfg, ctx, stop)
        if cfg.checkpoint.export_hf and result.checkpoint is not None and not result.stopped_by_signal:
            # At the run's own layout, in its process group: each pipeline stage's writer holds one stage.
            export = export_checkpoint(result.checkpoint, cfg.run.run_dir / "hf", ctx=ctx, replace=True)
            if ctx.is_logging_rank:
                print(f"[opd-megatron] Hugging Face checkpoint: {export.output}", flush=True)
        return result
    finally:
        stop.restore()
        destroy_parallel()
