"""Run outputs on the logging rank: a progress bar (tqdm), `metrics.jsonl` (one JSON object per logged step) and
TensorBoard scalars (torch.utils.tensorboard), all under the run directory. A context manager: closed on exit,
whatever ended the run. `student_compute`: a step's student FLOPs (`compute/*`), the x axis of equal-compute plots."""

from __future__ import annotations

import gzip
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm


# What the progress bar shows: (label, metrics key, format), from the last record that has the key.
BAR_FIELDS = (("loss", "loss", ".4f"), ("tok_s", "tokens_per_s", ".0f"))


class MetricsWriter:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool, tensorboard: bool,
                 progress_bar: bool):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._bar: Optional[tqdm] = None
        self._postfix: dict[str, str] = {}
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # Appending keeps the steps of an interrupted run; a resumed run continues the same file.
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if progress_bar:
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self._started = time.perf_counter()

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        record: dict[str, Any] = {"step": step, "time": round(time.time(), 3)}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._bar is not None:
            # Only a training step's record moves the bar's numbers: an evaluation record (before the first step,
            # after the last) has no loss, and would otherwise show `loss=nan` as the run's last word.
            shown = {name: format(scalars[key], spec) for name, key, spec in BAR_FIELDS if key in scalars}
            if shown:
                self._postfix.update(shown)
                self._bar.set_postfix(self._postfix, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


def student_compute(lengths: torch.Tensor, on_policy: torch.Tensor, parameters: int) -> dict[str, float]:
    """One step's student compute, the x axis of equal-compute comparisons (issue 16), from the global batch's
    sequence lengths `[B]` (prompt + response tokens) and its rows' on-policy flags `[B]`: every row goes through
    the student's forward and backward, and a sampled row also went through its forward once as a rollout (KV
    cached: one token per position). FLOPs by the dense-transformer estimate (Kaplan et al. 2020, C ~ 6 N D):
    6 N per trained token, 2 N per rollout token. Evaluations, the frozen reference's and the whole-batch baselines'
    forward-only passes, and the teacher are not counted."""
    trained = float(lengths.double().sum())
    rollout = float((lengths.double() * on_policy.double()).sum())
    return {"compute/student_trained_tokens": trained, "compute/student_rollout_tokens": rollout,
            "compute/student_flops": (6.0 * trained + 2.0 * rollout) * parameters}


def read_metrics(run_dir: Path) -> list[dict]:
    """The records `MetricsWriter` appended to `run_dir/metrics.jsonl`, in order (empty when there is none), or
    those of `metrics.jsonl.gz`, the form a sweep keeps them in."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        text = path.read_text()
    elif path.with_suffix(".jsonl.gz").is_file():
        text = gzip.decompress(path.with_suffix(".jsonl.gz").read_bytes()).decode()
    else:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
