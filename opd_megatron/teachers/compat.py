"""Student/teacher vocabulary compatibility, checked before the first step.

A teacher scores the student's token ids, so the two must mean the same thing by every id [docs/sources.md#slime,
#verl, #nemo-rl: slime and verl require a shared tokenizer, NeMo-RL asserts an identical token -> id map]. What is
compared:
- the TRUE vocabulary sizes (the tokenizers', `Tokenizer.vocab_size`), not the embeddings: Qwen-style models
  pad the embedding (Qwen3: 151,936 rows for 151,669 ids; Qwen2.5-7B: 152,064 rows for 151,665; megatron pads
  further to a multiple of 128 x tp),
  which is fine [docs/sources.md#padded-vocabulary-issues] as long as every embedding has at least the true size;
- the special ids (eos, bos, pad);
- the ids of probe strings (digits, letters, whitespace runs, punctuation) and of the student's chat template
  rendered on a probe prompt: these catch a different normaliser or pre-tokeniser over the same vocabulary;
- with two HF tokenizers, the whole token -> id map.
A served teacher may only report a size (`teacher_vocab_size`); its tokenizer, when available, is checked too.
Any mismatch is a `VocabMismatchError` saying what differs (the first differing probe and its ids on both sides).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from opd_megatron.data.tokenizer import HFTokenizer, Tokenizer
from opd_megatron.teachers.base import Teacher, TeacherError

DEFAULT_PROBES = (
    "0123456789", "0 1 2 3 4 5 6 7 8 9", "12 + 34 = 46", "abcdefghijklmnopqrstuvwxyz",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "The quick brown fox jumps over the lazy dog.", " ", "  ", "   x", "\n", "\n\n",
    "\t", "a  b\n\nc\td", "x = y * 2, z? $5.", "don't stop",
)
CHAT_PROBE = "What is 2 + 3?"


class VocabMismatchError(TeacherError):
    """Student and teacher do not share a vocabulary: training on the teacher's scores would be meaningless."""


@dataclass
class CompatReport:
    """What was checked (for the run's reporting checklist: "tokenizers and chat templates, state
    compatibility"). chat_template: same / differs / student only / teacher only / none / unknown."""

    teacher: str
    true_vocab_size: int
    student_embedding_rows: Optional[int] = None
    teacher_embedding_rows: Optional[int] = None
    special_ids: dict = field(default_factory=dict)
    probes_checked: int = 0
    full_map_checked: bool = False
    chat_template: str = "unknown"

    def lines(self) -> list[str]:
        checked = (f"{self.probes_checked} probes" if self.probes_checked else "size only (no teacher tokenizer)")
        return [f"teacher {self.teacher}: vocabulary {self.true_vocab_size} ids, compatible ({checked}"
                f"{', full token map' if self.full_map_checked else ''}); embeddings student "
                f"{self.student_embedding_rows or '?'} / teacher {self.teacher_embedding_rows or '?'} rows; "
                f"special ids {self.special_ids or '?'}; chat template {self.chat_template}"]


def check_vocab_compatible(student: Tokenizer, *, teacher_tokenizer: Optional[Tokenizer] = None,
                           teacher_vocab_size: Optional[int] = None, teacher_name: str = "teacher",
                           student_embedding_rows: Optional[int] = None,
                           teacher_embedding_rows: Optional[int] = None, probes: Sequence[str] = DEFAULT_PROBES,
                           require_same_chat_template: bool = False) -> CompatReport:
    """Raise `VocabMismatchError` unless the teacher (its tokenizer and/or its reported true vocabulary size)
    shares the student's vocabulary; returns what was checked.

    teacher_vocab_size: the true size a served teacher reports (`Teacher.vocab_size()`), not a padded
        embedding size; pass that as teacher_embedding_rows.
    *_embedding_rows: the models' (padded) embedding sizes, each must be >= the true vocabulary size.
    require_same_chat_template: also fail when both tokenizers have chat templates that render a probe prompt
        differently (otherwise reported as `chat_template="differs"`: the teacher reads the student's template).
    """
    where = f"student vs teacher {teacher_name}"
    if teacher_tokenizer is None and teacher_vocab_size is None:
        raise ValueError(f"check_vocab_compatible({teacher_name}): expected a teacher tokenizer or the teacher's "
                         f"reported vocabulary size, got neither")
    size = int(student.vocab_size)
    for label, other in (("the teacher tokenizer's", None if teacher_tokenizer is None else teacher_tokenizer.vocab_size),
                         ("the teacher's reported", teacher_vocab_size)):
        if other is not None and int(other) != size:
            hint = (f"; if {int(other)} is the teacher model's padded embedding size (config.vocab_size), "
                    f"report the tokenizer's true size and pass the padded one as teacher_embedding_rows"
                    if int(other) > size else "")
            raise VocabMismatchError(f"{where}: true vocabulary sizes differ: student tokenizer {size} ids, "
                                     f"{label} {int(other)}{hint}")
    for side, rows in (("student", student_embedding_rows), (f"teacher {teacher_name}", teacher_embedding_rows)):
        if rows is not None and int(rows) < size:
            raise VocabMismatchError(f"{where}: the {side} model's embedding has {int(rows)} rows, fewer than the "
                                     f"{size} ids of the vocabulary: ids >= {int(rows)} would index past it")
    report = CompatReport(teacher=teacher_name, true_vocab_size=size, student_embedding_rows=student_embedding_rows,
                          teacher_embedding_rows=teacher_embedding_rows)
    if teacher_tokenizer is None:
        return report
    for role in ("eos", "bos", "pad"):
        mine, theirs = getattr(student, f"{role}_id"), getattr(teacher_tokenizer, f"{role}_id")
        if mine != theirs:
            raise VocabMismatchError(f"{where}: {role} ids differ: student {mine}, teacher {theirs}")
        report.special_ids[role] = mine
    texts = list(probes)
    template = _chat_templates(student, teacher_tokenizer)
    report.chat_template = template[0]
    if template[1] is not None:
        texts.append(template[1])
    for text in texts:
        mine, theirs = student.encode(text), teacher_tokenizer.encode(text)
        if mine != theirs:
            at = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            raise VocabMismatchError(f"{where}: probe {text!r} encodes differently: student {mine}, teacher "
                                     f"{theirs} (first difference at position {at})")
    report.probes_checked = len(texts)
    if isinstance(student, HFTokenizer) and isinstance(teacher_tokenizer, HFTokenizer):
        _check_token_maps(where, student.hf.get_vocab(), teacher_tokenizer.hf.get_vocab())
        report.full_map_checked = True
    if require_same_chat_template and report.chat_template != "same" and report.chat_template != "none":
        raise VocabMismatchError(f"{where}: chat templates: {report.chat_template} (rendered on {CHAT_PROBE!r}); "
                                 f"require_same_chat_template is set")
    return report


def check_teacher_compatible(student: Tokenizer, teacher: Teacher, teacher_tokenizer: Optional[Tokenizer] = None,
                             **kwargs) -> CompatReport:
    """`check_vocab_compatible` with the teacher's own reported size and name."""
    return check_vocab_compatible(student, teacher_tokenizer=teacher_tokenizer, teacher_vocab_size=teacher.vocab_size(),
                                  teacher_name=teacher.name, **kwargs)


def check_teachers_compatible(student: Tokenizer, teachers: Mapping[str, Teacher],
                              tokenizers: Optional[Mapping[str, Tokenizer]] = None, **kwargs
                              ) -> dict[str, CompatReport]:
    """Every named teacher (e.g. a MultiTeacher's `teachers`) against the student; the first mismatch raises."""
    tokenizers = tokenizers or {}
    unknown = sorted(set(tokenizers) - set(teachers))
    if unknown:
        raise ValueError(f"check_teachers_compatible: tokenizers given for unknown teachers {unknown}; known: "
                         f"{sorted(teachers)}")
    return {name: check_vocab_compatible(student, teacher_tokenizer=tokenizers.get(name),
                                         teacher_vocab_size=teacher.vocab_size(), teacher_name=name, **kwargs)
            for name, teacher in teachers.items()}


def _chat_templates(student: Tokenizer, teacher: Tokenizer) -> tuple[str, Optional[str]]:
    """(how the templates compare, the student's rendering of the probe prompt or None)."""
    mine = student.apply_chat_template(CHAT_PROBE) if student.has_chat_template else None
    theirs = teacher.apply_chat_template(CHAT_PROBE) if teacher.has_chat_template else None
    if mine is None and theirs is None:
        return "none", None
    if mine is None:
        return "teacher only", None
    if theirs is None:
        return "student only", mine
    return ("same" if mine == theirs else "differs"), mine


def _check_token_maps(where: str, mine: Mapping[str, int], theirs: Mapping[str, int]) -> None:
    if mine == theirs:
        return
    for token in sorted(set(mine) | set(theirs), key=lambda t: (min(mine.get(t, 1 << 62), theirs.get(t, 1 << 62)), t)):
        if mine.get(token) != theirs.get(token):
            raise VocabMismatchError(f"{where}: token {token!r} has id {mine.get(token)} in the student's "
                                     f"vocabulary, {theirs.get(token)} in the teacher's")
