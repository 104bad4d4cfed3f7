"""ColocatedTeacher: a frozen megatron GPTModel sharded like the student, scoring micro-batches in the training
process, with the vocabulary never gathered.

Layout. The teacher has the student's tensor-parallel size and no pipeline: on each of the student's last-stage
ranks (where the loss runs) it holds all of its layers, TP-sharded over the same TP group as the student's last
stage, and scores a micro-batch in one forward. Ranks of the other pipeline stages hold no teacher. So with the
student at PP=p the teacher costs each last-stage rank `1/tp` of the whole teacher (p times what a pipelined
teacher would cost that rank) and nothing on the other stages; its forward adds no pipeline bubbles and no p2p.
Choose the student's layout so that `teacher / tp` fits beside the last stage (or serve the teacher instead).

How a PP=1 model is built under a PP>1 parallel state: megatron-core's GPTModel takes `pre_process` /
`post_process` as arguments (both True here), and its TransformerBlock derives the layer count and layer numbers
from `config.pipeline_model_parallel_size` (1 here: all layers, numbered 1..N from offset 0) and only reads the
pipeline rank when that size is > 1; tied embeddings are kept on the one stage for the same reason. So the
teacher's config says pp=1 while megatron's parallel state keeps the student's layout; nothing global is changed.

Results per `score` (label-aligned as `teachers/base.py` defines): `logits_shard [B, L-1, V/tp]` (this rank's
padded-vocabulary shard at temperature 1, float32), sampled-token logprobs, top-k (global ids, descending, ties to
the lower id) and extra-id logprobs at the teacher temperature, all from `opd_megatron.parallel` on the shards
(only `[N]` statistics and `k` candidates per rank cross the TP group).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from opd_megatron.config import ModelSection, ParallelSection
from opd_megatron.config.loader import build_dataclass
from opd_megatron.parallel.topk import (gather_owned, scatter_sparse_to_shards, vocab_parallel_topk,
                                        vocab_shard_range)
from opd_megatron.parallel.divergences import vocab_parallel_log_normalizer, vocab_parallel_token_logprobs
from opd_megatron.student.hf_bridge import load_hf_weights, model_section_from_hf_config
from opd_megatron.student.model import StudentModel, build_student
from opd_megatron.parallel.finite import nonfinite_on_any_tp_rank
from opd_megatron.teachers.base import (GenerationModel, NonFiniteTeacherError, Teacher, TeacherError,
                                        TeacherRequest, TeacherScores)
from opd_megatron.teachers.inprocess import (check_student_vocab, descending_topk, finish_scores,
                                             request_vocab_check)


def build_teacher_model(model: ModelSection, parallel: ParallelSection, device: torch.device) -> StudentModel:
    """The whole teacher (PP=1) at `parallel.tp`, on this rank, frozen (eval mode, no grad)."""
    whole = dataclasses.replace(parallel, pp=1)
    built = build_student(model, whole, device, pre_process=True, post_process=True)
    built.module.eval()
    built.module.requires_grad_(False)
    return built


class ColocatedTeacher(Teacher):
    """The frozen teacher on this rank (None on ranks of the student's other pipeline stages: `score` there is an
    error). Build it with `from_hf` or `from_megatron_checkpoint` on every rank. Being a megatron model, it can
    also answer prompts itself (`generation_model`): evaluation measures its own score beside the student's."""

    gives_full_logits = True
    scores_extra_ids = True
    can_generate = True

    def __init__(self, teacher: Optional[StudentModel], model: ModelSection, *, temperature: float = 1.0,
                 batch_chunk: Optional[int] = None, student_vocab_size: Optional[int] = None,
                 name: str = "colocated", true_vocab_size: Optional[int] = None) -> None:
        """true_vocab_size: the tokenizer's number of ids when it is smaller than the embedding
        (`model.vocab_size`, e.g. Qwen3's 151,669 ids in 151,936 rows); the teacher reports it as its vocabulary.
        Default: the embedding's size."""
        if temperature <= 0:
            raise ValueError(f"ColocatedTeacher.temperature: expected > 0, got {temperature}")
        self.teacher = teacher
        self.model = model
        self.temperature = float(temperature)
        self.batch_chunk = batch_chunk
        self.name = name
        if true_vocab_size is not None and not 1 <= true_vocab_size <= model.vocab_size:
            raise ValueError(f"{name}: true_vocab_size={true_vocab_size} must lie in [1, model.vocab_size="
                             f"{model.vocab_size}] (the tokenizer's ids must fit the embedding)")
        self.true_vocab_size = true_vocab_size
        check_student_vocab(self, student_vocab_size)

    @staticmethod
    def holds_teacher() -> bool:
        """The teacher lives on the student's last pipeline stage."""
        return parallel_state.is_pipeline_last_stage()

    @classmethod
    def from_hf(cls, path: str | Path, parallel: ParallelSection, device: torch.device, dtype: str = "fp32",
                **kwargs) -> "ColocatedTeacher":
        """Load an HF Llama / Qwen2 / Qwen3 checkpoint through the bridge (each rank reads its TP shard only;
        ranks without the teacher read nothing), in the student's precision `dtype` (fp32 / bf16 / fp16)."""
        model = model_section_from_hf_config(path, dtype)
        teacher = None
        if cls.holds_teacher():
            teacher = build_teacher_model(model, parallel, device)
            load_hf_weights(teacher.module, model, path)
        return cls(teacher, model, name=kwargs.pop("name", f"colocated:{Path(path).name}"), **kwargs)

    @classmethod
    def from_megatron_checkpoint(cls, path: str | Path, parallel: ParallelSection, device: torch.device,
                                 model: Optional[ModelSection] = None, **kwargs) -> "ColocatedTeacher":
        """Load the weights of one of our checkpoints (`student/checkpoint.py`, any saved layout; `path` is an
        `iter_*` directory). Collective over all ranks: ranks without the teacher take part with nothing to read.
        `model` defaults to the model section saved in the checkpoint's config."""
        from opd_megatron.student.checkpoint import saved_config
        path = Path(path)
        if model is None:
            model = build_dataclass(ModelSection, saved_config(path)["model"], "model.")
        teacher, state = None, {}
        if cls.holds_teacher():
            teacher = build_teacher_model(model, parallel, device)
            state = {"model": teacher.module.sharded_state_dict()}
        loaded = dist_checkpointing.load(state, str(path))
        if teacher is not None:
            teacher.module.load_state_dict(loaded["model"])
        return cls(teacher, model, name=kwargs.pop("name", f"colocated:{path.name}"), **kwargs)

    def vocab_size(self) -> int:
        return self.true_vocab_size if self.true_vocab_size is not None else self.model.vocab_size

    def generation_model(self) -> GenerationModel:
        """The teacher's module on this rank (the student's last pipeline stage), for its own greedy answers."""
        if self.teacher is None:
            raise TeacherError(f"{self.name}: this rank (pipeline stage "
                               f"{parallel_state.get_pipeline_model_parallel_rank()}) holds no teacher; the colocated "
                               f"teacher lives on the student's last pipeline stage")
        return GenerationModel(self.teacher.module, self.model.max_position_embeddings)

    @torch.no_grad()
    def _logits_shard(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """`[B, L]` right-padded rows -> float32 logits `[B, L-1, V/tp]` on the inputs `tokens[:, :-1]`, causal
        (pad positions come after every real one, so they change nothing that is read)."""
        module = self.teacher.module
        device = next(module.parameters()).device
        inputs = tokens[:, :-1]
        real = torch.arange(inputs.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
        inputs = torch.where(real, inputs, torch.zeros((), dtype=inputs.dtype)).long().to(device)
        positions = torch.arange(inputs.shape[1], device=device).unsqueeze(0)
        chunk = self.batch_chunk or inputs.shape[0]
        pieces = [module(inputs[i: i + chunk], positions.expand(len(inputs[i: i + chunk]), -1), None).float()
                  for i in range(0, inputs.shape[0], chunk)]
        return torch.cat(pieces)

    @torch.no_grad()
    def score(self, request: TeacherRequest) -> TeacherScores:
        if self.teacher is None:
            raise TeacherError(f"{self.name}: this rank (pipeline stage "
                               f"{parallel_state.get_pipeline_model_parallel_rank()}) holds no teacher; the colocated "
                               f"teacher scores on the student's last pipeline stage")
        request_vocab_check(self, request)
        vocab, tau = self.vocab_size(), self.temperature
        logits = self._logits_shard(request.tokens, request.lengths)         # [B, L-1, V/tp], temperature 1
        if nonfinite_on_any_tp_rank(logits):
            raise NonFiniteTeacherError(f"{self.name}: the teacher's logits are NaN/inf; its weights are broken")
        device = logits.device
        labels = request.tokens[:, 1:].long().clamp(0, vocab - 1).to(device)  # pad labels clamped, zeroed later
        sampled = vocab_parallel_token_logprobs(logits, labels, tau, vocab)
        topk_ids = topk_lp = extra_lp = None
        if request.topk or request.extra_ids is not None:
            scaled = logits / tau
            log_z = vocab_parallel_log_normalizer(logits, tau, vocab).unsqueeze(-1)
            if request.topk:
                values, ids = vocab_parallel_topk(scaled, request.topk, vocab)
                topk_lp, topk_ids = descending_topk(values - log_z, ids)
            if request.extra_ids is not None:
                extra = request.extra_ids.long().to(device)
                start, end = vocab_shard_range(logits.shape[-1])
                share = scatter_sparse_to_shards(extra.clamp_min(0), torch.zeros(extra.shape, device=device),
                                                 start, end, vocab)
                picked = gather_owned(scaled, share.local_positions, share.owned)
                if parallel_state.get_tensor_model_parallel_world_size() > 1:
                    dist.all_reduce(picked, group=parallel_state.get_tensor_model_parallel_group())
                extra_lp = torch.where(extra >= 0, picked - log_z, torch.zeros((), device=device))
        valid = request.valid_mask().to(device)
        return finish_scores(request, self, valid, sampled, topk_ids, topk_lp, extra_lp, logits)

    def close(self) -> None:
        self.teacher = None


__all__ = ["ColocatedTeacher", "build_teacher_model"]
