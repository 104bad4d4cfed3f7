"""The on-policy distillation loop (`run.algorithm: opd`): rollout -> teacher scoring -> loss -> update.

Each step, on every rank of the student's TP/PP layout:
1. prompts for this data-parallel rank (`rollout/prompts.py`, a pure function of the step), then either student
   rollouts (`RolloutEngine`, behaviour log-probs recorded) or, for GKD's fixed-dataset share
   (`opd.on_policy_fraction < 1`), the prompts' reference responses; verifier rewards for task prompts;
2. teacher scores: a served teacher (SGLang / vLLM) is asked once per data-parallel replica, by TP rank 0 of the
   last pipeline stage, and the answer is broadcast to that stage's TP group (the only ranks the loss runs on);
   with `teacher.overlap` the next batch is sampled now (with the weights before this update: one update stale)
   and scored in a background thread while this batch trains. A colocated / in-process teacher scores each
   micro-batch inside the loss on the last stage;
3. the loss of `objective.OpdObjective` through megatron's pipeline schedule (normaliser folded into per-token
   coefficients for the whole global batch), group/batch baselines computed first on the whole batch;
4. a non-finite loss or gradient skips the step (counted; `opd.nonfinite: stop` stops the run instead), so the
   weights, and the checkpoint on disk, never hold a NaN model; then megatron's optimizer step, the value head's;
5. the spec's diagnostics to metrics.jsonl / TensorBoard; held-out evaluation (verifier score, per-token reverse KL
   to the teacher); checkpoints on the interval and on SIGTERM, with everything an exact resume needs.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state

from opd_megatron.config import RunConfig
from opd_megatron.math.credit import advantages as credit_advantages
from opd_megatron.math.credit import batch_mean_advantages, centred_rewards, returns_to_go
from opd_megatron.data.tokenizer import check_vocab_fits, load_tokenizer
from opd_megatron.math.diagnostics import batch_diagnostics
from opd_megatron.errors import NonFiniteLossError
from opd_megatron.loop.metrics import MetricsWriter
from opd_megatron.loop.objective import MicroBatchStats, OpdObjective, normalizer_weights
from opd_megatron.parallel.finite import nonfinite_on_any_tp_rank
from opd_megatron.parallel import divergences as vp
from opd_megatron.rollout.batch import RolloutBatch
from opd_megatron.rollout.engine import MegatronRolloutEngine
from opd_megatron.rollout.prompts import Prompt, PromptSource
from opd_megatron.rollout.generate import MegatronSampler, SamplingConfig
from opd_megatron.math.cr_opd import RoutingStats
from opd_megatron.math.mixtures import OnPolicyMixture
from opd_megatron.student.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from opd_megatron.student.model import build_student
from opd_megatron.student.optimizer import current_lr, optimizer_step, wrap_for_training, zero_grads
from opd_megatron.student.schedule import forward_backward
from opd_megatron.student.value_head import ValueHead
from opd_megatron.tasks import get_task
from opd_megatron.teachers.base import NonFiniteTeacherError, TeacherScores
from opd_megatron.teachers.factory import build_teacher

log = logging.getLogger("opd_megatron.loop.opd")
# MicroBatchStats' per-token fields the step's diagnostics read (`_diagnostics`).
_PER_TOKEN_DIAGNOSTICS = ("mask", "log_ratio", "student_logprobs", "old_logprobs", "advantages", "values",
                          "value_targets", "rkl_exact", "student_entropy", "teacher_entropy", "top1_match",
                          "topk_overlap", "mass_on_teacher", "reference_kl")


@dataclass
class StudentInput:
    """What the pipeline schedule reads (`tokens`: the student's inputs `[B, L-1]`) and the rollout behind it."""
    tokens: torch.Tensor
    rollout: RolloutBatch


def _scoring_rank() -> bool:
    """TP rank 0 of the last pipeline stage asks a served teacher for its data-parallel replica."""
    return parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0


def _tp_src() -> int:
    return parallel_state.get_tensor_model_parallel_src_rank()


class OpdRun:
    """One OPD run on this rank: built from the config, then `run()`."""

    def __init__(self, cfg: RunConfig, ctx, stop):
        self.cfg, self.ctx, self.stop = cfg, ctx, stop
        r = cfg.rollout
        self.run_dir = cfg.run.run_dir
        self.checkpoints = self.run_dir / "checkpoints"
        self.task = get_task(r.task, **r.task_options) if r.source == "task" else None
        self.tokenizer = self.task.tokenizer() if self.task is not None else load_tokenizer(cfg.data.tokenizer)
        check_vocab_fits(self.tokenizer, cfg.model.vocab_size)
        # The TRUE vocabulary: the tokenizer's ids, not the embedding's rows (Qwen3: 151,669 ids in a 151,936-row
        # embedding, padded further to a multiple of 128 x tp). Sampling and every loss are masked here, so the
        # student never samples, and no divergence ever counts, an id the teacher does not have.
        self.vocab = self.tokenizer.vocab_size
        if cfg.parallel.global_batch_size % ctx.dp or r.prompts_per_step % ctx.dp:
            raise ValueError(f"rollout.prompts_per_step={r.prompts_per_step} must divide among dp={ctx.dp} "
                             f"data-parallel ranks")
        self.prompts_per_rank = r.prompts_per_step // ctx.dp
        max_prompt = cfg.model.max_position_embeddings - r.max_new_tokens
        if max_prompt < 1:
            raise ValueError(f"rollout.max_new_tokens={r.max_new_tokens} leaves no room for a prompt in "
                             f"model.max_position_embeddings={cfg.model.max_position_embeddings}")
        self.source = PromptSource(self.tokenizer, cfg.run.seed, max_prompt, task=self.task,
                                   path=r.path if r.source == "jsonl" else None, prompt_key=r.prompt_key,
                                   answer_key=r.answer_key, apply_chat_template=r.apply_chat_template,
                                   domain_key=r.domain_key, privileged_key=r.privileged_key,
                                   eval_count=cfg.eval.prompts, eval_path=cfg.eval.path or None)
        stops = (self.tokenizer.eos_id,) if r.stop_at_eos else ()
        # policy_temperature: the loss's distribution, under which the sampler records pi_theta_old(y_t) beside
        # the behaviour log-prob mu(y_t) of what it actually sampled (opd-math.md, Route B).
        self.sampling = SamplingConfig(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                       top_k=r.top_k, n=r.samples_per_prompt, stop_ids=stops,
                                       policy_temperature=cfg.opd.student_temperature)
        self.mixture = OnPolicyMixture(cfg.opd.on_policy_fraction, cfg.run.seed)

        self.student = build_student(cfg.model, cfg.parallel, ctx.device)
        self.trainable = wrap_for_training(self.student, cfg.optim, cfg.model, cfg.run.train_steps)
        self.engine = MegatronRolloutEngine(self.trainable.ddp, self.vocab, self.tokenizer.pad_id,
                                            cfg.model.max_position_embeddings, cfg.run.seed)
        self.eval_engine = MegatronRolloutEngine(self.trainable.ddp, self.vocab, self.tokenizer.pad_id,
                                                 cfg.model.max_position_embeddings, cfg.run.seed + 1)
        self.teacher, self.compat = build_teacher(cfg, ctx.device, self.tokenizer, self.student.padded_vocab_size,
                                                  student=self.student)
        self.dense_teacher = self.teacher.gives_full_logits
        self.value_head: Optional[ValueHead] = None
        if cfg.opd.uses_value_head and parallel_state.is_pipeline_last_stage():
            self.value_head = ValueHead(cfg.model.hidden_size, cfg.opd.value_lr, ctx.device)
            self.value_head.attach(self.student.module)
        self.objective = OpdObjective(cfg.opd, cfg.teacher, self.vocab,
                                      self.teacher if self.dense_teacher else None, self.value_head)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher") \
            if cfg.teacher.overlap and _scoring_rank() else None

        self.step = 0
        self.skipped_steps = 0
        self.pending: Optional[RolloutBatch] = None        # the next step's batch (teacher.overlap)
        self.pending_future: Optional[concurrent.futures.Future] = None
        self.pending_extra_ids: Optional[torch.Tensor] = None   # the pending batch's student top-k ids (last stage)
        self.baseline_eval: dict = {}
        self.teacher_tokens = 0               # scored for this replica since this process started
        self.teacher_tokens_before = 0        # scored by every replica before the checkpoint this run resumed
        self.teacher_seconds = 0.0
        self.timing = {"rollout_s": 0.0, "teacher_s": 0.0, "update_s": 0.0}
        self.reference: Optional[list[torch.Tensor]] = None   # the frozen reference's parameters (this rank's)
        self._load()

    # -- state ---------------------------------------------------------------------------------------------------
    def _load(self) -> None:
        cfg = self.cfg
        to_load = cfg.checkpoint.load
        resuming = False
        if cfg.checkpoint.resume and resolve_checkpoint(self.checkpoints) is not None:
            to_load, resuming = self.checkpoints, True
        if to_load is None:
            return
        path = resolve_checkpoint(to_load)
        if path is None:
            raise FileNotFoundError(f"checkpoint.load={str(to_load)!r}: no complete checkpoint there")
        # A resume restores everything; checkpoint.load of another run (e.g. an SFT warm start) takes the weights.
        if cfg.opd.reference_kl_coef > 0:
            # The frozen reference is the starting checkpoint (checkpoint.load), also when a resume follows.
            load_checkpoint(resolve_checkpoint(cfg.checkpoint.load), self.trainable, self.ctx, load_optimizer=False)
            self.reference = [p.detach().clone() for p in self.trainable.module.parameters()]
        with_optimizer = resuming and cfg.checkpoint.load_optimizer
        loaded = load_checkpoint(path, self.trainable, self.ctx, load_optimizer=with_optimizer)
        if not resuming:
            return
        self.step = loaded.iteration
        state = loaded.data_state.get("opd", {})
        self.engine.load_state_dict(state.get("engine", {}))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.baseline_eval = state.get("baseline_eval", {})
        self.teacher_tokens_before = int(state.get("teacher_tokens", 0))
        rank_state = loaded.rank_state or {}
        if self.value_head is not None and "value_head" in rank_state:
            self.value_head.load(rank_state["value_head"])
        if "self_teacher" in rank_state and hasattr(self.teacher, "load_state_dict"):
            self.teacher.load_state_dict(rank_state["self_teacher"])
        if rank_state.get("pending") is not None:
            self.pending = rank_state["pending"]
            self.pending_future = self._submit(self.pending, restored=rank_state)
        if self.ctx.is_logging_rank:
            print(f"[opd-megatron] resumed from {path} at step {self.step}", flush=True)

    def global_teacher_tokens(self) -> int:
        """Teacher tokens scored for every data-parallel replica since the run began (collective: every rank calls
        it; each replica's scoring rank contributes its own count, the other ranks of the replica 0)."""
        own = torch.tensor([float(self.teacher_tokens) if _scoring_rank() else 0.0], dtype=torch.float64)
        dist.all_reduce(own)
        return self.teacher_tokens_before + int(own.item())

    def save(self) -> str:
        data_state = {"opd": {"engine": self.engine.state_dict(), "skipped_steps": self.skipped_steps,
                              "baseline_eval": self.baseline_eval, "teacher_tokens": self.global_teacher_tokens()}}
        rank_state = {"pending": self.pending, "pending_extra_ids": self.pending_extra_ids}
        if hasattr(self.teacher, "update_ema"):
            rank_state["self_teacher"] = self.teacher.state_dict()
        if self.value_head is not None:
            rank_state["value_head"] = self.value_head.state()
        path = save_checkpoint(self.checkpoints, self.step, self.trainable, self.ctx, data_state,
                               self.cfg.to_dict(), keep_last=self.cfg.checkpoint.keep_last, rank_state=rank_state)
        return str(path)

    # -- batches -------------------------------------------------------------------------------------------------
    def _prompts(self, step: int, count: int) -> list[Prompt]:
        return self.source.prompts(step, self.ctx.dp_rank, self.ctx.dp, count)

    def make_batch(self, step: int) -> RolloutBatch:
        """Step `step`'s rows of this data-parallel rank, sampled with the current weights."""
        started = time.perf_counter()
        n = self.cfg.rollout.samples_per_prompt
        if self.mixture.is_on_policy(step):
            prompts = self._prompts(step, self.prompts_per_rank)
            # The noise is a pure function of (run seed, step, data-parallel rank, column): an exact resume
            # replays it, and no two data-parallel ranks share it.
            batch = self.engine.generate([p.ids for p in prompts], self.sampling, [p.text for p in prompts],
                                         policy_version=self.step, sample_key=("rollout", step))
        else:
            prompts = self._prompts(step, self.prompts_per_rank * n)
            missing = [p.text for p in prompts if p.reference is None]
            if missing:
                raise ValueError(f"opd.on_policy_fraction < 1 needs reference responses (rollout.answer_key) for "
                                 f"the fixed-dataset share; prompt {missing[0][:80]!r} has none")
            batch = RolloutBatch.from_sequences([p.ids for p in prompts], [p.reference for p in prompts],
                                                self.tokenizer.pad_id, on_policy=False,
                                                prompts=[p.text for p in prompts], policy_version=self.step,
                                                length=max(len(p.ids) + len(p.reference) for p in prompts))
        self._annotate(batch, prompts if len(prompts) == batch.size else [p for p in prompts for _ in range(n)])
        if self.task is not None:
            batch.rewards = torch.tensor([self.task.score(text, self.tokenizer.decode(batch.response_ids(b)))
                                          for b, text in enumerate(batch.prompts)], dtype=torch.float32)
        self.timing["rollout_s"] += time.perf_counter() - started
        return batch

    def _annotate(self, batch: RolloutBatch, rows: list[Prompt]) -> None:
        """What the teacher needs of each row besides its tokens: the domain (multi-teacher routing) and a
        self-teacher's privileged context. Training and evaluation batches alike: evaluation scored without them
        measures the reverse KL to the wrong teacher."""
        if all(p.domain is not None for p in rows):
            batch.domains = [p.domain for p in rows]
        if self.cfg.teacher.kind == "self" and all(p.privileged is not None for p in rows):
            batch.privileged = [p.privileged for p in rows]

    def _score_now(self, batch: RolloutBatch, extra_ids: Optional[torch.Tensor] = None) -> TeacherScores:
        """The teacher's answer for `batch`, with its log-probs on `extra_ids` (the student's top-k) when given."""
        started = time.perf_counter()
        request = batch.teacher_request(topk=self.cfg.teacher.topk, extra_ids=extra_ids)
        scores = self.teacher.score(request)
        if scores.extra_ids is None:        # the ids travel with their values to the loss (served teachers set it)
            scores.extra_ids = request.extra_ids
        self.teacher_seconds += time.perf_counter() - started
        return scores

    def _student_topk(self, batch: RolloutBatch) -> Optional[torch.Tensor]:
        """The student's top-k ids `[B, L-1, k]` (k = teacher.score_student_topk; -1 off the scored columns) that a
        served teacher must score for the student_topk / union supports (SGLang's token_ids_logprob), on the last
        stage; None elsewhere and when the loss needs none.

        A forward-only pass with the current weights: a pipeline collective, so every rank of the replica calls it,
        on the main thread (never from the teacher.overlap scoring thread). It reads what the training forward will
        read (the trimmed batch in the same micro-batches), and ranks with `vocab_parallel_topk`: ties to the lower
        id, the rule the loss applies when it takes the student's top-k among these ids
        (`losses.supports.top_k_among`). Without teacher.overlap the loss's logits are these logits, so its top-k
        (k = opd.support_k <= this k) is among the ids sent, exactly; with teacher.overlap the ids come from the
        weights one update before the step that trains on them, and the loss takes the student's best k among them:
        the support may then differ from the fresh top-k, but every id in it has a teacher value."""
        cfg = self.cfg
        k = cfg.teacher.score_student_topk
        if (self.dense_teacher or not k or cfg.opd.loss != "divergence"
                or cfg.opd.support not in ("student_topk", "union")):
            return None
        from opd_megatron.parallel.topk import vocab_parallel_topk
        trimmed = batch.trimmed()
        captured: list[torch.Tensor] = []

        def loss_fn(logits, micro: StudentInput):
            mb = micro.rollout
            with torch.no_grad():
                if nonfinite_on_any_tp_rank(logits):    # the training pass meets it too and skips the step
                    captured.append(torch.full(mb.loss_mask.shape + (k,), -1, dtype=torch.long))
                else:
                    captured.append(vocab_parallel_topk(logits, k, self.vocab, check_values=False)[1].cpu())
            return logits.new_zeros(()), mb.loss_mask.sum().to(logits.device)

        mbs = cfg.parallel.micro_batch_size
        micro = [StudentInput(tokens=mb.input_tokens, rollout=mb) for mb in trimmed.micro_batches(mbs)]
        forward_backward(self.trainable.ddp, micro, loss_fn, trimmed.tokens.shape[1] - 1, mbs, forward_only=True)
        if not parallel_state.is_pipeline_last_stage():
            return None
        ids = torch.full((batch.size, batch.tokens.shape[1] - 1, k), -1, dtype=torch.long)
        ids[:, : trimmed.tokens.shape[1] - 1] = torch.cat(captured)
        scored = batch.teacher_request().valid_mask().unsqueeze(-1)
        return torch.where(scored, ids, -1)

    def _submit(self, batch: RolloutBatch, restored: Optional[dict] = None) -> Optional[concurrent.futures.Future]:
        """Start scoring `batch` in the background (served teacher with teacher.overlap). The student top-k pass
        the request needs runs first, here, on the main thread of every rank of the replica. Returns the scoring
        future on the scoring rank and an already finished one (holding None) on the other ranks, so that every
        rank's `_scores_for` knows the batch was submitted (and runs no second pass); None for a dense teacher or
        without teacher.overlap. `restored`: the rank state of a resumed run, whose pending batch's student top-k
        ids were ranked with the weights before the checkpoint's last update; they are reused (every rank skips
        the pass) so that a resume asks the teacher exactly what the uninterrupted run asked."""
        if self.dense_teacher or not self.cfg.teacher.overlap:
            return None
        extra_ids = self._student_topk(batch) if restored is None else restored.get("pending_extra_ids")
        self.pending_extra_ids = extra_ids
        if self.executor is None or not _scoring_rank():
            done: concurrent.futures.Future = concurrent.futures.Future()
            done.set_result(None)
            return done
        return self.executor.submit(self._score_now, batch, extra_ids)

    def _scores_for(self, batch: RolloutBatch, future: Optional[concurrent.futures.Future] = None,
                    student_topk: bool = True) -> Optional[TeacherScores]:
        """The served teacher's answer for `batch` on the last stage (broadcast within its TP group); None for a
        dense teacher (it scores inside the loss) and on the other stages. `future`: from `_submit` (every rank
        has one for a submitted batch); without it the batch is scored now, after the student top-k pass (every
        rank of the replica takes part in it). student_topk=False: sampled-token and top-k scores only (evaluation
        reads no support)."""
        if self.dense_teacher:
            return None
        extra_ids = self._student_topk(batch) if future is None and student_topk else None
        if not parallel_state.is_pipeline_last_stage():
            return None
        started = time.perf_counter()
        scores = None
        if _scoring_rank():
            scores = future.result() if future is not None else self._score_now(batch, extra_ids)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            box = [scores]
            dist.broadcast_object_list(box, src=_tp_src(), group=parallel_state.get_tensor_model_parallel_group())
            scores = box[0]
        self.timing["teacher_s"] += time.perf_counter() - started
        self.teacher_tokens += int(scores.valid.sum())
        return scores

    def next_batch(self) -> RolloutBatch:
        """This step's batch with its teacher scores. With teacher.overlap the next step's batch is sampled now,
        with the weights before this update (one update stale, reported as rollout/staleness), and scored in
        the background while this one trains."""
        step = self.step
        future = None
        if self.pending is not None:
            batch, self.pending = self.pending, None
            future, self.pending_future = self.pending_future, None
        else:
            batch = self.make_batch(step)
        if self.cfg.teacher.overlap and step + 1 < self.cfg.run.train_steps:
            self.pending = self.make_batch(step + 1)
            self.pending_future = self._submit(self.pending)
        batch.teacher = self._scores_for(batch, future)
        return batch

    # -- the step ------------------------------------------------------------------------------------------------
    def _global_counts(self, batch: RolloutBatch) -> tuple[float, float, float]:
        counts = torch.tensor([float(batch.loss_mask.sum()), float((batch.loss_mask.sum(1) > 0).sum()),
                               float(batch.size)], dtype=torch.float64)
        dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        return float(counts[0]), float(counts[1]), float(counts[2])

    def _whole_batch_advantages(self, batch: RolloutBatch, micro_batches: list[StudentInput]) -> None:
        """Group / batch baselines need every row's log-ratio first: a forward-only pass with the current weights
        (the same values the training forward will see), then the estimator on the whole batch (last stage)."""
        opd = self.cfg.opd
        captured: list[torch.Tensor] = []

        def loss_fn(logits, micro: StudentInput):
            mb = micro.rollout
            with torch.no_grad():
                try:
                    scores = self.objective.teacher_scores(mb, logits)
                except NonFiniteTeacherError:      # the training pass meets it too and skips the step
                    captured.append(torch.zeros(mb.loss_mask.shape))
                    return logits.sum() * 0.0, mb.loss_mask.sum()
                labels = mb.labels.to(logits.device)
                student = vp.vocab_parallel_token_logprobs(logits, labels, opd.student_temperature, self.vocab)
                teacher = self.objective.teacher_token_logprobs(scores, labels)
                captured.append(torch.where(mb.loss_mask.to(logits.device) > 0, teacher - student, 0.0).cpu())
            zero = logits.sum() * 0.0
            return zero, mb.loss_mask.sum()

        forward_backward(self.trainable.ddp, micro_batches, loss_fn, batch.tokens.shape[1] - 1,
                         self.cfg.parallel.micro_batch_size, forward_only=True)
        if not parallel_state.is_pipeline_last_stage():
            return
        # The same kappa r_t (log-ratio clip included) the loss would give the estimator.
        log_ratio = self.objective.credit_log_ratio(torch.cat(captured))
        gamma = self.objective.credit_gamma
        if opd.baseline == "batch_mean":
            # The leave-one-out per-position mean over the GLOBAL batch: column totals summed over data-parallel
            # ranks (a rank-local mean would change the estimator with the data-parallel size).
            returns = returns_to_go(log_ratio, batch.loss_mask, gamma)
            batch.advantages = batch_mean_advantages(returns, batch.loss_mask,
                                                     *self._global_column_totals(returns, batch.loss_mask))
        else:
            batch.advantages = credit_advantages(log_ratio, batch.loss_mask, opd.estimator, gamma,
                                                 baseline=opd.baseline, group_ids=batch.group_ids)

    def _global_column_totals(self, values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-column sums of `values` and counts of `mask` `[T]` over every row of every data-parallel rank
        (columns are the same absolute positions on every rank; shorter ranks are padded with zeros)."""
        group = parallel_state.get_data_parallel_group()
        width = torch.tensor([values.shape[1]], dtype=torch.long)
        dist.all_reduce(width, op=dist.ReduceOp.MAX, group=group)
        totals = torch.zeros(2, int(width), dtype=torch.float64)
        totals[0, : values.shape[1]] = torch.where(mask > 0, values, 0.0).double().sum(0)
        totals[1, : values.shape[1]] = (mask > 0).double().sum(0)
        dist.all_reduce(totals, group=group)
        return totals[0, : values.shape[1]].to(values.dtype), totals[1, : values.shape[1]].to(values.dtype)

    def _reference_logprobs(self, batch: RolloutBatch, micro_batches: list[StudentInput]) -> None:
        """The frozen reference's log-probs of the sampled tokens, by a forward-only pass of the student's own
        modules with the reference weights swapped in (any TP/PP layout; no second model is built)."""
        params = list(self.trainable.module.parameters())
        captured: list[torch.Tensor] = []

        def loss_fn(logits, micro: StudentInput):
            mb = micro.rollout
            with torch.no_grad():
                labels = mb.labels.to(logits.device)
                logp = vp.vocab_parallel_token_logprobs(logits, labels, self.cfg.opd.student_temperature, self.vocab)
                captured.append(torch.where(mb.loss_mask.to(logits.device) > 0, logp, 0.0).cpu())
            return logits.sum() * 0.0, mb.loss_mask.sum()

        def swap():
            for param, ref in zip(params, self.reference):
                param.data, ref.data = ref.data, param.data

        swap()
        try:
            forward_backward(self.trainable.ddp, micro_batches, loss_fn, batch.tokens.shape[1] - 1,
                             self.cfg.parallel.micro_batch_size, forward_only=True)
        finally:
            swap()
        if parallel_state.is_pipeline_last_stage():
            batch.reference_logprobs = torch.cat(captured)

    def train_step(self, batch: RolloutBatch) -> tuple[Optional[dict], bool]:
        cfg, opd = self.cfg, self.cfg.opd
        started = time.perf_counter()
        batch = batch.trimmed()
        tokens, sequences, rows = self._global_counts(batch)
        batch.loss_weights = normalizer_weights(batch.loss_mask, opd.normalizer, tokens, sequences, rows,
                                                cfg.rollout.max_new_tokens)
        if opd.loss != "divergence" and opd.outcome_beta and batch.rewards is not None:
            # R - b_R on the whole batch: a prompt's group is whole on this data-parallel rank, not in a micro-batch.
            batch.outcome_advantages = centred_rewards(batch.rewards, "group_mean", group_ids=batch.group_ids)
        staleness = self.step - batch.policy_version
        mbs = cfg.parallel.micro_batch_size
        micro = [StudentInput(tokens=mb.input_tokens, rollout=mb) for mb in batch.micro_batches(mbs)]
        seq = batch.tokens.shape[1] - 1
        needs_whole_batch = opd.loss != "divergence" and opd.baseline in ("group_mean", "batch_mean")
        if self.reference is not None:
            self._reference_logprobs(batch, micro)
        if needs_whole_batch:
            self._whole_batch_advantages(batch, micro)
        if self.reference is not None or needs_whole_batch:
            micro = [StudentInput(tokens=mb.input_tokens, rollout=mb) for mb in batch.micro_batches(mbs)]
        stats: list[MicroBatchStats] = []

        def loss_fn(logits, micro_input: StudentInput):
            hidden = self.value_head.hidden if self.value_head is not None else None
            loss_sum, count, mb_stats = self.objective.micro_batch_loss(logits, micro_input.rollout, hidden,
                                                                        staleness=staleness)
            stats.append(mb_stats)
            return loss_sum, count

        zero_grads(self.trainable)
        if self.value_head is not None:
            self.value_head.optimizer.zero_grad(set_to_none=False)
        loss_sum, num_tokens = forward_backward(self.trainable.ddp, micro, loss_fn, seq, mbs)
        loss = loss_sum / max(num_tokens, 1.0)
        if any(s.nonfinite for s in stats):
            loss = float("nan")
        finite = self._all_finite(math.isfinite(loss))
        lr = current_lr(self.trainable.optimizer)
        grad_norm = float("nan")
        if finite:
            _, grad_norm = optimizer_step(self.trainable)
            if self.value_head is not None:
                self.value_head.step(tokens)
            if getattr(self.teacher, "mode", None) == "ema":
                self.teacher.update_ema()          # SelfTeacher: e_k = d e_(k-1) + (1 - d) theta_k
        else:
            self.skipped_steps += 1
            zero_grads(self.trainable)
            message = (f"step {self.step + 1}: non-finite loss or gradient (loss {loss}); the step was not applied "
                       f"({self.skipped_steps} skipped so far); the last checkpoint is untouched")
            if opd.nonfinite == "stop" or self.skipped_steps > opd.max_skipped_steps:
                raise NonFiniteLossError(message + (f"; more than opd.max_skipped_steps={opd.max_skipped_steps}"
                                                    if opd.nonfinite == "skip" else ""))
            log.warning(message)
        self.timing["update_s"] += time.perf_counter() - started
        metrics = self._diagnostics(batch, stats)
        if cfg.logging.rollouts:
            self._log_rollouts(batch, stats)
        if metrics is not None:
            metrics.update({"loss": loss, "lr": lr, "grad_norm": grad_norm, "skipped_steps": self.skipped_steps,
                            "step_skipped": 0.0 if finite else 1.0, "tokens": num_tokens})
        return metrics, finite

    def _all_finite(self, loss_finite: bool) -> bool:
        """The loss (last stage) and every gradient (all ranks) are finite, agreed over the world."""
        bad = torch.zeros(1)
        bad[0] = 0.0 if loss_finite else 1.0
        for param in self.trainable.ddp.parameters():
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            if grad is not None and not bool(torch.isfinite(grad).all()):
                bad[0] = 1.0
                break
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return not bool(bad.item())

    def _diagnostics(self, batch: RolloutBatch, stats: list[MicroBatchStats]) -> Optional[dict]:
        """The step's diagnostics over the GLOBAL batch, on the logging rank (None elsewhere). Each replica's scoring
        rank (last stage, TP rank 0) sends its per-token values `[B, S]` and per-row values to the logging rank,
        which computes every statistic once on their concatenation: token means weighted by tokens, counts summed,
        quantiles, standard deviations and the explained variance exact. (An average of the replicas' statistics
        is none of these: it halves `tokens/count` at dp=2 and weighs a short replica's tokens more.) The cost is
        one gather of a few `[B, S]` float tensors per step, a few bytes per token of the global batch."""
        payload = None
        if stats and _scoring_rank():
            cat = lambda name: torch.cat([getattr(s, name) for s in stats]).cpu() \
                if all(getattr(s, name) is not None for s in stats) else None  # noqa: E731
            keep_counts: dict = {}
            for s in stats:
                for key, value in s.gate_keep.items():
                    keep_counts[key] = keep_counts.get(key, 0.0) + value * float(s.mask.sum())
            routing = None
            if all(s.routing is not None for s in stats):
                routing = {f: torch.cat([getattr(s.routing, f) for s in stats]).cpu()
                           for f in stats[0].routing.__dataclass_fields__}
            per_token = {name: cat(name) for name in _PER_TOKEN_DIAGNOSTICS}
            per_token["behaviour"] = batch.behaviour_logprobs if bool(batch.on_policy.all()) else None
            payload = {"per_token": per_token, "routing": routing, "keep_counts": keep_counts,
                       "teacher": (self.teacher_tokens, self.teacher_seconds),
                       "rows": {"staleness": torch.full((batch.size,), float(self.step - batch.policy_version)),
                                "response_lengths": (batch.lengths - batch.prompt_lengths).float(),
                                "rewards": batch.rewards, "on_policy": batch.on_policy.float()}}
        gathered = [None] * dist.get_world_size() if self.ctx.is_logging_rank else None
        dist.gather_object(payload, gathered, dst=0)
        if not self.ctx.is_logging_rank:
            return None
        parts = [g for g in gathered if g is not None]
        width = max(int(p["per_token"]["mask"].shape[1]) for p in parts)

        def joined(values: list) -> Optional[torch.Tensor]:
            """Rows of every replica, each padded with zeros (masked out) to the widest replica's columns."""
            if any(v is None for v in values):
                return None
            return torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1])) if v.dim() == 2 else v
                              for v in values])

        token = lambda name: joined([p["per_token"][name] for p in parts])  # noqa: E731
        row = lambda name: joined([p["rows"][name] for p in parts])  # noqa: E731
        mask = token("mask")
        total = float(mask.sum())
        keep_rates = {k: sum(p["keep_counts"].get(k, 0.0) for p in parts) / max(total, 1.0)
                      for k in parts[0]["keep_counts"]}
        routing = None
        if all(p["routing"] is not None for p in parts):
            routing = RoutingStats(**{f: joined([p["routing"][f] for p in parts]) for f in parts[0]["routing"]})
        opd = self.cfg.opd
        out = batch_diagnostics(
            mask, log_ratio=token("log_ratio"), student_logprobs=token("student_logprobs"),
            behaviour_logprobs=token("behaviour"), old_logprobs=token("old_logprobs"),
            ratio_interval=(1.0 - opd.clip_eps_low, 1.0 + opd.clip_eps_high),
            mismatch_interval=opd.gates.truncated_is or (0.5, 2.0), advantages=token("advantages"),
            gate_keep_rates=keep_rates, routing_stats=routing, values=token("values"),
            value_targets=token("value_targets"), staleness=row("staleness"), response_lengths=row("response_lengths"))
        keep = mask > 0
        for key, name in (("kl/rkl_exact", "rkl_exact"), ("entropy/student", "student_entropy"),
                          ("entropy/teacher", "teacher_entropy"), ("agreement/teacher_top1_match", "top1_match"),
                          ("agreement/topk_overlap", "topk_overlap"),
                          ("agreement/student_mass_on_teacher_support", "mass_on_teacher"),
                          ("kl/reference", "reference_kl")):
            values = token(name)
            if values is not None and bool(keep.any()):
                out[key] = float(values[keep].double().mean())
        rewards = row("rewards")
        if rewards is not None:
            out["reward/mean"] = float(rewards.double().mean())
        out["rollout/on_policy"] = float(row("on_policy").double().mean())
        rates = [tokens / seconds for tokens, seconds in (p["teacher"] for p in parts) if seconds > 0]
        if rates:
            # The replicas ask the teacher(s) concurrently, each for its share: their rates add up.
            out["throughput/teacher_tokens_per_s"] = sum(rates)
        return out

    def _log_rollouts(self, batch: RolloutBatch, stats: list[MicroBatchStats]) -> None:
        """The first `logging.rollouts` rows of each data-parallel rank's batch, appended to rollouts.jsonl by the
        logging rank: what was sampled, scored and rewarded, token by token (collective: every rank calls it)."""
        records = []
        if stats and _scoring_rank():
            student = torch.cat([s.student_logprobs for s in stats])
            teacher = student + torch.cat([s.log_ratio for s in stats])
            for b in range(min(self.cfg.logging.rollouts, batch.size)):
                start, end = int(batch.prompt_lengths[b]) - 1, int(batch.lengths[b]) - 1
                prompt_ids = batch.tokens[b, : int(batch.prompt_lengths[b])].tolist()
                record = {"step": self.step + 1, "dp_rank": self.ctx.dp_rank, "row": b,
                          "policy_version": batch.policy_version, "on_policy": bool(batch.on_policy[b]),
                          "prompt": batch.prompts[b] if batch.prompts else self.tokenizer.decode(prompt_ids),
                          "response": self.tokenizer.decode(batch.response_ids(b)),
                          "response_ids": batch.response_ids(b),
                          "reward": None if batch.rewards is None else float(batch.rewards[b]),
                          "student_logprobs": [round(x, 6) for x in student[b, start:end].tolist()],
                          "teacher_logprobs": [round(x, 6) for x in teacher[b, start:end].tolist()]}
                if batch.behaviour_logprobs is not None:
                    record["behaviour_logprobs"] = [round(x, 6) for x in batch.behaviour_logprobs[b, start:end].tolist()]
                records.append(record)
        # Only the logging rank writes: gather to it, not to every rank.
        gathered = [None] * dist.get_world_size() if self.ctx.is_logging_rank else None
        dist.gather_object(records, gathered, dst=0)
        if self.ctx.is_logging_rank:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with (self.run_dir / "rollouts.jsonl").open("a") as out:
                for rank_records in gathered:
                    for record in rank_records or []:
                        out.write(json.dumps(record) + "\n")

    # -- evaluation ----------------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Held-out verifier score (greedy) and per-token reverse KL to the teacher on the student's own samples
        at temperature 1 (exact over the vocabulary with a dense teacher, the k1 estimate with a served one)."""
        cfg, e = self.cfg, self.cfg.eval
        prompts = self._eval_prompts()
        mine = prompts[self.ctx.dp_rank:: self.ctx.dp]
        out: dict = {}
        max_new = e.max_new_tokens or cfg.rollout.max_new_tokens
        stops = self.sampling.stop_ids
        correct = torch.zeros(2, dtype=torch.float64)
        rkl = torch.zeros(2, dtype=torch.float64)
        # The same noise at every evaluation (keys without the step): before/after comparisons are paired, and
        # `opd-megatron eval` of a checkpoint reproduces the run's final evaluation.
        for start in range(0, len(mine), e.batch_size):
            chunk = mine[start: start + e.batch_size]
            if self.task is not None:
                greedy = self.eval_engine.generate([p.ids for p in chunk],
                                                   SamplingConfig(max_new_tokens=max_new, temperature=0.0,
                                                                  stop_ids=stops),
                                                   sample_key=("eval", start, "greedy"))
                for b, p in enumerate(chunk):
                    correct[0] += self.task.score(p.text, self.tokenizer.decode(greedy.response_ids(b)))
                correct[1] += len(chunk)
            sampled = self.eval_engine.generate([p.ids for p in chunk],
                                                SamplingConfig(max_new_tokens=max_new, temperature=1.0,
                                                               stop_ids=stops,
                                                               policy_temperature=cfg.opd.student_temperature),
                                                sample_key=("eval", start, "sampled"))
            self._annotate(sampled, chunk)
            sampled.teacher = self._scores_for(sampled, student_topk=False) if not self.dense_teacher else None
            total, count = self._reverse_kl(sampled)
            rkl += torch.tensor([total, count], dtype=torch.float64)
        group = parallel_state.get_data_parallel_group()
        dist.all_reduce(correct, group=group)
        if self.task is not None:
            out["score"] = float(correct[0] / max(correct[1], 1.0))
        # _reverse_kl's totals are already summed over the whole world by forward_backward.
        out["rkl"] = float(rkl[0] / max(rkl[1], 1.0))
        return out

    def _eval_prompts(self) -> list[Prompt]:
        if self.task is not None:
            # Built as training's task prompts are (rollout/prompts.py): the domain and the privileged answer too.
            examples = self.task.examples("eval", self.cfg.eval.prompts, self.cfg.run.seed)
            return [Prompt(ex.prompt, [self.tokenizer.bos_id] + self.tokenizer.encode(ex.prompt),
                           domain=self.task.name, privileged=self.tokenizer.encode(ex.answer)) for ex in examples]
        return self.source.eval_prompts()

    def _reverse_kl(self, batch: RolloutBatch) -> tuple[float, float]:
        batch = batch.trimmed()
        opd = self.cfg.opd

        def loss_fn(logits, micro: StudentInput):
            mb = micro.rollout
            with torch.no_grad():
                mask = mb.loss_mask.to(logits.device)
                try:
                    scores = self.objective.teacher_scores(mb, logits)
                except NonFiniteTeacherError:
                    return torch.tensor(float("nan")), mask.sum()
                if nonfinite_on_any_tp_rank(logits, scores.logits_shard):
                    return torch.tensor(float("nan")), mask.sum()
                if scores.logits_shard is not None:
                    per_token = vp.vocab_parallel_reverse_kl(logits, scores.logits_shard,
                                                             student_temperature=opd.student_temperature,
                                                             teacher_temperature=self.cfg.teacher.temperature,
                                                             true_vocab_size=self.vocab, chunk_size=opd.chunk_size)
                else:
                    labels = mb.labels.to(logits.device)
                    student = vp.vocab_parallel_token_logprobs(logits, labels, opd.student_temperature, self.vocab)
                    per_token = student - self.objective.teacher_token_logprobs(scores, labels)
                return (per_token * mask).sum(), mask.sum()

        micro = [StudentInput(tokens=mb.input_tokens, rollout=mb)
                 for mb in batch.micro_batches(self.cfg.parallel.micro_batch_size)]
        return forward_backward(self.trainable.ddp, micro, loss_fn, batch.tokens.shape[1] - 1,
                                self.cfg.parallel.micro_batch_size, forward_only=True)

    def teacher_score(self) -> Optional[float]:
        """The colocated teacher's own greedy verifier score on the held-out prompts (None for other teachers, and
        with a warning when the teacher's logits are not finite: the OPD steps then meet the same logits and skip
        or stop as opd.nonfinite says)."""
        from opd_megatron.teachers.colocated import ColocatedTeacher
        if self.task is None or not isinstance(self.teacher, ColocatedTeacher):
            return None
        value = torch.zeros(2, dtype=torch.float64)          # hits, broken
        if parallel_state.is_pipeline_last_stage():
            try:
                hits = self._teacher_hits()
                if parallel_state.get_tensor_model_parallel_rank() == 0:
                    value[0] = hits
            except NonFiniteLossError as exc:                  # raised on every TP rank of the last stage
                log.warning("teacher score not measured: %s", exc)
                value[1] = 1.0
        dist.all_reduce(value)
        return None if value[1] > 0 else float(value[0]) / len(self._eval_prompts())

    def _teacher_hits(self) -> float:
        sampler = MegatronSampler(self.teacher.teacher.module, self.vocab, self.tokenizer.pad_id,
                                  self.teacher.model.max_position_embeddings, seed=0, use_pipeline=False)
        prompts = self._eval_prompts()[self.ctx.dp_rank:: self.ctx.dp]
        max_new = self.cfg.eval.max_new_tokens or self.cfg.rollout.max_new_tokens
        hits = 0.0
        for start in range(0, len(prompts), self.cfg.eval.batch_size):
            chunk = prompts[start: start + self.cfg.eval.batch_size]
            out = sampler.generate([p.ids for p in chunk], SamplingConfig(max_new_tokens=max_new, temperature=0.0,
                                                                          stop_ids=self.sampling.stop_ids))
            hits += sum(self.task.score(p.text, self.tokenizer.decode(out.response_ids(b)))
                        for b, p in enumerate(chunk))
        return hits

    # -- the loop ------------------------------------------------------------------------------------------------
    def run(self, writer: MetricsWriter) -> dict:
        cfg = self.cfg
        started = time.perf_counter()
        if not self.baseline_eval:
            before = self.evaluate()
            self.baseline_eval = {"student_score_before": before.get("score"), "rkl_before": before["rkl"],
                                  "teacher_score": self.teacher_score()}
            writer.message(f"[opd-megatron] before OPD: {self._describe(before)}; teacher score "
                           f"{self.baseline_eval['teacher_score']}")
            writer.log(self.step, {f"eval/{k}": v for k, v in before.items()})
        losses, stopped, checkpoint = [], False, None
        saved_at = self.step
        while self.step < cfg.run.train_steps:
            step_started = time.perf_counter()
            batch = self.next_batch()
            metrics, _ = self.train_step(batch)
            self.step += 1
            if metrics is not None:
                metrics["step_s"] = time.perf_counter() - step_started
                metrics.update({f"time/{k}": v for k, v in self.timing.items()})
                losses.append(metrics["loss"])
            if cfg.eval.interval and self.step % cfg.eval.interval == 0 and self.step < cfg.run.train_steps:
                result = self.evaluate()
                if metrics is not None:
                    metrics.update({f"eval/{k}": v for k, v in result.items()})
            if metrics is not None and (self.step % cfg.logging.log_interval == 0 or self.step == cfg.run.train_steps):
                writer.log(self.step, metrics)
            writer.advance()
            if self.stop.agreed():
                checkpoint = self.save()
                saved_at, stopped = self.step, True
                writer.message(f"[opd-megatron] received signal {self.stop.received or 'on another rank'}: finished "
                               f"step {self.step}, saved checkpoint {checkpoint}, exiting cleanly")
                break
            if cfg.checkpoint.save_interval and self.step % cfg.checkpoint.save_interval == 0:
                checkpoint = self.save()
                saved_at = self.step
        after = {}
        if not stopped:
            after = self.evaluate()
            writer.log(self.step, {f"eval/{k}": v for k, v in after.items()})
            writer.message(f"[opd-megatron] after OPD: {self._describe(after)}")
            if cfg.checkpoint.save_at_end and saved_at != self.step:
                checkpoint = self.save()
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        return {"losses": losses, "stopped": stopped, "checkpoint": checkpoint, "after": after,
                "wall_s": time.perf_counter() - started}

    @staticmethod
    def _describe(result: dict) -> str:
        score = f"score {result['score']:.3f}, " if result.get("score") is not None else ""
        return f"{score}per-token reverse KL to the teacher {result['rkl']:.4f}"


def train_opd(cfg: RunConfig, ctx, stop):
    """Run OPD on this rank (called by `train.train` with the parallel state initialised)."""
    from opd_megatron.tools.report import write_run_outputs
    from opd_megatron.loop.sft import TrainResult
    run_dir = cfg.run.run_dir
    if ctx.is_logging_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    run = OpdRun(cfg, ctx, stop)
    result = TrainResult(start_step=run.step, final_step=run.step)
    writer = MetricsWriter(run_dir, cfg.run.train_steps, run.step, ctx.is_logging_rank, cfg.logging.tensorboard,
                           cfg.logging.progress_bar)
    try:
        outcome = run.run(writer)
    finally:
        writer.close()
        run.teacher.close()
    result.final_step = run.step
    result.losses = outcome["losses"]
    result.stopped_by_signal = outcome["stopped"]
    result.checkpoint = outcome["checkpoint"]
    result.wall_s = outcome["wall_s"]
    teacher_tokens = run.global_teacher_tokens()
    if ctx.is_logging_rank:
        summary = {**run.baseline_eval,
                   "student_score_after": outcome["after"].get("score"), "rkl_after": outcome["after"].get("rkl"),
                   "steps": run.step, "start_step": result.start_step, "skipped_steps": run.skipped_steps,
                   "stopped_by_signal": result.stopped_by_signal, "checkpoint": result.checkpoint,
                   "wall_s": round(result.wall_s, 3), "time_split_s": {k: round(v, 3) for k, v in run.timing.items()},
                   "teacher": run.teacher.name, "teacher_tokens_scored": teacher_tokens,
                   "layout": {"tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp},
                   "first_loss": result.losses[0] if result.losses else None,
                   "last_loss": result.losses[-1] if result.losses else None}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        write_run_outputs(cfg, run_dir, summary, run.compat)
    return result


def evaluate_checkpoint(cfg: RunConfig, checkpoint: str) -> dict:
    """`opd-megatron eval`: the held-out score and per-token reverse KL to the configured teacher of a checkpoint
    (weights only), at any layout; the teacher's own score beside it when it is colocated."""
    import dataclasses
    from opd_megatron.student.distributed import destroy_parallel, init_parallel
    cfg = dataclasses.replace(cfg)
    cfg.run.algorithm = "opd"
    cfg.checkpoint.load, cfg.checkpoint.resume = checkpoint, False
    if resolve_checkpoint(checkpoint) is None:
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no complete checkpoint there")
    ctx = init_parallel(cfg)
    try:
        run = OpdRun(cfg, ctx, stop=None)
        result = run.evaluate()
        result["teacher_score"] = run.teacher_score()
        result["checkpoint"] = str(resolve_checkpoint(checkpoint))
        run.teacher.close()
        return result
    finally:
        destroy_parallel()
