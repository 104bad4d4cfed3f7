"""The sweep runner and its report: the sweep file is typed (unknown keys and bad arm overrides fail before any run),
a real 1 arm x 2 seeds OPD sweep (sweeps/smoke.yaml) leaves the results layout and runs.jsonl, a second call skips
both runs, and the report is made from the results directory alone; on hand-written results the report's table is
numpy's mean and sample std."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from opd_megatron.config import ConfigError
from opd_megatron.tools import sweep as sweep_module
from opd_megatron.tools.sweep import KEPT_FILES, load_sweep, render_report, run_sweep

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "sweeps" / "smoke.yaml"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_unknown_key_is_named_with_the_file(tmp_path):
    path = _write(tmp_path / "bad.yaml", "name: x\nbase: configs/quickstart.yaml\narms: {a: []}\nseeds: [1]\n"
                                         "seed: [2]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown config key 'seed'.*did you mean 'seeds'"):
        load_sweep(path)
    path = _write(tmp_path / "bad_figure.yaml", "name: x\nbase: configs/quickstart.yaml\narms: {a: []}\n"
                                                "seeds: [1]\nfigures: [{name: f, y: eval/score, colour: red}]\n")
    with pytest.raises(ConfigError, match=r"bad_figure\.yaml.*unknown config key 'figures\[0\]\.colour'"):
        load_sweep(path)
    path = _write(tmp_path / "bad_arm_in_figure.yaml", "name: x\nbase: configs/quickstart.yaml\narms: {a: []}\n"
                                                       "seeds: [1]\nfigures: [{name: f, y: eval/score, arms: [b]}]\n")
    with pytest.raises(ConfigError, match=r"figures\[0\]\.arms: \['b'\] are not arms"):
        load_sweep(path)


def test_bad_arm_override_fails_before_any_run_naming_the_arm(tmp_path, monkeypatch):
    launched = []
    monkeypatch.setattr(sweep_module.subprocess, "run", lambda *a, **k: launched.append(a))
    path = _write(tmp_path / "sweep.yaml", "name: x\nbase: configs/quickstart.yaml\n"
                                           "overrides: [teacher.kind=self]\n"
                                           "arms:\n  good: [opd.route_a.divergence=forward_kl]\n"
                                           "  typo: [opd.route_a.divergense=forward_kl]\nseeds: [1, 2]\n")
    results = tmp_path / "results"
    with pytest.raises(ConfigError, match=r"arm 'typo' \(seed 1\): unknown config key 'opd\.route_a\.divergense'"):
        run_sweep(path, results)
    with pytest.raises(ConfigError, match=r"--only: \['nope'\] are not arms"):
        run_sweep(path, results, only=["nope"])
    assert launched == [] and not results.exists()


def _smoke_env(monkeypatch):
    # One thread per run: the runs' processes inherit it (2 shared cores; the tests in tests/ run this way too).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")


def test_smoke_sweep_layout_resume_and_report_from_results_alone(tmp_path, monkeypatch):
    """sweeps/smoke.yaml: 1 arm x 2 seeds of a 4-step OPD run with a frozen self-teacher (no teacher checkpoint to
    train first), ~10 s a run on 2 cores."""
    _smoke_env(monkeypatch)
    launches = []
    real_run = subprocess.run

    def counting_run(cmd, *args, **kwargs):
        launches.append(cmd)
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(sweep_module.subprocess, "run", counting_run)
    results = tmp_path / "results" / "smoke"
    outcome = run_sweep(SMOKE, results, log=lambda line: None)
    assert outcome.failed == [] and outcome.launched == ["rkl/seed1", "rkl/seed2"] and len(launches) == 2
    for seed in (1, 2):
        run_dir = results / "rkl" / f"seed{seed}"
        assert {p.name for p in run_dir.iterdir()} == KEPT_FILES   # checkpoints, tensorboard, plots, log pruned
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == 4 and summary["rkl_after"] is not None
        assert f"seed: {seed}" in (run_dir / "config.yaml").read_text()
        steps = [record["step"] for record in sweep_module.read_metrics(run_dir)]
        assert steps[0] == 0 and steps[-1] == 4
    lines = [json.loads(text) for text in (results / "runs.jsonl").read_text().splitlines()]
    assert [(line["arm"], line["seed"], line["rc"]) for line in lines] == [("rkl", 1, 0), ("rkl", 2, 0)]
    for line in lines:
        assert line["cpu_s"] > 0 and line["wall_s"] > 0
        assert line["overrides"][-2:] == ["opd.route_a.divergence=reverse_kl", f"run.seed={line['seed']}"]

    again = run_sweep(SMOKE, results, log=lambda line: None)
    assert again.launched == [] and again.skipped == ["rkl/seed1", "rkl/seed2"] and len(launches) == 2
    assert len((results / "runs.jsonl").read_text().splitlines()) == 2

    # The report from a copy of the results alone (the sweep file and the run dirs are not read).
    copy = tmp_path / "elsewhere" / "smoke"
    shutil.copytree(results, copy)
    shutil.rmtree(results)
    page = render_report(copy, tmp_path / "docs" / "smoke.md")
    text = page.read_text()
    assert (tmp_path / "docs" / "smoke-score.png").stat().st_size > 1000
    assert (tmp_path / "docs" / "smoke-reverse_kl.png").read_bytes()[:4] == b"\x89PNG"
    assert "![score](smoke-score.png)" in text and "| rkl |" in text
    total_cpu = sum(line["cpu_s"] for line in lines)
    assert "opd-megatron sweep --config sweeps/smoke.yaml --results" in text and f"{total_cpu:.4g} s CPU" in text
    finals = [[r["eval/rkl"] for r in sweep_module.read_metrics(copy / "rkl" / f"seed{s}") if "eval/rkl" in r][-1]
              for s in (1, 2)]
    assert f"| rkl | {np.mean(finals):.4g} ± {np.std(finals, ddof=1):.4g} | 2 |" in text
    assert render_report(copy, tmp_path / "docs" / "smoke.md").read_text() == text   # deterministic


def test_sweep_command_runs_and_reports_a_failed_run(tmp_path, monkeypatch):
    """Through the CLI: a run that fails (its data file does not exist) is recorded with its rc and log tail, the
    other arm still runs (dry: --dry lists and validates without running), and the exit code is non-zero."""
    _smoke_env(monkeypatch)
    path = _write(tmp_path / "sweep.yaml", f"name: fail\nbase: {REPO / 'configs' / 'sft_tiny.yaml'}\n"
                                           "overrides: [run.train_steps=1, checkpoint.save_at_end=false]\n"
                                           "arms:\n  broken: [data.path=/nonexistent/data.jsonl]\n"
                                           "  fine: []\nseeds: [3]\n")
    results = tmp_path / "results"
    from opd_megatron.cli import main
    assert main(["sweep", "--config", str(path), "--results", str(results), "--dry"]) == 0
    assert not (results / "runs.jsonl").exists()
    assert main(["sweep", "--config", str(path), "--results", str(results), "--only", "broken"]) == 1
    lines = [json.loads(text) for text in (results / "runs.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["arm"] == "broken" and lines[0]["rc"] == 2
    assert "/nonexistent/data.jsonl" in lines[0]["stderr_tail"]
    assert not (results / "fine").exists()


def _synthetic_results(root: Path) -> dict[str, dict[int, float]]:
    """2 arms x 3 seeds of hand-written metrics.jsonl (eval/score at steps 0, 5, 10); returns the final scores."""
    finals = {"alpha": {1: 0.25, 2: 0.5, 3: 0.625}, "beta": {1: 0.9, 2: 0.7, 3: 0.95}}
    arms = {"alpha": ["opd.route_a.divergence=reverse_kl"], "beta": ["opd.route_a.divergence=forward_kl"]}
    sweep = {"name": "synthetic", "base": "configs/quickstart.yaml", "overrides": [], "arms": arms,
             "seeds": [3, 1, 2], "figures": [{"name": "score", "y": "eval/score", "x": "step", "arms": [],
                                               "title": "score"}]}
    _write(root / "sweep.json", json.dumps({"command": "opd-megatron sweep --config sweeps/synthetic.yaml",
                                            "sweep_file": "sweeps/synthetic.yaml", "base": "configs/quickstart.yaml",
                                            "sweep": sweep}))
    runs = []
    for arm, by_seed in finals.items():
        for seed, final in by_seed.items():
            records = [{"step": 0, "eval/score": 0.0}, {"step": 3, "loss": 1.0},
                       {"step": 5, "eval/score": final / 2}, {"step": 10, "eval/score": final}]
            _write(root / arm / f"seed{seed}" / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
            _write(root / arm / f"seed{seed}" / "summary.json", "{}")
            runs.append({"arm": arm, "seed": seed, "overrides": arms[arm], "wall_s": 2.0, "cpu_s": 1.5 * seed,
                         "rc": 0})
    _write(root / "runs.jsonl", "".join(json.dumps(r) + "\n" for r in runs))
    return finals


def test_report_table_is_numpys_mean_and_std(tmp_path):
    finals = _synthetic_results(tmp_path / "results")
    page = render_report(tmp_path / "results")
    text = page.read_text()
    assert page == tmp_path / "results" / "results.md"
    for arm, by_seed in finals.items():
        values = np.array([by_seed[s] for s in sorted(by_seed)])
        row = f"| {arm} | {np.mean(values):.4g} ± {np.std(values, ddof=1):.4g} | 3 | {1.5 * 6:.4g} |"
        assert row in text, (row, text)
    rows = sweep_module.figure_rows(tmp_path / "results", _score_figure(), ["beta", "alpha"])
    assert [row.arm for row in rows] == ["alpha", "beta"]
    for row in rows:
        values = np.array([finals[row.arm][s] for s in sorted(finals[row.arm])])
        assert row.mean == pytest.approx(np.mean(values), abs=1e-12)
        assert row.std == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    assert text.index("| alpha |") < text.index("| beta |")
    assert (tmp_path / "results" / "results-score.png").read_bytes()[:4] == b"\x89PNG"
    png = (tmp_path / "results" / "results-score.png").read_bytes()
    render_report(tmp_path / "results")
    assert (tmp_path / "results" / "results-score.png").read_bytes() == png and page.read_text() == text


def _score_figure():
    return sweep_module.FigureSpec(name="score", y="eval/score")


def test_smoke_sweep_file_is_valid():
    sweep = load_sweep(SMOKE)
    assert sweep.name == "smoke" and len(sweep.arms) * len(sweep.seeds) == 2
    assert os.path.isfile(REPO / sweep.base)


def test_first_reach_interpolates_between_logged_points():
    points = [(0.0, 0.0), (10.0, 0.2), (20.0, 0.6), (30.0, 0.4)]
    assert sweep_module.first_reach(points, 0.4) == pytest.approx(15.0)
    assert sweep_module.first_reach(points, 0.0) == 0.0
    assert sweep_module.first_reach(points, 0.7) is None


def test_report_gives_the_x_at_which_each_arm_reaches_a_level(tmp_path):
    """figures[].reach: per arm, the x at which each seed's y first reaches the level, mean ± std over the seeds
    that do, and how many of them do."""
    finals = _synthetic_results(tmp_path / "results")
    record_path = tmp_path / "results" / sweep_module.SWEEP_RECORD
    record = json.loads(record_path.read_text())
    level = sorted(v for by_seed in finals.values() for v in by_seed.values())[2]
    for figure in record["sweep"]["figures"]:
        figure["reach"] = level
    record_path.write_text(json.dumps(record))
    text = render_report(tmp_path / "results").read_text()
    rows = sweep_module.figure_rows(tmp_path / "results", sweep_module.FigureSpec(name="score", y="eval/score",
                                                                                 reach=level), ["alpha", "beta"])
    for row in rows:
        # eval/score is final / 2 at step 5 and final at step 10: the level is crossed between them, or never.
        expected = {seed: (None if final < level else 5.0 + (level - final / 2) / (final / 2) * 5.0)
                    for seed, final in finals[row.arm].items()}
        assert row.reached.keys() == expected.keys()
        for seed, x in expected.items():
            assert (row.reached[seed] is None) if x is None else row.reached[seed] == pytest.approx(x)
        hits = [x for x in expected.values() if x is not None]
        assert f"| {len(hits)} of 3 |" in text
        if hits:
            assert f"| {np.mean(hits):.4g} ± {np.std(hits, ddof=1) if len(hits) > 1 else 0:.4g} |" in text or \
                f"| {np.mean(hits):.4g} ± 0 |" in text
    assert "to reach" in text
    with pytest.raises(ConfigError, match="reach"):
        sweep_module.parse_sweep({**record["sweep"], "figures": [{"name": "a", "y": "b", "reach": "high"}]})


def test_report_tabulates_skipped_steps_and_grad_norm_spikes(tmp_path):
    """The stability table: skipped steps counted from `step_skipped`, the largest grad norm, and the steps above
    10x the run's median grad norm, summed over an arm's seeds."""
    _synthetic_results(tmp_path / "results")
    norms = [1.0, 1.2, 0.9, 15.0, 1.1, 1.0, 11.5]
    for seed in (1, 2, 3):
        path = tmp_path / "results" / "alpha" / f"seed{seed}" / "metrics.jsonl"
        extra = [{"step": 10 + i, "grad_norm": n, "step_skipped": 1.0 if (seed == 2 and i == 0) else 0.0}
                 for i, n in enumerate(norms)]
        path.write_text(path.read_text() + "".join(json.dumps(r) + "\n" for r in extra))
    text = render_report(tmp_path / "results").read_text()
    assert "| alpha | 3 | 1 | 15 | 6 |" in text, text
    assert "| beta |" not in text.split("## Stability")[1]


def test_a_record_without_x_takes_the_x_of_its_step():
    """The final evaluation is logged apart from its step's metrics: against wall time it still counts, at the
    wall time of its step."""
    records = [{"step": 0, "eval/score": 0.0}, {"step": 5, "time/cumulative/wall_s": 2.0, "loss": 1.0},
               {"step": 10, "time/cumulative/wall_s": 4.5, "loss": 0.5}, {"step": 10, "eval/score": 0.75}]
    assert sweep_module.series(records, "time/cumulative/wall_s", "eval/score") == [(4.5, 0.75)]
    assert sweep_module.series(records, "step", "eval/score") == [(0.0, 0.0), (10.0, 0.75)]
