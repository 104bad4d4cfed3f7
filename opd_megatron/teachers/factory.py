"""The run config's `teacher` section -> a `Teacher`, checked against the student's vocabulary before any step."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from opd_megatron.config import RunConfig
from opd_megatron.data.tokenizer import Tokenizer, load_tokenizer
from opd_megatron.teachers.base import Teacher
from opd_megatron.teachers.compat import CompatReport, check_teacher_compatible


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def build_teacher(cfg: RunConfig, device: torch.device, student_tokenizer: Tokenizer,
                  padded_vocab_size: int) -> tuple[Teacher, CompatReport]:
    """Build the configured teacher on this rank and check that it shares the student's vocabulary (a mismatch
    is a `VocabMismatchError` naming what differs). Collective for colocated teachers (every rank calls it)."""
    t = cfg.teacher
    teacher_tokenizer: Optional[Tokenizer] = None
    if t.kind == "colocated":
        from opd_megatron.student.checkpoint import resolve_checkpoint
        from opd_megatron.teachers.colocated import ColocatedTeacher
        path = Path(t.path)
        if _is_hf_dir(path):
            teacher = ColocatedTeacher.from_hf(path, cfg.parallel, device, temperature=t.temperature,
                                               student_vocab_size=cfg.model.vocab_size)
            teacher_tokenizer = load_tokenizer(str(path))
        else:
            resolved = resolve_checkpoint(path)
            if resolved is None:
                raise FileNotFoundError(f"teacher.path={t.path!r}: neither an HF checkpoint (config.json) nor a "
                                        f"megatron checkpoint of ours (an iter_* directory or a checkpoints/ "
                                        f"directory with one)")
            teacher = ColocatedTeacher.from_megatron_checkpoint(resolved, cfg.parallel, device, model=t.model,
                                                                temperature=t.temperature,
                                                                student_vocab_size=cfg.model.vocab_size)
    elif t.kind == "inprocess":
        from opd_megatron.teachers.inprocess import InProcessTeacher
        teacher = InProcessTeacher(t.path, temperature=t.temperature, device=device, full_logits=True,
                                   padded_vocab_size=padded_vocab_size, student_vocab_size=cfg.model.vocab_size)
        teacher_tokenizer = load_tokenizer(t.path)
    else:
        from opd_megatron.teachers.http import HTTPTeacherConfig
        server = HTTPTeacherConfig.from_dict({"temperature": t.temperature, **t.server}, "teacher.server.")
        if t.kind == "sglang":
            from opd_megatron.teachers.sglang import SGLangTeacher
            teacher = SGLangTeacher(server)
        else:
            from opd_megatron.teachers.vllm import VLLMTeacher
            teacher = VLLMTeacher(server)
    report = check_teacher_compatible(student_tokenizer, teacher, teacher_tokenizer=teacher_tokenizer,
                                      student_embedding_rows=padded_vocab_size)
    return teacher, report
