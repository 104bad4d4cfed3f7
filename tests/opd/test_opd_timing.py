"""What an OPD run says about its time and its teacher (issue 14, point 5), on a three-step run with a colocated
teacher: every step logs its tokens per second, its own times (`time/step/*`) and the running totals
(`time/cumulative/*`, the sums of the steps' times); the colocated teacher's forward, which runs inside the loss, is
timed as the teacher's, not the update's, and its scored tokens are counted in summary.json and report.md."""

import pytest

from tests.harness import run_distributed
from tests.opd import timing_workers as w

pytestmark = pytest.mark.slow      # one gloo process: a teacher and a student checkpoint, then three steps

PARTS = ("rollout", "teacher", "update", "wall")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_distributed(w.colocated_run, 1, args=(str(tmp_path_factory.mktemp("opd_timing")),),
                           timeout_s=600)[0]


def test_each_step_logs_its_tokens_per_second(run):
    steps = [m for m in run["metrics"] if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:
        assert m["tokens"] > 0 and m["tokens_per_s"] == pytest.approx(m["tokens"] / m["time/step/wall_s"], rel=1e-6)


def test_step_times_and_their_running_totals_are_named_apart(run):
    steps = [m for m in run["metrics"] if "loss" in m]
    totals = dict.fromkeys(PARTS, 0.0)
    for m in steps:
        assert not any(k.startswith("time/") and k.count("/") == 1 for k in m), sorted(m)   # no unqualified time
        for part in PARTS:
            assert m[f"time/step/{part}_s"] > 0, (part, m)
            totals[part] += m[f"time/step/{part}_s"]
            assert m[f"time/cumulative/{part}_s"] == pytest.approx(totals[part], rel=1e-6), part
        parts = sum(m[f"time/step/{part}_s"] for part in ("rollout", "teacher", "update"))
        assert parts <= m["time/step/wall_s"] * (1 + 1e-6), m


def test_the_colocated_teachers_forward_and_tokens_are_counted(run):
    summary, steps = run["summary"], [m for m in run["metrics"] if "loss" in m]
    # The teacher scores each step's response tokens inside the loss (and the evaluations' samples).
    assert summary["teacher_tokens_scored"] >= sum(m["tokens/count"] for m in steps) > 0, summary
    assert summary["time_split_s"]["teacher_s"] > 0, summary
    assert f"teacher tokens scored: {summary['teacher_tokens_scored']}" in run["report"]
    assert all(m["throughput/teacher_tokens_per_s"] > 0 for m in steps)
