"""The one starting-point rule of both loops (`loop/common.py::starting_point`), on checkpoint directories laid out
as `student/checkpoint.py` writes them (an `iter_XXXXXXX/metadata.json` marks a complete one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd_megatron.config import CheckpointSection, load_config
from opd_megatron.loop.common import LoadMeaning, StepLoop, logged_step, run_steps, starting_point
from opd_megatron.loop.metrics import MetricsWriter


def _complete(checkpoints: Path, iteration: int) -> Path:
    path = checkpoints / f"iter_{iteration:07d}"
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    return path


@pytest.mark.parametrize("meaning", list(LoadMeaning))
def test_a_requeued_run_continues_from_its_own_checkpoints_not_from_checkpoint_load(tmp_path, meaning):
    """A run started from `checkpoint.load` that Slurm stopped and requeued must pick up its own newest checkpoint:
    restarting from `checkpoint.load` would silently throw away every step since (the bug this test was written
    for: SFT took `checkpoint.load` first on every start)."""
    warm = _complete(tmp_path / "warm", 100)
    own = _complete(tmp_path / "run" / "checkpoints", 7)
    start = starting_point(CheckpointSection(load=str(warm), resume=True), tmp_path / "run" / "checkpoints", meaning)
    assert start.path == own and start.restores_run


@pytest.mark.parametrize("meaning, restores_run", [(LoadMeaning.CONTINUE, True), (LoadMeaning.WEIGHTS, False)])
def test_a_fresh_run_starts_from_checkpoint_load(tmp_path, meaning, restores_run):
    warm = _complete(tmp_path / "warm", 100)
    start = starting_point(CheckpointSection(load=str(warm), resume=True), tmp_path / "run" / "checkpoints", meaning)
    assert start.path == warm and start.restores_run is restores_run


def test_resume_false_ignores_the_runs_own_checkpoints(tmp_path):
    warm = _complete(tmp_path / "warm", 100)
    _complete(tmp_path / "run" / "checkpoints", 7)
    start = starting_point(CheckpointSection(load=str(warm), resume=False), tmp_path / "run" / "checkpoints",
                           LoadMeaning.CONTINUE)
    assert start.path == warm


def test_nothing_to_start_from(tmp_path):
    start = starting_point(CheckpointSection(resume=True), tmp_path / "run" / "checkpoints", LoadMeaning.CONTINUE)
    assert start.path is None and not start.restores_run


def test_fallbacks_are_the_older_checkpoints_of_a_directory_only_when_asked(tmp_path):
    """checkpoint.fallback_to_previous: a run may load the newest older checkpoint of the directory it resumes from
    when the chosen one proves corrupt (`Checkpointer.restore`, tested on 2 ranks in tests/student/
    test_checkpoint.py); a checkpoint named by its own directory is that one, with nothing to fall back to."""
    checkpoints = tmp_path / "run" / "checkpoints"
    for iteration in (3, 5, 8):
        _complete(checkpoints, iteration)
    (checkpoints / "latest").write_text("5")           # 8: a newer iteration of a timeline the run went back from
    own = starting_point(CheckpointSection(resume=True, fallback_to_previous=True), checkpoints, LoadMeaning.WEIGHTS)
    assert own.path == checkpoints / "iter_0000005" and own.fallbacks == (checkpoints / "iter_0000003",)
    assert own.own and own.restores_run
    off = starting_point(CheckpointSection(resume=True), checkpoints, LoadMeaning.WEIGHTS)
    assert off.path == own.path and off.fallbacks == ()
    named = starting_point(CheckpointSection(load=str(checkpoints / "iter_0000005"), resume=False,
                                             fallback_to_previous=True), checkpoints, LoadMeaning.WEIGHTS)
    assert named.path == checkpoints / "iter_0000005" and named.fallbacks == () and not named.own
    warm = starting_point(CheckpointSection(load=str(checkpoints), resume=False, fallback_to_previous=True),
                          tmp_path / "other" / "checkpoints", LoadMeaning.WEIGHTS)
    assert warm.fallbacks == (checkpoints / "iter_0000003",) and not warm.own


class _CountingLoop(StepLoop):
    """Steps that report a loss, and an evaluation every `eval_every` steps, as OpdRun.advance does."""

    def __init__(self, eval_every: int):
        self.step, self.eval_every = 0, eval_every

    def advance(self):
        self.step += 1
        metrics = {"loss": float(self.step)}
        if self.step % self.eval_every == 0:
            metrics["eval/score"] = 0.5
        return metrics


class _NoStop:
    received = None

    def agreed(self) -> bool:
        return False


class _NoSaves:
    def __init__(self, checkpoints: Path):
        self.checkpoints = checkpoints

    def save(self, step: int) -> str:
        raise AssertionError("no checkpoint was asked for")


def test_steps_are_logged_every_log_interval_and_evaluations_always(tmp_path):
    """logging.log_interval=4 writes steps 4, 8 and the last (10), and every step that evaluated (3, 6, 9), which
    the interval would otherwise drop from metrics.jsonl; `logged_step` is the rule the loops use to skip the
    diagnostics of the other steps."""
    cfg = load_config(None, ["run.train_steps=10", "logging.log_interval=4", "checkpoint.save_at_end=false",
                             "run.hang_timeout_s=0"])
    writer = MetricsWriter(tmp_path, 10, 0, True, False, False)
    run_steps(_CountingLoop(eval_every=3), cfg, _NoSaves(tmp_path / "checkpoints"), writer, _NoStop())
    writer.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 4, 6, 8, 9, 10]
    assert [r["step"] for r in records if "eval/score" in r] == [3, 6, 9]
    assert [s for s in range(1, 11) if logged_step(cfg, s)] == [4, 8, 10]
