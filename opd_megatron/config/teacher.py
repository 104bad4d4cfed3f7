"""The run config's `teacher` section: what every teacher has (kind, temperature, what the loop asks of it), and one
sub-section per kind of teacher.

    teacher:
      kind: colocated | inprocess | sglang | vllm | multi | self
      temperature, topk, score_student_topk, overlap
      colocated:    {path, model}           kind colocated
      inprocess:    {path}                  kind inprocess
      server:       {urls, model, ...}      kinds sglang and vllm (the HTTP client, teachers/http.py)
      multi:        {members, routes, default, mixture, weights}
      self_teacher: {mode, ema_decay, insert, keep}    kind self

A section of another kind than `kind` is not read. `ServerSection` is the served teachers' client schema; the client
(`teachers/http.py: HTTPTeacherConfig`) is this section plus the teacher's temperature.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional

from opd_megatron.config.loader import ConfigError, require
from opd_megatron.config.sections import ModelSection


@dataclass
class ServerSection:
    """A served teacher (SGLang, vLLM): where it is, what it serves, and the transport knobs."""
    urls: list[str] = field(default_factory=list)  # base URLs, e.g. ["http://10.0.0.5:30000"]; a router is one URL
    model: str = ""                  # served model name (vLLM's "model"; checked against the server's identity)
    vocab_size: int = 0              # the tokenizer's true size (not a padded embedding's, e.g. 151936 not 152064)
    max_topk: Optional[int] = None   # cap on top-k (vLLM: the server's --max-logprobs, 20 by default)
    max_extra_ids: int = 256         # SGLang: bound on the distinct extra ids (student top-k) sent per row
    timeout_s: float = 120.0         # per request (read/write/pool)
    connect_timeout_s: float = 5.0
    max_retries: int = 4             # retries after the first attempt
    backoff_s: float = 0.5           # first retry waits ~backoff_s, doubling, jittered in [0.5, 1] x
    backoff_max_s: float = 10.0
    max_retry_time_s: float = 300.0  # a request gives up once this much time has passed since its first attempt
    max_inflight: int = 8            # concurrent requests, all servers together
    max_tokens_per_request: int = 32768  # rows are packed into one request up to this many tokens
    max_rows_per_request: int = 64
    balance: Literal["least_inflight", "round_robin"] = "least_inflight"
    # The API key (sent as a Bearer header) comes from the environment or a file, never from the config itself:
    api_key_env: Optional[str] = None    # NAME of the environment variable holding it (e.g. OPD_TEACHER_API_KEY)
    api_key_file: Optional[str] = None   # or a file holding it (its first line; e.g. a mounted secret)
    check_on_start: bool = True      # health + identity of every URL at construction
    reply_retries: int = 2           # a batch whose reply is rejected (malformed, non-finite, out of range, another
    #                                  model) is asked again this many times before the run stops; never trained on

    def validate(self, prefix: str = "teacher.server.") -> None:
        urls = self.urls
        require(isinstance(urls, (list, tuple)) and len(urls) > 0
                and all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in urls),
                f"{prefix}urls", "a non-empty list of http(s):// base URLs", urls)
        require(isinstance(self.vocab_size, int) and self.vocab_size >= 1, f"{prefix}vocab_size",
                "the teacher tokenizer's true vocabulary size (an integer >= 1)", self.vocab_size)
        require(self.max_topk is None or self.max_topk >= 0, f"{prefix}max_topk", "None or an integer >= 0",
                self.max_topk)
        for key in ("max_extra_ids", "max_inflight", "max_tokens_per_request", "max_rows_per_request"):
            require(getattr(self, key) >= 1, f"{prefix}{key}", "an integer >= 1", getattr(self, key))
        require(self.max_retries >= 0, f"{prefix}max_retries", "an integer >= 0", self.max_retries)
        for key in ("timeout_s", "connect_timeout_s", "backoff_max_s", "max_retry_time_s"):
            require(getattr(self, key) > 0, f"{prefix}{key}", "a positive number of seconds", getattr(self, key))
        require(self.backoff_s >= 0, f"{prefix}backoff_s", "a number of seconds >= 0", self.backoff_s)
        require(self.reply_retries >= 0, f"{prefix}reply_retries", "an integer >= 0", self.reply_retries)
        # The value is never echoed: a key pasted here by mistake must not reach a log or an error message.
        if self.api_key_env is not None and not re.fullmatch(r"[A-Z_][A-Z0-9_]{0,127}", str(self.api_key_env)):
            raise ConfigError(f"{prefix}api_key_env: expected the NAME of an environment variable (upper-case "
                              f"letters, digits and _, e.g. OPD_TEACHER_API_KEY), got a value that is not one (not "
                              f"shown: it may be the key itself). Put the key in that variable, or in a file named "
                              f"by {prefix}api_key_file; a key is never written in the config")
        if self.api_key_file is not None and not (isinstance(self.api_key_file, str) and "/" in self.api_key_file):
            raise ConfigError(f"{prefix}api_key_file: expected the path of a file holding the API key, with a '/' "
                              f"(e.g. /run/secrets/teacher_key or ./teacher.key), got a value that is not one (not "
                              f"shown: it may be the key itself)")
        require(self.api_key_env is None or self.api_key_file is None, f"{prefix}api_key_env",
                f"at most one of {prefix}api_key_env and {prefix}api_key_file", "both")


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
    kind: Literal["colocated", "inprocess", "sglang", "vllm", "multi", "self"] = "colocated"
    temperature: float = 1.0
    topk: int = 0
    score_student_topk: int = 0
    overlap: bool = False
    colocated: ColocatedTeacherSection = field(default_factory=ColocatedTeacherSection)
    inprocess: InProcessTeacherSection = field(default_factory=InProcessTeacherSection)
    server: ServerSection = field(default_factory=ServerSection)
    multi: MultiTeacherSection = field(default_factory=MultiTeacherSection)
    self_teacher: SelfTeacherSection = field(default_factory=SelfTeacherSection)

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
        path = self.as_member().checkpoint_path
        require(bool(path), f"teacher.{self.kind}.path", f"a checkpoint directory for teacher.kind={self.kind}", path)
        require(not self.overlap, "teacher.overlap", "false for an in-process or colocated teacher (it runs on the "
                "training ranks; there is nothing to overlap with)", self.overlap)
        if self.kind == "colocated" and self.colocated.model is not None:
            self.colocated.model.validate()
