"""Hugging Face in and out as a user runs it (real processes, real files): an OPD run whose student starts from an
HF checkpoint (`model.from_hf`, layer-pruned with `model.from_hf_layers`) distilled from that checkpoint as a
colocated HF teacher, exported at the end (`checkpoint.export_hf`); transformers loads the export and its logits
equal the megatron student's; `export-hf` at PP=2 under torchrun writes the same tensors (in bf16 as asked); the run resumes from its own
checkpoint, not from the HF weights; `convert` HF -> megatron (TP=2) -> HF is bit-exact; clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.harness import run_distributed
from tests.student import hf_bridge_workers as w
from tests.student.test_hf_bridge import hf_logits, safetensors_tensors, write_model

REPO = Path(__file__).resolve().parents[2]
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }} = {% endfor %}"
TOKENS = 500          # the tokenizer's ids; the embedding has 600 rows (Qwen-style)
PROMPTS = ["a b c", "1 2 3 =", "w10 w11", "x y z ?", "h e l l o", "5 + 7 =", "w42 w7 w99", "q r s t"]


def _env():
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(*args, nproc: int = 1, timeout: int = 400):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc > 1 else [sys.executable])
    return subprocess.run([*launcher, "-m", "opd_megatron", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _opd_args(teacher: Path, root: Path, steps: int) -> list[str]:
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return ["train", f"run.output_dir={root}", "run.name=hf", "run.algorithm=opd", f"run.train_steps={steps}",
            f"model.from_hf={teacher}", "model.from_hf_layers=[0, 3]", "data.seq_length=32",
            "parallel.micro_batch_size=8", "parallel.global_batch_size=8", "rollout.source=jsonl",
            f"rollout.path={prompts}", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2",
            "rollout.max_new_tokens=6", "teacher.kind=colocated", f"teacher.colocated.path={teacher}",
            "optim.lr=1e-2", "optim.warmup_steps=0", "optim.decay_style=constant", "checkpoint.export_hf=true", "eval.prompts=4", "eval.interval=0",
            "logging.progress_bar=false", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_run")
    # The teacher: a 4-layer Qwen3 (QK norm) with 600 embedding rows, a 500-id tokenizer and a chat template; the
    # student: its layers 0 and 3, the strong-to-weak start the issue asks for.
    teacher = write_model(root / "teacher", "qwen3", None, num_layers=4, vocab_size=600, tokenizer_size=TOKENS,
                          chat_template=CHAT_TEMPLATE)
    result = _cli(*_opd_args(teacher, root, steps=2))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return {"root": root, "teacher": teacher, "run_dir": root / "hf", "stdout": result.stdout}


def test_the_run_trains_from_the_hf_weights_and_exports_a_checkpoint_transformers_matches(hf_run):
    run_dir, teacher = hf_run["run_dir"], hf_run["teacher"]
    export = run_dir / "hf"
    assert "Hugging Face checkpoint: " in hf_run["stdout"]
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["num_hidden_layers"] == 2
    assert config["vocab_size"] == 600 and config["dtype"] == "float32"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (export / name).is_file(), name
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    assert tokenizer.apply_chat_template([{"role": "user", "content": "a b"}], tokenize=False) == "a b = "

    # It started from the teacher's layers 0 and 3 and trained: two Adam steps at lr 1e-2 move each weight by at most
    # about 2 x 1e-2 (a step is lr x m / sqrt(v), ~lr x sign(g) early on), while the random init the run would start
    # from without the HF weights differs from them by ~0.3 (std 0.08 vs 0.02).
    exported, source = safetensors_tensors(export), safetensors_tensors(teacher)
    for ours, theirs in [(1, 3), (0, 0)]:
        moved = (exported[f"model.layers.{ours}.mlp.down_proj.weight"]
                 - source[f"model.layers.{theirs}.mlp.down_proj.weight"]).abs().max()
        assert 1e-4 < float(moved) < 0.03, (ours, theirs, float(moved))
    assert "model.layers.2.mlp.down_proj.weight" not in exported

    # transformers' forward of the export equals the megatron student's forward of the run's last checkpoint.
    ids = w.tokens(TOKENS)
    megatron = run_distributed(w.checkpoint_logits, 1, args=(str(run_dir / "checkpoints"), ids), timeout_s=180)[0]
    reference = hf_logits(export, ids)[..., :TOKENS]
    assert megatron.shape == reference.shape
    diff = float((megatron - reference).abs().max())
    assert diff <= 1e-4 * max(1.0, float(reference.abs().max())), diff


def test_export_at_pp2_under_torchrun_writes_the_same_tensors(hf_run, tmp_path):
    # (TP=2 exports are bit-exact in tests/student/test_hf_bridge.py; the convert test below saves at TP=2.)
    out = tmp_path / "pp2"
    result = _cli("export-hf", "--run-dir", str(hf_run["run_dir"]), "--iteration", "2", "--output", str(out), "--pp",
                  "2", "--dtype", "bfloat16", nproc=2)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"wrote {out} (qwen3, bfloat16)" in result.stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index.values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    at_pp1, at_pp2 = safetensors_tensors(hf_run["run_dir"] / "hf"), safetensors_tensors(out)
    assert at_pp1.keys() == at_pp2.keys() == index.keys()
    for key, tensor in at_pp1.items():
        assert at_pp2[key].dtype == torch.bfloat16 and torch.equal(at_pp2[key], tensor.to(torch.bfloat16)), key
    assert not list(tmp_path.glob("*.partial-*"))


def test_a_second_run_resumes_its_own_checkpoint_not_the_hf_weights(hf_run):
    before = safetensors_tensors(hf_run["run_dir"] / "hf")
    result = _cli(*_opd_args(hf_run["teacher"], hf_run["root"], steps=3))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from" in result.stdout and "at step 2" in result.stdout
    steps = [json.loads(line)["step"] for line in (hf_run["run_dir"] / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3]
    # The end-of-run export of the extended run replaced the first one (step 3's weights, not step 2's).
    after = safetensors_tensors(hf_run["run_dir"] / "hf")
    assert after.keys() == before.keys()
    assert not torch.equal(after["model.layers.0.mlp.down_proj.weight"], before["model.layers.0.mlp.down_proj.weight"])
    assert not list(hf_run["run_dir"].glob("hf.*"))


def test_convert_hf_to_megatron_at_tp2_and_back_is_bit_exact(tmp_path):
    source = write_model(tmp_path / "llama", "llama", None, tie=True, num_layers=2,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    checkpoints = tmp_path / "megatron"
    result = _cli("convert", "--from-hf", str(source), "--output", str(checkpoints), "--tp", "2", nproc=2)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (checkpoints / "iter_0000000" / "metadata.json").is_file()
    back = tmp_path / "back"
    result = _cli("convert", "--from-megatron", str(checkpoints), "--output", str(back))
    assert result.returncode == 0, result.stderr[-4000:]
    original, exported = safetensors_tensors(source), safetensors_tensors(back)
    assert original.keys() == exported.keys()          # tied: no lm_head.weight on either side
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    config, source_config = (json.loads((d / "config.json").read_text()) for d in (back, source))
    assert config["rope_parameters"] == source_config["rope_parameters"]
    assert (back / "tokenizer.json").is_file()


def test_export_refuses_an_existing_directory_and_a_run_without_checkpoints(hf_run, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    result = _cli("export-hf", "--run-dir", str(hf_run["run_dir"]), "--output", str(tmp_path / "taken"))
    assert result.returncode == 2
    assert "opd-megatron export-hf: error: --output" in result.stderr and "not empty" in result.stderr
    result = _cli("export-hf", "--run-dir", str(tmp_path / "nothing"), "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and "no complete checkpoint" in result.stderr
