"""Every sweep file under sweeps/ validates (every arm's run config, for every seed, as `sweep --dry` does), and a
sweep's prepared teacher path names the teacher its base config's preparation command caches (the quickstart's
cache key of the base config), so editing a base config without its sweeps fails here, not an hour into a sweep."""

import re
from pathlib import Path

import pytest

from opd_megatron.config import load_config
from opd_megatron.tools.quickstart import _teacher_key
from opd_megatron.tools.sweep import REPO_ROOT, load_sweep, plan_runs, resolve_base

SWEEPS = sorted((REPO_ROOT / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_file_validates_and_names_its_prepared_teacher(path, tmp_path):
    sweep = load_sweep(path)
    base = resolve_base(sweep.base, path)
    runs = plan_runs(sweep, base, tmp_path / sweep.name)
    assert len(runs) == len(sweep.arms) * len(sweep.seeds) and len(sweep.seeds) >= 2
    teacher = [o for o in sweep.overrides if o.startswith("teacher.colocated.path=")]
    if teacher:
        key = re.fullmatch(r"teacher\.colocated\.path=runs/prep/teachers/([0-9a-f]{12})/teacher/checkpoints",
                           teacher[0])
        assert key is not None, teacher[0]
        assert key.group(1) == _teacher_key(load_config(base, [])), f"{path.name}: re-prepare and update the key"
        task = load_config(base, []).rollout.task
        assert f"checkpoint.load=runs/prep/{task}/warmup/student_warmup/checkpoints" in sweep.overrides


def test_every_issue_question_has_a_sweep():
    names = {Path(p).stem for p in SWEEPS}
    assert {"opd_vs_sft_vs_rl", "credit", "support", "routing", "on_policy_fraction"} <= names
