"""The one Teacher interface and the one result structure the loss consumes, whichever teacher produced it.

Position convention (label-aligned, as the student's loss is): a batch holds token ids `tokens [B, L]` (prompt
followed by response, right-padded; `lengths [B]` real tokens per row). The student's forward on `tokens[:, :-1]`
gives logits `[B, L-1, V]` whose column j predicts `tokens[:, j+1]`. Every teacher result uses the same columns:
column j of `TeacherScores` is the teacher's view of the distribution over `tokens[:, j+1]` given `tokens[:, :j+1]`.
A row is scored from column `score_start[b]` (normally prompt_len - 1, the column predicting the first response
token) to column `lengths[b] - 2` (the last real token); other columns are invalid (`valid` False, values 0).

Logprobs are at the teacher's temperature (1.0 unless the config says otherwise), never at the rollout
temperature: a served teacher is asked at its own temperature whatever the student sampled at
[docs/sources.md#temperature-issues].
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from opd_megatron.errors import ReportedError


class TeacherError(ReportedError, RuntimeError):
    """A teacher could not give a usable result (down, slow, garbage reply, vocabulary mismatch). The message
    names the teacher (URL or model) and what was wrong; no training step ever consumes a partial result."""


class NonFiniteTeacherError(TeacherError):
    """The teacher's own logits are NaN/inf (a broken in-loop teacher). Raised on every TP rank together, so the
    training loop can skip the step (or stop, as opd.nonfinite says) without leaving a collective waiting."""


@dataclass(frozen=True)
class TeacherRequest:
    """What to score: a batch of student rollouts in the contexts the student produced.

    tokens `[B, L]` int64: prompt + response ids, right-padded (pad values are never sent or read).
    lengths `[B]` int64: real tokens per row (2 <= lengths <= L).
    score_start `[B]` int64: first label column to score per row (0 <= score_start <= lengths - 2).
    topk: teacher top-k ids + logprobs to return at every scored column (0 = none).
    extra_ids `[B, L-1, E]` int64 or None: per column, ids whose teacher logprobs are wanted besides the sampled
        token (typically the student's own top-k, for reverse KL / CR-OPD on the student's support); -1 = unused.
    domains: per-row domain tags (multi-teacher routing), or None.
    privileged: per-row extra context token ids (self-distillation: e.g. the reference solution) that a
        self-teacher inserts before the prompt; the scores stay aligned to the student's columns.
    sample_keys: per-row corpus window keys (rollout.source corpus), which a teacher cache is keyed by.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    score_start: torch.Tensor
    topk: int = 0
    extra_ids: Optional[torch.Tensor] = None
    domains: Optional[Sequence[str]] = None
    privileged: Optional[Sequence[Sequence[int]]] = None
    sample_keys: Optional[torch.Tensor] = None      # [B] int64: each row's corpus window key (-1: none)

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def columns(self) -> int:
        """L - 1: the number of label columns."""
        return int(self.tokens.shape[1]) - 1

    def valid_mask(self) -> torch.Tensor:
        """`[B, L-1]` bool: the columns this request asks the teacher to score."""
        col = torch.arange(self.columns).unsqueeze(0)
        return (col >= self.score_start.unsqueeze(1)) & (col <= (self.lengths - 2).unsqueeze(1))

    def row(self, b: int) -> list[int]:
        """Row b's real token ids as a list (what a server is sent)."""
        return [int(t) for t in self.tokens[b, : int(self.lengths[b])].tolist()]

    def validate(self, vocab_size: Optional[int] = None) -> None:
        """Shape and range checks; raises ValueError naming the field and what was expected."""
        if self.tokens.dim() != 2 or self.tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"TeacherRequest.tokens: expected an integer [B, L] tensor, got "
                             f"{tuple(self.tokens.shape)} {self.tokens.dtype}")
        b, length = self.tokens.shape
        for name in ("lengths", "score_start"):
            value = getattr(self, name)
            if tuple(value.shape) != (b,):
                raise ValueError(f"TeacherRequest.{name}: expected shape ({b},), got {tuple(value.shape)}")
        if bool(((self.lengths < 2) | (self.lengths > length)).any()):
            raise ValueError(f"TeacherRequest.lengths: expected 2 <= lengths <= {length}, got "
                             f"{self.lengths.tolist()}")
        if bool(((self.score_start < 0) | (self.score_start > self.lengths - 2)).any()):
            raise ValueError(f"TeacherRequest.score_start: expected 0 <= score_start <= lengths - 2, got "
                             f"{self.score_start.tolist()} for lengths {self.lengths.tolist()}")
        if self.topk < 0:
            raise ValueError(f"TeacherRequest.topk: expected >= 0, got {self.topk}")
        if self.extra_ids is not None and (self.extra_ids.dim() != 3 or tuple(self.extra_ids.shape[:2]) != (b, length - 1)):
            raise ValueError(f"TeacherRequest.extra_ids: expected [B, L-1, E] = [{b}, {length - 1}, E], got "
                             f"{tuple(self.extra_ids.shape)}")
        for name, seq in (("domains", self.domains), ("privileged", self.privileged)):
            if seq is not None and len(seq) != b:
                raise ValueError(f"TeacherRequest.{name}: expected {b} entries (one per row), got {len(seq)}")
        if vocab_size is not None:
            real = torch.arange(length).unsqueeze(0) < self.lengths.unsqueeze(1)
            ids = self.tokens[real]
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
                raise ValueError(f"TeacherRequest.tokens: ids must lie in [0, {vocab_size}), got "
                                 f"[{int(ids.min())}, {int(ids.max())}]")


@dataclass
class TeacherScores:
    """A teacher's result for one `TeacherRequest`, label-aligned `[B, L-1, ...]` (see the module docstring).

    sampled_logprobs `[B, L-1]` float32: log q(tokens[:, j+1] | tokens[:, :j+1]); 0 where not `valid`.
    valid `[B, L-1]` bool: scored columns (the request's `valid_mask()`).
    topk_ids / topk_logprobs `[B, L-1, k]`: the teacher's top-k (global vocabulary ids, descending logprob; ties
        to the lower id where the teacher lets us see them), or None if not asked.
    extra_ids / extra_logprobs `[B, L-1, E]`: the request's `extra_ids` (-1 = unused) and the teacher's logprobs on
        them (0 where the id is -1), or None. The ids travel with their values so that a consumer (the loss's
        student_topk / union support) never has to pair them with the request again.
    logits_shard `[B, L-1, V/tp]`: colocated teachers only, this rank's vocabulary shard of the teacher's logits
        at temperature 1 (padding ids included, as the student's shards are); None for served teachers.
    teacher_name: which teacher (or `multi:<names>`); per_teacher: diagnostics keyed by teacher name, e.g.
        `{"math": {"rows": 3, "mean_logprob": -0.7}}` for multi-teacher runs.
    rejected_replies: replies to this request a served teacher rejected (and asked again) before this one.
    """

    sampled_logprobs: torch.Tensor
    valid: torch.Tensor
    topk_ids: Optional[torch.Tensor] = None
    topk_logprobs: Optional[torch.Tensor] = None
    extra_logprobs: Optional[torch.Tensor] = None
    extra_ids: Optional[torch.Tensor] = None
    logits_shard: Optional[torch.Tensor] = None
    teacher_name: str = "teacher"
    per_teacher: dict = field(default_factory=dict)
    rejected_replies: int = 0

    def check(self, request: TeacherRequest, vocab_size: int) -> "TeacherScores":
        """Reject anything a step must never train on: wrong shapes, non-finite or positive logprobs on valid
        columns, top-k ids outside [0, vocab_size). Returns self; raises TeacherError naming the field."""
        shape = (request.batch_size, request.columns)
        if tuple(self.sampled_logprobs.shape) != shape or tuple(self.valid.shape) != shape:
            raise TeacherError(f"{self.teacher_name}: sampled_logprobs/valid have shape "
                               f"{tuple(self.sampled_logprobs.shape)}/{tuple(self.valid.shape)}, expected {shape}")
        _check_logprobs(self.teacher_name, "sampled_logprobs", self.sampled_logprobs, self.valid)
        if request.topk:
            if self.topk_ids is None or self.topk_logprobs is None:
                raise TeacherError(f"{self.teacher_name}: top-{request.topk} was asked for but not returned")
            want = shape + (request.topk,)
            if tuple(self.topk_ids.shape) != want or tuple(self.topk_logprobs.shape) != want:
                raise TeacherError(f"{self.teacher_name}: top-k tensors have shape {tuple(self.topk_ids.shape)}, "
                                   f"expected {want}")
            outside = self.valid.unsqueeze(-1) & ((self.topk_ids < 0) | (self.topk_ids >= vocab_size))
            if bool(outside.any()):
                row, column, entry = (int(i) for i in outside.nonzero()[0])
                raise TeacherError(f"{self.teacher_name}: top-k ids must lie in [0, {vocab_size}), got "
                                   f"{int(self.topk_ids[row, column, entry])} at row {row} column {column} "
                                   f"({int(outside.sum())} such ids)")
            _check_logprobs(self.teacher_name, "topk_logprobs", self.topk_logprobs, self.valid.unsqueeze(-1))
        if request.extra_ids is not None:
            if self.extra_logprobs is None or self.extra_logprobs.shape != request.extra_ids.shape:
                raise TeacherError(f"{self.teacher_name}: extra_logprobs missing or of shape "
                                   f"{None if self.extra_logprobs is None else tuple(self.extra_logprobs.shape)}, "
                                   f"expected {tuple(request.extra_ids.shape)}")
            if self.extra_ids is not None and not torch.equal(self.extra_ids.long(), request.extra_ids.long()):
                raise TeacherError(f"{self.teacher_name}: extra_ids in the result are not the request's extra_ids")
            used = self.valid.unsqueeze(-1) & (request.extra_ids >= 0)
            _check_logprobs(self.teacher_name, "extra_logprobs", self.extra_logprobs, used)
        return self


def _check_logprobs(teacher: str, name: str, values: torch.Tensor, scored: torch.Tensor) -> None:
    """`values [B, L-1, ...]` finite and <= 0 wherever `scored` (broadcast to its shape); the error names the first
    bad [row, column] and its value. A server rounds, so up to 1e-4 above 0 passes; anything clearly above 0 is not a
    log-probability (logits were returned, or garbage)."""
    bad = scored & (~torch.isfinite(values) | (values > 1e-4))
    if not bool(bad.any()):
        return
    first = tuple(int(i) for i in bad.nonzero()[0])
    raise TeacherError(f"{teacher}: {name} {float(values[first])!r} at row {first[0]} column {first[1]} is NaN/inf "
                       f"or positive ({int(bad.sum())} such values on scored positions); expected finite "
                       f"log-probabilities <= 0")


@dataclass(frozen=True)
class GenerationModel:
    """A teacher that can answer prompts itself, as the student's sampler needs it (`rollout/generate.py`): the
    megatron module on this rank (the whole model, TP-sharded like the student's last stage) and the longest
    sequence it takes. Evaluation samples it greedily to measure the teacher's own verifier score."""

    module: torch.nn.Module
    max_sequence_length: int


class Teacher(abc.ABC):
    """Scores student rollouts. Implementations: sglang.SGLangTeacher, vllm.VLLMTeacher (served over HTTP),
    colocated.ColocatedTeacher (frozen megatron model sharded like the student), inprocess.InProcessTeacher
    (a transformers model), self_teacher.SelfTeacher (the student with privileged context), multi.MultiTeacher.

    Besides scoring, a teacher owns what the training loop must do for it: its state in a checkpoint
    (`state_dict` / `load_state_dict`, per rank), its update after each applied optimizer step
    (`after_optimizer_step`), and whether evaluation can measure its own score (`can_generate`,
    `generation_model`). The defaults fit a frozen teacher: no state, nothing to update, no generation."""

    name: str = "teacher"
    #: True when `score` can return `logits_shard` (full-vocabulary losses need it).
    gives_full_logits: bool = False
    #: The largest top-k the teacher can return (servers cap it, e.g. vLLM's --max-logprobs 20); None = any.
    max_topk: Optional[int] = None
    #: True when the teacher can score requested extra ids (the student's top-k).
    scores_extra_ids: bool = False
    #: True when the teacher reads each row's privileged context (`TeacherRequest.privileged`): the loop then
    #: sends it (a self-teacher); other teachers never see it.
    reads_privileged_context: bool = False
    #: True when the teacher scores rows by their corpus window keys (`TeacherRequest.sample_keys`): a teacher
    #: cache. The loop then gives it whole windows.
    reads_sample_keys: bool = False
    #: True when `generation_model` gives a model to sample the teacher's own answers from. The same on every
    #: rank (evaluation of the teacher's score is collective), whether or not this rank holds the model.
    can_generate: bool = False

    @abc.abstractmethod
    def vocab_size(self) -> int:
        """The teacher's true vocabulary size (the tokenizer's, not a padded embedding's)."""

    @abc.abstractmethod
    def score(self, request: TeacherRequest) -> TeacherScores:
        """Score `request`; the result is checked (`TeacherScores.check`) before it is returned."""

    def state_dict(self) -> dict:
        """What this rank's checkpoint keeps of the teacher so that a resumed run scores as the uninterrupted one
        would (e.g. a self-teacher's frozen / EMA weights); empty for a teacher whose weights never change."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""

    def after_optimizer_step(self) -> None:
        """Called once after every optimizer step the loop applies (not after a skipped one), on every rank."""

    def generation_model(self) -> GenerationModel:
        """The model to sample the teacher's own answers from, on a rank that holds it (`can_generate`)."""
        raise TeacherError(f"{self.name}: this teacher cannot answer prompts itself (can_generate is False)")

    def close(self) -> None:
        """Release connections / memory. Idempotent."""

    def __enter__(self) -> "Teacher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
