"""The whole run config (`RunConfig`: one field per section), the rules that span sections, and loading it from a
YAML file plus dotted overrides."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from opd_megatron.config.loader import (ConfigError, build_dataclass, parse_override, read_yaml, reject_moved_keys,
                                        require, set_dotted)
from opd_megatron.config.hf import CONFIG_FILE, TOKENIZER_FILE, model_keys_from_hf, resolve_from_hf
from opd_megatron.config.opd import OpdSection
from opd_megatron.config.presets import with_preset
from opd_megatron.config.sections import (CheckpointSection, DataSection, EvalSection, LoggingSection, ModelSection,
                                          OptimSection, ParallelSection, QuickstartSection, RolloutSection,
                                          RunSection)
from opd_megatron.config.teacher import ColocatedTeacherSection, TeacherSection


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    opd: OpdSection = field(default_factory=OpdSection)
    eval: EvalSection = field(default_factory=EvalSection)
    quickstart: QuickstartSection = field(default_factory=QuickstartSection)

    def validate(self) -> "RunConfig":
        """Checks that need no world size: each section, then the cross-section rules."""
        opd_only = ("rollout", "teacher", "opd", "eval", "quickstart")
        for f in dataclasses.fields(self):
            if self.run.algorithm == "opd" or f.name not in opd_only:
                getattr(self, f.name).validate()
        m, p = self.model, self.parallel
        # The student's shape may come from model.from_hf: the message says where to look.
        read = f" (the student's, from the config.json of model.from_hf={m.from_hf})" if m.from_hf else ""
        require(m.num_attention_heads % p.tp == 0, "parallel.tp",
                f"a divisor of model.num_attention_heads={m.num_attention_heads}{read}", p.tp)
        require(m.query_groups % p.tp == 0, "parallel.tp",
                f"a divisor of the number of query groups ({m.query_groups}){read}", p.tp)
        require(m.ffn_hidden_size % p.tp == 0, "parallel.tp",
                f"a divisor of model.ffn_hidden_size={m.ffn_hidden_size}{read}", p.tp)
        require(m.num_layers % p.pp == 0, "parallel.pp", f"a divisor of model.num_layers={m.num_layers}{read}", p.pp)
        require(self.data.seq_length <= m.max_position_embeddings, "data.seq_length",
                f"at most model.max_position_embeddings={m.max_position_embeddings}", self.data.seq_length)
        if p.sequence_parallel:
            require(self.data.seq_length % p.tp == 0, "data.seq_length",
                    f"a multiple of parallel.tp={p.tp} with sequence parallelism", self.data.seq_length)
        if self.checkpoint.export_hf:
            require(m.from_hf is not None, "checkpoint.export_hf", "false unless model.from_hf names the Hugging "
                    "Face checkpoint the student started from (its architecture and config.json are the export's; "
                    "`opd-megatron export-hf --family ...` exports other students)", True)
        if self.run.algorithm == "opd":
            self._validate_opd()
        if self.optim.use_distributed_optimizer or m.dtype != "fp32":
            # Measured: megatron's distributed optimizer and mixed precision do not run on the CPU
            # (docs/megatron-on-cpu.md). Caught here so a laptop dry-run still accepts them.
            if self.run.device == "cpu":
                raise ConfigError("optim.use_distributed_optimizer / model.dtype=bf16|fp16 need run.device=cuda "
                                  "or auto on a GPU machine; with run.device=cpu use model.dtype=fp32 and "
                                  "optim.use_distributed_optimizer=false")
        return self

    def _validate_opd(self) -> None:
        """Combinations the OPD loop cannot run, rejected with what would work instead."""
        r, t, o, p = self.rollout, self.teacher, self.opd, self.parallel
        rows = r.prompts_per_step * r.samples_per_prompt
        require(p.global_batch_size == rows, "parallel.global_batch_size",
                f"rollout.prompts_per_step x rollout.samples_per_prompt = {r.prompts_per_step} x "
                f"{r.samples_per_prompt} = {rows} with run.algorithm=opd", p.global_batch_size)
        if t.kind == "self":
            require(p.pp == 1, "parallel.pp", "1 with teacher.kind=self (the self-teacher is the student's whole "
                    "model on one rank)", p.pp)
        self._validate_teacher_gives_what_the_loss_reads()
        if r.temperature != o.student_temperature and not o.allow_temperature_mismatch:
            raise ConfigError(f"rollout.temperature={r.temperature} differs from opd.student_temperature="
                              f"{o.student_temperature}: the loss's distribution would not be the one that samples "
                              f"(the sampler-mismatch weight pi_old/mu != 1 on every token); set them equal, or set "
                              f"opd.allow_temperature_mismatch=true if this is intended (then consider "
                              f"opd.gates.truncated_is to correct it)")
        c = o.credit
        if t.overlap and o.loss in ("policy_gradient", "cr_opd"):
            corrected = (o.loss == "policy_gradient" and o.policy_gradient.ratio == "ppo") \
                or o.gates.truncated_is is not None
            require(corrected, "teacher.overlap", f"false with opd.loss={o.loss} unless the one-update staleness is "
                    f"corrected: opd.policy_gradient.ratio=ppo (the PPO ratio against the sampling weights, "
                    f"policy_gradient only) or opd.gates.truncated_is=[0.5, 2.0] (weights pi/mu)", True)
        stale_served = r.engine != "megatron" and (r.sync_interval > 1 or r.max_staleness > 0 or t.overlap)
        if stale_served and o.loss in ("policy_gradient", "cr_opd"):
            # A served engine's stale rows take the current forward as pi_theta_old (the proximal policy), so the
            # PPO ratio starts at 1 and only the sampler-mismatch weight pi_theta_old / mu sees the staleness.
            require(o.gates.truncated_is is not None, "opd.gates.truncated_is", f"set (e.g. [0.5, 2.0]) with "
                    f"opd.loss={o.loss} and a served rollout engine whose rows can be stale (rollout.sync_interval="
                    f"{r.sync_interval}, rollout.max_staleness={r.max_staleness}, teacher.overlap={t.overlap}): "
                    f"truncated IS on pi_theta_old / mu is what corrects the staleness there", None)
        if t.kind == "cache":
            self._validate_cache_mixture()
        if r.source == "corpus":
            d = self.data
            require(d.format == "indexed", "data.format", "indexed with rollout.source=corpus (the prompts are "
                    "prefixes of data.path / data.blend)", d.format)
            require(bool(self.eval.path), "eval.path", "the prefix of a held-out indexed corpus with rollout.source="
                    "corpus (`opd-megatron preprocess` of documents training never sees)", self.eval.path)
            require(r.prefix_tokens + r.max_new_tokens <= d.seq_length + 1, "rollout.prefix_tokens",
                    f"at most data.seq_length + 1 - rollout.max_new_tokens = {d.seq_length + 1 - r.max_new_tokens} "
                    f"(a prompt and the corpus continuation it is compared with fit in one sample)", r.prefix_tokens)
        if o.loss == "divergence":
            require(c.estimator == "immediate" and o.policy_gradient.ratio == "logprob", "opd.credit.estimator",
                    "the default (immediate, ratio logprob) with opd.loss=divergence: credit estimators and "
                    "ratios belong to opd.loss=policy_gradient or cr_opd", (c.estimator, o.policy_gradient.ratio))
        if o.regularizers.reference_kl_coef > 0:
            require(self.checkpoint.load is not None or self.model.from_hf is not None, "checkpoint.load",
                    "the starting checkpoint with opd.regularizers.reference_kl_coef > 0 (checkpoint.load, or "
                    "model.from_hf: its weights are the frozen reference)", None)
        if o.mixtures.on_policy_fraction < 1:
            require(o.loss == "divergence", "opd.mixtures.on_policy_fraction", "1.0 unless opd.loss=divergence "
                    "(fixed-dataset rows were not sampled by the student: a policy gradient on them has no "
                    "behaviour policy)", o.mixtures.on_policy_fraction)
        if c.length_normalized:
            require(c.estimator == "single_step", "opd.credit.length_normalized",
                    "false unless opd.credit.estimator=single_step", True)
        if c.outcome_beta > 0:
            require(r.source == "task", "opd.credit.outcome_beta", "0 unless rollout.source=task (the verifier "
                    "gives the outcome reward)", c.outcome_beta)
        for member in t.multi.members:
            model = member.colocated.model
            if model is not None and model.vocab_size != self.model.vocab_size:
                raise ConfigError(f"teacher.multi.members[{member.name}].colocated.model.vocab_size="
                                  f"{model.vocab_size} differs from model.vocab_size={self.model.vocab_size}")
        model = t.colocated.model
        if model is not None and model.vocab_size != self.model.vocab_size:
            raise ConfigError(f"teacher.colocated.model.vocab_size={model.vocab_size} differs from model.vocab_size="
                              f"{self.model.vocab_size}: student and teacher must share one vocabulary")
        self._validate_colocated_teacher_layouts()

    def _validate_cache_mixture(self) -> None:
        """teacher.kind=cache: offline KD on corpus windows (on_policy_fraction 0), or mixed with on-policy
        continuations of corpus prefixes scored by teacher.cache.live (a fraction in (0, 1)); route A on the cached
        top-k support either way."""
        r, t, o = self.rollout, self.teacher, self.opd
        fraction, live = o.mixtures.on_policy_fraction, t.cache.live.kind
        require(r.source == "corpus", "teacher.kind", "cache only with rollout.source=corpus and opd.mixtures."
                "on_policy_fraction=0, or with a fraction in (0, 1) and a live teacher for the on-policy rows "
                "(teacher.cache.live): a teacher cache scores the corpus windows it was written for, not the "
                "student's rollouts", t.kind)
        require(fraction < 1, "opd.mixtures.on_policy_fraction", "below 1 with teacher.kind=cache (at 1 no step reads "
                "the cache: make the live teacher teacher.kind itself)", fraction)
        if fraction > 0:
            require(live is not None, "teacher.cache.live.kind", f"colocated, inprocess, sglang or vllm: the teacher "
                    f"of the on-policy rows of opd.mixtures.on_policy_fraction={fraction:g} (the cache scores the "
                    f"offline corpus windows only)", live)
        else:
            require(live is None, "teacher.cache.live.kind", "unset with opd.mixtures.on_policy_fraction=0 (no "
                    "on-policy rows to score; a fraction in (0, 1) mixes them in)", live)
        require(o.loss == "divergence", "opd.loss", "divergence with teacher.kind=cache (route A on the cached "
                "top-k support)", o.loss)

    def _validate_teacher_gives_what_the_loss_reads(self) -> None:
        """A served teacher gives sampled-token and top-k logprobs only: the loss, credit, routing and gates must
        read no more than that (and no more top-k entries than `teacher.topk`)."""
        t, o = self.teacher, self.opd
        a = o.route_a
        needs_dense = []
        if o.loss == "divergence" and a.support == "full":
            needs_dense.append(f"opd.route_a.support=full (the {a.divergence} over the whole vocabulary)")
        if o.credit.baseline == "reverse_kl":
            needs_dense.append("opd.credit.baseline=reverse_kl (the exact per-state reverse KL)")
        if o.loss != "divergence" and o.credit.estimator == "single_step":
            needs_dense.append("opd.credit.estimator=single_step (MiniLLM: the step-t term exactly over the "
                               "vocabulary)")
        if o.gates.teacher_entropy is not None:
            needs_dense.append("opd.gates.teacher_entropy")
        if o.loss == "cr_opd" and o.cr_opd.teacher_support == "threshold":
            needs_dense.append("opd.cr_opd.teacher_support=threshold")
        if t.dense:
            return
        if needs_dense:
            raise ConfigError(f"teacher.kind={t.kind} gives sampled-token and top-k logprobs only, but "
                              f"{'; '.join(needs_dense)} needs the teacher's full distribution: use "
                              f"teacher.kind=colocated (or inprocess), or a top-k support "
                              f"(opd.route_a.support=teacher_topk with teacher.topk >= opd.route_a.support_k)")
        need_k = 0
        if o.loss == "divergence":
            need_k = a.support_k if a.support in ("teacher_topk", "union") else 0
        if o.loss == "cr_opd":
            need_k = o.cr_opd.teacher_top_k
        if o.gates.teacher_confidence is not None:
            need_k = max(need_k, 1)
        require(t.topk >= need_k, "teacher.topk", f">= {need_k} for the configured support/routing/gates "
                f"with a served teacher", t.topk)
        if o.loss == "divergence" and a.support in ("student_topk", "union"):
            require(t.kind == "sglang" and t.score_student_topk >= a.support_k, "teacher.score_student_topk",
                    f">= opd.route_a.support_k={a.support_k} with teacher.kind=sglang (the teacher's logprobs on the "
                    f"student's top-k come from SGLang's token_ids_logprob; vLLM cannot score chosen ids)",
                    t.score_student_topk)

    def colocated_teachers(self) -> list["ColocatedTeacherShape"]:
        """The colocated teachers of an OPD run (teacher.kind colocated, or the members of that kind of a
        multi-teacher), each with its architecture as far as the config knows it (`ColocatedTeacherShape`)."""
        t = self.teacher
        if self.run.algorithm != "opd":
            return []
        dtype = self.model.dtype  # an HF teacher is built in the student's precision (teachers/factory.py)
        if t.kind == "colocated":
            return [ColocatedTeacherShape.of("the teacher", "teacher.colocated", t.colocated, dtype)]
        live = t.live_member
        if live is not None and live.kind == "colocated":
            return [ColocatedTeacherShape.of("the live teacher of the on-policy rows", "teacher.cache.live.colocated",
                                             live.colocated, dtype)]
        if t.kind != "multi":
            return []
        return [ColocatedTeacherShape.of(f"teacher.multi.members[{member.name}]",
                                         f"teacher.multi.members[{i}].colocated", member.colocated, dtype)
                for i, member in enumerate(t.multi.members) if member.kind == "colocated"]

    def _validate_colocated_teacher_layouts(self) -> None:
        """A colocated teacher is built whole (PP=1) at the student's tp and ep, its logits sharded like the
        student's (teachers/colocated.py): its heads, query groups and MLP width must split over parallel.tp, its
        experts over parallel.ep, and its embedding must have the student's rows. Checked here, naming the teacher
        and its key, before anything is built (megatron says only `num_attention_heads (9) must be a multiple of
        tensor_model_parallel_size (2)`, and only when the teacher is built, after the student)."""
        p, student_rows = self.parallel, self.model.embedding_rows
        for teacher in self.colocated_teachers():
            m = teacher.model
            if m is None:
                continue
            for name, value in (("num_attention_heads", m.num_attention_heads), ("num_query_groups", m.query_groups),
                                ("ffn_hidden_size", m.ffn_hidden_size)):
                if value % p.tp:
                    raise ConfigError(f"{teacher.who}: {teacher.describe(name, value)} is not a multiple of "
                                      f"parallel.tp={p.tp}: a colocated teacher is split over the student's "
                                      f"tensor-parallel ranks; use a parallel.tp that divides it, or serve this "
                                      f"teacher (kind sglang or vllm)")
            if m.num_moe_experts is not None and m.num_moe_experts % p.ep:
                raise ConfigError(f"{teacher.who}: {teacher.describe('num_moe_experts', m.num_moe_experts)} is not a "
                                  f"multiple of parallel.ep={p.ep}: a colocated teacher's experts are split over the "
                                  f"student's expert-parallel ranks")
            if m.embedding_rows != student_rows:
                raise ConfigError(f"{teacher.who}: an embedding of {m.embedding_rows} rows ({teacher.origin}); the "
                                  f"student's has {student_rows} (model.checkpoint_vocab_size, else model.vocab_size): "
                                  f"a colocated teacher's logits are sharded like the student's, so the two embeddings "
                                  f"must have the same rows; set model.checkpoint_vocab_size={m.embedding_rows} (the "
                                  f"tokenizer's ids stay model.vocab_size)")

    def validate_for_world(self, world_size: int) -> "RunConfig":
        """Checks that need the number of processes; run before any model is built."""
        p = self.parallel
        if world_size % (p.tp * p.pp) != 0:
            raise ConfigError(f"world size {world_size} is not a multiple of parallel.tp x parallel.pp = "
                              f"{p.tp} x {p.pp} = {p.tp * p.pp}; launch tp*pp*dp processes "
                              f"(e.g. torchrun --nproc_per_node {p.tp * p.pp})")
        dp = p.dp(world_size)
        if dp % p.ep != 0:
            raise ConfigError(f"parallel.ep={p.ep} must divide the data-parallel size {dp} (megatron needs "
                              f"tp x ep x pp to divide the world size {world_size})")
        if p.global_batch_size % (p.micro_batch_size * dp) != 0:
            raise ConfigError(f"parallel.global_batch_size={p.global_batch_size} is not divisible by "
                              f"parallel.micro_batch_size x dp = {p.micro_batch_size} x {dp}; expected a multiple "
                              f"of {p.micro_batch_size * dp}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# config.json's names of the `model.*` keys a layout message may name (config/hf.py reads them).
HF_CONFIG_KEYS = {"num_query_groups": "num_key_value_heads", "ffn_hidden_size": "intermediate_size"}


@dataclass(frozen=True)
class ColocatedTeacherShape:
    """A colocated teacher's architecture as the config knows it, the way the teacher will be built
    (teachers/factory.py): from the Hugging Face checkpoint's config.json when its path is one (`from_hf`), else
    from `<key>.model`, else unknown (None: a megatron checkpoint of ours, whose saved config is read at build).
    `who` names the teacher in messages (`the teacher`, `teacher.multi.members[name]`); `key` is its config
    section (`teacher.colocated`, `teacher.multi.members[i].colocated`)."""
    who: str
    key: str
    path: str
    model: Optional[ModelSection]
    from_hf: bool

    @classmethod
    def of(cls, who: str, key: str, section: ColocatedTeacherSection, dtype: str = "fp32") -> "ColocatedTeacherShape":
        """The shape of the colocated-teacher section `section`, at config key `key`; an HF teacher's in `dtype`."""
        path = section.path
        if path and (Path(path) / CONFIG_FILE).is_file():
            try:
                model = build_dataclass(ModelSection, {**model_keys_from_hf(path), "dtype": dtype}, f"{key}.model.")
            except ConfigError as error:
                raise ConfigError(f"{who}: {key}.path={path}: {error}") from error
            return cls(who, key, path, model, from_hf=True)
        return cls(who, key, path, section.model, from_hf=False)

    def describe(self, name: str, value: Any) -> str:
        """`model.*` key `name` with its `value`, named where the user can find it."""
        if self.from_hf:
            return f"{HF_CONFIG_KEYS.get(name, name)}={value} ({self.origin})"
        return f"{self.key}.model.{name}={value}"

    @property
    def origin(self) -> str:
        """Where the shape was read: the checkpoint's config.json, or the config's model section."""
        return f"config.json of {self.key}.path={self.path}" if self.from_hf else f"{self.key}.model"


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                validate: bool = True) -> RunConfig:
    """Build a RunConfig from a YAML file (optional) and `a.b=value` overrides (applied after the file)."""
    raw: dict[str, Any] = read_yaml(path) if path is not None else {}
    for item in overrides or []:
        set_dotted(raw, *parse_override(item))
    cfg = from_dict(raw)
    return cfg.validate() if validate else cfg


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """A RunConfig from a mapping of sections (as read from YAML): presets filled in, every key checked."""
    reject_moved_keys(raw)
    raw = copy.deepcopy(raw)  # presets are filled in place; the caller's mapping stays as it was
    _fill_preset(raw, "model")
    _fill_from_hf(raw)
    teacher = _mapping(raw.get("teacher"))
    _fill_preset(_mapping(teacher.get("colocated")), "teacher.colocated.model")
    _fill_preset(_mapping(_mapping(_mapping(teacher.get("cache")).get("live")).get("colocated")),
                 "teacher.cache.live.colocated.model")
    members = _mapping(teacher.get("multi")).get("members")
    for i, member in enumerate(members if isinstance(members, list) else []):
        _fill_preset(_mapping(_mapping(member).get("colocated")), f"teacher.multi.members[{i}].colocated.model")
    return build_dataclass(RunConfig, raw, "")


def _fill_preset(section: dict[str, Any], key: str) -> None:
    """The section's `model` with its preset's shape filled in (`key`: that model's config key)."""
    if "model" in section:
        section["model"] = with_preset(section["model"], key)


def _fill_from_hf(raw: dict[str, Any]) -> None:
    """`model` with the architecture of `model.from_hf`'s checkpoint filled in, and `data.tokenizer` defaulting to
    that checkpoint's tokenizer when it has one and the config names none."""
    model = _mapping(raw.get("model"))
    if model.get("from_hf") is None:
        return
    raw["model"] = resolve_from_hf(model, "model")
    data = raw.setdefault("data", {})
    if isinstance(data, dict) and "tokenizer" not in data and (Path(model["from_hf"]) / TOKENIZER_FILE).is_file():
        data["tokenizer"] = model["from_hf"]


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
