"""One OPD step of the loop at TP=1 and TP=2, split into rollout / update, against an SFT step on the same tokens.

The OPD side is the project's loop itself (`loop/opd.py::OpdRun`): `make_batch` (KV-cache sampling of
prompts x samples rollouts from the megatron student, verifier rewards) and `train_step` (the colocated teacher's
forward inside the loss, the vocab-parallel objective and diagnostics, megatron's optimizer step). The baseline,
measured in the same processes on the same rollout batch, is a plain SFT step: megatron's vocab-parallel
cross-entropy on the same tokens through the same schedule and optimizer, so the ratio says what the OPD objective
(teacher forward, full-vocabulary reverse KL, diagnostics) costs on top of a supervised step.

    python -m benchmarks.opd_step                      # quickstart shapes, about 2 minutes on 2 cores
    python -m benchmarks.opd_step --steps 10 --json runs/opd_step.json

Each layout runs in fresh gloo processes (`tests/harness.py`); a multi-process number is the slowest rank's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
warnings.filterwarnings("ignore", module=r"megatron\..*")

CONFIG = str(REPO_ROOT / "configs" / "quickstart.yaml")


def _overrides(tp: int, teacher: str, out: str) -> list[str]:
    return [f"parallel.tp={tp}", f"teacher.colocated.path={teacher}", f"run.output_dir={out}", "run.name=bench",
            "checkpoint.resume=false", "logging.progress_bar=false", "logging.tensorboard=false", "eval.prompts=8"]


def make_teacher(out: str) -> str:
    """A random teacher of the quickstart's shape, saved as our checkpoint (the timing does not need a good one)."""
    from opd_megatron.config import load_config
    from opd_megatron.student.checkpoint import save_checkpoint
    from opd_megatron.student.distributed import init_parallel
    from opd_megatron.student.model import build_student
    from opd_megatron.student.optimizer import wrap_for_training

    base = load_config(CONFIG, ["teacher.colocated.path=unused"])
    cfg = load_config(CONFIG, ["teacher.colocated.path=unused", "run.algorithm=sft", "data.path=unused.jsonl"]
                      + [f"model.{k}={v}" for k, v in vars(base.teacher.colocated.model).items()
                         if v is not None and k != "preset"], validate=False)
    ctx = init_parallel(cfg)
    trainable = wrap_for_training(build_student(cfg.model, cfg.parallel, ctx.device), cfg.optim, cfg.model, 1)
    save_checkpoint(out, 0, trainable, ctx, {}, cfg.to_dict())
    return out


def worker(tp: int, teacher: str, out: str, steps: int, warmup: int) -> dict:
    from opd_megatron.config import load_config
    from opd_megatron.loop.opd import OpdRun, StudentInput
    from opd_megatron.student.distributed import init_parallel
    from opd_megatron.student.lm_loss import token_cross_entropy_sum
    from opd_megatron.student.optimizer import optimizer_step, zero_grads
    from opd_megatron.student.schedule import forward_backward

    cfg = load_config(CONFIG, _overrides(tp, teacher, out))
    ctx = init_parallel(cfg)
    run = OpdRun(cfg, ctx)
    vocab = cfg.model.vocab_size
    timings = {"rollout_ms": [], "opd_update_ms": [], "sft_update_ms": []}
    for step in range(warmup + steps):
        started = time.perf_counter()
        batch = run.make_batch(step)
        rolled = time.perf_counter()
        run.train_step(batch)
        updated = time.perf_counter()
        # The baseline: an SFT step on the same rollout tokens (cross-entropy on the responses).
        trimmed = batch.trimmed()
        micro = [StudentInput(tokens=mb.input_tokens, rollout=mb)
                 for mb in trimmed.micro_batches(cfg.parallel.micro_batch_size)]

        def ce(logits, micro_input):
            mb = micro_input.rollout
            return token_cross_entropy_sum(logits, mb.labels, mb.loss_mask, vocab)

        sft_started = time.perf_counter()
        zero_grads(run.trainable)
        forward_backward(run.trainable.ddp, micro, ce, trimmed.tokens.shape[1] - 1, cfg.parallel.micro_batch_size)
        optimizer_step(run.trainable)
        sft_done = time.perf_counter()
        run.step += 1
        if step >= warmup:
            timings["rollout_ms"].append(1000 * (rolled - started))
            timings["opd_update_ms"].append(1000 * (updated - rolled))
            timings["sft_update_ms"].append(1000 * (sft_done - sft_started))
    run.teacher.close()
    return {k: statistics.median(v) for k, v in timings.items()} | {"rows": batch.size,
                                                                    "tokens": float(batch.loss_mask.sum())}


def main() -> None:
    from tests.harness import run_distributed

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        teacher = run_distributed(make_teacher, 1, args=(str(Path(tmp) / "teacher"),), timeout_s=300)[0]
        rows = []
        for tp in args.tp:
            ranks = run_distributed(worker, tp, args=(tp, teacher, str(Path(tmp) / f"tp{tp}"), args.steps,
                                                      args.warmup), timeout_s=1200)
            worst = {k: max(r[k] for r in ranks) for k in ("rollout_ms", "opd_update_ms", "sft_update_ms")}
            step_ms = worst["rollout_ms"] + worst["opd_update_ms"]
            rows.append({"tp": tp, **worst, "step_ms": step_ms, "steps_per_s": 1000 / step_ms,
                         "opd_vs_sft_update": worst["opd_update_ms"] / worst["sft_update_ms"],
                         "rows": ranks[0]["rows"], "tokens": ranks[0]["tokens"]})
    print("| tp | rollout ms | OPD update ms | SFT update ms (same tokens) | OPD / SFT update | step ms | steps/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tp']} | {r['rollout_ms']:.0f} | {r['opd_update_ms']:.0f} | {r['sft_update_ms']:.0f} | "
              f"{r['opd_vs_sft_update']:.2f}x | {r['step_ms']:.0f} | {r['steps_per_s']:.2f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
