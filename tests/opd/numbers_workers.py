"""Process bodies for tests/opd/test_opd_numbers.py: single OPD steps whose numbers the spec fixes exactly (ratios,
normalisers, estimators that must not depend on a layout knob), each on one gloo process at TP=1."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from opd_megatron.config import load_config
from opd_megatron.loop.opd import OpdRun
from opd_megatron.rollout.batch import RolloutBatch
from opd_megatron.student.checkpoint import save_checkpoint
from opd_megatron.student.distributed import destroy_parallel, init_parallel
from opd_megatron.student.model import build_student
from opd_megatron.student.optimizer import wrap_for_training
from opd_megatron.tasks import get_task

# model.vocab_size 64 over the sort task's 14-id tokenizer: 50 embedding rows no tokenizer id reaches.
MODEL = ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.vocab_size=64", "model.max_position_embeddings=32"]
TEACHER = [o.replace("model.", "teacher.colocated.model.") for o in MODEL]
MAX_NEW = 9


def config(root: str, name: str, overrides=()):
    return load_config(None, MODEL + TEACHER + [
        "run.algorithm=opd", f"run.output_dir={root}", f"run.name={name}", "run.seed=7", "run.train_steps=4",
        "parallel.micro_batch_size=8", "parallel.global_batch_size=8", "data.seq_length=24",
        "data.tokenizer=task:sort_digits", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2",
        f"rollout.max_new_tokens={MAX_NEW}", "teacher.kind=colocated", f"teacher.colocated.path={root}/teacher",
        f"checkpoint.load={root}/student", "checkpoint.resume=false", "optim.optimizer=sgd", "optim.sgd_momentum=0",
        "optim.lr=0.5", "optim.clip_grad=0", "optim.weight_decay=0", "optim.decay_style=constant",
        "eval.prompts=4", "logging.progress_bar=false", "logging.tensorboard=false", *overrides])


def make_checkpoints(root: str) -> None:
    """A student and a different teacher, both random, at TP=1."""
    for name, seed in (("student", 11), ("teacher", 12)):
        cfg = load_config(None, MODEL + [f"run.seed={seed}", "data.seq_length=24"])
        ctx = init_parallel(cfg)
        trainable = wrap_for_training(build_student(cfg.model, cfg.parallel, ctx.device), cfg.optim, cfg.model, 4)
        save_checkpoint(f"{root}/{name}", 0, trainable, ctx, {}, cfg.to_dict())
        destroy_parallel()


def fixed_batch() -> RolloutBatch:
    """8 rows (4 prompts x 2) of sort prompts with random responses of varying length; behaviour log-probs made up
    (a sampler whose mu differs from the loss's distribution) and verifier rewards fixed."""
    task = get_task("sort_digits")
    tok = task.tokenizer()
    gen = torch.Generator().manual_seed(0)
    prompts, responses, behaviour = [], [], []
    for i in range(8):
        example = task.train_example(i // 2, seed=3)
        prompts.append([tok.bos_id] + tok.encode(example.prompt))
        length = int(torch.randint(3, MAX_NEW + 1, (1,), generator=gen))
        response = torch.randint(0, 10, (length,), generator=gen).tolist()
        responses.append(response[:-1] + [tok.eos_id])
        behaviour.append((-torch.rand(length, generator=gen) * 2.5).tolist())
    batch = RolloutBatch.from_sequences(prompts, responses, tok.pad_id, length=24, behaviour_logprobs=behaviour,
                                        group_ids=[i // 2 for i in range(8)])
    batch.rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    return batch


def _weights(run: OpdRun) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in run.trainable.module.state_dict().items()
            if isinstance(v, torch.Tensor) and "_extra_state" not in k}


def _step(root: str, name: str, overrides=(), batch: RolloutBatch | None = None, diagnostics: bool = True) -> dict:
    """One train_step from the student checkpoint; the metrics, the weight update and (when the batch is sampled
    by the run) the sampled token ids. diagnostics=False: a step the run does not log."""
    cfg = config(root, name, overrides)
    ctx = init_parallel(cfg)
    try:
        run = OpdRun(cfg, ctx)
        before = _weights(run)
        sampled = teacher = None          # the colocated teacher scores inside the loss
        if batch is None:
            batch, teacher = run.next_batch()
            sampled = [batch.response_ids(b) for b in range(batch.size)]
        metrics, finite = run.train_step(batch, teacher, diagnostics=diagnostics)
        after = _weights(run)
        run.teacher.close()
        logged = cfg.run.run_dir / "rollouts.jsonl"
        return {"metrics": metrics, "finite": finite, "sampled": sampled, "batch": batch,
                "rollouts": [json.loads(line) for line in logged.read_text().splitlines()] if logged.exists() else [],
                "update": {k: after[k] - before[k] for k in before}}
    finally:
        destroy_parallel()


SCENARIOS = {
    # item 3: PPO ratio 1 on fresh data under nucleus + tempered sampling; the mismatch is logged apart.
    "ppo_top_p": ["opd.loss=policy_gradient", "opd.policy_gradient.ratio=ppo", "rollout.top_p=0.8",
                  "rollout.temperature=0.7", "opd.student_temperature=0.7", "logging.rollouts=3"],
    # item 8: on fresh data PPO + truncated IS and log-prob + truncated IS give the same update (w rho, not w rho^2).
    "ppo_tis": ["opd.loss=policy_gradient", "opd.policy_gradient.ratio=ppo", "opd.gates.truncated_is=[0.01, 100.0]"],
    "logprob_tis": ["opd.loss=policy_gradient", "opd.policy_gradient.ratio=logprob",
                    "opd.gates.truncated_is=[0.01, 100.0]"],
    # item 9: A = kappa (G + RKL): kappa = 2 doubles the update.
    "rkl_baseline_k1": ["opd.loss=policy_gradient", "opd.credit.estimator=baseline", "opd.credit.baseline=reverse_kl",
                        "opd.kl_coef=1.0"],
    "rkl_baseline_k2": ["opd.loss=policy_gradient", "opd.credit.estimator=baseline", "opd.credit.baseline=reverse_kl",
                        "opd.kl_coef=2.0"],
    # item 5: GAE-OPD + outcome term: micro-batch 1 and 8 are the same estimator.
    "gae_outcome_mb8": ["opd.loss=policy_gradient", "opd.credit.estimator=gae", "opd.credit.outcome_beta=1.0"],
    "gae_outcome_mb1": ["opd.loss=policy_gradient", "opd.credit.estimator=gae", "opd.credit.outcome_beta=1.0",
                        "parallel.micro_batch_size=1"],
    # item 7: the whole-batch pre-pass clips the log-ratio under log_ratio_clip_mode=clip.
    "group_clip": ["opd.loss=policy_gradient", "opd.credit.estimator=baseline", "opd.credit.baseline=group_mean",
                   "opd.gates.log_ratio_clip=0.01", "opd.gates.log_ratio_clip_mode=clip"],
    # item 2: Z = global rows x rollout.max_new_tokens.
    "rkl_token_mean": ["opd.loss=divergence", "opd.normalizer=token_mean"],
    "rkl_constant": ["opd.loss=divergence", "opd.normalizer=constant"],
}
SAMPLED = ("ppo_top_p",)     # scenarios that sample their own batch (the others train on fixed_batch())


def scenarios(root: str, names: list[str]) -> dict:
    make_checkpoints(root)
    out = {}
    for name in names:
        out[name] = _step(root, name, SCENARIOS[name], batch=None if name in SAMPLED else fixed_batch())
    out["tokens"] = {"mask": fixed_batch().loss_mask.sum().item(), "rows": 8, "max_new": MAX_NEW}
    return out


def self_teacher_padded_embedding(root: str) -> dict:
    """A self-teacher run over the byte tokenizer (259 ids) with model.vocab_size=260: two steps."""
    prompts = Path(root) / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {i} twice", "hint": f"{i} {i}"}) + "\n"
                               for i in range(40)))
    cfg = load_config(None, [o.replace("=64", "=260") for o in MODEL] + [
        "run.algorithm=opd", f"run.output_dir={root}", "run.name=self", "run.seed=3", "run.train_steps=2",
        "parallel.micro_batch_size=4", "parallel.global_batch_size=4", "data.tokenizer=byte",
        "rollout.source=jsonl", f"rollout.path={prompts}", "rollout.privileged_key=hint",
        "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=4",
        "model.max_position_embeddings=64", "data.seq_length=64", "teacher.kind=self",
        "teacher.self_teacher.mode=frozen", "eval.prompts=4",
        "checkpoint.resume=false", "checkpoint.save_at_end=false", "logging.progress_bar=false",
        "logging.tensorboard=false"])
    ctx = init_parallel(cfg)
    run = OpdRun(cfg, ctx)
    batch, teacher = run.next_batch()
    ids = [t for b in range(batch.size) for t in batch.response_ids(b)]
    metrics, finite = run.train_step(batch, teacher)
    return {"vocab": run.vocab, "max_id": max(ids), "finite": finite, "loss": metrics["loss"]}


# Steps the run does not log skip the per-step vocabulary diagnostics and, where nothing in the loss reads them,
# the sampled tokens' log-ratios: the update must not change. Route A without gates (nothing per-vocabulary
# beyond the loss), with entropy gates (which need the entropies the diagnostics used to provide), on a top-k + tail
# support; route B (reads the log-ratio); the log-ratio clip gate (reads it too).
UNLOGGED = {
    "rkl_full": ["opd.loss=divergence"],
    "fkl_topk_tail": ["opd.loss=divergence", "opd.route_a.divergence=forward_kl", "opd.route_a.support=teacher_topk",
                      "opd.route_a.support_k=4", "opd.route_a.support_mode=tail"],
    "jsd_entropy_gates": ["opd.loss=divergence", "opd.route_a.divergence=jsd", "opd.gates.student_entropy=0.5",
                          "opd.gates.teacher_entropy=3.0"],
    "rkl_clip_gate": ["opd.loss=divergence", "opd.gates.log_ratio_clip=1.0"],
    "pg_return_to_go": ["opd.loss=policy_gradient", "opd.credit.estimator=return_to_go"],
}


def unlogged_steps(root: str) -> dict:
    """Each UNLOGGED config stepped twice from the same checkpoint on fixed_batch(): logged (diagnostics) and not;
    with the number of vocabulary-wide entropy passes each made."""
    from opd_megatron.parallel import divergences
    make_checkpoints(root)
    original = divergences.vocab_parallel_entropy
    calls = {"n": 0}

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    divergences.vocab_parallel_entropy = counted
    try:
        out = {}
        for name, overrides in UNLOGGED.items():
            for logged in (True, False):
                calls["n"] = 0
                result = _step(root, f"{name}_{logged}", overrides, batch=fixed_batch(), diagnostics=logged)
                out[(name, logged)] = {"update": result["update"], "loss": result["metrics"]["loss"],
                                       "metrics": result["metrics"], "entropy_passes": calls["n"]}
        return out
    finally:
        divergences.vocab_parallel_entropy = original


# Where a negative advantage's mass goes (routing/freed_mass_to_teacher_support): all of it when the teacher's
# support is the whole vocabulary (14 ids); part of it with the teacher's top-1 only; under CR-OPD matched, every
# routed token's mass goes to C_t, inside the support, so the share rises above plain PG's at the same support.
FREED = {
    "pg_support_all": ["opd.loss=policy_gradient", "opd.cr_opd.teacher_top_k=14"],
    "pg_support_top2": ["opd.loss=policy_gradient", "opd.cr_opd.teacher_top_k=2"],
    "cr_support_top2": ["opd.loss=cr_opd", "opd.cr_opd.teacher_top_k=2", "opd.cr_opd.student_reach=topk",
                        "opd.cr_opd.student_top_k=14"],
}


def freed_mass_steps(root: str) -> dict:
    make_checkpoints(root)
    return {name: _step(root, name, overrides, batch=fixed_batch())["metrics"] for name, overrides in FREED.items()}
