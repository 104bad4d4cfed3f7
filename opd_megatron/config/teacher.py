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
      cache:        {path, live, check_live_identity}   kind cache (a teacher top-k cache, `opd-megatron
                                            cache-teacher`; `live`: the teacher of the on-policy rows when the run
                                            mixes them in, opd.mixtures.on_policy_fraction in (0, 1))

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
class CacheLiveTeacherSection:
    """teacher.cache.live: the live teacher of the on-policy rows in a run that mixes cached offline KD with on-policy
    continuations of corpus prefixes (opd.mixtures.on_policy_fraction in (0, 1)). Offline steps read the cache and
    call no teacher; on-policy steps are scored by this teacher, on the same top-k + tail support (its top-k at
    teacher.topk). kind colocated, inprocess, sglang or vllm, with that kind's keys as under `teacher`; no
    temperature of its own: it scores at teacher.temperature, the cache's (checked against the manifest).

        teacher:
          kind: cache
          topk: 64                          # <= the cache's k
          cache:
            path: /data/cache/llama70b-top64
            live: {kind: vllm, server: {urls: [http://teacher:8000], model: meta-llama/Llama-3.1-70B}}
            check_live_identity: true       # the live teacher must be the one the cache was written with

    kind None (the default): no live teacher; the run is offline only (on_policy_fraction 0)."""
    kind: Optional[Literal["colocated", "inprocess", "sglang", "vllm"]] = None
    colocated: ColocatedTeacherSection = field(default_factory=ColocatedTeacherSection)
    inprocess: InProcessTeacherSection = field(default_factory=InProcessTeacherSection)
    server: ServerSection = field(default_factory=ServerSection)

    def as_member(self, temperature: float) -> TeacherMemberSection:
        """The live teacher as the member it is built like (teachers/factory.py), at the cache's `temperature`."""
        if self.kind is None:
            raise ValueError("teacher.cache.live.kind is not set: there is no live teacher")
        return TeacherMemberSection(name="live", kind=self.kind, temperature=temperature, colocated=self.colocated,
                                    inprocess=self.inprocess, server=self.server)


@dataclass
class CacheTeacherSection:
    """kind cache: a teacher top-k cache written by `opd-megatron cache-teacher`, read in place of a teacher.

    path: the cache directory (its manifest.json).
    live: the teacher of the on-policy rows (`CacheLiveTeacherSection`); unset (kind None) for offline KD only.
    check_live_identity: the live teacher must be the teacher the cache was written with: the same files
        (sha256 of a local checkpoint's files, whatever its path or kind colocated / inprocess) or the same served
        model name; its vocabulary, the tokenizer, teacher.temperature and teacher.topk <= the cache's k are checked
        always. A live teacher that cannot be compared with the cache's (one local, the other served) is refused
        unless this is false: set it false only when both are the same model (a checkpoint and its served copy)."""
    path: str = ""
    live: CacheLiveTeacherSection = field(default_factory=CacheLiveTeacherSection)
    check_live_identity: bool = True

    def validate(self, overlap: bool) -> None:
        require(bool(self.path), "teacher.cache.path", "the directory of a cache written by "
                "`opd-megatron cache-teacher`", self.path)
        require(not overlap, "teacher.overlap", "false for a teacher cache (its offline steps read the cache; its "
                "on-policy steps are scored when they are sampled)", True)
        if self.live.kind is not None:
            self.live.as_member(1.0).validate("teacher.cache.live.")
            if self.live.kind == "colocated" and self.live.colocated.model is not None:
                self.live.colocated.model.validate()


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
    def live_member(self) -> Optional[TeacherMemberSection]:
        """The live teacher of a teacher cache's on-policy rows (teacher.cache.live), None without one."""
        if self.kind != "cache" or self.cache.live.kind is None:
            return None
        return self.cache.live.as_member(self.temperature)

    @property
    def dense_on_some_steps(self) -> bool:
        """Whether some steps' teacher gives full-vocabulary logits on the training ranks: a dense teacher, or the
        colocated / in-process live teacher of a cache's on-policy steps (its offline steps read top-k only)."""
        live = self.live_member
        return self.dense or (live is not None and live.kind in ("colocated", "inprocess"))

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
            self.cache.validate(self.overlap)
            return
        path = self.as_member().checkpoint_path
        require(bool(path), f"teacher.{self.kind}.path", f"a checkpoint directory for teacher.kind={self.kind}", path)
        require(not self.overlap, "teacher.overlap", "false for an in-process or colocated teacher (it runs on the "
                "training ranks; there is nothing to overlap with)", self.overlap)
        if self.kind == "colocated" and self.colocated.model is not None:
            self.colocated.model.validate()
