"""report.md says where the evaluation prompts came from: the task's eval split, eval.path, or records held out of
rollout.path, never a blanket "held-out"."""

import pytest

from opd_megatron.config import RunConfig
from opd_megatron.loop.report import write_report

SUMMARY = {"layout": {"tp": 1, "pp": 1, "dp": 1}, "steps": 2, "skipped_steps": 0}


def _report(tmp_path, **sections) -> str:
    cfg = RunConfig()
    cfg.run.algorithm = "opd"
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    write_report(cfg, tmp_path, SUMMARY, None, [])
    return (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("case", ["task", "eval_path", "held_out"])
def test_report_names_the_origin_of_the_eval_prompts(tmp_path, case):
    jsonl = {"source": "jsonl", "path": "/data/prompts.jsonl"}
    sections, sentence = {
        "task": ({"rollout": {"source": "task", "task": "add"}, "eval": {"prompts": 50}},
                 "Evaluation prompts: 50 prompts of task add's eval split, disjoint from its training split."),
        "eval_path": ({"rollout": jsonl, "eval": {"prompts": 30, "path": "/data/eval.jsonl"}},
                      "Evaluation prompts: the first 30 prompts of eval.path /data/eval.jsonl; rollout.path "
                      "/data/prompts.jsonl records with the same text are not trained on."),
        "held_out": ({"rollout": jsonl, "eval": {"prompts": 20}},
                     "Evaluation prompts: 20 records held out of rollout.path /data/prompts.jsonl (those with the "
                     "smallest SHA-256 of their prompt text; training never samples them or their duplicates)."),
    }[case]
    report = _report(tmp_path, **sections)
    assert sentence in report
    assert "held-out prompts" not in report


def test_report_checklist_names_every_regulariser(tmp_path):
    """The reporting checklist lists each regulariser with its coefficient (and the reference KL's estimator): a
    run with a reference-KL term must not read as one with the entropy bonus alone."""
    cfg = RunConfig()
    cfg.run.algorithm = "opd"
    cfg.opd.regularizers.entropy_coef = 0.01
    cfg.opd.regularizers.reference_kl_coef = 0.05
    cfg.opd.regularizers.reference_kl_estimator = "k2"
    write_report(cfg, tmp_path, SUMMARY, None, [])
    report = (tmp_path / "report.md").read_text()
    assert "- regularisers: entropy bonus 0.01, reference KL 0.05 (estimator k2)" in report


def test_report_splits_the_steps_time_and_counts_the_teachers_tokens(tmp_path):
    """The wall time's split names its parts in seconds, and the teacher's scored tokens are counted whatever its
    kind (a colocated teacher scores inside the loss)."""
    summary = {**SUMMARY, "wall_s": 10.0, "time_split_s": {"rollout_s": 1.5, "teacher_s": 2.0, "update_s": 3.25},
               "teacher_tokens_scored": 640}
    cfg = RunConfig()
    cfg.run.algorithm = "opd"
    write_report(cfg, tmp_path, summary, None, [])
    report = (tmp_path / "report.md").read_text()
    assert "| wall time | 10.0 s; of the training steps: rollout 1.5 s, teacher 2.0 s, update 3.25 s |" in report
    assert "- teacher tokens scored: 640 (training steps and evaluations)" in report
