"""Process bodies for tests/teachers/test_colocated.py (importable: spawned processes load them).

`colocated_layouts(hf_dir, ckpt_dir)` runs, in one 2-process group: at TP=2 the colocated teacher loaded from HF
(each rank's logits shard, its scores, megatron CE on the same shards), the student loaded from HF and saved as
our megatron checkpoint, and the teacher loaded from that checkpoint; then at TP=1 x PP=2 (the student's layout)
the teacher on the last stage, from HF and from the checkpoint (the first stage takes part in the load only)."""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from opd_megatron.config import load_config
from opd_megatron.student.checkpoint import iteration_dir, save_checkpoint
from opd_megatron.student.hf_bridge import load_hf_checkpoint, model_section_from_hf_config
from opd_megatron.student.lm_loss import mask_padded_vocab
from opd_megatron.student.optimizer import wrap_for_training
from opd_megatron.teachers.base import TeacherRequest
from opd_megatron.teachers.colocated import ColocatedTeacher
from tests.student.hf_bridge_workers import init_layout

VOCAB = 500  # padded to 512: TP rank 1's shard ends in padding
TOPK, EXTRA = 4, 3


def request() -> TeacherRequest:
    gen = torch.Generator().manual_seed(21)
    tokens = torch.randint(0, VOCAB, (3, 10), generator=gen)
    lengths = torch.tensor([10, 6, 8])
    tokens[1, 6:] = -3  # pad values are never read
    extra_ids = torch.randint(0, VOCAB, (3, 9, EXTRA), generator=gen)
    extra_ids[:, :, 0] = -1
    return TeacherRequest(tokens=tokens, lengths=lengths, score_start=torch.tensor([1, 0, 3]), topk=TOPK,
                          extra_ids=extra_ids)


def _summary(scores, req: TeacherRequest) -> dict:
    """Everything to compare, plus the largest |sampled logprob + megatron CE| on valid columns (CE on the
    same shards, padding masked)."""
    labels = req.tokens[:, 1:].clamp(0, VOCAB - 1)
    ce = vocab_parallel_cross_entropy(mask_padded_vocab(scores.logits_shard, VOCAB).transpose(0, 1).contiguous(),
                                      labels.transpose(0, 1).contiguous()).transpose(0, 1)
    return {"logits_shard": scores.logits_shard, "sampled": scores.sampled_logprobs, "valid": scores.valid,
            "topk_ids": scores.topk_ids, "topk_logprobs": scores.topk_logprobs, "extra": scores.extra_logprobs,
            "ce_diff": float((scores.sampled_logprobs + ce)[scores.valid].abs().max())}


def colocated_layouts(hf_dir: str, ckpt_root: str) -> dict:
    out: dict = {}
    req = request()
    ctx = init_layout(2, 1)
    parallel = load_config(None, ["parallel.tp=2"]).parallel
    out["tp2_hf"] = _summary(ColocatedTeacher.from_hf(hf_dir, parallel, ctx.device).score(req), req)
    cfg = load_config(None, ["parallel.tp=2"])
    cfg.model = model_section_from_hf_config(hf_dir)  # saved with the checkpoint: the teacher reads it back
    trainable = wrap_for_training(load_hf_checkpoint(hf_dir, parallel, ctx.device), cfg.optim, cfg.model, 10)
    save_checkpoint(ckpt_root, 1, trainable, ctx, {}, cfg.to_dict())
    ckpt = iteration_dir(ckpt_root, 1)
    out["tp2_ckpt"] = _summary(ColocatedTeacher.from_megatron_checkpoint(ckpt, parallel, ctx.device).score(req), req)

    ctx = init_layout(1, 2)
    parallel = load_config(None, ["parallel.pp=2"]).parallel
    from_hf = ColocatedTeacher.from_hf(hf_dir, parallel, ctx.device)
    from_ckpt = ColocatedTeacher.from_megatron_checkpoint(ckpt, parallel, ctx.device)
    if ctx.is_last_stage:
        out["pp2_hf"] = _summary(from_hf.score(req), req)
        out["pp2_ckpt"] = _summary(from_ckpt.score(req), req)
        out["pp2_layers"] = [layer.layer_number for layer in from_hf.teacher.module.decoder.layers]
    else:
        out["pp2_first_stage_holds"] = from_hf.teacher is not None
    return out
