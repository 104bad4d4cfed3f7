"""The one starting-point rule of both loops (`loop/common.py::starting_point`), on checkpoint directories laid out
as `student/checkpoint.py` writes them (an `iter_XXXXXXX/metadata.json` marks a complete one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from opd_megatron.config import CheckpointSection
from opd_megatron.loop.common import LoadMeaning, starting_point


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
