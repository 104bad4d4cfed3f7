"""Process bodies for tests/rollout/test_vllm_rollout.py (importable: spawned processes load them).

`sync_and_compare` loads a tiny HF Llama as the megatron student at TP=`tp`, publishes its weights to a real vLLM
rollout server (rollout/served.py::DiskWeightSync), and compares what the server computes with the student's own
forward: raw prompt log-probs of fixed sequences, and the behaviour log-probs of rows the engine samples (top-k and
a temperature, `--logprobs-mode processed_logprobs`) against the trainer's log-probs under that distribution. Then
the weights move (as an update moves them), are published again, and everything is compared again."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from opd_megatron.config import load_config
from opd_megatron.config.hf import read_hf_config
from opd_megatron.parallel.divergences import vocab_parallel_token_logprobs
from opd_megatron.rollout.generate import SamplingConfig, sampling_token_logprobs
from opd_megatron.rollout.served import DiskWeightSync, VLLMRolloutEngine
from opd_megatron.student.distributed import init_parallel
from opd_megatron.student.hf_bridge import load_hf_weights
from opd_megatron.student.hf_export import export_module
from opd_megatron.student.model import build_student
from opd_megatron.teachers.http import HTTPTeacherConfig

VOCAB = 512
SAMPLING = SamplingConfig(max_new_tokens=8, temperature=0.7, top_k=20, n=2, stop_ids=(2,))


def _forward_logits(module, tokens: torch.Tensor) -> torch.Tensor:
    """The student's logits shard `[B, L, V/tp]` for `tokens [B, L]` (TP only, one stage)."""
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return module(tokens, positions, None).float()


def _server_prompt_logprobs(url: str, rows: list[list[int]]) -> torch.Tensor:
    """vLLM's raw (T = 1) log-probs of each row's tokens 1.. given the tokens before: `[B, L-1]`."""
    body = {"model": "student", "prompt": rows, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=120.0)
    assert reply.status_code == 200, reply.text
    choices = sorted(reply.json()["choices"], key=lambda c: c["index"])
    return torch.tensor([[entries[str(ids[t])]["logprob"] for t, entries in enumerate(c["prompt_logprobs"]) if t > 0]
                         for ids, c in zip(rows, choices)], dtype=torch.float64)


def sync_and_compare(model_dir: str, url: str, weights_dir: str, tp: int) -> dict:
    dp = int(os.environ["WORLD_SIZE"]) // tp
    cfg = load_config(None, [f"model.from_hf={model_dir}", f"data.tokenizer={model_dir}", f"parallel.tp={tp}",
                             "parallel.micro_batch_size=1", f"parallel.global_batch_size={dp}"])
    ctx = init_parallel(cfg)
    student = build_student(cfg.model, cfg.parallel, ctx.device)
    load_hf_weights(student.module, cfg.model, model_dir)
    module = student.module
    base = read_hf_config(model_dir)

    def export(directory: Path) -> None:
        export_module(module, cfg.model, directory, ctx, family="llama", hf_config=base, dtype=None,
                      tokenizer_dir=Path(model_dir))

    sync = DiskWeightSync([url], weights_dir, export, is_driver=ctx.rank == 0)
    client = HTTPTeacherConfig.from_dict({"urls": [url], "model": "student", "vocab_size": VOCAB})
    engine = VLLMRolloutEngine(client, VOCAB, pad_id=0, seed=11, dp_rank=parallel_state.get_data_parallel_rank(),
                               sync=sync, model_parallel_group=parallel_state.get_model_parallel_group())
    rows = torch.randint(4, VOCAB, (3, 20), generator=torch.Generator().manual_seed(7))
    prompts = [[1, 5, 9, 13], [1, 40, 41], [1, 200, 300, 400, 500]]
    seen: dict = {"versions": [], "prompt_gap": [], "behaviour_gap": [], "student_logprobs": [], "sync_s": []}
    for version in (1, 2):
        if version == 2:
            # Move every weight, as an update does (the same noise on every rank: replicated weights stay equal).
            generator = torch.Generator().manual_seed(3)
            with torch.no_grad():
                for param in module.parameters():
                    param.add_(0.05 * torch.randn(param.shape, generator=generator))
        sync.publish(version)
        seen["sync_s"].append(sync.seconds[-1])
        logits = _forward_logits(module, rows)
        student = vocab_parallel_token_logprobs(logits[:, :-1], rows[:, 1:], 1.0, VOCAB)
        seen["student_logprobs"].append(student.double())
        if ctx.rank == 0:
            seen["versions"].append(engine.server_versions())
            served = _server_prompt_logprobs(url, rows.tolist())
            seen["prompt_gap"].append(float((served - student.double()).abs().max()))
        batch = engine.generate(prompts, SAMPLING, policy_version=version, sample_key=("rollout", version))
        trainer_mu = sampling_token_logprobs(_forward_logits(module, batch.input_tokens), batch.labels, SAMPLING,
                                             VOCAB)
        keep = batch.loss_mask > 0
        seen["behaviour_gap"].append(float((trainer_mu.double() - batch.behaviour_logprobs.double())[keep]
                                           .abs().max()))
        seen["rows"] = batch.size
        seen["policy_version"] = batch.policy_version
    # The same key repeats the same rows (the seeds are a pure function of the key): an exact resume needs it.
    again = engine.generate(prompts, SAMPLING, policy_version=2, sample_key=("rollout", 2))
    seen["repeat_equal"] = bool(torch.equal(again.tokens, batch.tokens))
    # A server that lost its version (as a restarted one answers "default") is reloaded before the next batch.
    if ctx.rank == 0:
        httpx.post(f"{url}/update_weight_version", json={"new_version": "default"}, timeout=60.0)
    dist.barrier()
    engine.generate(prompts, SAMPLING, policy_version=2, sample_key=("rollout", 3))
    seen["resynced"] = engine.resynced
    seen["versions_after_resync"] = engine.server_versions() if ctx.rank == 0 else None
    seen["published"] = sorted(p.name for p in Path(weights_dir).iterdir())
    engine.close()
    return seen


def served_resume(model_dir: str, teacher_dir: str, prompts_path: str, url: str, out_dir: str) -> dict:
    """OPD with `rollout.engine: vllm` and `max_staleness` 2 for 4 steps straight, then the same run stopped after 2
    steps (a checkpoint holding the rollouts already requested for steps 3 and 4) and resumed in this process."""
    from opd_megatron.loop.opd import train_opd
    from opd_megatron.student.distributed import seed_everything
    from tests.opd.resume_workers import StopAfter

    def config(name: str):
        return load_config(None, [
            f"run.output_dir={out_dir}", f"run.name={name}", "run.algorithm=opd", "run.train_steps=4", "run.seed=5",
            f"model.from_hf={model_dir}", f"data.tokenizer={model_dir}", "parallel.micro_batch_size=4",
            "parallel.global_batch_size=8", "rollout.source=jsonl", f"rollout.path={prompts_path}",
            "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=6",
            "rollout.engine=vllm", f"rollout.server={{urls: [{url}], model: student}}", "rollout.max_staleness=2",
            "opd.loss=policy_gradient", "opd.policy_gradient.ratio=ppo", "opd.gates.truncated_is=[0.5, 2.0]",
            "teacher.kind=inprocess",
            f"teacher.inprocess.path={teacher_dir}", "eval.prompts=4", "logging.progress_bar=false",
            "logging.tensorboard=false", "optim.optimizer=sgd", "optim.lr=0.05", "optim.clip_grad=0"])

    cfg = config("straight")
    ctx = init_parallel(cfg)
    straight = train_opd(cfg, ctx, StopAfter(None))
    runs = {"straight": straight.losses}
    for stop in (2, None):
        cfg = config("cut")
        seed_everything(cfg.run.seed, ctx)
        result = train_opd(cfg, ctx, StopAfter(stop))
        runs["cut" if stop else "resumed"] = result.losses
    import json

    def staleness(name: str) -> list[float]:
        lines = (Path(out_dir) / name / "metrics.jsonl").read_text().splitlines()
        return [m["rollout/staleness_mean"] for m in map(json.loads, lines) if "rollout/staleness_mean" in m]

    runs["staleness"] = {name: staleness(name) for name in ("straight", "cut")}
    return runs
