"""The on-policy distillation loop (`run.algorithm: opd`): rollout -> teacher scoring -> loss -> update.

Each step, on every rank of the student's TP/PP layout:
1. prompts for this data-parallel rank (`rollout/prompts.py`, a pure function of the step), then either student
   rollouts (`RolloutEngine`, behaviour log-probs recorded) or, for GKD's fixed-dataset share
   (`opd.mixtures.on_policy_fraction < 1`), the prompts' reference responses; verifier rewards for task prompts;
2. teacher scores: a served teacher (SGLang / vLLM) is asked once per data-parallel replica (`teacher_scoring.py`);
   with `teacher.overlap` the next batch is sampled now (with the weights before this update: one update stale)
   and scored in a background thread while this batch trains. A colocated / in-process teacher scores each
   micro-batch inside the loss on the last stage;
3. everything the loss reads of the batch, computed for the whole global batch first and set on it in one place
   (`loss_batch`: normaliser weights, centred rewards, the reference's log-probs, group / batch advantages), then
   the loss of `objective.OpdObjective` through megatron's pipeline schedule;
4. a non-finite loss or gradient skips the step (counted; `opd.nonfinite: stop` stops the run instead), so the
   weights, and the checkpoint on disk, never hold a NaN model; then megatron's optimizer step, the value head's and
   the teacher's own after-step update (a self-teacher's EMA);
5. the spec's diagnostics to metrics.jsonl / TensorBoard; held-out evaluation (`evaluation.py`). Checkpoints, resume
   and signals follow the one policy of `common.py`; `checkpoint.load` gives the starting weights only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import replace
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from opd_megatron.config import RunConfig
from opd_megatron.data import build_dataset
from opd_megatron.data.tokenizer import check_vocab_fits, load_tokenizer
from opd_megatron.errors import NonFiniteLossError, RolloutMismatchError
from opd_megatron.loop.common import (Checkpointer, LoadMeaning, RunDirectory, StepLoop, StopRequest, TrainResult,
                                      logged_step, run_steps, starting_point)
from opd_megatron.loop.evaluation import Evaluator, describe
from opd_megatron.loop.metrics import MetricsWriter, student_compute
from opd_megatron.loop.rollouts_ahead import RolloutsAhead
from opd_megatron.loop.objective import MicroBatchStats, OpdObjective, StudentInput, normalizer_weights
from opd_megatron.loop.teacher_scoring import TeacherScoring, scoring_rank
from opd_megatron.math.cr_opd import RoutingStats
from opd_megatron.math.credit import advantages as credit_advantages
from opd_megatron.math.credit import batch_mean_advantages, centred_rewards, returns_to_go
from opd_megatron.math.diagnostics import DiagnosticsBatch, DiagnosticsSettings, batch_diagnostics
from opd_megatron.math.mixtures import OnPolicyMixture
from opd_megatron.parallel import divergences as vp
from opd_megatron.parallel.finite import all_finite
from opd_megatron.rollout.batch import RolloutBatch
from opd_megatron.rollout.engine import MegatronRolloutEngine, RolloutEngine
from opd_megatron.rollout.generate import SamplingConfig, sampling_token_logprobs
from opd_megatron.rollout.prompts import CorpusPrompts, PromptSource, window_batch, with_prompt_context
from opd_megatron.rollout.served import build_vllm_engine
from opd_megatron.rollout.served_sglang import build_sglang_engine
from opd_megatron.student.checkpoint import load_checkpoint, resolve_checkpoint
from opd_megatron.student.distributed import ParallelContext, destroy_parallel, init_parallel
from opd_megatron.student.hf_bridge import load_hf_weights
from opd_megatron.student.model import build_student, parameter_count
from opd_megatron.student.optimizer import current_lr, optimizer_step, wrap_for_training, zero_grads
from opd_megatron.student.schedule import forward_backward
from opd_megatron.student.value_head import ValueHead
from opd_megatron.tasks import get_task
from opd_megatron.teachers.base import NonFiniteTeacherError, Teacher, TeacherScores
from opd_megatron.teachers.factory import build_teacher
from opd_megatron.loop.report import write_run_outputs

log = logging.getLogger("opd_megatron.loop.opd")


class OpdProgress:
    """What every rank agrees on about the run so far, an OPD checkpoint's shared `opd` state (restored at any
    layout): the rollout engine's sampling position, the skipped steps, the evaluation before the first step, and
    the teacher tokens scored by every replica (`state_dict` is collective: it sums them)."""

    def __init__(self, engine: RolloutEngine, scoring: TeacherScoring):
        self.engine, self.scoring = engine, scoring
        self.skipped_steps = 0
        self.baseline_eval: dict = {}

    def state_dict(self) -> dict:
        return {"engine": self.engine.state_dict(), "skipped_steps": self.skipped_steps,
                "baseline_eval": self.baseline_eval, "teacher_tokens": self.scoring.global_tokens()}

    def load_state_dict(self, state: dict) -> None:
        self.engine.load_state_dict(state.get("engine", {}))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.baseline_eval = state.get("baseline_eval", {})
        self.scoring.tokens_before = int(state.get("teacher_tokens", 0))


class OpdRankState:
    """One rank's shard of an OPD checkpoint (restored at the same layout only), from the parts that hold one: the
    batch teacher.overlap scores ahead (`pending`, `pending_extra_ids`), the rollouts already requested for later
    steps (`rollouts_ahead`, rollout.max_staleness), the teacher's state (`self_teacher`, left
    out when the teacher has none: so far only a self-teacher has one) and the value head's (`value_head`, last
    pipeline stage)."""

    def __init__(self, scoring: TeacherScoring, teacher: Teacher, value_head: Optional[ValueHead],
                 rollouts: RolloutsAhead):
        self.scoring, self.teacher, self.value_head, self.rollouts = scoring, teacher, value_head, rollouts

    def state_dict(self) -> dict:
        state = self.scoring.state_dict()
        ahead = self.rollouts.state_dict()
        if ahead["batches"]:
            state["rollouts_ahead"] = ahead
        teacher = self.teacher.state_dict()
        if teacher:
            state["self_teacher"] = teacher
        if self.value_head is not None:
            state["value_head"] = self.value_head.state()
        return state

    def load_state_dict(self, state: dict) -> None:
        # The pending batch last: its scoring starts at once, with the teacher's restored state.
        if self.value_head is not None and "value_head" in state:
            self.value_head.load(state["value_head"])
        if "self_teacher" in state:
            self.teacher.load_state_dict(state["self_teacher"])
        if "rollouts_ahead" in state:
            self.rollouts.load_state_dict(state["rollouts_ahead"])
        self.scoring.load_state_dict(state)


class OpdRun(StepLoop):
    """One OPD run on this rank: its parts built from the config (and restored from a checkpoint), then driven by
    `common.run_steps` (`train_opd`) or step by step (`next_batch`, `train_step`)."""

    def __init__(self, cfg: RunConfig, ctx: ParallelContext):
        self.cfg, self.ctx = cfg, ctx
        self.run_dir = RunDirectory(cfg, ctx.is_logging_rank)
        self._build_prompts()
        self._build_models()
        self.evaluator = Evaluator(cfg, ctx, source=self.source, task=self.task, tokenizer=self.tokenizer,
                                   engine=self.eval_engine, trainable=self.trainable, teacher=self.teacher,
                                   scoring=self.scoring, objective=self.objective, vocab=self.vocab,
                                   stop_ids=self.sampling.stop_ids)
        self.progress = OpdProgress(self.engine, self.scoring)
        self.checkpointer = Checkpointer(cfg, ctx, self.trainable, self.run_dir.checkpoints,
                                         shared={"opd": self.progress},
                                         per_rank=OpdRankState(self.scoring, self.teacher, self.value_head,
                                                               self.rollouts))
        self.step = 0
        # Seconds over this process's training steps (evaluations not included): sampling rollouts, on the teacher
        # (waiting for a served teacher's scores; a dense teacher's forwards inside the loss), in the updates (the
        # teacher's forwards taken out), and whole steps.
        self.rollout_s = self.teacher_s = self.update_s = self.steps_s = 0.0
        self.final_eval: dict = {}
        self.reference: Optional[list[torch.Tensor]] = None   # the frozen reference's parameters (this rank's)
        self._start()

    def _build_prompts(self) -> None:
        """The task (or JSONL prompts), tokenizer, prompt source, sampling settings and on-policy mixture."""
        cfg, ctx, r = self.cfg, self.ctx, self.cfg.rollout
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
        if r.source == "corpus":
            self.source = self._corpus_prompts(max_prompt)
        else:
            self.source = PromptSource(self.tokenizer, cfg.run.seed, max_prompt, task=self.task,
                                       path=r.path if r.source == "jsonl" else None, prompt_key=r.prompt_key,
                                       answer_key=r.answer_key, apply_chat_template=r.apply_chat_template,
                                       domain_key=r.domain_key, privileged_key=r.privileged_key,
                                       eval_count=cfg.eval.prompts, eval_path=cfg.eval.path or None)
        stops = (self.tokenizer.eos_id,) if r.stop_at_eos else ()
        # policy_temperature: the loss's distribution, under which the sampler records pi_theta_old(y_t) beside
        # the behaviour log-prob mu(y_t) of what it actually sampled (docs/opd-math.md, Route B).
        self.sampling = SamplingConfig(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                       top_k=r.top_k, n=r.samples_per_prompt, stop_ids=stops,
                                       policy_temperature=cfg.opd.student_temperature)
        self.mixture = OnPolicyMixture(cfg.opd.mixtures.on_policy_fraction, cfg.run.seed)

    def _corpus_prompts(self, max_prompt: int) -> PromptSource:
        """rollout.source corpus: prompts cut from the samples of the indexed corpus in `data` (its blend order),
        evaluation prompts from the held-out corpus at eval.path (its first samples, in file order)."""
        cfg, r = self.cfg, self.cfg.rollout
        if r.prefix_tokens > max_prompt:
            raise ValueError(f"rollout.prefix_tokens={r.prefix_tokens} + rollout.max_new_tokens={r.max_new_tokens} "
                             f"exceed model.max_position_embeddings={cfg.model.max_position_embeddings}")
        blend = build_dataset(cfg.data, self.tokenizer, seed=cfg.run.seed)
        held_out = build_dataset(dataclasses.replace(cfg.data, path=cfg.eval.path, blend=[], shuffle=False),
                                 self.tokenizer, seed=cfg.run.seed)
        corpus = CorpusPrompts(blend, self.tokenizer, r.prefix_tokens, r.max_new_tokens, "rollout.source=corpus")
        evaluation = CorpusPrompts(held_out, self.tokenizer, r.prefix_tokens, r.max_new_tokens, "eval.path")
        return PromptSource(self.tokenizer, cfg.run.seed, max_prompt, eval_count=cfg.eval.prompts, corpus=corpus,
                            eval_corpus=evaluation)

    def _build_models(self) -> None:
        """The student and its optimizer, the rollout engines on its weights, the teacher (and its scoring), the
        value head and the objective (in this order on every rank: the collectives and the random initialisations
        line up)."""
        cfg, ctx = self.cfg, self.ctx
        self.student = build_student(cfg.model, cfg.parallel, ctx.device)
        self.trainable = wrap_for_training(self.student, cfg.optim, cfg.model, cfg.run.train_steps)
        self.student_parameters = parameter_count(self.trainable.module)        # compute/student_flops
        if cfg.rollout.engine != "megatron":
            build = build_sglang_engine if cfg.rollout.engine == "sglang" else build_vllm_engine
            self.engine: RolloutEngine = build(cfg, ctx, self.trainable.module, self.vocab, self.tokenizer.pad_id,
                                               self.run_dir.path)
        else:
            self.engine = MegatronRolloutEngine(self.trainable.ddp, self.vocab, self.tokenizer.pad_id,
                                                cfg.model.max_position_embeddings, cfg.run.seed)
        self.rollouts = RolloutsAhead(
            self.engine, self.sampling, lambda step: self.source.prompts(step, ctx.dp_rank, ctx.dp,
                                                                         self.prompts_per_rank),
            self.mixture.is_on_policy, cfg.run.train_steps, cfg.rollout.max_staleness)
        self.engine_agreement: dict[str, float] = {}
        self.eval_engine = MegatronRolloutEngine(self.trainable.ddp, self.vocab, self.tokenizer.pad_id,
                                                 cfg.model.max_position_embeddings, cfg.run.seed + 1)
        self.teacher, self.compat = build_teacher(cfg, ctx.device, self.tokenizer, self.student.padded_vocab_size,
                                                  student=self.student)
        self.value_head: Optional[ValueHead] = None
        if cfg.opd.uses_value_head and parallel_state.is_pipeline_last_stage():
            self.value_head = ValueHead(cfg.model.hidden_size, cfg.opd.credit.value_lr, ctx.device)
            self.value_head.attach(self.student.module)
        self.scoring = TeacherScoring(cfg, self.teacher, self.trainable, self.vocab)
        # A dense teacher scores inside the loss: through `counted`, its forwards are timed and its tokens counted.
        dense = self.scoring.counted(self.teacher) if self.teacher.gives_full_logits else None
        self.objective = OpdObjective(cfg.opd, cfg.teacher, self.vocab, dense, self.value_head)

    def _start(self) -> None:
        """Resume from the run's own checkpoints (everything an exact resume needs), or take the weights of
        checkpoint.load (e.g. an SFT warm start), which is also the frozen reference of opd.regularizers."""
        cfg = self.cfg
        start = starting_point(cfg.checkpoint, self.run_dir.checkpoints, LoadMeaning.WEIGHTS)
        if cfg.opd.regularizers.reference_kl_coef > 0:
            # The frozen reference is the starting weights (checkpoint.load, else model.from_hf), also when a
            # resume follows.
            if cfg.checkpoint.load is not None:
                load_checkpoint(resolve_checkpoint(cfg.checkpoint.load), self.trainable, self.ctx,
                                load_optimizer=False)
            else:
                load_hf_weights(self.trainable.module, cfg.model, cfg.model.from_hf)
            self.reference = [p.detach().clone() for p in self.trainable.module.parameters()]
        self.step = self.checkpointer.restore(start)
        if start.restores_run and self.ctx.is_logging_rank:
            print(f"[opd-megatron] resumed from {start.path} at step {self.step}", flush=True)
        # A served engine starts from the weights the run starts (or resumes) with, checked against the trainer.
        if self.engine.holds_copy:
            self.engine.sync_weights(self.step)
            self._check_engine_agreement()

    def save(self) -> str:
        """A checkpoint of the run at its current step (collective)."""
        return self.checkpointer.save(self.step)

    @property
    def timing(self) -> dict[str, float]:
        """Seconds over this process's training steps so far: sampling rollouts, on the teacher, in the updates
        (without the teacher's forwards), and the whole steps (`wall_s`: the three and the step's diagnostics)."""
        return {"rollout_s": self.rollout_s, "teacher_s": self.teacher_s, "update_s": self.update_s,
                "wall_s": self.steps_s}

    # -- batches -------------------------------------------------------------------------------------------------
    def make_batch(self, step: int) -> RolloutBatch:
        """Step `step`'s rows of this data-parallel rank, sampled with the current weights, with the prompts'
        context for the teacher and, for task prompts, the verifier's rewards."""
        started = time.perf_counter()
        n = self.cfg.rollout.samples_per_prompt
        if self.mixture.is_on_policy(step):
            # The noise is a pure function of (run seed, step, data-parallel rank, column): an exact resume
            # replays it, and no two data-parallel ranks share it.
            prompts, batch = self.rollouts.take(step, self.engine.policy_version(self.step))
        elif self.cfg.rollout.source == "corpus":
            # Whole samples (every token trains, as in pretraining KD), keyed for a teacher cache.
            windows = self.source.windows(step, self.ctx.dp_rank, self.ctx.dp, self.prompts_per_rank * n)
            batch, prompts = window_batch(windows, self.tokenizer.pad_id, policy_version=self.step), []
        else:
            prompts = self.source.prompts(step, self.ctx.dp_rank, self.ctx.dp, self.prompts_per_rank * n)
            missing = [p.text for p in prompts if p.reference is None]
            if missing:
                raise ValueError(f"opd.mixtures.on_policy_fraction < 1 needs reference responses "
                                 f"(rollout.answer_key) for the fixed-dataset share; prompt {missing[0][:80]!r} "
                                 f"has none")
            batch = RolloutBatch.from_sequences([p.ids for p in prompts], [p.reference for p in prompts],
                                                self.tokenizer.pad_id, on_policy=False,
                                                prompts=[p.text for p in prompts], policy_version=self.step,
                                                length=max(len(p.ids) + len(p.reference) for p in prompts))
        if prompts:
            rows = prompts if len(prompts) == batch.size else [p for p in prompts for _ in range(n)]
            batch = with_prompt_context(batch, rows, self.teacher.reads_privileged_context)
        if self.task is not None:
            batch = replace(batch, rewards=torch.tensor(
                [self.task.score(text, self.tokenizer.decode(batch.response_ids(b)))
                 for b, text in enumerate(batch.prompts)], dtype=torch.float32))
        self.rollout_s += time.perf_counter() - started
        return batch

    def next_batch(self) -> tuple[RolloutBatch, Optional[TeacherScores]]:
        """This step's batch and its served teacher's scores (None for a dense teacher). With teacher.overlap the
        next step's batch is sampled now, with the weights before this update (one update stale, reported as
        rollout/staleness), and scored in the background while this one trains."""
        step = self.step
        batch, future = self.scoring.take_ahead()
        if batch is None:
            batch = self.make_batch(step)
        if self.cfg.teacher.overlap and step + 1 < self.cfg.run.train_steps:
            self.scoring.score_ahead(self.make_batch(step + 1))
        waited = self.scoring.waited_s
        scores = self.scoring.scores_for(batch, future)
        self.teacher_s += self.scoring.waited_s - waited
        return batch, scores

    # -- what the loss reads of a batch ------------------------------------------------------------------------------
    def loss_batch(self, batch: RolloutBatch, teacher: Optional[TeacherScores]) -> tuple[RolloutBatch, float]:
        """`batch` (trimmed) with everything the loss reads besides its rows, each computed here for the whole
        global batch before any micro-batch: the teacher's scores, the normaliser's per-token weights, the centred
        rewards of the outcome term, the frozen reference's log-probs and group / batch advantages (these two by
        forward-only passes with the current weights). Returns it and the global count of response tokens."""
        opd, credit = self.cfg.opd, self.cfg.opd.credit
        scored = replace(batch, teacher=teacher).trimmed()
        tokens, sequences, rows = self._global_counts(scored)
        loss_weights = normalizer_weights(scored.loss_mask, opd.normalizer, tokens, sequences, rows,
                                          self.cfg.rollout.max_new_tokens)
        outcome = None
        if opd.loss != "divergence" and credit.outcome_beta and scored.rewards is not None:
            # R - b_R on the whole batch: a prompt's group is whole on this data-parallel rank, not in a micro-batch.
            outcome = centred_rewards(scored.rewards, "group_mean", group_ids=scored.group_ids)
        reference = advantages = None
        whole_batch_baseline = opd.loss != "divergence" and credit.baseline in ("group_mean", "batch_mean")
        if scored.behaviour_logprobs is not None and scored.old_logprobs is None and self.step > scored.policy_version:
            # Stale rows of a served engine carry its `mu` but no pi_theta_old, and the weights that sampled them
            # are gone: the current ones stand in as the proximal policy of decoupled PPO (Hilton et al. 2021, as
            # AReaL does), so the PPO ratio starts at 1 and the sampler-mismatch weight pi_theta_old / mu carries
            # the staleness and the engine's numerics, corrected by truncated IS (docs/opd-math.md, Route B).
            # Fresh rows need nothing: the training forward's own log-probs are pi_theta_old.
            old, _ = self._served_logprobs(scored, with_mu=False)
            scored = replace(scored, old_logprobs=old) if old is not None else scored
        if self.reference is not None or whole_batch_baseline:
            micro = StudentInput.of(scored, self.cfg.parallel.micro_batch_size)
            if self.reference is not None:
                reference = self._reference_logprobs(scored, micro)
            if whole_batch_baseline:
                advantages = self._whole_batch_advantages(scored, micro)
        return replace(scored, loss_weights=loss_weights, outcome_advantages=outcome, reference_logprobs=reference,
                       advantages=advantages), tokens

    def _global_counts(self, batch: RolloutBatch) -> tuple[float, float, float]:
        """Response tokens, rows with a response token, and rows, over every data-parallel rank."""
        counts = torch.tensor([float(batch.loss_mask.sum()), float((batch.loss_mask.sum(1) > 0).sum()),
                               float(batch.size)], dtype=torch.float64)
        dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        return float(counts[0]), float(counts[1]), float(counts[2])

    def _whole_batch_advantages(self, batch: RolloutBatch, micro_batches: list[StudentInput]
                                ) -> Optional[torch.Tensor]:
        """Group / batch baselines need every row's log-ratio first: a forward-only pass with the current weights
        (the same values the training forward will see), then the estimator on the whole batch. `[B, S]` on the
        last stage, None elsewhere."""
        opd, credit = self.cfg.opd, self.cfg.opd.credit
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
            return None
        # The same kappa r_t (log-ratio clip included) the loss would give the estimator.
        log_ratio = self.objective.credit_log_ratio(torch.cat(captured))
        gamma = self.objective.credit_gamma
        if credit.baseline == "batch_mean":
            # The leave-one-out per-position mean over the GLOBAL batch: column totals summed over data-parallel
            # ranks (a rank-local mean would change the estimator with the data-parallel size).
            returns = returns_to_go(log_ratio, batch.loss_mask, gamma)
            return batch_mean_advantages(returns, batch.loss_mask,
                                         *self._global_column_totals(returns, batch.loss_mask))
        return credit_advantages(log_ratio, batch.loss_mask, credit.estimator, gamma, baseline=credit.baseline,
                                 group_ids=batch.group_ids)

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

    def _served_logprobs(self, batch: RolloutBatch, with_mu: bool) -> tuple[Optional[torch.Tensor],
                                                                               Optional[torch.Tensor]]:
        """A forward-only pass with the current weights over rows a served engine sampled: the sampled tokens'
        log-probs under the loss's distribution (full softmax at opd.student_temperature) and, with `with_mu`, under
        the distribution the engine sampled from (rollout temperature, top-k, top-p). `[B, S]` each on the last
        pipeline stage, None elsewhere."""
        captured: list[tuple[torch.Tensor, torch.Tensor]] = []

        def loss_fn(logits, micro: StudentInput):
            mb = micro.rollout
            with torch.no_grad():
                labels = mb.labels.to(logits.device)
                mask = mb.loss_mask.to(logits.device) > 0
                old = vp.vocab_parallel_token_logprobs(logits, labels, self.cfg.opd.student_temperature, self.vocab)
                mu = sampling_token_logprobs(logits, labels, self.sampling, self.vocab) if with_mu else old
                captured.append((torch.where(mask, old, 0.0).cpu(), torch.where(mask, mu, 0.0).cpu()))
            return logits.sum() * 0.0, mb.loss_mask.sum()

        forward_backward(self.trainable.ddp, StudentInput.of(batch, self.cfg.parallel.micro_batch_size), loss_fn,
                         batch.tokens.shape[1] - 1, self.cfg.parallel.micro_batch_size, forward_only=True)
        if not captured:
            return None, None
        return torch.cat([c[0] for c in captured]), (torch.cat([c[1] for c in captured]) if with_mu else None)

    def _check_engine_agreement(self) -> None:
        """Before the first update of this process (a run's start or resume): a probe batch (the step's first prompt
        on each data-parallel rank, rollout.samples_per_prompt rows, its own sample key) from the engine just
        synced, and mean |log mu_trainer - log mu_engine| over its response tokens on every rank (the last pipeline
        stage computes, every rank learns) within rollout.max_initial_mismatch, else RolloutMismatchError with the
        evidence."""
        prompts = self.source.prompts(self.step, self.ctx.dp_rank, self.ctx.dp, 1)
        batch = self.engine.generate([p.ids for p in prompts], self.sampling, [p.text for p in prompts],
                                     policy_version=self.step, sample_key=("engine_check", self.step)).trimmed()
        _, trainer_mu = self._served_logprobs(batch, with_mu=True)
        totals = torch.zeros(4, dtype=torch.float64)
        if trainer_mu is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
            keep = batch.loss_mask > 0
            gap = (trainer_mu.double() - batch.behaviour_logprobs.double()).abs()[keep]
            outside = ~torch.isfinite(gap)
            gap = gap.nan_to_num(nan=50.0, posinf=50.0).clamp(max=50.0)
            totals += torch.tensor([float(gap.sum()), float(keep.sum()), float(outside.sum()),
                                    float(gap.max()) if gap.numel() else 0.0], dtype=torch.float64)
        everyone = torch.zeros(self.ctx.world_size, 4, dtype=torch.float64)
        gathered = list(everyone.unbind(0))
        dist.all_gather(gathered, totals)
        every = torch.stack(gathered)
        tokens = float(every[:, 1].sum())
        mean_gap = float(every[:, 0].sum()) / max(tokens, 1.0)
        worst, outside = float(every[:, 3].max()), float(every[:, 2].sum())
        self.engine_agreement = {"rollout/engine_logprob_gap_mean": mean_gap, "rollout/engine_logprob_gap_max":
                                 worst, "rollout/engine_tokens_outside_support": outside}
        if mean_gap > self.cfg.rollout.max_initial_mismatch:
            raise RolloutMismatchError(
                f"the rollout engine's log-probs disagree with the trainer's on a probe batch: mean |log mu_trainer"
                f" - log mu_engine| = {mean_gap:.4g} nats over {int(tokens)} tokens (max {worst:.4g}; "
                f"{int(outside)} tokens the trainer's sampling distribution cannot produce), above rollout."
                f"max_initial_mismatch={self.cfg.rollout.max_initial_mismatch}. Does the server hold the student's "
                f"weights and tokenizer, and run with --logprobs-mode processed_logprobs and --generation-config "
                f"vllm?")
        if self.ctx.is_logging_rank:
            print(f"[opd-megatron] rollout engine agrees with the trainer: mean |log-prob gap| {mean_gap:.3g} nats "
                  f"(max {worst:.3g}) over {int(tokens)} tokens", flush=True)

    def _reference_logprobs(self, batch: RolloutBatch, micro_batches: list[StudentInput]) -> Optional[torch.Tensor]:
        """The frozen reference's log-probs of the sampled tokens `[B, S]` (last stage; None elsewhere), by a
        forward-only pass of the student's own modules with the reference weights swapped in (any TP/PP layout;
        no second model is built)."""
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
        return torch.cat(captured) if parallel_state.is_pipeline_last_stage() else None

    # -- the step ------------------------------------------------------------------------------------------------
    def train_step(self, batch: RolloutBatch, teacher: Optional[TeacherScores] = None,
                   diagnostics: bool = True) -> tuple[Optional[dict], bool]:
        """One optimizer step on `batch` (this data-parallel rank's rows) and `teacher`, its served teacher's
        scores (None: a dense teacher scores inside the loss). Returns the step's metrics (on the logging rank, None
        elsewhere) and whether the step was applied. diagnostics=False (a step the run does not log): the loss's
        per-token vocabulary statistics are not computed (`OpdObjective.micro_batch_loss`), nor are the metrics
        that read them; the update is the same."""
        started, waited = time.perf_counter(), self.scoring.waited_s
        batch, global_tokens = self.loss_batch(batch, teacher)
        loss, num_tokens, stats = self._loss_and_gradients(batch, diagnostics or self.cfg.logging.rollouts > 0)
        lr = current_lr(self.trainable.optimizer)
        applied, grad_norm = self._apply_or_skip(loss, global_tokens)
        teacher_s = self.scoring.waited_s - waited          # a dense teacher's forwards, inside the loss
        self.teacher_s += teacher_s
        self.update_s += time.perf_counter() - started - teacher_s
        metrics = self._diagnostics(batch, stats)
        if self.cfg.logging.rollouts:
            self._log_rollouts(batch, stats)
        if metrics is not None:
            metrics.update({"loss": loss, "lr": lr, "grad_norm": grad_norm,
                            "skipped_steps": self.progress.skipped_steps, "step_skipped": 0.0 if applied else 1.0,
                            "tokens": num_tokens})
        return metrics, applied

    def _loss_and_gradients(self, batch: RolloutBatch, diagnostics: bool) -> tuple[float, float,
                                                                                   list[MicroBatchStats]]:
        """The forward and backward of `batch` through the pipeline schedule (student and value head gradients
        zeroed first): the loss per token (NaN when a micro-batch met a non-finite logit), the token count, and
        each micro-batch's statistics (last stage; the vocabulary statistics only with `diagnostics`)."""
        mbs = self.cfg.parallel.micro_batch_size
        staleness = self.step - batch.policy_version
        stats: list[MicroBatchStats] = []

        def loss_fn(logits, micro: StudentInput):
            hidden = self.value_head.hidden if self.value_head is not None else None
            loss_sum, count, mb_stats = self.objective.micro_batch_loss(logits, micro.rollout, hidden,
                                                                        staleness=staleness, diagnostics=diagnostics)
            stats.append(mb_stats)
            return loss_sum, count

        micro = StudentInput.of(batch, mbs)
        zero_grads(self.trainable)
        if self.value_head is not None:
            self.value_head.optimizer.zero_grad(set_to_none=False)
        loss_sum, num_tokens = forward_backward(self.trainable.ddp, micro, loss_fn, batch.tokens.shape[1] - 1, mbs)
        loss = loss_sum / max(num_tokens, 1.0)
        if any(s.nonfinite for s in stats):
            loss = float("nan")
        return loss, num_tokens, stats

    def _apply_or_skip(self, loss: float, global_tokens: float) -> tuple[bool, float]:
        """The optimizer steps (student, value head) and the teacher's after-step update when the loss and every
        gradient are finite on every rank; otherwise the step is skipped and counted, or the run stops as
        opd.nonfinite says. Returns (applied, grad norm)."""
        opd = self.cfg.opd
        if self._all_finite(math.isfinite(loss)):
            _, grad_norm = optimizer_step(self.trainable)
            if self.value_head is not None:
                self.value_head.step(global_tokens)
            self.teacher.after_optimizer_step()          # a self-teacher's EMA: e_k = d e_(k-1) + (1 - d) theta_k
            return True, grad_norm
        self.progress.skipped_steps += 1
        zero_grads(self.trainable)
        skipped = self.progress.skipped_steps
        message = (f"step {self.step + 1}: non-finite loss or gradient (loss {loss}); the step was not applied "
                   f"({skipped} skipped so far); the last checkpoint is untouched")
        if opd.nonfinite == "stop" or skipped > opd.max_skipped_steps:
            raise NonFiniteLossError(message + (f"; more than opd.max_skipped_steps={opd.max_skipped_steps}"
                                                if opd.nonfinite == "skip" else ""))
        log.warning(message)
        return False, float("nan")

    def _all_finite(self, loss_finite: bool) -> bool:
        """The loss (last stage) and every gradient (all ranks) are finite, agreed over the world."""
        bad = torch.zeros(1)
        # megatron's DDP accumulates the gradient of each trainable parameter in its `main_grad` buffer.
        finite = loss_finite and all_finite(param.main_grad for param in self.trainable.ddp.params_with_grad)
        bad[0] = 0.0 if finite else 1.0
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return not bool(bad.item())

    # -- what a step reports -------------------------------------------------------------------------------------
    def _diagnostics(self, batch: RolloutBatch, stats: list[MicroBatchStats]) -> Optional[dict]:
        """The step's diagnostics over the GLOBAL batch, on the logging rank (None elsewhere). Each replica's scoring
        rank (last stage, TP rank 0) sends its per-token values `[B, S]` and per-row values to the logging rank,
        which computes every statistic once on their concatenation: token means weighted by tokens, counts summed,
        quantiles, standard deviations and the explained variance exact. (An average of the replicas' statistics
        is none of these: it halves `tokens/count` at dp=2 and weighs a short replica's tokens more.) The cost is
        one gather of a few `[B, S]` float tensors per step, a few bytes per token of the global batch."""
        payload = self._diagnostics_payload(batch, stats) if stats and scoring_rank() else None
        gathered = [None] * dist.get_world_size() if self.ctx.is_logging_rank else None
        dist.gather_object(payload, gathered, dst=0)
        if not self.ctx.is_logging_rank:
            return None
        return self._global_diagnostics([g for g in gathered if g is not None])

    def _diagnostics_payload(self, batch: RolloutBatch, stats: list[MicroBatchStats]) -> dict:
        """What this replica's scoring rank sends to the logging rank: per-token values `[B, S]`, the routing
        statistics, the gates' kept tokens, the teacher's counts, and per-row values."""
        tensors = [s.diagnostic_tensors() for s in stats]

        def cat(name: str) -> Optional[torch.Tensor]:
            values = [t[name] for t in tensors]
            return torch.cat(values).cpu() if all(v is not None for v in values) else None

        keep_counts: dict = {}
        for s in stats:
            for key, value in s.gate_keep.items():
                keep_counts[key] = keep_counts.get(key, 0.0) + value * float(s.mask.sum())
        routing = None
        if all(s.routing is not None for s in stats):
            routing = {f.name: torch.cat([getattr(s.routing, f.name) for s in stats]).cpu()
                       for f in dataclasses.fields(stats[0].routing)}
        per_token = {name: cat(name) for name in tensors[0]}
        per_token["behaviour"] = batch.behaviour_logprobs if bool(batch.on_policy.all()) else None
        return {"per_token": per_token, "routing": routing, "keep_counts": keep_counts,
                "teacher": (self.scoring.tokens, self.scoring.seconds, self.scoring.rejected_replies),
                "rows": {"staleness": torch.full((batch.size,), float(self.step - batch.policy_version)),
                         "response_lengths": (batch.lengths - batch.prompt_lengths).float(),
                         "lengths": batch.lengths.float(),
                         "rewards": batch.rewards, "on_policy": batch.on_policy.float()}}

    def _global_diagnostics(self, parts: list[dict]) -> dict:
        """The diagnostics of the replicas' payloads, joined row-wise (the logging rank)."""
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
            DiagnosticsBatch(mask, log_ratio=token("log_ratio"), student_logprobs=token("student_logprobs"),
                             behaviour_logprobs=token("behaviour"), old_logprobs=token("old_logprobs"),
                             advantages=token("advantages"), gate_keep_rates=keep_rates, routing_stats=routing,
                             values=token("values"), value_targets=token("value_targets"),
                             staleness=row("staleness"), response_lengths=row("response_lengths")),
            DiagnosticsSettings(
                ratio_interval=(1.0 - opd.policy_gradient.clip_eps_low, 1.0 + opd.policy_gradient.clip_eps_high),
                mismatch_interval=opd.gates.truncated_is or (0.5, 2.0)))
        keep = mask > 0
        for key, name in (("kl/rkl_exact", "rkl_exact"), ("entropy/student", "student_entropy"),
                          ("entropy/teacher", "teacher_entropy"), ("agreement/teacher_top1_match", "top1_match"),
                          ("agreement/topk_overlap", "topk_overlap"),
                          ("agreement/student_mass_on_teacher_support", "mass_on_teacher"),
                          ("kl/reference", "reference_kl")):
            values = token(name)
            if values is not None and bool(keep.any()):
                out[key] = float(values[keep].double().mean())
        freed, on_support = token("freed_mass"), token("freed_mass_on_support")
        if freed is not None and float(freed.sum()) > 0:
            # The share of the mass negative advantages took from sampled tokens that went to the teacher's top-k
            # (OpdObjective._freed_mass); the rest went to tokens the teacher does not support.
            out["routing/freed_mass_to_teacher_support"] = float(on_support.double().sum() / freed.double().sum())
            out["routing/freed_mass_mean"] = float(freed[freed > 0].double().mean())
        rewards = row("rewards")
        if rewards is not None:
            out["reward/mean"] = float(rewards.double().mean())
        out["rollout/on_policy"] = float(row("on_policy").double().mean())
        out.update(student_compute(row("lengths"), row("on_policy"), self.student_parameters))
        rates = [tokens / seconds for tokens, seconds, _ in (p["teacher"] for p in parts) if seconds > 0]
        if not self.scoring.dense:      # a served teacher's replies rejected and asked again (teachers/http.py)
            out["teacher/rejected_replies"] = float(sum(p["teacher"][2] for p in parts))
        if rates:
            # The replicas ask the teacher(s) concurrently, each for its share: their rates add up.
            out["throughput/teacher_tokens_per_s"] = sum(rates)
        return out

    def _log_rollouts(self, batch: RolloutBatch, stats: list[MicroBatchStats]) -> None:
        """The first `logging.rollouts` rows of each data-parallel rank's batch, appended to rollouts.jsonl by the
        logging rank: what was sampled, scored and rewarded, token by token (collective: every rank calls it)."""
        records = []
        if stats and scoring_rank():
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
                    behaviour = batch.behaviour_logprobs[b, start:end].tolist()
                    record["behaviour_logprobs"] = [round(x, 6) for x in behaviour]
                records.append(record)
        # Only the logging rank writes: gather to it, not to every rank.
        gathered = [None] * dist.get_world_size() if self.ctx.is_logging_rank else None
        dist.gather_object(records, gathered, dst=0)
        if self.ctx.is_logging_rank:
            self.run_dir.path.mkdir(parents=True, exist_ok=True)
            with (self.run_dir.path / "rollouts.jsonl").open("a") as out:
                for rank_records in gathered:
                    for record in rank_records or []:
                        out.write(json.dumps(record) + "\n")

    # -- the loop, as common.run_steps drives it -------------------------------------------------------------------
    def before_steps(self, writer: MetricsWriter) -> None:
        """The evaluation before OPD, once per run (a resumed run has it from its checkpoint)."""
        if self.progress.baseline_eval:
            return
        before = self.evaluator.evaluate()
        self.progress.baseline_eval = {"student_score_before": before.get("score"), "rkl_before": before.get("rkl"),
                                       "teacher_score": self.evaluator.teacher_score()}
        writer.message(f"[opd-megatron] before OPD: {describe(before)}; teacher score "
                       f"{self.progress.baseline_eval['teacher_score']}")
        writer.log(self.step, {f"eval/{k}": v for k, v in before.items()})

    def advance(self) -> Optional[dict]:
        """One step: the batch and its scores, the update, the step's timings, and the evaluation every
        eval.interval steps (before the last, which `after_steps` evaluates)."""
        cfg = self.cfg
        before, started = self.timing, time.perf_counter()
        batch, teacher = self.next_batch()
        metrics, _ = self.train_step(batch, teacher, diagnostics=logged_step(cfg, self.step + 1))
        self.step += 1
        if self.engine.holds_copy and self.step % cfg.rollout.sync_interval == 0 and self.step < cfg.run.train_steps:
            synced = time.perf_counter()
            self.engine.sync_weights(self.step)
            self.rollout_s += time.perf_counter() - synced
        self.steps_s += time.perf_counter() - started
        if metrics is not None:
            # time/step/*: this step's seconds; time/cumulative/*: their sums over this process's steps.
            after = self.timing
            metrics.update({f"time/step/{k}": after[k] - before[k] for k in after})
            metrics.update({f"time/cumulative/{k}": v for k, v in after.items()})
            # The global batch's response tokens trained on, per second of the whole step.
            metrics["tokens_per_s"] = metrics["tokens"] / max(metrics["time/step/wall_s"], 1e-9)
            metrics.update(self.engine.stats())
            metrics.update(self.engine_agreement)
        if cfg.eval.interval and self.step % cfg.eval.interval == 0 and self.step < cfg.run.train_steps:
            result = self.evaluator.evaluate()
            if metrics is not None:
                metrics.update({f"eval/{k}": v for k, v in result.items()})
        return metrics

    def after_steps(self, writer: MetricsWriter) -> None:
        self.final_eval = self.evaluator.evaluate()
        writer.log(self.step, {f"eval/{k}": v for k, v in self.final_eval.items()})
        writer.message(f"[opd-megatron] after OPD: {describe(self.final_eval)}")

    def summary(self, result: TrainResult) -> dict:
        """summary.json of the run (collective: the teacher tokens are summed over the replicas)."""
        teacher_tokens = self.scoring.global_tokens()
        return {**self.progress.baseline_eval,
                "student_score_after": self.final_eval.get("score"), "rkl_after": self.final_eval.get("rkl"),
                "steps": self.step, "start_step": result.start_step, "skipped_steps": self.progress.skipped_steps,
                "stopped_by_signal": result.stopped_by_signal, "checkpoint": result.checkpoint,
                "wall_s": round(result.wall_s, 3), "time_split_s": self._time_split(),
                "teacher": self.teacher.name, "teacher_tokens_scored": teacher_tokens,
                "layout": {"tp": self.ctx.tp, "pp": self.ctx.pp, "dp": self.ctx.dp},
                "first_loss": result.first_loss, "last_loss": result.last_loss}

    def _time_split(self) -> dict[str, float]:
        """summary.json's split of the training steps' seconds: rollout, teacher and update (the rest of a step is
        its diagnostics)."""
        return {k: round(v, 3) for k, v in self.timing.items() if k != "wall_s"}


def train_opd(cfg: RunConfig, ctx: ParallelContext, stop: StopRequest) -> TrainResult:
    """Run OPD on this rank (called by `loop.train.train` with the parallel state initialised); summary.json and
    the report (`report.py`) at the end."""
    run_dir = RunDirectory(cfg, ctx.is_logging_rank)
    run_dir.write_config()
    run = OpdRun(cfg, ctx)
    try:
        with run_dir.metrics_writer(run.step) as writer:
            started = time.perf_counter()
            result = run_steps(run, cfg, run.checkpointer, writer, stop)
            run.scoring.close()
            result.wall_s = time.perf_counter() - started
    finally:
        run.teacher.close()
        run.engine.close()
    summary = run.summary(result)
    if ctx.is_logging_rank:
        run_dir.write_summary(summary)
        write_run_outputs(cfg, run_dir.path, summary, run.compat)
    return result


def evaluate_checkpoint(cfg: RunConfig, checkpoint: str) -> dict:
    """`opd-megatron eval`: the held-out score and per-token reverse KL to the configured teacher of a checkpoint
    (weights only), at any layout; the teacher's own score beside it when it can answer prompts itself."""
    cfg = dataclasses.replace(cfg)
    cfg.run.algorithm = "opd"
    cfg.checkpoint.load, cfg.checkpoint.resume = checkpoint, False
    # Evaluation samples in-process: a served engine's servers are neither needed nor touched (no weight sync).
    cfg.rollout = dataclasses.replace(cfg.rollout, engine="megatron", max_staleness=0)
    if resolve_checkpoint(checkpoint) is None:
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no complete checkpoint there")
    ctx = init_parallel(cfg)
    try:
        run = OpdRun(cfg, ctx)
        result = run.evaluator.evaluate()
        result["teacher_score"] = run.evaluator.teacher_score()
        result["checkpoint"] = str(resolve_checkpoint(checkpoint))
        run.teacher.close()
        return result
    finally:
        destroy_parallel()


__all__ = ["OpdRun", "StudentInput", "evaluate_checkpoint", "train_opd"]
