"""Process bodies for the OPD loop tests (importable: spawned processes load them): one OPD step on fixed rollouts
at a given TP/PP layout, from shared student and teacher checkpoints, for each route."""

from __future__ import annotations


import torch

from opd_megatron.config import load_config
from opd_megatron.opd_train import OpdRun
from opd_megatron.rollout.batch import RolloutBatch
from opd_megatron.student.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from opd_megatron.student.distributed import init_parallel
from opd_megatron.student.model import build_student
from opd_megatron.student.optimizer import wrap_for_training
from opd_megatron.tasks import get_task

MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.vocab_size=14", "model.max_position_embeddings=32"]
TEACHER = [o.replace("model.", "teacher.model.") for o in MODEL]
ROUTES = {
    "rkl_full": ["opd.loss=divergence", "opd.divergence=reverse_kl", "opd.support=full"],
    "jsd_union_tail": ["opd.loss=divergence", "opd.divergence=jsd", "opd.jsd_beta=0.3", "opd.support=union",
                       "opd.support_k=3", "opd.support_mode=tail", "opd.normalizer=sequence_mean"],
    "pg_rtg_ppo": ["opd.loss=policy_gradient", "opd.estimator=return_to_go", "opd.ratio=ppo",
                   "opd.gates.truncated_is=[0.5, 2.0]"],
    "pg_group_hybrid": ["opd.loss=policy_gradient", "opd.estimator=baseline", "opd.baseline=group_mean",
                        "opd.outcome_beta=0.5", "opd.normalizer=constant"],
    "cr_opd": ["opd.loss=cr_opd", "opd.estimator=discounted", "opd.gamma=0.9", "opd.routing.teacher_top_k=4",
               "opd.routing.student_reach=topk", "opd.routing.student_top_k=4"],
    "gae": ["opd.loss=policy_gradient", "opd.estimator=gae", "opd.gae_lambda=0.8"],
    "minillm_single_step": ["opd.loss=policy_gradient", "opd.estimator=single_step", "opd.length_normalized=true",
                            "opd.gamma=1.0"],
    "fkl_reference_entropy": ["opd.loss=divergence", "opd.divergence=forward_kl", "opd.reference_kl_coef=0.5",
                              "opd.entropy_coef=0.05", "opd.gates.teacher_confidence=0.05"],
}


def config(tp: int, pp: int, teacher: str, out: str, route: str, extra=()):
    return load_config(None, MODEL + TEACHER + [
        "run.algorithm=opd", f"run.output_dir={out}", f"run.name={route}", "run.seed=5", "run.train_steps=4",
        f"parallel.tp={tp}", f"parallel.pp={pp}", "parallel.micro_batch_size=4", "parallel.global_batch_size=8",
        "data.seq_length=24", "data.tokenizer=task:sort_digits", "rollout.prompts_per_step=4",
        "rollout.samples_per_prompt=2", "rollout.max_new_tokens=9", "teacher.kind=colocated",
        f"teacher.path={teacher}", "checkpoint.resume=false", "optim.optimizer=sgd", "optim.sgd_momentum=0", "optim.lr=0.5",
        "optim.clip_grad=0", "optim.weight_decay=0",
        "logging.progress_bar=false", "logging.tensorboard=false", *ROUTES[route], *extra])


def fixed_batch() -> RolloutBatch:
    """8 rows (4 prompts x 2): sort prompts and random responses of varying length, behaviour log-probs and
    rewards made up but fixed."""
    task = get_task("sort_digits")
    tok = task.tokenizer()
    gen = torch.Generator().manual_seed(0)
    prompts, responses, behaviour = [], [], []
    for i in range(8):
        example = task.train_example(i // 2, seed=3)
        prompts.append([tok.bos_id] + tok.encode(example.prompt))
        length = int(torch.randint(3, 10, (1,), generator=gen))
        response = torch.randint(0, 10, (length,), generator=gen).tolist()
        responses.append(response[:-1] + [tok.eos_id])
        behaviour.append((-torch.rand(length, generator=gen) * 2.5).tolist())
    batch = RolloutBatch.from_sequences(prompts, responses, tok.pad_id, length=19, behaviour_logprobs=behaviour,
                                        group_ids=[i // 2 for i in range(8)])
    batch.rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    return batch


def make_init(student_out: str, teacher_out: str) -> None:
    """A student and a (different) teacher checkpoint at TP=1, both random: the teacher has another seed."""
    for path, seed in ((student_out, 11), (teacher_out, 12)):
        cfg = load_config(None, MODEL + [f"run.seed={seed}", "data.seq_length=24"])
        ctx = init_parallel(cfg)
        trainable = wrap_for_training(build_student(cfg.model, cfg.parallel, ctx.device), cfg.optim, cfg.model, 4)
        save_checkpoint(path, 0, trainable, ctx, {}, cfg.to_dict())
        from opd_megatron.student.distributed import destroy_parallel
        destroy_parallel()


def opd_step(tp: int, pp: int, student_init: str, teacher: str, out: str, routes: list[str]) -> dict:
    """For each route: one OPD step on `fixed_batch()` from `student_init`, saved under out/<route>."""
    results = {}
    ctx = None
    for route in routes:
        cfg = config(tp, pp, teacher, out, route, extra=(f"checkpoint.load={student_init}",))
        if ctx is None:
            ctx = init_parallel(cfg)
        run = OpdRun(cfg, ctx, stop=None)
        metrics, finite = run.train_step(fixed_batch())
        run.step = 1
        saved = run.save()
        run.teacher.close()
        results[route] = {"metrics": metrics, "finite": finite, "saved": saved}
    return results


def full_weights(paths: list[str]) -> list[dict[str, torch.Tensor]]:
    return _weights(load_config(None, MODEL + ["data.seq_length=24"]), paths)


def _weights(cfg, paths: list[str]) -> list[dict[str, torch.Tensor]]:
    """The whole student's weights in each checkpoint, loaded at TP=1 with `cfg`'s model section."""
    ctx = init_parallel(cfg)
    trainable = wrap_for_training(build_student(cfg.model, cfg.parallel, ctx.device), cfg.optim, cfg.model, 4)
    out = []
    for path in paths:
        load_checkpoint(resolve_checkpoint(path), trainable, ctx, load_optimizer=False)
        out.append({k: v.detach().clone() for k, v in trainable.module.state_dict().items()
                    if isinstance(v, torch.Tensor) and "_extra_state" not in k})
    return out


def poison_checkpoint(source: str, target: str, config_path: str, overrides: list[str]) -> None:
    """Copy the student checkpoint `source` to `target` with one output-layer row set to NaN."""
    cfg = load_config(config_path, overrides + ["run.algorithm=sft", "data.path=unused.jsonl"], validate=False)
    ctx = init_parallel(cfg)
    trainable = wrap_for_training(build_student(cfg.model, cfg.parallel, ctx.device), cfg.optim, cfg.model, 4)
    load_checkpoint(resolve_checkpoint(source), trainable, ctx, load_optimizer=False)
    with torch.no_grad():
        trainable.module.output_layer.weight[3].fill_(float("nan"))
    save_checkpoint(target, 0, trainable, ctx, {}, cfg.to_dict())


def weights_of(config_path: str, overrides: list[str], paths: list[str]) -> list[dict[str, torch.Tensor]]:
    return _weights(load_config(config_path, overrides + ["run.algorithm=sft", "data.path=unused.jsonl"],
                                validate=False), paths)
