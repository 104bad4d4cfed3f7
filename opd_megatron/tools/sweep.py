"""`opd-megatron sweep` and `opd-megatron sweep-report`: a grid of run configs x seeds, and the page that shows it.

A sweep file (`sweeps/*.yaml`, format in `sweeps/README.md`) names a base run config, overrides shared by every
arm, the arms (a name -> dotted overrides), the seeds and the figures to draw. `run_sweep` runs every (arm, seed)
one after another, each in its own process (`python -m opd_megatron train`), into `results/X/<arm>/seed<s>/`:

- resumable: a run whose `summary.json` exists is skipped; a run killed midway resumes from its own checkpoints
  (the loop's resume policy), since its run directory is the same;
- measured: each finished run appends one line to `results/X/runs.jsonl` (arm, seed, overrides, wall and CPU
  seconds of the child process from `getrusage(RUSAGE_CHILDREN)`, return code; a failed run also the tail of its
  log); a failed run does not stop the sweep, the sweep reports it at the end;
- small: after a successful run only `KEPT_FILES` stay (checkpoints, TensorBoard logs and plots go;
  metrics.jsonl is gzipped), so the raw results can live in the repository.

`render_report` reads only the files under `results/X` (`sweep.json`, `runs.jsonl`, each run's `metrics.jsonl`) and
writes, per figure, a PNG (the mean over seeds as a line, min..max over seeds as a band, one colour per arm) and a
markdown section: a table per arm (final value mean and sample std over seeds, seeds, CPU time), the figure, and the
command that made its data with that command's summed CPU time.
"""

from __future__ import annotations

import bisect
import dataclasses
import gzip
import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from opd_megatron.config import ConfigError, load_config
from opd_megatron.config.loader import build_dataclass, read_yaml
from opd_megatron.loop.metrics import read_metrics

REPO_ROOT = Path(__file__).resolve().parents[2]
# metrics.jsonl is kept gzipped (about 1/5 of its size: a run's records repeat the same keys every step);
# `read_metrics` reads either form.
KEPT_FILES = frozenset({"summary.json", "metrics.jsonl.gz", "config.yaml", "report.md"})
SWEEP_RECORD = "sweep.json"      # the parsed sweep and the command that ran it, under results/X
RUNS_LOG = "runs.jsonl"          # one line per finished run, under results/X
RUN_LOG = "run.log"              # the child's stdout + stderr, in its run directory (kept only when it fails)
STDERR_TAIL_CHARS = 3000
# A sweep's runs report no progress bar into their log files; an override in the sweep file can turn it back on.
RUN_DEFAULTS = ("logging.progress_bar=false",)


@dataclass
class FigureSpec:
    """One plot and its table: `y` (a metrics.jsonl key, e.g. eval/score) against `x` ("step" or another key)."""
    name: str = ""
    y: str = ""
    x: str = "step"
    arms: list[str] = field(default_factory=list)   # empty: every arm
    title: str = ""
    # A level of y: the table also gives, per arm, the x at which each seed's y first reaches it (linear between
    # logged points), e.g. the student compute to reach a score; seeds that never reach it are counted apart.
    reach: Optional[float] = None


@dataclass
class SweepConfig:
    """A sweep file: the base run config, shared overrides, arms, seeds, figures."""
    name: str = ""
    base: str = ""                                      # a run config, relative to the repository or the sweep file
    overrides: list[str] = field(default_factory=list)  # dotted key=value, every arm
    arms: dict[str, list[str]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)      # each applied as run.seed=<s>
    figures: list[FigureSpec] = field(default_factory=list)


@dataclass(frozen=True)
class SweepRun:
    """One (arm, seed): its run directory and the overrides it trains with (after the base config)."""
    arm: str
    seed: int
    run_dir: Path
    overrides: tuple[str, ...]       # shared + arm + run.seed; the run directory keys are added at launch

    @property
    def label(self) -> str:
        return f"{self.arm}/seed{self.seed}"


@dataclass
class SweepOutcome:
    launched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)   # "arm/seedS (rc N)"


# ---------------------------------------------------------------------------------------------------------------
# The sweep file
# ---------------------------------------------------------------------------------------------------------------

def load_sweep(path: str | Path) -> SweepConfig:
    """The typed sweep of a YAML file; an unknown key or a bad value is a ConfigError naming the key and the file."""
    try:
        sweep = parse_sweep(read_yaml(path))
    except ConfigError as exc:
        raise ConfigError(f"sweep file {str(path)!r}: {exc}") from exc
    return sweep


def parse_sweep(raw: dict) -> SweepConfig:
    sweep = build_dataclass(SweepConfig, raw, "")
    if not sweep.name or "/" in sweep.name:
        raise ConfigError(f"name: expected a non-empty name without '/', got {sweep.name!r}")
    if not sweep.base:
        raise ConfigError("base: expected the path of a run config, got nothing")
    if not sweep.arms:
        raise ConfigError("arms: expected a mapping of arm name -> list of dotted overrides, got none")
    for arm in sweep.arms:
        if not arm or "/" in arm or arm.startswith("."):
            raise ConfigError(f"arms: an arm name must be a non-empty directory name, got {arm!r}")
    if not sweep.seeds or len(set(sweep.seeds)) != len(sweep.seeds):
        raise ConfigError(f"seeds: expected a non-empty list of distinct integers, got {sweep.seeds!r}")
    names = [figure.name for figure in sweep.figures]
    for i, figure in enumerate(sweep.figures):
        if not figure.name or "/" in figure.name or names.count(figure.name) > 1:
            raise ConfigError(f"figures[{i}].name: expected a unique file name, got {figure.name!r}")
        if not figure.y:
            raise ConfigError(f"figures[{i}].y: expected a metrics.jsonl key such as eval/score, got nothing")
        unknown = [arm for arm in figure.arms if arm not in sweep.arms]
        if unknown:
            raise ConfigError(f"figures[{i}].arms: {unknown} are not arms of the sweep ({sorted(sweep.arms)})")
    return sweep


def resolve_base(base: str, sweep_path: Optional[Path]) -> Path:
    """The base run config: beside the sweep file first, then under the repository root."""
    candidates = ([sweep_path.parent / base] if sweep_path is not None else []) + [REPO_ROOT / base, Path(base)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"base: run config {base!r} not found beside the sweep file or under {REPO_ROOT}")


def plan_runs(sweep: SweepConfig, base: Path, results: Path, only: Optional[list[str]] = None) -> list[SweepRun]:
    """Every (arm, seed) of the sweep (arms in file order, seeds in file order), each run config loaded and
    validated now, so a bad override fails before any run starts, naming its arm."""
    if only:
        unknown = [arm for arm in only if arm not in sweep.arms]
        if unknown:
            raise ConfigError(f"--only: {unknown} are not arms of the sweep ({sorted(sweep.arms)})")
    runs = []
    for arm, arm_overrides in sweep.arms.items():
        if only and arm not in only:
            continue
        for seed in sweep.seeds:
            run = SweepRun(arm, seed, results / arm / f"seed{seed}",
                           tuple([*sweep.overrides, *arm_overrides, f"run.seed={seed}"]))
            try:
                load_config(base, _launch_overrides(run))
            except ConfigError as exc:
                raise ConfigError(f"arm {arm!r} (seed {seed}): {exc}") from exc
            runs.append(run)
    return runs


def _launch_overrides(run: SweepRun) -> list[str]:
    # Relative to the repository root (the run's cwd) where the results lie under it: the config.yaml kept with the
    # results then reads the same on every machine.
    return [*RUN_DEFAULTS, *run.overrides, f"run.output_dir={_shown(run.run_dir.parent)}",
            f"run.name={run.run_dir.name}"]


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------

def sweep_command(sweep_path: str | Path, results: str | Path, only: Optional[list[str]] = None) -> str:
    """The command line that makes (or resumes) a sweep's data, as a user types it from the repository root."""
    only_args = "".join(f" --only {arm}" for arm in only or [])
    return f"opd-megatron sweep --config {_shown(sweep_path)} --results {_shown(results)}{only_args}"


def _shown(path: str | Path) -> str:
    """A path relative to the repository root where it lies under it (results kept in the repository read the
    same on every machine), else as given."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(path)


def run_sweep(sweep_path: str | Path, results: Optional[str | Path] = None, only: Optional[list[str]] = None,
              dry: bool = False, keep_checkpoints: bool = False,
              log: Callable[[str], None] = print) -> SweepOutcome:
    """Run (or resume) every run of the sweep, one after another; `dry`: validate and list them only."""
    sweep_path = Path(sweep_path)
    sweep = load_sweep(sweep_path)
    base = resolve_base(sweep.base, sweep_path)
    results = Path(results if results is not None else Path("results") / sweep.name).resolve()
    runs = plan_runs(sweep, base, results, only)
    outcome = SweepOutcome()
    if dry:
        for run in runs:
            state = "done" if (run.run_dir / "summary.json").is_file() else "to run"
            log(f"[sweep] {run.label} ({state}): {' '.join(_train_command(base, run))}")
        return outcome
    results.mkdir(parents=True, exist_ok=True)
    record = {"command": sweep_command(sweep_path, results, None), "sweep_file": _shown(sweep_path),
              "base": _shown(base), "sweep": dataclasses.asdict(sweep)}
    (results / SWEEP_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    for i, run in enumerate(runs, 1):
        if (run.run_dir / "summary.json").is_file():
            outcome.skipped.append(run.label)
            log(f"[sweep] {i}/{len(runs)} {run.label}: done before, skipped")
            continue
        outcome.launched.append(run.label)
        line = _launch(base, run)
        with (results / RUNS_LOG).open("a") as out:
            out.write(json.dumps(line) + "\n")
        if line["rc"] != 0:
            outcome.failed.append(f"{run.label} (rc {line['rc']})")
            log(f"[sweep] {i}/{len(runs)} {run.label}: FAILED rc {line['rc']}, log {run.run_dir / RUN_LOG}")
            continue
        if not keep_checkpoints:
            _prune(run.run_dir)
        log(f"[sweep] {i}/{len(runs)} {run.label}: {line['wall_s']:.1f} s wall, {line['cpu_s']:.1f} s CPU")
    return outcome


def _train_command(base: Path, run: SweepRun) -> list[str]:
    return [sys.executable, "-m", "opd_megatron", "train", "--config", str(base), *_launch_overrides(run)]


def _launch(base: Path, run: SweepRun) -> dict:
    """One run in its own process (its state cannot leak into the next run); its runs.jsonl line."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run.run_dir / RUN_LOG
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with log_path.open("a") as log_file:
        # cwd: the repository root, where a base config's relative data paths (configs/data/...) point.
        rc = subprocess.run(_train_command(base, run), cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL).returncode
    wall_s = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    line = {"arm": run.arm, "seed": run.seed, "overrides": list(run.overrides), "wall_s": round(wall_s, 3),
            "cpu_s": round(cpu_s, 3), "rc": rc}
    if rc != 0:
        line["stderr_tail"] = log_path.read_text(errors="replace")[-STDERR_TAIL_CHARS:]
    return line


def _prune(run_dir: Path) -> None:
    """Everything of a finished run but KEPT_FILES (checkpoints, TensorBoard, plots, the log); metrics.jsonl
    gzipped (no name or time in its header: the same records give the same bytes)."""
    compress_metrics(run_dir)
    for path in run_dir.iterdir():
        if path.name in KEPT_FILES:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def compress_metrics(run_dir: Path) -> None:
    """`run_dir/metrics.jsonl` -> `metrics.jsonl.gz` (written whole, then the plain file removed)."""
    plain = run_dir / "metrics.jsonl"
    if not plain.is_file():
        return
    packed = run_dir / "metrics.jsonl.gz.tmp"
    with packed.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as out:
        out.write(plain.read_bytes())
    packed.replace(run_dir / "metrics.jsonl.gz")
    plain.unlink()


# ---------------------------------------------------------------------------------------------------------------
# The report: from the files under results/X alone
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class ArmRow:
    """One arm's line of a figure's table: the final value of y per seed, and the arm's CPU seconds."""
    arm: str
    finals: dict[int, float]          # seed -> the last logged value of y
    cpu_s: float
    reached: dict[int, Optional[float]] = field(default_factory=dict)   # seed -> x where y first reaches the level

    @property
    def mean(self) -> float:
        return statistics.fmean(self.finals.values()) if self.finals else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (ddof 1; 0 with one seed)."""
        return statistics.stdev(self.finals.values()) if len(self.finals) > 1 else 0.0


CUMULATIVE = "cumulative/"      # x: "cumulative/<key>": the running sum over steps of a per-step key


def with_running_sum(records: list[dict], key: str) -> list[dict]:
    """`records` with `cumulative/<key>` on each: the sum of `key` over the steps up to and including its own
    (a step logged twice, by a resumed run, counted once with its last value); a record before the first step
    (the evaluation before training) gets 0. E.g. x: cumulative/compute/student_flops, the student compute so far."""
    per_step: dict[int, float] = {}
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and isinstance(record.get("step"), int):
            per_step[record["step"]] = float(value)
    running, total = {}, 0.0
    for step in sorted(per_step):
        total += per_step[step]
        running[step] = total
    steps = sorted(running)
    out = []
    for record in records:
        step = record.get("step")
        if isinstance(step, int):
            done = bisect.bisect_right(steps, step)          # steps logged up to this record's step
            record = {**record, CUMULATIVE + key: running[steps[done - 1]] if done else 0.0}
        out.append(record)
    return out


def series(records: list[dict], x: str, y: str) -> list[tuple[float, float]]:
    """(x, y) of every record holding both as numbers, sorted by x; a repeated x (a resumed run appends to
    metrics.jsonl) keeps its last value. x = `cumulative/<key>`: the running sum of a per-step key
    (`with_running_sum`)."""
    if x.startswith(CUMULATIVE):
        records = with_running_sum(records, x[len(CUMULATIVE):])
    if x != "step":
        # A record without x (the final evaluation, logged apart from its step's metrics) takes the x of its step.
        at_step = {r["step"]: r[x] for r in records if isinstance(r.get(x), (int, float)) and "step" in r}
        records = [r if x in r or r.get("step") not in at_step else {**r, x: at_step[r["step"]]} for r in records]
    points: dict[float, float] = {}
    for record in records:
        xv, yv = record.get(x), record.get(y)
        if isinstance(xv, (int, float)) and isinstance(yv, (int, float)):
            points[float(xv)] = float(yv)
    return sorted(points.items())


def first_reach(points: list[tuple[float, float]], level: float) -> Optional[float]:
    """The x at which y first reaches `level` (>=) along `points` sorted by x, linear between consecutive points
    (the first point's x if it starts there); None if it never does."""
    previous = None
    for x, y in points:
        if y >= level:
            if previous is None:
                return x
            x0, y0 = previous
            return x0 + (level - y0) / (y - y0) * (x - x0)
        previous = (x, y)
    return None


def _finished_seeds(results: Path, arm: str) -> list[int]:
    arm_dir = results / arm
    if not arm_dir.is_dir():
        return []
    seeds = []
    for run_dir in arm_dir.iterdir():
        number = run_dir.name[len("seed"):]
        if run_dir.name.startswith("seed") and number.lstrip("-").isdigit() and (run_dir / "summary.json").is_file():
            seeds.append(int(number))
    return sorted(seeds)


def _cpu_by_arm(results: Path) -> dict[str, float]:
    """CPU seconds per arm, summed over every attempt in runs.jsonl (a failed or resumed attempt cost CPU too)."""
    totals: dict[str, float] = {}
    path = results / RUNS_LOG
    for text in (path.read_text().splitlines() if path.is_file() else []):
        if text.strip():
            line = json.loads(text)
            totals[line["arm"]] = totals.get(line["arm"], 0.0) + float(line["cpu_s"])
    return totals


def figure_rows(results: Path, figure: FigureSpec, arms: list[str]) -> list[ArmRow]:
    cpu = _cpu_by_arm(results)
    rows = []
    for arm in sorted(figure.arms or arms):
        finals, reached = {}, {}
        for seed in _finished_seeds(results, arm):
            points = series(read_metrics(results / arm / f"seed{seed}"), figure.x, figure.y)
            if points:
                finals[seed] = points[-1][1]
                if figure.reach is not None:
                    reached[seed] = first_reach(points, figure.reach)
        rows.append(ArmRow(arm, finals, cpu.get(arm, 0.0), reached))
    return rows


def _plot(results: Path, figure: FigureSpec, arms: list[str], png: Path) -> None:
    """Mean over seeds as a line, min..max over seeds as a band, on the x values every seed covers (each seed
    interpolated linearly onto the union of their x values in that common range)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for arm in sorted(figure.arms or arms):
        per_seed = [series(read_metrics(results / arm / f"seed{seed}"), figure.x, figure.y)
                    for seed in _finished_seeds(results, arm)]
        per_seed = [points for points in per_seed if points]
        if not per_seed:
            continue
        low = max(points[0][0] for points in per_seed)
        high = min(points[-1][0] for points in per_seed)
        grid = np.array(sorted({x for points in per_seed for x, _ in points if low <= x <= high}))
        if grid.size == 0:
            continue
        values = np.stack([np.interp(grid, [x for x, _ in points], [y for _, y in points]) for points in per_seed])
        colour = colours(sorted(arms).index(arm) % 10)
        ax.plot(grid, values.mean(axis=0), color=colour, label=f"{arm} (n={len(per_seed)})", marker="." if
                grid.size < 20 else None)
        ax.fill_between(grid, values.min(axis=0), values.max(axis=0), color=colour, alpha=0.2, linewidth=0)
    ax.set_xlabel(figure.x)
    ax.set_ylabel(figure.y)
    ax.set_title(figure.title or figure.name)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    # No software/date metadata: the same results give the same bytes.
    fig.savefig(png, metadata={"Software": None})
    plt.close(fig)


def _number(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4g}"


def render_report(results: str | Path, out: Optional[str | Path] = None) -> Path:
    """Write the markdown page (default results/X/results.md) and one PNG per figure beside it, from the files
    under `results` alone; return the page's path."""
    results = Path(results)
    record_path = results / SWEEP_RECORD
    if not record_path.is_file():
        raise FileNotFoundError(f"{record_path} not found: is {results} the --results directory of a sweep?")
    record = json.loads(record_path.read_text())
    sweep = parse_sweep(record["sweep"])
    arms = sorted(sweep.arms)
    out = Path(out) if out is not None else results / "results.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    cpu = _cpu_by_arm(results)
    lines = [f"# Sweep `{sweep.name}`", "",
             f"Base run config `{record['base']}`, seeds {sorted(sweep.seeds)}, arms {', '.join(arms)}. Data made "
             f"by `{record['command']}` ({_number(sum(cpu.values()))} s CPU summed over its runs); this page by "
             f"`opd-megatron sweep-report --results {_shown(results)}` from the files under `{_shown(results)}` "
             f"alone.", ""]
    for arm in arms:
        lines.append(f"- `{arm}`: {' '.join(sweep.arms[arm]) or '(the base config)'}")
    lines.append("")
    for figure in sweep.figures:
        figure_arms = sorted(figure.arms or arms)
        rows = figure_rows(results, figure, arms)
        png = out.parent / f"{out.stem}-{figure.name}.png"
        _plot(results, figure, arms, png)
        command = sweep_command(record["sweep_file"], _shown(results), figure_arms if figure.arms else None)
        reach = figure.reach is not None
        lines += [f"## {figure.title or figure.name}", "",
                  f"Final `{figure.y}` (the last logged value of each run) per arm: mean and sample standard "
                  f"deviation (ddof 1) over seeds." + (f" `{figure.x}` at which `{figure.y}` first reaches "
                                                       f"{_number(figure.reach)} (linear between logged points): "
                                                       f"mean ± std over the seeds that reach it." if reach else ""),
                  "", f"| arm | final {figure.y} (mean ± std) | seeds | CPU time (s) |"
                  + (f" {figure.x} to reach {_number(figure.reach)} | seeds reaching it |" if reach else ""),
                  "|---|---|---|---|" + ("---|---|" if reach else "")]
        for row in rows:
            line = (f"| {row.arm} | {_number(row.mean)} ± {_number(row.std)} | {len(row.finals)} | "
                    f"{_number(row.cpu_s)} |")
            if reach:
                hits = [x for x in row.reached.values() if x is not None]
                spread = _number(statistics.stdev(hits)) if len(hits) > 1 else "0"
                line += (f" {_number(statistics.fmean(hits))} ± {spread} |" if hits else " not reached |")
                line += f" {len(hits)} of {len(row.reached)} |"
            lines.append(line)
        lines += ["", f"![{figure.name}]({png.name})", "",
                  f"Line: the mean over seeds; band: min..max over seeds; x = `{figure.x}`. Data: `{command}` "
                  f"({_number(sum(row.cpu_s for row in rows))} s CPU summed over its runs).", ""]
    lines += stability_lines(results, arms)
    out.write_text("\n".join(lines))
    return out


SPIKE_FACTOR = 10.0      # a grad-norm spike: a step's gradient norm above this multiple of its run's median


def stability_lines(results: Path, arms: list[str]) -> list[str]:
    """The stability table of a report: per arm, over its finished seeds, the steps skipped for a non-finite loss
    or gradient (`step_skipped`), the largest gradient norm, and the grad-norm spikes (steps above SPIKE_FACTOR x
    the run's median gradient norm); empty when no run logged `grad_norm`."""
    rows = []
    for arm in arms:
        skipped, spikes, largest, runs = 0, 0, 0.0, 0
        for seed in _finished_seeds(results, arm):
            records = read_metrics(results / arm / f"seed{seed}")
            norms = [r["grad_norm"] for r in records if isinstance(r.get("grad_norm"), (int, float))
                     and math.isfinite(r["grad_norm"])]
            skipped += sum(1 for r in records if r.get("step_skipped") == 1.0)
            if norms:
                runs += 1
                median = statistics.median(norms)
                spikes += sum(1 for n in norms if n > SPIKE_FACTOR * median)
                largest = max(largest, max(norms))
        if runs:
            rows.append(f"| {arm} | {runs} | {skipped} | {_number(largest)} | {spikes} |")
    if not rows:
        return []
    return ["## Stability", "",
            f"Over each arm's finished runs: steps skipped for a non-finite loss or gradient (`step_skipped`), the "
            f"largest gradient norm (before clipping), and the steps whose gradient norm exceeds "
            f"{_number(SPIKE_FACTOR)}x its run's median.", "",
            "| arm | runs | skipped steps | largest grad norm | grad-norm spikes |", "|---|---|---|---|---|",
            *rows, ""]
