"""Process bodies for the OPD loop tests (importable: spawned processes load them): one OPD step on a fixed batch
at a given TP/PP/DP layout and micro-batch size, from shared student and teacher checkpoints, for each route.

The vocabulary is a real tokenizer of `VOCAB` = 1000 ids (a WordLevel tokenizer.json written by `write_tokenizer`),
not a multiple of 128: the embedding is padded to 1024 rows at TP <= 4, so at TP=4 every rank's shard of 256 holds
real ids (rank 3: ids 768..999 and 24 padding rows) and every vocab-parallel reduction merges real mass across
ranks. The models are random with a large init std (logits of std ~1.6), so the fixed batch's responses, and the
teacher's and student's top-k candidates, land on every shard (`make_init` measures it)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from opd_megatron.config import load_config
from opd_megatron.loop.opd import OpdRun
from opd_megatron.rollout.batch import RolloutBatch
from opd_megatron.student.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from opd_megatron.student.distributed import destroy_parallel, init_parallel
from opd_megatron.student.model import build_student, padded_vocab_size
from opd_megatron.student.optimizer import wrap_for_training

VOCAB = 1000                      # the tokenizer's true size: ids 0..999 (pad 0, bos 1, eos 2, unk 3)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD, BOS, EOS = 0, 1, 2
ROWS, GROUP = 8, 2                # 4 prompts x 2 samples, prompt-major rows
MAX_NEW = 12                      # rollout.max_new_tokens: the longest response of the fixed batch
MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=8",
         "model.num_query_groups=4", f"model.vocab_size={VOCAB}", "model.max_position_embeddings=32",
         "model.init_method_std=0.2"]
TEACHER = [o.replace("model.", "teacher.colocated.model.") for o in MODEL]
ROUTES = {
    "rkl_full": ["opd.loss=divergence", "opd.route_a.divergence=reverse_kl", "opd.route_a.support=full"],
    "jsd_union_tail": ["opd.loss=divergence", "opd.route_a.divergence=jsd", "opd.route_a.jsd_beta=0.3",
                       "opd.route_a.support=union", "opd.route_a.support_k=3", "opd.route_a.support_mode=tail",
                       "opd.normalizer=sequence_mean"],
    "pg_rtg_ppo": ["opd.loss=policy_gradient", "opd.credit.estimator=return_to_go", "opd.policy_gradient.ratio=ppo",
                   "opd.gates.truncated_is=[0.5, 2.0]"],
    "pg_group_hybrid": ["opd.loss=policy_gradient", "opd.credit.estimator=baseline", "opd.credit.baseline=group_mean",
                        "opd.credit.outcome_beta=0.5", "opd.normalizer=constant"],
    # C_t = teacher top-8 within the student's nucleus of mass 0.5: both sets span the shards.
    "cr_opd": ["opd.loss=cr_opd", "opd.credit.estimator=discounted", "opd.credit.gamma=0.9",
               "opd.cr_opd.teacher_top_k=8", "opd.cr_opd.student_reach=top_p", "opd.cr_opd.student_top_p=0.5"],
    "gae": ["opd.loss=policy_gradient", "opd.credit.estimator=gae", "opd.credit.gae_lambda=0.8"],
    "minillm_single_step": ["opd.loss=policy_gradient", "opd.credit.estimator=single_step",
                            "opd.credit.length_normalized=true", "opd.credit.gamma=1.0"],
    "fkl_reference_entropy": ["opd.loss=divergence", "opd.route_a.divergence=forward_kl",
                              "opd.regularizers.reference_kl_coef=0.5", "opd.regularizers.entropy_coef=0.05",
                              "opd.gates.teacher_confidence=0.06"],
    # A batch-wide baseline: a per-rank batch mean would differ at DP=2.
    "pg_batch_mean": ["opd.loss=policy_gradient", "opd.credit.estimator=baseline", "opd.credit.baseline=batch_mean"],
    # The log-ratio clamped to [-0.5, 0.5] before the credit estimator (and its group baseline).
    "pg_group_logclip": ["opd.loss=policy_gradient", "opd.credit.estimator=baseline", "opd.credit.baseline=group_mean",
                         "opd.gates.log_ratio_clip=0.5", "opd.gates.log_ratio_clip_mode=clip"],
    # Sampled at another temperature / top-p (behaviour mu != pi_theta_old) and one update stale (pi_theta_old !=
    # pi_theta): the PPO ratio and the truncated-IS sampler correction both differ from 1.
    "pg_ppo_sampled": ["opd.loss=policy_gradient", "opd.credit.estimator=discounted", "opd.credit.gamma=0.9",
                       "opd.policy_gradient.ratio=ppo", "opd.gates.truncated_is=[0.5, 2.0]",
                       "rollout.temperature=0.7", "rollout.top_p=0.9", "opd.allow_temperature_mismatch=true"],
}
STALE_ROUTES = ("pg_ppo_sampled",)   # trained as step 2 on a batch sampled at step 1 (staleness 1)
# opd.credit.outcome_beta > 0 is refused unless rollout.source=task (the verifier gives the reward), and a task brings
# its own 14-character tokenizer; the fixed batch carries its own rewards, so the route sets it after validation.
AFTER_VALIDATION = {"pg_group_hybrid": {"credit.outcome_beta": 0.5}}


def write_tokenizer(path: str) -> str:
    """A WordLevel tokenizer.json of exactly VOCAB ids: the 4 specials, then words w4 .. w999."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {token: i for i, token in enumerate(SPECIALS + [f"w{i}" for i in range(len(SPECIALS), VOCAB)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.save(path)
    return path


def write_prompts(path: str) -> str:
    """A JSONL prompt file for OpdRun's prompt source (the fixed batch never reads it)."""
    lines = [json.dumps({"prompt": " ".join(f"w{10 + 37 * i + j}" for j in range(3))}) for i in range(16)]
    Path(path).write_text("\n".join(lines) + "\n")
    return path


def config(tp: int, pp: int, files: dict, out: str, route: str, mbs: int):
    cfg = load_config(None, MODEL + TEACHER + [
        "run.algorithm=opd", f"run.output_dir={out}", f"run.name={route}_mbs{mbs}", "run.seed=5",
        "run.train_steps=4", f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.micro_batch_size={mbs}",
        f"parallel.global_batch_size={ROWS}", "data.seq_length=24", f"data.tokenizer={files['tokenizer']}",
        "rollout.source=jsonl", f"rollout.path={files['prompts']}", "eval.prompts=2",
        f"rollout.prompts_per_step={ROWS // GROUP}", f"rollout.samples_per_prompt={GROUP}",
        f"rollout.max_new_tokens={MAX_NEW}", "teacher.kind=colocated", f"teacher.colocated.path={files['teacher']}",
        "checkpoint.resume=false", f"checkpoint.load={files['student']}", "optim.optimizer=sgd",
        "optim.sgd_momentum=0", "optim.lr=0.5", "optim.clip_grad=0", "optim.weight_decay=0",
        "optim.warmup_steps=0", "logging.progress_bar=false", "logging.tensorboard=false",
        *[o for o in ROUTES[route] if o.split("=")[0] not in {f"opd.{k}" for k in AFTER_VALIDATION.get(route, {})}]])
    for key, value in AFTER_VALIDATION.get(route, {}).items():
        section, name = key.split(".")
        setattr(getattr(cfg.opd, section), name, value)
    return cfg


def _sequences(gen: torch.Generator) -> tuple[list[list[int]], list[list[int]]]:
    """ROWS prompt / response id lists: a random prompt per group, random responses over the whole vocabulary
    (row 3 cut at MAX_NEW without eos, the others ending in eos)."""
    prompts, responses = [], []
    for i in range(ROWS):
        if i % GROUP == 0:
            size = int(torch.randint(2, 6, (1,), generator=gen))
            prompt = [BOS] + torch.randint(len(SPECIALS), VOCAB, (size,), generator=gen).tolist()
        length = MAX_NEW if i == 3 else int(torch.randint(3, MAX_NEW, (1,), generator=gen))
        response = torch.randint(len(SPECIALS), VOCAB, (length,), generator=gen).tolist()
        prompts.append(prompt)
        responses.append(response if i == 3 else response[:-1] + [EOS])
    return prompts, responses


def fixed_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed batch's tokens [ROWS, L] and loss mask [ROWS, L-1] (what make_init measures)."""
    batch = RolloutBatch.from_sequences(*_sequences(torch.Generator().manual_seed(0)), PAD)
    return batch.tokens, batch.loss_mask


def fixed_batch(files: dict) -> RolloutBatch:
    """The ROWS rows of `_sequences` (ROWS / GROUP prompts x GROUP samples, prompt-major) with made-up rewards;
    `pi_theta_old` = the starting student's log-probs (measured by `make_init`) plus N(0, 0.15^2) noise, as if
    sampled one update ago; behaviour `mu` = pi_theta_old plus N(0, 0.5^2) (a tempered / top-p sampler's log-probs
    differ from the full softmax)."""
    gen = torch.Generator().manual_seed(0)
    prompts, responses = _sequences(gen)
    start = torch.load(files["start_logprobs"])       # [ROWS, L-1] the starting student's sampled-token log-probs
    old, behaviour = [], []
    for b, (p, r) in enumerate(zip(prompts, responses)):
        o = start[b, len(p) - 1: len(p) + len(r) - 1] + 0.15 * torch.randn(len(r), generator=gen)
        old.append(o.tolist())
        behaviour.append((o + 0.5 * torch.randn(len(r), generator=gen)).tolist())
    batch = RolloutBatch.from_sequences(prompts, responses, PAD, behaviour_logprobs=behaviour, old_logprobs=old,
                                        group_ids=[i // GROUP for i in range(ROWS)])
    batch.rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.5])
    return batch


def rows_of_rank(batch: RolloutBatch, dp_rank: int, dp: int) -> RolloutBatch:
    """This data-parallel rank's rows: contiguous, prompt-major (PromptSource.prompts gives rank r the prompts
    r*n .. (r+1)*n - 1 of a step), so a prompt's group stays on one rank."""
    share = batch.size // dp
    return batch.select(range(dp_rank * share, (dp_rank + 1) * share))


def make_init(files: dict) -> dict:
    """A student and a (different) teacher checkpoint at TP=1, both random (the teacher has another seed); the
    student's sampled-token log-probs of the fixed batch (for `fixed_batch`); and where the fixed batch's tokens and
    each model's top-4 candidates fall among the TP=4 vocab shards."""
    tokens, mask = fixed_tokens()
    shard = padded_vocab_size(VOCAB, 4) // 4
    out = {"response_shards": torch.bincount(tokens[:, 1:][mask > 0] // shard, minlength=4).tolist()}
    for name, seed in (("student", 11), ("teacher", 12)):
        cfg = load_config(None, MODEL + [f"run.seed={seed}", "data.seq_length=24"])
        ctx = init_parallel(cfg)
        trainable = wrap_for_training(build_student(cfg.model, cfg.parallel, ctx.device), cfg.optim, cfg.model, 4)
        save_checkpoint(files[name], 0, trainable, ctx, {}, cfg.to_dict())
        with torch.no_grad():
            inputs = tokens[:, :-1]
            positions = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)
            logp = torch.log_softmax(trainable.module(inputs, positions, None)[..., :VOCAB].float(), dim=-1)
        top = logp.topk(4, dim=-1).indices[mask > 0]
        out[f"{name}_top4_shards"] = torch.bincount(top.flatten() // shard, minlength=4).tolist()
        out[f"{name}_max_prob_mean"] = float(logp.exp().max(-1).values[mask > 0].mean())
        if name == "student":
            torch.save(torch.gather(logp, 2, tokens[:, 1:].unsqueeze(-1)).squeeze(-1), files["start_logprobs"])
        destroy_parallel()
    return out


def opd_steps(tp: int, pp: int, files: dict, out: str, routes: list[str], micro_batch_sizes: list[int],
              references: dict[str, str]) -> dict:
    """For each route and micro-batch size: one OPD step on this rank's rows of `fixed_batch()` from the student
    checkpoint. `references[route]` is the TP=1 checkpoint after that route's step; the step's update of every
    local weight shard is compared with the reference's (loaded into this layout by dist_checkpointing, which
    reshards it). A route without a reference (the TP=1 run, first micro-batch size) saves one instead.
    The logging rank returns, per (route, mbs): metrics, finite, and `update` (see `_update_errors`) or `saved`."""
    results = {}
    references = dict(references)
    ctx = None
    for route in routes:
        for mbs in micro_batch_sizes:
            cfg = config(tp, pp, files, out, route, mbs)
            if ctx is None:
                ctx = init_parallel(cfg)
            run = OpdRun(cfg, ctx)
            batch = rows_of_rank(fixed_batch(files), ctx.dp_rank, ctx.dp)
            if route in STALE_ROUTES:
                run.step = 1                  # the batch (policy_version 0) is one update stale
            before = _local_weights(run)
            metrics, finite = run.train_step(batch)
            run.step += 1
            entry = {"metrics": metrics, "finite": finite}
            if route not in references:
                references[route] = entry["saved"] = run.save()
            else:
                after = _local_weights(run)
                load_checkpoint(resolve_checkpoint(references[route]), run.trainable, ctx, load_optimizer=False)
                entry["update"] = _update_errors(before, after, _local_weights(run), ctx)
            run.teacher.close()
            results[(route, mbs)] = entry
    return results if ctx.is_logging_rank else {}


def _local_weights(run: OpdRun) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in run.trainable.module.named_parameters()}


def _update_errors(before: dict, after: dict, reference: dict, ctx) -> dict[str, tuple[float, float]]:
    """Per weight shard of every rank, "<name> [tp t pp p dp d]" -> (max |update - reference update|,
    max |reference update|), where update = after - before (SGD without momentum: -lr x gradient)."""
    where = f"[tp{ctx.tp_rank} pp{ctx.pp_rank} dp{ctx.dp_rank}]"
    local = {}
    for name, start in before.items():
        got, ref = after[name] - start, reference[name] - start
        local[f"{name} {where}"] = (float((got - ref).abs().max()), float(ref.abs().max()))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return {k: v for part in gathered for k, v in part.items()}


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
