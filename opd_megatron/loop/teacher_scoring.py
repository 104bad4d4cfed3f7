"""A served teacher's scores for the OPD loop's batches (SGLang / vLLM; dense teachers score inside the loss).

The teacher is asked once per data-parallel replica, by TP rank 0 of the last pipeline stage (`scoring_rank`), and
the answer is broadcast to that stage's TP group, the only ranks the loss runs on. With `teacher.overlap` the next
step's batch is scored ahead, in a background thread, while this step trains (`score_ahead`, `take_ahead`): that
batch is this rank's checkpoint state (`state_dict`), so that a resume asks the teacher exactly what the
uninterrupted run asked.

The student top-k ids a served teacher scores for the student_topk / union supports come from a forward-only pass
of the student (`student_topk`): a pipeline collective, so every rank of the replica runs it, always on the main
thread, before the request is sent.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from opd_megatron.config import RunConfig
from opd_megatron.loop.objective import StudentInput
from opd_megatron.parallel.finite import nonfinite_on_any_tp_rank
from opd_megatron.parallel.topk import vocab_parallel_topk
from opd_megatron.rollout.batch import RolloutBatch
from opd_megatron.student.optimizer import TrainableStudent
from opd_megatron.student.schedule import forward_backward
from opd_megatron.teachers.base import Teacher, TeacherError, TeacherRequest, TeacherScores


def scoring_rank() -> bool:
    """TP rank 0 of the last pipeline stage asks a served teacher for its data-parallel replica."""
    return parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0


class TeacherScoring:
    """Scores batches with a served teacher on this rank's replica; counts what it asked.

    tokens: teacher tokens scored for this replica since this process started (on its last-stage ranks);
    tokens_before: scored by every replica before the checkpoint this run resumed from; seconds: spent in the
    teacher's `score` (throughput); waited_s: the loop's time waiting for scores (time/step/teacher_s). A dense
    teacher's answers, scored inside the loss, count here too (`counted`);
    rejected_replies: replies the served teacher rejected and asked again for this replica since this process started
    (teacher/rejected_replies; a batch is trained on only once a reply passes every check).
    """

    def __init__(self, cfg: RunConfig, teacher: Teacher, trainable: TrainableStudent, vocab: int):
        self.cfg, self.teacher, self.trainable, self.vocab = cfg, teacher, trainable, vocab
        self.dense = teacher.gives_full_logits
        self.overlap = cfg.teacher.overlap
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher") \
            if self.overlap and scoring_rank() else None
        self.pending: Optional[RolloutBatch] = None        # the next step's batch (teacher.overlap)
        self.pending_future: Optional[concurrent.futures.Future] = None
        self.pending_extra_ids: Optional[torch.Tensor] = None   # the pending batch's student top-k ids (last stage)
        self.tokens = 0
        self.tokens_before = 0
        self.seconds = 0.0
        self.waited_s = 0.0
        self.rejected_replies = 0

    # -- the one-step-ahead batch (teacher.overlap) ----------------------------------------------------------------
    def score_ahead(self, batch: RolloutBatch) -> None:
        """Start scoring the next step's `batch` in the background (after its student top-k pass, here)."""
        self.pending = batch
        self.pending_future = self._submit(batch)

    def take_ahead(self) -> tuple[Optional[RolloutBatch], Optional[concurrent.futures.Future]]:
        """The batch scored ahead and its future (None, None when there is none); it is no longer pending."""
        batch, future = self.pending, self.pending_future
        self.pending = self.pending_future = None
        return batch, future

    def state_dict(self) -> dict:
        """This rank's pending batch and the student top-k ids it was sent with (the keys of an OPD checkpoint's
        rank state)."""
        return {"pending": self.pending, "pending_extra_ids": self.pending_extra_ids}

    def load_state_dict(self, state: dict) -> None:
        """Submit the checkpoint's pending batch again with its saved student top-k ids: they were ranked with the
        weights before the checkpoint's last update, so every rank skips the pass that would rank them anew."""
        if state.get("pending") is not None:
            self.pending = state["pending"]
            self.pending_future = self._submit(self.pending, restored=state)

    def _submit(self, batch: RolloutBatch, restored: Optional[dict] = None) -> Optional[concurrent.futures.Future]:
        """The scoring future on the scoring rank and an already finished one (holding None) on the other ranks,
        so that every rank's `scores_for` knows the batch was submitted (and runs no second pass); None for a dense
        teacher or without teacher.overlap. `restored`: the rank state of a resumed run (see `load_state_dict`)."""
        if self.dense or not self.overlap:
            return None
        extra_ids = self.student_topk(batch) if restored is None else restored.get("pending_extra_ids")
        self.pending_extra_ids = extra_ids
        if self.executor is None or not scoring_rank():
            done: concurrent.futures.Future = concurrent.futures.Future()
            done.set_result(None)
            return done
        return self.executor.submit(self._score_now, batch, extra_ids)

    # -- scores ----------------------------------------------------------------------------------------------------
    def scores_for(self, batch: RolloutBatch, future: Optional[concurrent.futures.Future] = None,
                   student_topk: bool = True) -> Optional[TeacherScores]:
        """The served teacher's answer for `batch` on the last stage (broadcast within its TP group); None for a
        dense teacher (it scores inside the loss) and on the other stages. `future`: from `take_ahead` (every rank
        has one for a batch scored ahead); without it the batch is scored now, after the student top-k pass (every
        rank of the replica takes part in it). student_topk=False: sampled-token and top-k scores only
        (evaluation reads no support)."""
        if self.scores_inside_loss(batch):
            return None
        extra_ids = self.student_topk(batch) if future is None and student_topk else None
        if not parallel_state.is_pipeline_last_stage():
            return None
        started = time.perf_counter()
        scores: Optional[TeacherScores | TeacherError] = None
        if scoring_rank():
            try:
                scores = future.result() if future is not None else self._score_now(batch, extra_ids)
            except TeacherError as exc:     # sent to the TP group first: every rank stops with it, none waits
                scores = exc
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            box = [scores]
            dist.broadcast_object_list(box, src=parallel_state.get_tensor_model_parallel_src_rank(),
                                       group=parallel_state.get_tensor_model_parallel_group())
            scores = box[0]
        if isinstance(scores, TeacherError):
            raise scores
        self.waited_s += time.perf_counter() - started
        self.tokens += int(scores.valid.sum())
        self.rejected_replies += scores.rejected_replies
        return scores

    def scores_inside_loss(self, batch: RolloutBatch) -> bool:
        """Whether the loss scores `batch` micro-batch by micro-batch (a dense teacher) rather than this class once
        per replica. A teacher that reads window keys (a teacher cache) scores keyed rows here, by their keys, even
        when its live teacher of the on-policy rows is dense (teacher.cache.live colocated or in-process)."""
        return self.dense and not (self.teacher.reads_sample_keys and batch.sample_keys is not None)

    def _score_now(self, batch: RolloutBatch, extra_ids: Optional[torch.Tensor] = None) -> TeacherScores:
        """The teacher's answer for `batch`, with its log-probs on `extra_ids` (the student's top-k) when given."""
        started = time.perf_counter()
        request = batch.teacher_request(topk=self.cfg.teacher.topk, extra_ids=extra_ids)
        scores = self.teacher.score(request)
        if scores.extra_ids is None:        # the ids travel with their values to the loss (served teachers set it)
            scores.extra_ids = request.extra_ids
        self.seconds += time.perf_counter() - started
        return scores

    def student_topk(self, batch: RolloutBatch) -> Optional[torch.Tensor]:
        """The student's top-k ids `[B, L-1, k]` (k = teacher.score_student_topk; -1 off the scored columns) that a
        served teacher must score for the student_topk / union supports (SGLang's token_ids_logprob), on the last
        stage; None elsewhere and when the loss needs none.

        A forward-only pass with the current weights: a pipeline collective, so every rank of the replica calls it,
        on the main thread (never from the teacher.overlap scoring thread). It reads what the training forward will
        read (the trimmed batch in the same micro-batches), and ranks with `vocab_parallel_topk`: ties to the lower
        id, the rule the loss applies when it takes the student's top-k among these ids
        (`math.supports.top_k_among`). Without teacher.overlap the loss's logits are these logits, so its top-k
        (k = opd.route_a.support_k <= this k) is among the ids sent, exactly; with teacher.overlap the ids come from the
        weights one update before the step that trains on them, and the loss takes the student's best k among them:
        the support may then differ from the fresh top-k, but every id in it has a teacher value."""
        cfg = self.cfg
        k = cfg.teacher.score_student_topk
        if (self.dense or not k or cfg.opd.loss != "divergence"
                or cfg.opd.route_a.support not in ("student_topk", "union")):
            return None
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
        forward_backward(self.trainable.ddp, StudentInput.of(trimmed, mbs), loss_fn, trimmed.tokens.shape[1] - 1, mbs,
                         forward_only=True)
        if not parallel_state.is_pipeline_last_stage():
            return None
        ids = torch.full((batch.size, batch.tokens.shape[1] - 1, k), -1, dtype=torch.long)
        ids[:, : trimmed.tokens.shape[1] - 1] = torch.cat(captured)
        scored = batch.teacher_request().valid_mask().unsqueeze(-1)
        return torch.where(scored, ids, -1)

    def global_tokens(self) -> int:
        """Teacher tokens scored for every data-parallel replica since the run began (collective: every rank calls
        it; each replica's scoring rank contributes its own count, the other ranks of the replica 0)."""
        own = torch.tensor([float(self.tokens) if scoring_rank() else 0.0], dtype=torch.float64)
        dist.all_reduce(own)
        return self.tokens_before + int(own.item())

    def counted(self, teacher: Teacher) -> Teacher:
        """`teacher` as the loss calls it (a dense teacher, which scores each micro-batch inside the loss): each
        answer timed and its tokens counted here like a served teacher's, so that its forward is reported as the
        teacher's time, not the update's, and its tokens as scored."""
        return CountedTeacher(teacher, self)

    def count(self, scores: TeacherScores, seconds: float) -> None:
        """A dense teacher's answer, `seconds` long: the loop waited for all of it."""
        self.tokens += int(scores.valid.sum())
        self.seconds += seconds
        self.waited_s += seconds

    def close(self) -> None:
        """Wait for a scoring still in flight and stop the background thread."""
        if self.executor is not None:
            self.executor.shutdown(wait=True)


class CountedTeacher(Teacher):
    """A teacher whose every `score` is timed and counted by a `TeacherScoring` (`TeacherScoring.counted`); all
    else is the teacher's own."""

    def __init__(self, teacher: Teacher, scoring: TeacherScoring):
        self.teacher, self.scoring = teacher, scoring
        self.name = teacher.name
        self.gives_full_logits, self.max_topk = teacher.gives_full_logits, teacher.max_topk
        self.scores_extra_ids, self.can_generate = teacher.scores_extra_ids, teacher.can_generate
        self.reads_privileged_context = teacher.reads_privileged_context

    def vocab_size(self) -> int:
        return self.teacher.vocab_size()

    def score(self, request: TeacherRequest) -> TeacherScores:
        started = time.perf_counter()
        scores = self.teacher.score(request)
        self.scoring.count(scores, time.perf_counter() - started)
        return scores
