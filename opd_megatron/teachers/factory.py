"""The run config's `teacher` section -> a `Teacher`, checked against the student's vocabulary before any step."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from opd_megatron.config import RunConfig, TeacherMemberSection
from opd_megatron.data.tokenizer import Tokenizer, load_tokenizer
from opd_megatron.teachers.base import Teacher, TeacherError
from opd_megatron.teachers.compat import CompatReport, check_teacher_compatible


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _single(cfg: RunConfig, t: TeacherMemberSection, device: torch.device, padded_vocab_size: int,
            name: Optional[str] = None, true_vocab_size: Optional[int] = None,
            full_logits: bool = True) -> tuple[Teacher, Optional[Tokenizer]]:
    """One teacher of kind colocated / inprocess / sglang / vllm, and its tokenizer when it has local files."""
    named = {"name": name} if name else {}
    if t.kind == "colocated":
        from opd_megatron.student.checkpoint import resolve_checkpoint
        from opd_megatron.teachers.colocated import ColocatedTeacher
        path = Path(t.colocated.path)
        if _is_hf_dir(path):
            # Its own tokenizer gives its true vocabulary (config.json's vocab_size counts padding rows); the
            # compatibility check below compares it with the student's tokenizer.
            tokenizer = load_tokenizer(str(path))
            teacher = ColocatedTeacher.from_hf(path, cfg.parallel, device, temperature=t.temperature,
                                               true_vocab_size=tokenizer.vocab_size, dtype=cfg.model.dtype, **named)
            if teacher.model.embedding_rows != cfg.model.embedding_rows:
                # Its logits are sharded like the student's: the two embeddings must pad to the same width.
                raise TeacherError(f"{teacher.name}: embedding of {teacher.model.embedding_rows} rows (config.json "
                                   f"vocab_size), the student's is {cfg.model.embedding_rows} (model.vocab_size="
                                   f"{cfg.model.vocab_size}, model.checkpoint_vocab_size="
                                   f"{cfg.model.checkpoint_vocab_size}); a colocated teacher's logits are sharded "
                                   f"like the student's, so give the student the same rows: "
                                   f"model.checkpoint_vocab_size={teacher.model.embedding_rows}")
            return teacher, tokenizer
        resolved = resolve_checkpoint(path)
        if resolved is None:
            raise FileNotFoundError(f"teacher path {t.colocated.path!r}: neither an HF checkpoint (config.json) nor a "
                                    f"megatron checkpoint of ours (an iter_* directory or a checkpoints/ directory "
                                    f"with one)")
        # A checkpoint of ours carries no tokenizer: it was trained on the student's (config/run.py holds the two
        # embeddings equal), so its true vocabulary is the student tokenizer's.
        return (ColocatedTeacher.from_megatron_checkpoint(resolved, cfg.parallel, device, model=t.colocated.model,
                                                          temperature=t.temperature, true_vocab_size=true_vocab_size,
                                                          **named), None)
    if t.kind == "inprocess":
        from opd_megatron.teachers.inprocess import InProcessTeacher
        return (InProcessTeacher(t.inprocess.path, temperature=t.temperature, device=device, full_logits=full_logits,
                                 padded_vocab_size=padded_vocab_size, student_vocab_size=true_vocab_size,
                                 **named), load_tokenizer(t.inprocess.path))
    from opd_megatron.teachers.http import HTTPTeacherConfig
    server = HTTPTeacherConfig.from_section(t.server, t.temperature)
    if t.kind == "sglang":
        from opd_megatron.teachers.sglang import SGLangTeacher
        return SGLangTeacher(server), None
    from opd_megatron.teachers.vllm import VLLMTeacher
    return VLLMTeacher(server), None


def build_teacher(cfg: RunConfig, device: torch.device, student_tokenizer: Tokenizer, padded_vocab_size: int,
                  student=None, full_logits: bool = True) -> tuple[Teacher, CompatReport]:
    """Build the configured teacher on this rank and check that it shares the student's vocabulary (a mismatch
    is a `VocabMismatchError` naming what differs). Collective for colocated teachers (every rank calls it).
    `student` (a `StudentModel`) is needed by `kind: self`. full_logits=False: an in-process teacher returns
    sampled-token and top-k log-probs only (a caller that reads no more need not copy its [B, L-1, V] logits)."""
    t = cfg.teacher
    tokenizer: Optional[Tokenizer] = None
    if t.kind == "multi":
        from opd_megatron.teachers.multi import MultiTeacher
        members = {}
        for member in t.multi.members:
            teacher, member_tokenizer = _single(cfg, member, device, padded_vocab_size, name=member.name,
                                                true_vocab_size=student_tokenizer.vocab_size)
            check_teacher_compatible(student_tokenizer, teacher, teacher_tokenizer=member_tokenizer,
                                     student_embedding_rows=padded_vocab_size)
            members[member.name] = teacher
        multi = t.multi
        teacher = MultiTeacher(members, routes=(multi.routes or {}) if multi.mixture is None else None,
                               default=multi.default, mixture=multi.mixture, weights=multi.weights or None)
    elif t.kind == "cache":
        from opd_megatron.data.teacher_cache import tokenizer_fingerprint
        from opd_megatron.teachers.cached import CachedTeacher
        # The corpus it was written for is checked row by row (each window's tokens against the crc the cache
        # kept); the tokenizer and the window length here, at once.
        teacher = CachedTeacher(t.cache.path, expect={"tokenizer_hash": tokenizer_fingerprint(student_tokenizer),
                                                      "seq_length": cfg.data.seq_length,
                                                      "temperature": t.temperature})
        live_member = t.live_member
        if live_member is not None:
            from opd_megatron.teachers.cached import CacheOrLiveTeacher, check_live_teacher, teacher_identity
            # The on-policy rows' teacher, at the cache's temperature (the manifest's, checked above), sharing the
            # student's tokenizer (checked here) and the cache's teacher (checked against its manifest).
            live, live_tokenizer = _single(cfg, live_member, device, padded_vocab_size,
                                           true_vocab_size=student_tokenizer.vocab_size, full_logits=full_logits)
            check_teacher_compatible(student_tokenizer, live, teacher_tokenizer=live_tokenizer,
                                     student_embedding_rows=padded_vocab_size)
            identity = teacher_identity(live_member, live) if t.cache.check_live_identity else None
            check_live_teacher(teacher, live, identity, t.topk)
            teacher, tokenizer = CacheOrLiveTeacher(teacher, live), live_tokenizer
    elif t.kind == "self":
        from opd_megatron.teachers.colocated import ColocatedTeacher
        from opd_megatron.teachers.self_teacher import SelfTeacher
        if student is None:
            raise ValueError("teacher.kind=self needs the student model")
        # The student scoring itself: its vocabulary is its tokenizer's (model.vocab_size may hold padding rows).
        scorer = ColocatedTeacher(student, cfg.model, temperature=t.temperature, name="student",
                                  true_vocab_size=student_tokenizer.vocab_size)
        own = t.self_teacher
        teacher = SelfTeacher(scorer, model=student.module, mode=own.mode, ema_decay=own.ema_decay,
                              insert=own.insert, keep=own.keep, max_length=cfg.model.max_position_embeddings)
    else:
        teacher, tokenizer = _single(cfg, t.as_member(), device, padded_vocab_size,
                                     true_vocab_size=student_tokenizer.vocab_size, full_logits=full_logits)
    report = check_teacher_compatible(student_tokenizer, teacher, teacher_tokenizer=tokenizer,
                                      student_embedding_rows=padded_vocab_size)
    return teacher, report
