"""The run config's `teacher` section: what every teacher has (kind, temperature, what the loop asks of it), and one
sub-section per kind of teacher.

    teacher:
      kind: colocated | inprocess | sglang | vllm | multi | self | cache
      temperature, topk, score_student_topk, overlap
      colocated:    {path, model}           kind colocated
      inprocess:    {path}                  kind inprocess
      server:       {urls, model, ...}      kinds sglang and vllm (the HTTP client, teachers/http.py)
      multi:        {members, routes, default, mixture, weights}
      self_teacher: {mode, ema_decay, insert, keep}    kind self
      cache:        {path}                  kind cache (a teacher top-k cache, `opd-megatron cache-teacher`)

A section of another kind than `kind` is not read. `ServerSection` (config/sections.py, shared with the rollout
servers) is the served teachers' client schema; the client (`teachers/http.py: HTTPTeacherConfig`) is this section
plus the teacher's temperature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from opd_megatron.config.loader import require
from opd_megatron.config.sections import ModelSection, ServerSection  # noqa: F401  (ServerSection: re-exported)


@dataclass
class ColocatedTeacherSection:
    """kind colocated: a frozen megatron GPTModel sharded like the student (full vocab-sharded logits: every loss
    and support)."""
    path: str = ""                           # a megatron checkpoint of ours, or an HF checkpoint directory
    model: Optional[ModelSection] = None     # its shape (default: the one saved in the checkpoint)


@dataclass
class CacheTeacherSection:
    """kind cache: a teacher top-k cache written by `opd-megatron cache-teacher` (no teacher at train time)."""
    path: str = ""                           # the cache directory (its manifest.json)


@dataclass
class InProcessTeacherSection:
    """kind inprocess: a transformers model on the training ranks (small runs)."""
    path: str = ""                           # an HF checkpoint directory


@dataclass
class TeacherMemberSection:
    """One teacher of `teacher.kind: multi`: a name, and the keys of a single teacher of its kind."""
    name: str = ""
    kind: Literal["colocated", "inprocess", "sglang", "vllm"] = "colocated"
    temperature: float = 1.0
    colocated: ColocatedTeacherSection = field(default_factory=ColocatedTeacherSection)
    inprocess: InProcessTeacherSection = field(default_factory=InProcessTeacherSection)
    server: ServerSection = field(default_factory=ServerSection)

    @property
    def checkpoint_path(self) -> str:
        """The checkpoint directory of a colocated or in-process teacher ("" for a served one)."""
        return {"colocated": self.colocated.path, "inprocess": self.inprocess.path}.get(self.kind, "")

    def validate(self, prefix: str) -> None:
        if self.kind in ("sglang", "vllm"):
            self.server.validate(f"{prefix}server.")
        else:
            require(bool(self.checkpoint_path), f"{prefix}{self.kind}.path", "a checkpoint directory",
                    self.checkpoint_path)


@dataclass
class MultiTeacherSection:
    """kind multi (MiMo-style multi-teacher OPD): per-domain routes (routes: a row's domain -> member name, and a
    default member) or a mixture of every member on every row (geometric / arithmetic; weights: member name ->
    weight)."""
    members: list[TeacherMemberSection] = field(default_factory=list)
    routes: dict[str, str] = field(default_factory=dict)
    default: Optional[str] = None
    mixture: Optional[Literal["geometric", "arithmetic"]] = None
    weights: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        names = [m.name for m in self.members]
        require(len(names) >= 1 and all(names) and len(set(names)) == len(names), "teacher.multi.members",
                "a list of teachers with distinct non-empty names", names)
        require((bool(self.routes) or self.default is not None) != (self.mixture is not None), "teacher.multi.routes",
                "either routes (and/or default) for per-domain routing, or a mixture, not both", self.routes)
        for target in list(self.routes.values()) + ([self.default] if self.default else []) + list(self.weights):
            require(target in names, "teacher.multi.routes", f"member names from {names}", target)
        for i, member in enumerate(self.members):
            member.validate(f"teacher.multi.members[{i}].")


@dataclass
class SelfTeacherSection:
    """kind self (OPSD / self-distillation): the student's own weights (current, a frozen copy, or an EMA) reading
    the row's privileged context (rollout.privileged_key, or a task's reference answer) inserted in the prompt,
    `keep` prompt tokens from the insertion side (teachers/self_teacher.py)."""
    mode: Literal["current", "frozen", "ema"] = "frozen"
    ema_decay: float = 0.99
    insert: Literal["before_prompt", "after_prompt"] = "after_prompt"
    keep: int = 0

    def validate(self) -> None:
        require(0.0 <= self.ema_decay < 1.0, "teacher.self_teacher.ema_decay", "a float in [0, 1)", self.ema_decay)
        require(self.keep >= 0, "teacher.self_teacher.keep", "an integer >= 0", self.keep)


@dataclass
class TeacherSection:
    """The teacher that scores the student's rollouts: its kind, what the loop asks of every kind, and the kind's
    own sub-section.

    temperature: the teacher's, independent of the rollout temperature (served teachers score at 1.0 only).
    topk: top-k logprobs per position asked of a served teacher (0 = the sampled token only).
    score_student_topk: SGLang: also score the student's top-k ids (the student_topk / union supports).
    overlap: score the next batch (sampled with the weights before this update, so one update stale) while this
        batch trains; staleness is reported every step. Only for served teachers."""
    kind: Literal["colocated", "inprocess", "sglang", "vllm", "multi", "self", "cache"] = "colocated"
    temperature: float = 1.0
    topk: int = 0
    score_student_topk: int = 0
    overlap: bool = False
    colocated: ColocatedTeacherSection = field(default_factory=ColocatedTeacherSection)
    inprocess: InProcessTeacherSection = field(default_factory=InProcessTeacherSection)
    server: ServerSection = field(default_factory=ServerSection)
    multi: MultiTeacherSection = field(default_factory=MultiTeacherSection)
    self_teacher: SelfTeacherSection = field(default_factory=SelfTeacherSection)
    cache: CacheTeacherSection = field(default_factory=CacheTeacherSection)

    @property
    def dense(self) -> bool:
        """Whether the teacher gives full-vocabulary logits on the training ranks (colocated, in-process, self, or a
        multi-teacher of those), not only sampled-token and top-k logprobs."""
        return self.kind in ("colocated", "inprocess", "self") or (
            self.kind == "multi" and all(m.kind in ("colocated", "inprocess") for m in self.multi.members))

    def as_member(self) -> TeacherMemberSection:
        """A single teacher (kind colocated, inprocess, sglang or vllm) as the unnamed member it is built like."""
        return TeacherMemberSection(name="", kind=self.kind, temperature=self.temperature, colocated=self.colocated,
                                    inprocess=self.inprocess, server=self.server)

    def validate(self) -> None:
        require(self.temperature > 0, "teacher.temperature", "a positive number", self.temperature)
        require(self.topk >= 0 and self.score_student_topk >= 0, "teacher.topk",
                "integers >= 0 (teacher.topk, teacher.score_student_topk)", (self.topk, self.score_student_topk))
        if self.kind == "multi":
            self.multi.validate()
            return
        if self.kind == "self":
            self.self_teacher.validate()
            require(not self.overlap, "teacher.overlap", "false for a self-teacher", self.overlap)
            return
        if self.kind in ("sglang", "vllm"):
            self.server.validate("teacher.server.")
            return
        if self.kind == "cache":
            require(bool(self.cache.path), "teacher.cache.path", "the directory of a cache written by "
                    "`opd-megatron cache-teacher`", self.cache.path)
            require(not self.overlap, "teacher.overlap", "false for a teacher cache (reading it is cheap)", True)
            return
        path = self.as_member().checkpoint_path
        require(bool(path), f"teacher.{self.kind}.path", f"a checkpoint directory for teacher.kind={self.kind}", path)
        require(not self.overlap, "teacher.overlap", "false for an in-process or colocated teacher (it runs on the "
                "training ranks; there is nothing to overlap with)", self.overlap)
        if self.kind == "colocated" and self.colocated.model is not None:
            self.colocated.model.validate()
