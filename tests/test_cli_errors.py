"""Expected failures end as one line, `opd-megatron <command>: error: <message>`, on every rank, with the traceback
only under OPD_DEBUG=1: here a served teacher that is down (it used to end in a Python traceback)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _args(tmp_path: Path) -> list[str]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["hello", "world", "again"]))
    # Port 9 (discard) on 127.0.0.1: nothing listens there, the connection is refused at once.
    return ["train", f"run.output_dir={tmp_path}", "run.name=down", "run.algorithm=opd", "run.train_steps=2",
            "data.seq_length=32", "model.vocab_size=259", "model.max_position_embeddings=64",
            "parallel.micro_batch_size=2", "parallel.global_batch_size=4", "rollout.source=jsonl",
            f"rollout.path={prompts}", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
            "rollout.max_new_tokens=4", "teacher.kind=vllm", "teacher.topk=4", "opd.route_a.support=teacher_topk",
            "opd.route_a.support_k=4", "eval.prompts=1", "logging.progress_bar=false",
            "teacher.server={urls: [http://127.0.0.1:9], model: down-teacher, vocab_size: 259, max_retries: 1, "
            "backoff_s: 0.01}"]


def _run(args, nproc: int = 1, **env):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc > 1 else [sys.executable])
    full_env = {key: value for key, value in os.environ.items() if key != "OPD_DEBUG"}
    full_env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **env)
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run([*launcher, "-m", "opd_megatron", *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=300)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("opd-megatron train: error: ")]


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "OPD_DEBUG"])
def test_a_teacher_that_is_down_is_one_line(tmp_path, debug):
    result = _run(_args(tmp_path), **({"OPD_DEBUG": "1"} if debug else {}))
    assert result.returncode == 2, result.stderr[-3000:]
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and "http://127.0.0.1:9" in lines[0] and "down-teacher" in lines[0], result.stderr[-3000:]
    assert result.stderr.rstrip().splitlines()[-1] == lines[0]       # the last thing the user reads
    assert ("Traceback" in result.stderr) == debug


def test_every_rank_reports_the_line(tmp_path):
    result = _run([*_args(tmp_path), "parallel.micro_batch_size=1"], nproc=2)
    assert result.returncode != 0
    lines = _error_lines(result.stderr)
    assert len(lines) == 2 and all("http://127.0.0.1:9" in line for line in lines), result.stderr[-3000:]
