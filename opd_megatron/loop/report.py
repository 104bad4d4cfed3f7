"""What every OPD run leaves beside its metrics: PNG plots and `report.md`, the survey's reporting checklist
(docs/opd-math.md, "Reporting checklist") filled from the resolved config, the vocabulary check and the
summary. The report states what was measured and nothing more: it never claims OPD beat SFT (no same-compute
SFT comparison runs inside an OPD run)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from opd_megatron.config import RunConfig
from opd_megatron.loop.metrics import read_metrics

PLOTS = {
    "score.png": ("held-out verifier score (greedy)", ["eval/score"]),
    "reverse_kl.png": ("per-token reverse KL to the teacher", ["eval/rkl", "kl/rkl_exact", "kl/k1"]),
    "log_ratio_quantiles.png": ("log-ratio r_t quantiles", ["log_ratio/q05", "log_ratio/q25", "log_ratio/q50",
                                                            "log_ratio/q75", "log_ratio/q95"]),
    "gate_keep_rates.png": ("gate keep rates", None),   # every gates/*_keep_rate key
}


def write_plots(run_dir: Path, records: list[dict]) -> list[str]:
    """One PNG per entry of PLOTS with at least one logged point; returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, (title, keys) in PLOTS.items():
        if keys is None:
            keys = sorted({k for r in records for k in r if k.startswith("gates/") and k.endswith("_keep_rate")})
        series = {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        for key, points in series.items():
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 12 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(run_dir / name)
        plt.close(fig)
        written.append(name)
    return written


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _time_split(summary: dict) -> list[tuple[str, float]]:
    """(part, seconds) of summary.json's `time_split_s`: rollout, teacher (a served teacher's answers, or a dense
    teacher's forwards inside the loss) and update."""
    return [(key.removesuffix("_s"), value) for key, value in summary.get("time_split_s", {}).items()]


def eval_prompt_origin(cfg: RunConfig) -> str:
    """Where the run's evaluation prompts came from (the split rule is rollout/prompts.py's)."""
    e, r = cfg.eval, cfg.rollout
    if r.source == "task":
        return f"{e.prompts} prompts of task {r.task}'s eval split, disjoint from its training split"
    if e.path:
        return (f"the first {e.prompts} prompts of eval.path {e.path}; rollout.path {r.path} records with the same "
                f"text are not trained on")
    return (f"{e.prompts} records held out of rollout.path {r.path} (those with the smallest SHA-256 of their "
            f"prompt text; training never samples them or their duplicates)")


def write_report(cfg: RunConfig, run_dir: Path, summary: dict, compat, plots: list[str]) -> None:
    o, r, t = cfg.opd, cfg.rollout, cfg.teacher
    a, c, pg, cr = o.route_a, o.credit, o.policy_gradient, o.cr_opd
    if o.loss == "divergence":
        loss = f"route A: {a.divergence}" + (f" (beta {a.jsd_beta})" if a.divergence == "jsd" else "") + \
            (f" (alpha {a.skew_alpha})" if a.divergence.startswith("skew") else "")
        support = "full vocabulary" if a.support == "full" else f"{a.support} k={a.support_k} ({a.support_mode})"
        credit = "n/a (distributional loss at visited states)"
    else:
        loss = "route B: policy gradient on r_t" if o.loss == "policy_gradient" else \
            "route B with CR-OPD routing of negative advantages"
        routing = ""
        if o.loss == "cr_opd":
            routing = (f"; routing {cr.teacher_support}/{cr.student_reach}, weights {cr.weights}, "
                       f"form {cr.form}" + (f", eta {cr.eta}" if cr.form == "kl_target" else ""))
        support = "sampled token" + routing
        credit = f"{c.estimator}, gamma {c.gamma}" + (f", lambda {c.gae_lambda}" if c.estimator == "gae" else "") + \
            (f", baseline {c.baseline}" if c.baseline else "") + f", ratio {pg.ratio}" + \
            (f" (clip {pg.clip_eps_low}/{pg.clip_eps_high})" if pg.ratio == "ppo" else "")
    gates = {k: v for k, v in vars(o.gates).items() if v is not None and k not in ("student_entropy_keep",
                                                                                    "log_ratio_clip_mode")}
    teacher_model = f"{t.kind} {summary.get('teacher')}"
    student_model = (f"megatron GPTModel {cfg.model.num_layers} layers x {cfg.model.hidden_size} hidden, vocabulary "
                     f"{cfg.model.vocab_size}")
    lines = [
        f"# OPD run `{cfg.run.name}`", "",
        "## Result", "",
        "| | value |", "|---|---|",
        f"| teacher score | {_fmt(summary.get('teacher_score'))} |",
        f"| student score before | {_fmt(summary.get('student_score_before'))} |",
        f"| student score after | {_fmt(summary.get('student_score_after'))} |",
        f"| per-token reverse KL before | {_fmt(summary.get('rkl_before'))} |",
        f"| per-token reverse KL after | {_fmt(summary.get('rkl_after'))} |",
        f"| steps | {summary.get('steps')} (skipped for non-finite values: {summary.get('skipped_steps')}) |",
        f"| wall time | {summary.get('wall_s')} s; of the training steps: "
        f"{', '.join(f'{k} {v} s' for k, v in _time_split(summary))} |", "",
        f"Evaluation prompts: {eval_prompt_origin(cfg)}. Scores (task runs) are the task verifier's exact-match "
        "accuracy of greedy decoding on them; the reverse KL is per response token on the student's own "
        "temperature-1 samples (exact over the vocabulary with a dense teacher, the sampled k1 estimate with a "
        "served one).", "",
        "What this run shows: how far on-policy distillation moved the student toward the teacher under these "
        "settings. It does not show that OPD beats SFT or any other method: no same-compute comparison ran here.",
        "",
        "## Reporting checklist", "",
        f"- teacher: {teacher_model}, temperature {t.temperature}; student: {student_model}",
        f"- tokenizers and chat templates: {'; '.join(compat.lines()) if compat is not None else 'not checked'}",
        f"- loss: {loss}, coefficient {o.kl_coef}, normaliser {o.normalizer}, student temperature "
        f"{o.student_temperature}",
        f"- support: {support}",
        f"- credit estimator: {credit}",
        f"- gates and clips: {gates or 'none'}",
        f"- regularisers: entropy bonus {o.regularizers.entropy_coef}, reference KL "
        f"{o.regularizers.reference_kl_coef} (estimator {o.regularizers.reference_kl_estimator})",
        f"- outcome hybrid: alpha {c.outcome_alpha}, beta {c.outcome_beta}",
        f"- on-policy fraction: {o.mixtures.on_policy_fraction}; teacher overlap (staleness bound 1): {t.overlap}",
        f"- sampling: temperature {r.temperature}, top-p {r.top_p}, top-k {r.top_k or 'off'}, max new tokens "
        f"{r.max_new_tokens}",
        f"- samples per prompt: {r.samples_per_prompt}; prompts per step: {r.prompts_per_step}; source: "
        f"{r.task if r.source == 'task' else r.path}",
        f"- parallel layout: tp {summary['layout']['tp']}, pp {summary['layout']['pp']}, dp {summary['layout']['dp']}",
        f"- teacher tokens scored: {summary.get('teacher_tokens_scored')} (training steps and evaluations)",
        f"- wall time: {summary.get('wall_s')} s",
        f"- optimizer: {cfg.optim.optimizer} lr {cfg.optim.lr} ({cfg.optim.decay_style}, warmup "
        f"{cfg.optim.warmup_steps}), clip {cfg.optim.clip_grad}", "",
    ]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["Every step's diagnostics are in `metrics.jsonl` and `tensorboard/`; the resolved config in "
              "`config.yaml`.", ""]
    (run_dir / "report.md").write_text("\n".join(lines))


def write_run_outputs(cfg: RunConfig, run_dir: Path, summary: dict, compat: Optional[object]) -> None:
    plots = write_plots(run_dir, read_metrics(run_dir))
    write_report(cfg, run_dir, summary, compat, plots)
