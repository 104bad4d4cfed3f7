"""`opd-megatron train` as a user runs it: real processes (one, or two under torchrun), real files, signals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "sft_tiny.yaml")
QUIET = ["logging.progress_bar=false"]


def _env():
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _train_cmd(out: Path, *overrides: str, nproc: int = 1) -> list[str]:
    # --standalone: a local rendezvous on a free port.
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc > 1 else [sys.executable])
    return launcher + ["-m", "opd_megatron", "train", "--config", CONFIG, f"run.output_dir={out}", *QUIET,
                       *overrides]


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _run(cmd, timeout=240):
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_train_at_tp2_under_torchrun_loss_falls(tmp_path):
    result = _run(_train_cmd(tmp_path, "parallel.tp=2", "run.train_steps=40", nproc=2))
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = tmp_path / "sft_tiny"
    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 41))
    first, last = metrics[0]["loss"], sum(m["loss"] for m in metrics[-5:]) / 5
    assert first > 5.0 and last < 0.3 * first, (first, last)   # ~log(259) at start
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "time/step/wall_s", "time/cumulative/wall_s"} <= set(metrics[0])
    assert metrics[1]["time/cumulative/wall_s"] == pytest.approx(sum(m["time/step/wall_s"] for m in metrics[:2]))
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert "tp: 2" in (run_dir / "config.yaml").read_text()
    assert (run_dir / "checkpoints" / "iter_0000040" / "metadata.json").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["layout"] == {"tp": 2, "pp": 1, "dp": 1} and summary["final_step"] == 40


def test_world_size_that_does_not_fit_the_layout_fails_before_building(tmp_path):
    result = _run(_train_cmd(tmp_path, "parallel.pp=4", nproc=2))
    assert result.returncode != 0
    assert "world size 2 is not a multiple of parallel.tp x parallel.pp = 1 x 4" in result.stderr
    assert not (tmp_path / "sft_tiny").exists()  # nothing was built or written


def test_malformed_dataset_line_is_named(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "12=", "response": "12"}\n{"prompt": "3=", "respons": "3"}\n')
    result = _run(_train_cmd(tmp_path, f"data.path={data}"))
    assert result.returncode == 2
    assert f"{data}:2" in result.stderr or f"{data}, line 2" in result.stderr, result.stderr[-2000:]
    assert "response" in result.stderr
    assert not (tmp_path / "sft_tiny" / "checkpoints").exists()


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(m["step"] >= step for m in _metrics(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stderr.read()[-3000:]}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {timeout} s")


def test_sigterm_finishes_the_step_saves_and_exits_zero(tmp_path):
    run_dir = tmp_path / "sft_tiny"
    proc = subprocess.Popen(_train_cmd(tmp_path, "run.train_steps=100000"), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    stopped_at = summary["final_step"]
    assert summary["stopped_by_signal"] and 3 <= stopped_at < 100000
    assert f"received signal {int(signal.SIGTERM)}: finished step {stopped_at}, saved checkpoint" in stdout
    assert (run_dir / "checkpoints" / f"iter_{stopped_at:07d}" / "metadata.json").is_file()
    # Requeued: the same command resumes at the saved step.
    resumed = _run(_train_cmd(tmp_path, f"run.train_steps={stopped_at + 2}"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(step {stopped_at})" in resumed.stdout
    assert json.loads((run_dir / "summary.json").read_text())["final_step"] == stopped_at + 2


def test_resume_after_a_crash_repeats_the_uninterrupted_losses_exactly(tmp_path):
    common = ("run.train_steps=24", "checkpoint.save_interval=4", "checkpoint.keep_last=0")
    straight = _run(_train_cmd(tmp_path / "straight", *common))
    assert straight.returncode == 0, straight.stderr[-3000:]
    reference = {m["step"]: m["loss"] for m in _metrics(tmp_path / "straight" / "sft_tiny")}

    crashed_dir = tmp_path / "crashed" / "sft_tiny"
    proc = subprocess.Popen(_train_cmd(tmp_path / "crashed", *common), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_step(crashed_dir, 10, proc)
    proc.kill()  # SIGKILL: no chance to save
    proc.wait(30)
    resumed = _run(_train_cmd(tmp_path / "crashed", *common))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start = json.loads((crashed_dir / "summary.json").read_text())["start_step"]
    assert start >= 8 and start % 4 == 0
    after_resume = [m for m in _metrics(crashed_dir)][-(24 - start):]
    assert [m["step"] for m in after_resume] == list(range(start + 1, 25))
    for m in after_resume:
        assert m["loss"] == reference[m["step"]], f"step {m['step']}: {m['loss']} vs {reference[m['step']]}"


def test_train_with_an_hf_tokenizer_and_its_chat_template(tmp_path, bpe_paths):
    result = _run(_train_cmd(tmp_path, f"data.tokenizer={bpe_paths['dir']}", "data.apply_chat_template=true",
                             "model.vocab_size=320", "data.seq_length=48", "run.train_steps=3"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["step"] for m in _metrics(tmp_path / "sft_tiny")] == [1, 2, 3]


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path):
    result = _run(_train_cmd(tmp_path, "model.vocab_size=200"))
    assert result.returncode == 2
    assert "tokenizer vocab_size 259 exceeds model.vocab_size 200" in result.stderr


def test_preprocess_then_train_on_the_indexed_dataset(tmp_path):
    prefix = tmp_path / "indexed" / "sort"
    pre = _run([sys.executable, "-m", "opd_megatron", "preprocess", "--input", "configs/data/sort_digits.jsonl",
                "--output-prefix", str(prefix), "--tokenizer", "byte"])
    assert pre.returncode == 0, pre.stderr[-3000:]
    assert "wrote 2000 documents" in pre.stdout
    assert prefix.with_suffix(".bin").is_file() and prefix.with_suffix(".idx").is_file()
    result = _run(_train_cmd(tmp_path, "data.format=indexed", f"data.path={prefix}", "run.train_steps=3"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(_metrics(tmp_path / "sft_tiny")) == 3


def test_non_finite_loss_stops_without_saving_over_the_last_checkpoint(tmp_path):
    # Adam moves every weight by ~lr per step: lr 1e25 overflows the logits within a few steps.
    result = _run(_train_cmd(tmp_path, "optim.lr=1e25", "optim.clip_grad=0", "optim.warmup_steps=0",
                             "optim.decay_style=constant", "run.train_steps=20", "checkpoint.save_interval=1",
                             "checkpoint.keep_last=0"))
    assert result.returncode == 3, result.stderr[-3000:]
    assert "(non-finite); not saving over the last checkpoint" in result.stderr
    run_dir = tmp_path / "sft_tiny"
    bad_step = len(_metrics(run_dir)) + 1
    assert 3 <= bad_step <= 20
    # The weights of the last logged step are already non-finite (its update overflowed; the next loss shows it):
    # the save of that step was refused, so `latest` is the step before, whose weights are finite.
    assert (run_dir / "checkpoints" / "latest").read_text() == str(bad_step - 2)


def test_sequence_parallel_without_transformer_engine_is_refused_clearly(tmp_path):
    result = _run(_train_cmd(tmp_path, "parallel.tp=2", "parallel.sequence_parallel=true", nproc=2))
    assert result.returncode != 0
    assert "parallel.sequence_parallel=true needs TransformerEngine's layer spec" in result.stderr
