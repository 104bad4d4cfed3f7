"""The OPD loop as a user runs it (real processes, real files, signals): a quickstart-sized run whose held-out
score rises; exact resume after SIGTERM, and bit-exact resume of the stateful parts (teacher.overlap's pending
batch, GAE's value head, an EMA self-teacher, a served teacher) at DP=2 / PP=2 / TP=2; the run's outputs; bad
inputs that must fail clearly before a step runs; NaN teacher logits that skip steps (counted) or stop the run, as
opd.nonfinite says, never saving."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "quickstart.yaml")
# The quickstart shrunk: 4-digit sorting, a 2 x 64 teacher (150 SFT steps), a 15-step warm-up, 30 OPD steps.
SMALL = ["rollout.task_options.length=4", "rollout.max_new_tokens=5", "rollout.prompts_per_step=32",
         "parallel.global_batch_size=128", "parallel.micro_batch_size=128", "run.train_steps=30",
         "eval.prompts=100", "eval.interval=10", "quickstart.teacher_steps=150", "quickstart.teacher_lr=3e-3",
         "quickstart.teacher_batch_size=64", "quickstart.train_examples=4000", "quickstart.warmup_steps=15",
         "quickstart.warmup_lr=3e-3", "quickstart.warmup_batch_size=32", "teacher.colocated.model.num_layers=2",
         "teacher.colocated.model.hidden_size=64", "teacher.colocated.model.ffn_hidden_size=256", "optim.lr=3e-3",
         "logging.progress_bar=false", "logging.tensorboard=false"]


def _env():
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(args, timeout=600):
    return subprocess.run([sys.executable, "-m", "opd_megatron", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    root = tmp_path_factory.mktemp("opd_loop")
    run_dir = root / "quick"
    started = time.perf_counter()
    result = _run(["quickstart", "--run-dir", str(run_dir), f"quickstart.teacher_cache={root / 'cache'}", *SMALL])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    teacher = next((root / "cache").glob("*/teacher/checkpoints"))
    warm = run_dir / "warmup" / "student_warmup" / "checkpoints"
    return {"root": root, "run_dir": run_dir, "stdout": result.stdout, "teacher": teacher, "warm": warm,
            "wall_s": time.perf_counter() - started}


def test_quickstart_sized_run_score_rises(quickstart):
    summary = json.loads((quickstart["run_dir"] / "summary.json").read_text())
    assert summary["teacher_score"] >= 0.9, summary
    assert summary["student_score_after"] >= summary["student_score_before"] + 0.1, summary
    assert summary["rkl_after"] < 0.8 * summary["rkl_before"], summary
    assert summary["steps"] == 30 and summary["skipped_steps"] == 0
    assert "held-out accuracy: teacher" in quickstart["stdout"]


def test_run_outputs(quickstart):
    run_dir = quickstart["run_dir"]
    metrics = _metrics(run_dir)
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 31))
    first = steps[0]
    for key in ("loss", "log_ratio/mean", "log_ratio/q05", "log_ratio/q95", "kl/k1", "kl/k3", "kl/rkl_exact",
                "entropy/student", "entropy/teacher", "agreement/teacher_top1_match", "agreement/topk_overlap",
                "gates/all_keep_rate", "rollout/staleness_mean", "rollout/response_length_mean", "reward/mean",
                "time/step/rollout_s", "time/step/update_s", "time/cumulative/teacher_s", "tokens_per_s"):
        assert key in first, key
    assert [m["step"] for m in metrics if "eval/score" in m] == [0, 10, 20, 30]
    for name in ("score.png", "reverse_kl.png", "log_ratio_quantiles.png", "report.md", "config.yaml"):
        assert (run_dir / name).is_file(), name
    report = (run_dir / "report.md").read_text()
    assert "does not show that OPD beats SFT" in report and "Reporting checklist" in report
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("teacher_score", "student_score_before", "student_score_after", "rkl_before", "rkl_after",
                "steps", "wall_s"):
        assert summary[key] is not None, key


def _train_args(quickstart, out: Path, *extra):
    return ["train", "--config", CONFIG, *SMALL, f"run.output_dir={out}", "run.name=run", "eval.interval=0",
            "eval.prompts=20", f"teacher.colocated.path={quickstart['teacher']}",
            f"checkpoint.load={quickstart['warm']}", "run.train_steps=6", *extra]


def test_sigterm_saves_and_resume_repeats_the_uninterrupted_losses(quickstart, tmp_path):
    full = _run(_train_args(quickstart, tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-4000:]
    reference = [m["loss"] for m in _metrics(tmp_path / "full" / "run") if "loss" in m]
    assert len(reference) == 6

    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "opd_megatron", *_train_args(quickstart, out)], cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not any("loss" in m and m["step"] >= 2 for m in _metrics(out / "run")):
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-4000:]
    assert "received signal 15" in stdout + stderr
    stopped_at = max(m["step"] for m in _metrics(out / "run") if "loss" in m)
    assert 2 <= stopped_at < 6
    assert (out / "run" / "checkpoints" / f"iter_{stopped_at:07d}").is_dir()

    resumed = _run(_train_args(quickstart, out))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from" in resumed.stdout
    losses = [m["loss"] for m in _metrics(out / "run") if "loss" in m]
    assert losses == reference, (losses, reference)


def test_malformed_prompt_file_names_the_line(quickstart, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1234="}\n{"prompt": 5}\n')
    result = _run(_train_args(quickstart, tmp_path, "rollout.source=jsonl", f"rollout.path={prompts}"))
    assert result.returncode != 0
    assert f"{prompts}, line 2" in result.stderr and "non-empty string 'prompt'" in result.stderr


def test_prompt_longer_than_the_context_is_refused(quickstart, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "1" * 40 + "="}) + "\n")
    result = _run(_train_args(quickstart, tmp_path, "rollout.source=jsonl", f"rollout.path={prompts}"))
    assert result.returncode != 0
    assert "line 1: the prompt is 42 tokens" in result.stderr


def test_teacher_with_another_vocabulary_is_refused_before_a_step(quickstart, tmp_path):
    result = _run(_train_args(quickstart, tmp_path, "teacher.colocated.model.vocab_size=20"))
    assert result.returncode != 0
    assert "teacher.colocated.model.vocab_size=20 differs from model.vocab_size=14" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _nan_teacher(quickstart, tmp_path) -> Path:
    """The teacher with one output-layer row of NaN: its logits are NaN on every position (the teacher and the
    student have the same shape in SMALL, so the student's model section builds it)."""
    from tests.harness import run_distributed
    from tests.opd import opd_workers
    target = tmp_path / "nan_teacher"
    run_distributed(opd_workers.poison_checkpoint, 1, args=(str(quickstart["teacher"]), str(target), CONFIG, SMALL),
                    timeout_s=120)
    return target


@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_nan_logits_skip_or_stop_and_never_save_a_nan_model(quickstart, tmp_path, mode):
    nan_teacher = _nan_teacher(quickstart, tmp_path)
    args = [a for a in _train_args(quickstart, tmp_path, f"opd.nonfinite={mode}", "opd.max_skipped_steps=2",
                                   "checkpoint.save_interval=1") if not a.startswith("teacher.colocated.path=")]
    result = _run(args + [f"teacher.colocated.path={nan_teacher}", "eval.prompts=4"])
    assert result.returncode == 3, result.stderr[-3000:]
    assert "non-finite" in result.stderr
    skipped = [m for m in _metrics(tmp_path / "run") if "loss" in m]
    saved = sorted((tmp_path / "run" / "checkpoints").glob("iter_*"))
    if mode == "stop":
        assert skipped == [] and saved == []        # stopped at the first step, nothing saved
        return
    assert [m["step_skipped"] for m in skipped] == [1.0, 1.0]
    assert "more than opd.max_skipped_steps=2" in result.stderr
    # The skipped steps were saved (checkpoint.save_interval=1), and hold exactly the finite starting weights.
    assert [p.name for p in saved] == ["iter_0000001", "iter_0000002"]
    from tests.harness import run_distributed
    from tests.opd import opd_workers
    import torch
    weights = run_distributed(opd_workers.weights_of, 1, args=(CONFIG, SMALL, [str(quickstart["warm"])] +
                                                               [str(p) for p in saved]), timeout_s=120)[0]
    for state in weights[1:]:
        for key, value in weights[0].items():
            assert torch.isfinite(state[key]).all() and torch.equal(state[key], value), key


def test_eval_command_reproduces_the_final_evaluation(quickstart):
    run_dir = quickstart["run_dir"]
    result = _run(["eval", "--config", str(run_dir / "config.yaml"), "--checkpoint", str(run_dir / "checkpoints"),
                   "logging.progress_bar=false"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout[result.stdout.index("{"):])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert out["score"] == summary["student_score_after"]
    assert abs(out["rkl"] - summary["rkl_after"]) <= 1e-6 * max(1.0, summary["rkl_after"])
    assert out["teacher_score"] == summary["teacher_score"]
    assert out["checkpoint"].endswith("iter_0000030")


# -- exact resume of the loop's stateful parts ---------------------------------------------------------------------
# N steps straight vs N/2 + stop (as SIGTERM stops: finish the step, save) + resume in fresh processes + N/2: the
# per-step losses and the final checkpoint (weights, Adam moments, schedule position, per-rank loop state) are
# bit-identical. Each case puts a different piece of per-rank state across the cut, at a layout where it is sharded
# or lives on some ranks only.
TOY_VOCAB = 14            # the sort_digits character tokenizer
RESUME_CASES = {
    # The next batch sampled before the update and scored in the background (teacher.overlap): at the cut it is
    # pending, one per data-parallel rank, and must be the first batch after the resume.
    "overlap_served_dp2": (2, ["opd.loss=policy_gradient", "opd.credit.estimator=return_to_go",
                               "opd.policy_gradient.ratio=ppo", "teacher.kind=sglang", "teacher.topk=4",
                               "teacher.overlap=true"]),
    # GAE's value head (its weights and Adam state live on the last pipeline stage only), with a served teacher.
    "gae_served_pp2": (2, ["parallel.pp=2", "opd.loss=policy_gradient", "opd.credit.estimator=gae",
                           "opd.credit.gae_lambda=0.8", "teacher.kind=sglang", "teacher.topk=4"]),
    # An EMA self-teacher: the EMA copy of every TP shard (decay 0.5, so every update moves it visibly).
    "ema_self_tp2": (2, ["parallel.tp=2", "teacher.kind=self", "teacher.self_teacher.mode=ema",
                         "teacher.self_teacher.ema_decay=0.5"]),
}


@pytest.fixture(scope="module")
def toy_sglang():
    """A local server answering in SGLang's /generate format from a toy teacher over the 14-id task vocabulary."""
    from tests.teachers.fake_server import FakeServer, sglang_generate, sglang_routes, toy_logprobs

    def model(ids: list[int]) -> list[list[float]]:
        return [toy_logprobs(ids[: j + 1], TOY_VOCAB) for j in range(len(ids))]
    with FakeServer(sglang_routes(lambda body, headers: sglang_generate(body, model))) as server:
        yield server


def _assert_same_state(where: str, straight: dict, resumed: dict) -> None:
    assert straight["iteration"] == resumed["iteration"], where
    for part in ("weights", "optimizer", "scheduler", "value_head", "self_teacher"):
        a, b = straight[part], resumed[part]
        assert sorted(a) == sorted(b), f"{where}: {part} keys differ: {sorted(set(a) ^ set(b))}"
        for key in a:
            same = torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
            assert same, f"{where}: {part} {key} differs after the resume"


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_repeats_the_uninterrupted_run_exactly(toy_sglang, tmp_path, case):
    from tests.harness import run_distributed
    from tests.opd import resume_workers as rw
    processes, overrides = RESUME_CASES[case]
    overrides = overrides + [f"run.output_dir={tmp_path}",
                             f"teacher.server={{urls: [{toy_sglang.url}], vocab_size: {TOY_VOCAB}, backoff_s: 0.01, "
                             f"timeout_s: 60}}"]
    first = run_distributed(rw.straight_and_cut, processes, args=(overrides + ["run.name=straight"],
                                                                  overrides + ["run.name=cut"]), timeout_s=600)
    resumed = run_distributed(rw.resume, processes, args=(overrides + ["run.name=cut"],), timeout_s=600)
    half = rw.STEPS // 2
    for rank in range(processes):
        straight, cut, again = first[rank]["straight"], first[rank]["cut"], resumed[rank]
        assert cut["stopped"] and cut["final_step"] == half and cut["state"]["iteration"] == half, cut
        assert again["start_step"] == half and again["final_step"] == rw.STEPS, again
        _assert_same_state(f"{case} rank {rank}", straight["state"], again["state"])
    straight_losses = [m["loss"] for m in _metrics(tmp_path / "straight") if "loss" in m]
    logged = [m for m in _metrics(tmp_path / "cut") if "loss" in m]
    assert [m["step"] for m in logged] == list(range(1, rw.STEPS + 1))
    assert [m["loss"] for m in logged] == straight_losses, ([m["loss"] for m in logged], straight_losses)
    assert first[0]["straight"]["losses"] == first[0]["cut"]["losses"] + resumed[0]["losses"]
    # The case really carried its state across the cut.
    at_cut = [first[rank]["cut"]["state"] for rank in range(processes)]
    if case.startswith("overlap"):
        assert all(s["pending_tokens"] is not None for s in at_cut)
        assert [m["rollout/staleness_mean"] for m in logged] == [0.0] + [1.0] * (rw.STEPS - 1)
    if case.startswith("gae"):
        assert at_cut[0]["value_head"] == {} and at_cut[1]["value_head"] != {}   # last stage only
    if case.startswith("ema"):
        assert all(s["self_teacher"].get("/updates") == half for s in at_cut), [s["self_teacher"] for s in at_cut]
