"""Held-out evaluation of an OPD run, before the first step, every `eval.interval` steps, after the last, and by
`opd-megatron eval`: the student's verifier score (greedy), its per-token reverse KL to the teacher on its own
samples, and the teacher's own verifier score when the teacher can answer prompts itself.

The prompts are `PromptSource.eval_prompts()` (never training prompts), split over the data-parallel ranks. The
sampling noise is keyed without the step, so every evaluation draws the same samples: before/after comparisons
are paired, and `opd-megatron eval` of a checkpoint reproduces the run's final evaluation.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from opd_megatron.config import RunConfig
from opd_megatron.data.tokenizer import Tokenizer
from opd_megatron.errors import NonFiniteLossError
from opd_megatron.loop.objective import OpdObjective, StudentInput
from opd_megatron.loop.teacher_scoring import TeacherScoring
from opd_megatron.parallel import divergences as vp
from opd_megatron.parallel.finite import nonfinite_on_any_tp_rank
from opd_megatron.rollout.batch import RolloutBatch
from opd_megatron.rollout.engine import RolloutEngine
from opd_megatron.rollout.generate import MegatronSampler, SamplingConfig
from opd_megatron.rollout.prompts import Prompt, PromptSource, window_batch, with_prompt_context
from opd_megatron.student.distributed import ParallelContext
from opd_megatron.student.optimizer import TrainableStudent
from opd_megatron.student.schedule import forward_backward
from opd_megatron.tasks.base import Task
from opd_megatron.teachers.base import NonFiniteTeacherError, Teacher

log = logging.getLogger("opd_megatron.loop.evaluation")


class Evaluator:
    """Evaluates the student (and the teacher) of one OPD run on this rank; every method is collective."""

    def __init__(self, cfg: RunConfig, ctx: ParallelContext, *, source: PromptSource, task: Optional[Task],
                 tokenizer: Tokenizer, engine: RolloutEngine, trainable: TrainableStudent, teacher: Teacher,
                 scoring: TeacherScoring, objective: OpdObjective, vocab: int, stop_ids: tuple[int, ...]):
        self.cfg, self.ctx = cfg, ctx
        self.source, self.task, self.tokenizer = source, task, tokenizer
        self.engine, self.trainable = engine, trainable
        self.teacher, self.scoring, self.objective = teacher, scoring, objective
        self.vocab, self.stop_ids = vocab, stop_ids
        self.max_new_tokens = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens

    def evaluate(self) -> dict[str, float]:
        """Held-out verifier score (`score`, greedy; task prompts only) and per-token reverse KL to the teacher
        (`rkl`) on the student's own samples at temperature 1 (exact over the vocabulary with a dense teacher, the
        k1 estimate with a served one)."""
        if self.teacher.reads_sample_keys:
            return self._held_out_nll()
        batch_size = self.cfg.eval.batch_size
        mine = self.source.eval_prompts()[self.ctx.dp_rank:: self.ctx.dp]
        correct = torch.zeros(2, dtype=torch.float64)      # hits, prompts
        rkl = torch.zeros(2, dtype=torch.float64)          # summed reverse KL, tokens
        for start in range(0, len(mine), batch_size):
            chunk = mine[start: start + batch_size]
            if self.task is not None:
                self._count_greedy_hits(chunk, start, correct)
            sampled = self.engine.generate([p.ids for p in chunk],
                                           SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=1.0,
                                                          stop_ids=self.stop_ids,
                                                          policy_temperature=self.cfg.opd.student_temperature),
                                           sample_key=("eval", start, "sampled"))
            sampled = with_prompt_context(sampled, chunk, self.teacher.reads_privileged_context)
            total, count = self._reverse_kl(sampled)
            rkl += torch.tensor([total, count], dtype=torch.float64)
        dist.all_reduce(correct, group=parallel_state.get_data_parallel_group())
        out: dict[str, float] = {}
        if self.task is not None:
            out["score"] = float(correct[0] / max(correct[1], 1.0))
        # _reverse_kl's totals are already summed over the whole world by forward_backward.
        out["rkl"] = float(rkl[0] / max(rkl[1], 1.0))
        return out

    def _held_out_nll(self) -> dict[str, float]:
        """A teacher cache scores only the windows it was written for, not the student's samples: the evaluation
        is then the student's per-token negative log-likelihood on the held-out corpus's first `eval.prompts`
        windows (`nll`; no `rkl`), as pretraining distillation reports its validation loss."""
        batch = window_batch(self.source.eval_windows()[self.ctx.dp_rank:: self.ctx.dp], self.tokenizer.pad_id)
        mbs = self.cfg.parallel.micro_batch_size

        def loss_fn(logits, micro: StudentInput):
            mb = micro.rollout
            with torch.no_grad():
                mask = mb.loss_mask.to(logits.device)
                logp = vp.vocab_parallel_token_logprobs(logits, mb.labels.to(logits.device), 1.0, self.vocab)
                return -(logp * mask).sum(), mask.sum()

        total, count = forward_backward(self.trainable.ddp, StudentInput.of(batch, mbs), loss_fn,
                                        batch.tokens.shape[1] - 1, mbs, forward_only=True)
        return {"nll": float(total / max(count, 1.0))}

    def _count_greedy_hits(self, chunk: list[Prompt], start: int, correct: torch.Tensor) -> None:
        """Add the student's greedy hits on `chunk` and its size to `correct` `[2]`."""
        greedy = self.engine.generate([p.ids for p in chunk],
                                      SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=0.0,
                                                     stop_ids=self.stop_ids),
                                      sample_key=("eval", start, "greedy"))
        for b, p in enumerate(chunk):
            correct[0] += self.task.score(p.text, self.tokenizer.decode(greedy.response_ids(b)))
        correct[1] += len(chunk)

    def _reverse_kl(self, batch: RolloutBatch) -> tuple[float, float]:
        """The summed per-token reverse KL to the teacher over `batch`'s response tokens and their count, summed
        over the world (NaN when a logit is not finite)."""
        batch = replace(batch, teacher=self.scoring.scores_for(batch, student_topk=False)).trimmed()
        opd, mbs = self.cfg.opd, self.cfg.parallel.micro_batch_size

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

        return forward_backward(self.trainable.ddp, StudentInput.of(batch, mbs), loss_fn, batch.tokens.shape[1] - 1,
                                mbs, forward_only=True)

    def teacher_score(self) -> Optional[float]:
        """The teacher's own greedy verifier score on the held-out prompts: None without a task, for a teacher
        that cannot answer prompts itself (`Teacher.can_generate`), and, with a warning, when the teacher's logits
        are not finite (the OPD steps then meet the same logits and skip or stop as opd.nonfinite says)."""
        if self.task is None or not self.teacher.can_generate:
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
        return None if value[1] > 0 else float(value[0]) / len(self.source.eval_prompts())

    def _teacher_hits(self) -> float:
        """This data-parallel rank's greedy hits of the teacher (the last stage holds the whole teacher)."""
        model = self.teacher.generation_model()
        sampler = MegatronSampler(model.module, self.vocab, self.tokenizer.pad_id, model.max_sequence_length, seed=0,
                                  use_pipeline=False)
        prompts = self.source.eval_prompts()[self.ctx.dp_rank:: self.ctx.dp]
        batch_size = self.cfg.eval.batch_size
        hits = 0.0
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start: start + batch_size]
            out = sampler.generate([p.ids for p in chunk], SamplingConfig(max_new_tokens=self.max_new_tokens,
                                                                          temperature=0.0, stop_ids=self.stop_ids))
            hits += sum(self.task.score(p.text, self.tokenizer.decode(out.response_ids(b)))
                        for b, p in enumerate(chunk))
        return hits


def describe(result: dict[str, float]) -> str:
    """One line of an evaluation's results, for the run's log."""
    score = f"score {result['score']:.3f}, " if result.get("score") is not None else ""
    if result.get("rkl") is None:
        return f"{score}held-out per-token NLL {result['nll']:.4f}"
    return f"{score}per-token reverse KL to the teacher {result['rkl']:.4f}"
