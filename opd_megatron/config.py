"""Typed run configuration: dataclasses, YAML loading, dotted command-line overrides, validation.

A run config is a tree of dataclasses. It is built from a YAML file (or nothing: every field has a default)
and then `key.path=value` overrides from the command line, e.g.

    opd-megatron train --config configs/sft_tiny.yaml parallel.tp=2 optim.lr=1e-4

Every key is checked: an unknown key is a `ConfigError` that names it and suggests the nearest valid key;
a value of the wrong type or out of range is a `ConfigError` that says what was expected. Validation that needs
the world size (tp x pp dividing it) runs in `validate_for_world(world_size)`, before any model is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and what was expected."""


# ---------------------------------------------------------------------------------------------------------------
# Model presets: published shapes. A preset fills the model section; keys given beside it override the preset.
# Sources: Llama 3 model card / config.json (meta-llama/Meta-Llama-3-8B, -70B); Qwen3 technical report table 1
# and config.json of Qwen/Qwen3-{0.6B,1.7B,4B,8B,14B,32B}.
# ---------------------------------------------------------------------------------------------------------------
_LLAMA_STYLE = dict(normalization="RMSNorm", activation="swiglu", position_embedding="rope", add_bias_linear=False)
_GPT2_STYLE = dict(normalization="LayerNorm", activation="gelu", position_embedding="learned_absolute",
                   add_bias_linear=True, norm_epsilon=1e-5, tie_embeddings=True)
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_layers=2, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4, num_query_groups=2,
                 vocab_size=512, max_position_embeddings=256, **_LLAMA_STYLE),
    "small": dict(num_layers=4, hidden_size=128, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=2,
                  vocab_size=1024, max_position_embeddings=512, **_LLAMA_STYLE),
    "llama3-8b": dict(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                      num_query_groups=8, vocab_size=128256, max_position_embeddings=8192, rotary_base=500000,
                      norm_epsilon=1e-5, tie_embeddings=False, **_LLAMA_STYLE),
    "llama3-70b": dict(num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64,
                       num_query_groups=8, vocab_size=128256, max_position_embeddings=8192, rotary_base=500000,
                       norm_epsilon=1e-5, tie_embeddings=False, **_LLAMA_STYLE),
    "qwen3-0.6b": dict(num_layers=28, hidden_size=1024, ffn_hidden_size=3072, num_attention_heads=16,
                       num_query_groups=8, kv_channels=128, vocab_size=151936, max_position_embeddings=40960,
                       rotary_base=1000000, norm_epsilon=1e-6, qk_layernorm=True, tie_embeddings=True,
                       **_LLAMA_STYLE),
    "qwen3-1.7b": dict(num_layers=28, hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=16,
                       num_query_groups=8, kv_channels=128, vocab_size=151936, max_position_embeddings=40960,
                       rotary_base=1000000, norm_epsilon=1e-6, qk_layernorm=True, tie_embeddings=True,
                       **_LLAMA_STYLE),
    "qwen3-4b": dict(num_layers=36, hidden_size=2560, ffn_hidden_size=9728, num_attention_heads=32,
                     num_query_groups=8, kv_channels=128, vocab_size=151936, max_position_embeddings=40960,
                     rotary_base=1000000, norm_epsilon=1e-6, qk_layernorm=True, tie_embeddings=True,
                     **_LLAMA_STYLE),
    "qwen3-8b": dict(num_layers=36, hidden_size=4096, ffn_hidden_size=12288, num_attention_heads=32,
                     num_query_groups=8, kv_channels=128, vocab_size=151936, max_position_embeddings=40960,
                     rotary_base=1000000, norm_epsilon=1e-6, qk_layernorm=True, tie_embeddings=False,
                     **_LLAMA_STYLE),
    "qwen3-14b": dict(num_layers=40, hidden_size=5120, ffn_hidden_size=17408, num_attention_heads=40,
                      num_query_groups=8, kv_channels=128, vocab_size=151936, max_position_embeddings=40960,
                      rotary_base=1000000, norm_epsilon=1e-6, qk_layernorm=True, tie_embeddings=False,
                      **_LLAMA_STYLE),
    "qwen3-32b": dict(num_layers=64, hidden_size=5120, ffn_hidden_size=25600, num_attention_heads=64,
                      num_query_groups=8, kv_channels=128, vocab_size=151936, max_position_embeddings=40960,
                      rotary_base=1000000, norm_epsilon=1e-6, qk_layernorm=True, tie_embeddings=False,
                      **_LLAMA_STYLE),
    # Qwen/Qwen3-30B-A3B config.json: 128 experts of width 768, 8 per token, in every layer (decoder_sparse_step 1,
    # no mlp_only_layers); ffn_hidden_size is its dense intermediate_size, unused when every layer is MoE.
    "qwen3-30b-a3b": dict(num_layers=48, hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=32,
                          num_query_groups=4, kv_channels=128, vocab_size=151936, max_position_embeddings=40960,
                          rotary_base=1000000, norm_epsilon=1e-6, qk_layernorm=True, tie_embeddings=False,
                          num_moe_experts=128, moe_router_topk=8, moe_ffn_hidden_size=768, **_LLAMA_STYLE),
    # meta-llama/Llama-3.2-{1B,3B} config.json (tied embeddings; their llama3 rope scaling of the 131072 context is
    # not modelled: plain rope at rotary_base, exact up to the 8192 original context).
    "llama3.2-1b": dict(num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
                        num_query_groups=8, kv_channels=64, vocab_size=128256, max_position_embeddings=131072,
                        rotary_base=500000, norm_epsilon=1e-5, tie_embeddings=True, **_LLAMA_STYLE),
    "llama3.2-3b": dict(num_layers=28, hidden_size=3072, ffn_hidden_size=8192, num_attention_heads=24,
                        num_query_groups=8, kv_channels=128, vocab_size=128256, max_position_embeddings=131072,
                        rotary_base=500000, norm_epsilon=1e-5, tie_embeddings=True, **_LLAMA_STYLE),
    # GPT-2 (openai-community/gpt2{,-medium,-large,-xl} config.json): the GKD / MiniLLM / DistiLLM GPT-2 students
    # and the 1.5B teacher. LayerNorm, GeLU (HF's tanh approximation; megatron's exact erf GeLU here), biases,
    # learned positions, tied embeddings.
    "gpt2": dict(num_layers=12, hidden_size=768, ffn_hidden_size=3072, num_attention_heads=12, vocab_size=50257,
                 max_position_embeddings=1024, **_GPT2_STYLE),
    "gpt2-medium": dict(num_layers=24, hidden_size=1024, ffn_hidden_size=4096, num_attention_heads=16,
                        vocab_size=50257, max_position_embeddings=1024, **_GPT2_STYLE),
    "gpt2-large": dict(num_layers=36, hidden_size=1280, ffn_hidden_size=5120, num_attention_heads=20,
                       vocab_size=50257, max_position_embeddings=1024, **_GPT2_STYLE),
    "gpt2-xl": dict(num_layers=48, hidden_size=1600, ffn_hidden_size=6400, num_attention_heads=25,
                    vocab_size=50257, max_position_embeddings=1024, **_GPT2_STYLE),
}


@dataclass
class RunSection:
    """What the run is and where it writes."""
    name: str = "run"
    output_dir: str = "runs"           # the run directory is output_dir/name
    algorithm: Literal["sft", "opd"] = "sft"  # sft: supervised on data.path; opd: on-policy distillation
    seed: int = 1234
    train_steps: int = 100
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA + NCCL where a GPU is present, else CPU + gloo

    def validate(self) -> None:
        _require(self.train_steps >= 1, "run.train_steps", "an integer >= 1", self.train_steps)
        _require(bool(self.name) and "/" not in self.name, "run.name", "a non-empty name without '/'", self.name)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclass
class ModelSection:
    """The student: a megatron-core GPTModel (Llama/Qwen style by default)."""
    preset: Optional[str] = None
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None   # GQA: None means multi-head attention (= num_attention_heads)
    kv_channels: Optional[int] = None        # head dim; None means hidden_size / num_attention_heads
    vocab_size: int = 512                    # the tokenizer's true size; padded to a multiple of tp internally
    max_position_embeddings: int = 256
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    norm_epsilon: float = 1e-5
    activation: Literal["swiglu", "gelu"] = "swiglu"
    position_embedding: Literal["rope", "learned_absolute"] = "rope"
    rotary_base: int = 10000
    tie_embeddings: bool = False
    add_bias_linear: bool = False
    add_qkv_bias: bool = False               # bias on Q/K/V only (Qwen2); implied by add_bias_linear
    qk_layernorm: bool = False
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16 are GPU paths
    # Mixture of experts (megatron-core's MoELayer in place of the MLP of every layer); None: a dense model.
    num_moe_experts: Optional[int] = None
    moe_router_topk: int = 2                 # experts per token
    moe_ffn_hidden_size: Optional[int] = None  # each expert's ffn width; None: ffn_hidden_size

    def validate(self) -> None:
        if self.preset is not None and self.preset not in MODEL_PRESETS:
            raise ConfigError(f"model.preset: unknown preset {self.preset!r}; expected one of "
                              f"{sorted(MODEL_PRESETS)}{_did_you_mean(self.preset, MODEL_PRESETS)}")
        for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size",
                    "max_position_embeddings"):
            _require(getattr(self, key) >= 1, f"model.{key}", "an integer >= 1", getattr(self, key))
        groups = self.query_groups
        _require(self.num_attention_heads % groups == 0, "model.num_query_groups",
                 f"a divisor of model.num_attention_heads={self.num_attention_heads}", groups)
        if self.kv_channels is None:
            _require(self.hidden_size % self.num_attention_heads == 0, "model.hidden_size",
                     f"a multiple of model.num_attention_heads={self.num_attention_heads} (or set model.kv_channels)",
                     self.hidden_size)
        _require(self.norm_epsilon > 0, "model.norm_epsilon", "a positive float", self.norm_epsilon)
        _require(self.init_method_std > 0, "model.init_method_std", "a positive float", self.init_method_std)
        for key in ("hidden_dropout", "attention_dropout"):
            _require(0.0 <= getattr(self, key) < 1.0, f"model.{key}", "a float in [0, 1)", getattr(self, key))
        if self.num_moe_experts is not None:
            _require(self.num_moe_experts >= 1, "model.num_moe_experts", "null or an integer >= 1",
                     self.num_moe_experts)
            _require(1 <= self.moe_router_topk <= self.num_moe_experts, "model.moe_router_topk",
                     f"an integer in [1, model.num_moe_experts={self.num_moe_experts}]", self.moe_router_topk)

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


@dataclass
class ParallelSection:
    """Parallel layout. dp is derived: world_size / (tp * pp)."""
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    micro_batch_size: int = 4
    global_batch_size: int = 16
    ep: int = 1                     # expert parallel (MoE): experts split over ep ranks of the data-parallel group

    def validate(self) -> None:
        for key in ("tp", "pp", "micro_batch_size", "global_batch_size"):
            _require(getattr(self, key) >= 1, f"parallel.{key}", "an integer >= 1", getattr(self, key))
        _require(self.ep >= 1, "parallel.ep", "an integer >= 1", self.ep)
        _require(self.global_batch_size % self.micro_batch_size == 0, "parallel.global_batch_size",
                 f"a multiple of parallel.micro_batch_size={self.micro_batch_size}", self.global_batch_size)
        if self.sequence_parallel:
            _require(self.tp > 1, "parallel.sequence_parallel", "false when parallel.tp == 1", True)

    def dp(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp)

    def num_microbatches(self, world_size: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp(world_size))


@dataclass
class DataSection:
    """Training data. `jsonl`: one JSON object a line, with `prompt`+`response` (loss on the response) or `text`
    (loss on every token). `indexed`: megatron-core `.bin/.idx` written by `opd-megatron preprocess`."""
    format: Literal["jsonl", "indexed"] = "jsonl"
    path: str = ""                  # a .jsonl file, or the prefix of an indexed dataset (without .bin/.idx)
    tokenizer: str = "byte"         # "byte" (built-in byte-level), or a directory / tokenizer.json of an HF tokenizer
    seq_length: int = 128
    prompt_key: str = "prompt"
    response_key: str = "response"
    text_key: str = "text"
    apply_chat_template: bool = False
    skip_malformed: bool = False    # False: a malformed line is an error; True: skipped and counted
    shuffle: bool = True

    def validate(self) -> None:
        _require(self.seq_length >= 2, "data.seq_length", "an integer >= 2", self.seq_length)


@dataclass
class OptimSection:
    """Optimizer (megatron-core's get_megatron_optimizer) and learning-rate schedule."""
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.9
    clip_grad: float = 1.0          # 0 disables clipping
    warmup_steps: int = 0
    decay_style: Literal["constant", "linear", "cosine"] = "cosine"
    decay_steps: Optional[int] = None  # None: run.train_steps
    use_distributed_optimizer: bool = False  # GPU only (megatron's sharded optimizer state)

    def validate(self) -> None:
        _require(self.lr > 0 and math.isfinite(self.lr), "optim.lr", "a positive finite float", self.lr)
        _require(0 <= self.min_lr <= self.lr, "optim.min_lr", f"a float in [0, optim.lr={self.lr}]", self.min_lr)
        _require(self.weight_decay >= 0, "optim.weight_decay", "a float >= 0", self.weight_decay)
        for key in ("adam_beta1", "adam_beta2"):
            _require(0 <= getattr(self, key) < 1, f"optim.{key}", "a float in [0, 1)", getattr(self, key))
        _require(self.adam_eps > 0, "optim.adam_eps", "a positive float", self.adam_eps)
        _require(self.clip_grad >= 0, "optim.clip_grad", "a float >= 0 (0 disables clipping)", self.clip_grad)
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "an integer >= 0", self.warmup_steps)
        if self.decay_steps is not None:
            _require(self.decay_steps >= 1, "optim.decay_steps", "an integer >= 1 or null", self.decay_steps)


@dataclass
class CheckpointSection:
    """megatron-core dist_checkpointing checkpoints under <run_dir>/checkpoints/iter_XXXXXXX."""
    save_interval: int = 0          # 0: save only at the end (and on SIGTERM)
    load: Optional[str] = None      # a checkpoint directory, or a run's checkpoints/ (takes the latest)
    resume: bool = True             # resume from <run_dir>/checkpoints if it has a checkpoint
    load_optimizer: bool = True     # False: weights only (e.g. start a new run from a trained model)
    keep_last: int = 2              # older checkpoints are deleted; 0 keeps all
    save_at_end: bool = True

    def validate(self) -> None:
        _require(self.save_interval >= 0, "checkpoint.save_interval", "an integer >= 0", self.save_interval)
        _require(self.keep_last >= 0, "checkpoint.keep_last", "an integer >= 0", self.keep_last)


@dataclass
class LoggingSection:
    log_interval: int = 1
    tensorboard: bool = True
    progress_bar: bool = True
    # OPD: the first `rollouts` rows of every data-parallel rank's batch, every step, to <run_dir>/rollouts.jsonl
    # (step, dp_rank, prompt, response, reward, per-token student / teacher / behaviour log-probs); 0 = off.
    rollouts: int = 0

    def validate(self) -> None:
        _require(self.log_interval >= 1, "logging.log_interval", "an integer >= 1", self.log_interval)
        _require(self.rollouts >= 0, "logging.rollouts", "an integer >= 0 (rows per data-parallel rank)",
                 self.rollouts)


@dataclass
class RolloutSection:
    """Where OPD prompts come from and how the student samples (algorithm: opd).

    source `task`: prompts of a synthetic task (`opd_megatron/tasks`), with its verifier as the outcome reward;
    `jsonl`: prompts from `path` (key `prompt_key`), optional chat template. Each step samples
    `prompts_per_step` prompts x `samples_per_prompt` responses = the global batch (parallel.global_batch_size)."""
    source: Literal["task", "jsonl"] = "task"
    task: str = "sort_digits"
    task_options: dict[str, int] = field(default_factory=dict)   # e.g. {length: 8} for sort_digits
    path: str = ""
    prompt_key: str = "prompt"
    answer_key: str = "response"        # jsonl: the reference response (fixed-dataset rows of on_policy_fraction)
    apply_chat_template: bool = False
    domain_key: str = ""                # jsonl: a row's domain tag (multi-teacher routing); tasks: the task name
    privileged_key: str = ""            # jsonl: privileged context for a self-teacher; tasks: the reference answer
    prompts_per_step: int = 16
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    stop_at_eos: bool = True
    engine: Literal["megatron"] = "megatron"   # the RolloutEngine; a served student engine plugs in here

    def validate(self) -> None:
        for key in ("prompts_per_step", "samples_per_prompt", "max_new_tokens"):
            _require(getattr(self, key) >= 1, f"rollout.{key}", "an integer >= 1", getattr(self, key))
        _require(self.temperature > 0 and math.isfinite(self.temperature), "rollout.temperature",
                 "a positive number (greedy rollouts are not on-policy samples)", self.temperature)
        _require(0.0 < self.top_p <= 1.0, "rollout.top_p", "a float in (0, 1]", self.top_p)
        _require(self.top_k >= 0, "rollout.top_k", "an integer >= 0 (0 = off)", self.top_k)
        if self.source == "jsonl":
            _require(bool(self.path), "rollout.path", "a JSONL prompt file with rollout.source=jsonl", self.path)
        else:
            from opd_megatron.tasks import TASKS
            if self.task not in TASKS:
                raise ConfigError(f"rollout.task: unknown task {self.task!r}; expected one of {sorted(TASKS)}"
                                  f"{_did_you_mean(self.task, TASKS)}")


@dataclass
class TeacherMemberSection:
    """One teacher of `teacher.kind: multi` (the keys of a single teacher, plus its name)."""
    name: str = ""
    kind: Literal["colocated", "inprocess", "sglang", "vllm"] = "colocated"
    path: str = ""
    model: Optional[ModelSection] = None     # colocated: the shape (default: the one saved in the checkpoint)
    temperature: float = 1.0
    server: dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherSection:
    """The teacher that scores the student's rollouts.

    colocated: a frozen megatron GPTModel sharded like the student (full vocab-sharded logits: every loss and
        support); `path` a megatron checkpoint of ours or an HF checkpoint directory, `model` its shape.
    inprocess: a transformers model from the HF directory `path` (small runs).
    sglang / vllm: a served teacher, `server` holds the client's keys (urls, model, vocab_size, timeouts, ...;
        see teachers/http.py); gives sampled-token logprobs and top-`topk` (sparse supports only).
    `overlap`: score the next batch (sampled with the weights before this update, so one update stale) while this
    batch trains; staleness is reported every step. Only for served teachers."""
    kind: Literal["colocated", "inprocess", "sglang", "vllm", "multi", "self"] = "colocated"
    path: str = ""
    model: Optional[ModelSection] = None     # colocated: the shape (default: the one saved in the checkpoint)
    temperature: float = 1.0
    topk: int = 0                     # served teachers: top-k logprobs per position (0 = sampled token only)
    # kind multi (MiMo-style multi-teacher OPD): per-domain routing (routes: domain -> member name, default) or a
    # mixture of every member on every row (geometric / arithmetic, weights: member name -> weight).
    members: list[TeacherMemberSection] = field(default_factory=list)
    routes: dict[str, str] = field(default_factory=dict)
    default: Optional[str] = None
    mixture: Optional[Literal["geometric", "arithmetic"]] = None
    weights: dict[str, float] = field(default_factory=dict)
    # kind self (OPSD / self-distillation): the student's own weights (current, a frozen copy, or an EMA) reading
    # the row's privileged context (rollout.privileged_key, or a task's reference answer) inserted in the prompt.
    self_mode: Literal["current", "frozen", "ema"] = "frozen"
    ema_decay: float = 0.99
    self_insert: Literal["before_prompt", "after_prompt"] = "after_prompt"
    self_keep: int = 0
    score_student_topk: int = 0       # SGLang: also score the student's top-k ids (student/union supports)
    server: dict[str, Any] = field(default_factory=dict)
    overlap: bool = False

    def validate(self) -> None:
        _require(self.temperature > 0, "teacher.temperature", "a positive number", self.temperature)
        _require(self.topk >= 0 and self.score_student_topk >= 0, "teacher.topk",
                 "integers >= 0 (teacher.topk, teacher.score_student_topk)", (self.topk, self.score_student_topk))
        if self.kind == "multi":
            names = [m.name for m in self.members]
            _require(len(names) >= 1 and all(names) and len(set(names)) == len(names), "teacher.members",
                     "a list of teachers with distinct non-empty names", names)
            _require((bool(self.routes) or self.default is not None) != (self.mixture is not None), "teacher.routes",
                     "either routes (and/or default) for per-domain routing, or a mixture, not both", self.routes)
            for target in list(self.routes.values()) + ([self.default] if self.default else []) + list(self.weights):
                _require(target in names, "teacher.routes", f"member names from {names}", target)
            for i, member in enumerate(self.members):
                if member.kind in ("sglang", "vllm"):
                    from opd_megatron.teachers.http import HTTPTeacherConfig
                    HTTPTeacherConfig.from_dict(member.server, f"teacher.members[{i}].server.")
                else:
                    _require(bool(member.path), f"teacher.members[{i}].path", "a checkpoint directory", member.path)
            return
        if self.kind == "self":
            _require(0.0 <= self.ema_decay < 1.0, "teacher.ema_decay", "a float in [0, 1)", self.ema_decay)
            _require(self.self_keep >= 0, "teacher.self_keep", "an integer >= 0", self.self_keep)
            _require(not self.overlap, "teacher.overlap", "false for a self-teacher", self.overlap)
            return
        if self.kind in ("sglang", "vllm"):
            from opd_megatron.teachers.http import HTTPTeacherConfig
            HTTPTeacherConfig.from_dict(self.server, "teacher.server.")
        else:
            _require(bool(self.path), "teacher.path", f"a checkpoint directory for teacher.kind={self.kind}",
                     self.path)
            _require(not self.overlap, "teacher.overlap", "false for an in-process or colocated teacher (it runs "
                     "on the training ranks; there is nothing to overlap with)", self.overlap)
        if self.kind == "colocated" and self.model is not None:
            self.model.validate()


@dataclass
class GatesSection:
    """Token gates multiplied into w_t (see gates.GateConfig); null turns a gate off."""
    teacher_confidence: Optional[float] = None
    teacher_entropy: Optional[float] = None
    student_entropy: Optional[float] = None
    student_entropy_keep: Literal["high", "low"] = "high"
    sign: Optional[Literal["negative", "positive"]] = None
    log_ratio_clip: Optional[float] = None
    log_ratio_clip_mode: Literal["drop", "clip"] = "drop"
    truncated_is: Optional[tuple[float, float]] = None

    def validate(self) -> None:
        from opd_megatron.math.gates import GateConfig
        _check_with("opd.gates", GateConfig, self)


@dataclass
class RoutingSection:
    """CR-OPD routed-loss form, candidate set and routing weights (see routing.RoutingConfig)."""
    form: Literal["matched", "kl_target"] = "matched"
    teacher_support: Literal["topk", "threshold"] = "topk"
    teacher_top_k: int = 20
    teacher_min_prob: float = 1e-3
    student_reach: Literal["top_p", "topk", "threshold"] = "top_p"
    student_top_p: float = 0.95
    student_top_k: int = 20
    student_min_prob: float = 1e-3
    weights: Literal["q", "sqrt_q_pi", "uniform"] = "q"
    eta: float = 1.0

    def validate(self) -> None:
        from opd_megatron.math.cr_opd import RoutingConfig
        _check_with("opd.routing", RoutingConfig, self)


@dataclass
class OpdSection:
    """The OPD objective (shared/docs/opd-math.md).

    loss `divergence` (route A): `divergence` on `support` (full needs dense teacher logits: colocated or
        in-process); `policy_gradient` (route B): `estimator` credit on the log-ratio r_t, `ratio` form;
        `cr_opd`: route B with CR-OPD vocabulary routing of negative advantages.
    outcome_beta > 0 adds the verifier's reward: A = outcome_alpha * A_opd + outcome_beta * (R - b_R).
    on_policy_fraction (GKD's lambda): the share of each batch sampled by the student; the rest are fixed rows
        (the task's reference answers or rollout.answer_key), trained with the same loss (0 = offline logit
        distillation on a corpus). value_* : GAE-OPD's value head (estimator gae, or baseline value)."""
    loss: Literal["divergence", "policy_gradient", "cr_opd"] = "divergence"
    divergence: Literal["reverse_kl", "forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv"] = "reverse_kl"
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    support: Literal["full", "teacher_topk", "student_topk", "union"] = "full"
    support_k: int = 16
    support_mode: Literal["renormalized", "tail"] = "tail"
    student_temperature: float = 1.0
    # Sampling at a rollout.temperature other than student_temperature trains pi on states of another
    # distribution; the sampler-mismatch weight pi_theta_old / mu then differs from 1 on every token (corrected
    # by truncated IS, logged as mismatch/*). Refused unless this says it is intended.
    allow_temperature_mismatch: bool = False
    estimator: Literal["immediate", "return_to_go", "discounted", "baseline", "single_step", "gae"] = "immediate"
    length_normalized: bool = False      # single_step: MiniLLM's G_(t+1) / (T - t - 1)
    gamma: float = 1.0
    gae_lambda: float = 0.95
    baseline: Optional[Literal["group_mean", "batch_mean", "reverse_kl", "value"]] = None
    ratio: Literal["logprob", "ppo"] = "logprob"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    dual_clip: Optional[float] = None
    kl_coef: float = 1.0                 # scales the OPD term (the log-ratio reward / the divergence)
    normalizer: Literal["token_mean", "sequence_mean", "constant"] = "token_mean"
    gates: GatesSection = field(default_factory=GatesSection)
    routing: RoutingSection = field(default_factory=RoutingSection)
    outcome_alpha: float = 1.0
    outcome_beta: float = 0.0
    entropy_coef: float = 0.0
    reference_kl_coef: float = 0.0        # KL(pi || ref) to the frozen starting weights (checkpoint.load)
    reference_kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    on_policy_fraction: float = 1.0
    value_lr: float = 1e-3
    value_coef: float = 1.0
    chunk_size: Optional[int] = None     # tokens per chunk of the vocab-parallel ops (None: all at once)
    nonfinite: Literal["skip", "stop"] = "skip"
    max_skipped_steps: int = 10

    def validate(self) -> None:
        self.gates.validate()
        self.routing.validate()
        _require(0.0 <= self.jsd_beta <= 1.0, "opd.jsd_beta", "a float in [0, 1]", self.jsd_beta)
        _require(0.0 <= self.skew_alpha <= 1.0, "opd.skew_alpha", "a float in [0, 1]", self.skew_alpha)
        _require(self.support_k >= 1, "opd.support_k", "an integer >= 1", self.support_k)
        _require(self.student_temperature > 0, "opd.student_temperature", "a positive number",
                 self.student_temperature)
        _require(0.0 <= self.gamma <= 1.0, "opd.gamma", "a float in [0, 1]", self.gamma)
        _require(0.0 <= self.gae_lambda <= 1.0, "opd.gae_lambda", "a float in [0, 1]", self.gae_lambda)
        _require(0.0 <= self.on_policy_fraction <= 1.0, "opd.on_policy_fraction", "a float in [0, 1]",
                 self.on_policy_fraction)
        _require(self.kl_coef > 0, "opd.kl_coef", "a positive number", self.kl_coef)
        _require(self.reference_kl_coef >= 0 and self.entropy_coef >= 0, "opd.reference_kl_coef",
                 "numbers >= 0 (opd.reference_kl_coef, opd.entropy_coef)", (self.reference_kl_coef, self.entropy_coef))
        _require(self.chunk_size is None or self.chunk_size >= 1, "opd.chunk_size", "null or an integer >= 1",
                 self.chunk_size)
        _require(self.max_skipped_steps >= 0, "opd.max_skipped_steps", "an integer >= 0", self.max_skipped_steps)
        if self.estimator == "baseline":
            _require(self.baseline is not None, "opd.baseline",
                     "one of group_mean, batch_mean, reverse_kl, value with opd.estimator=baseline", None)
        else:
            _require(self.baseline is None, "opd.baseline", f"null with opd.estimator={self.estimator} (set "
                     f"opd.estimator=baseline to subtract a baseline)", self.baseline)
        if self.estimator == "return_to_go":
            _require(self.gamma == 1.0, "opd.gamma", "1.0 with opd.estimator=return_to_go (use discounted)",
                     self.gamma)

    @property
    def uses_value_head(self) -> bool:
        return self.loss != "divergence" and (self.estimator == "gae" or self.baseline == "value")


@dataclass
class EvalSection:
    """Held-out evaluation (task score and per-token reverse KL to the teacher): before, every `interval` steps
    (0 = only before and after) and after training, on `prompts` prompts training never samples. A task evaluates
    on its eval split; rollout.source=jsonl on the first `prompts` records of `path` (a JSONL file read with the
    rollout keys) or, without it, on `prompts` records held out of rollout.path by a hash of their text
    (rollout/prompts.py)."""
    prompts: int = 200
    path: str = ""
    interval: int = 0
    max_new_tokens: Optional[int] = None   # default: rollout.max_new_tokens
    batch_size: int = 100

    def validate(self) -> None:
        _require(self.prompts >= 1 and self.batch_size >= 1, "eval.prompts", "integers >= 1 (eval.prompts, "
                 "eval.batch_size)", (self.prompts, self.batch_size))
        _require(self.interval >= 0, "eval.interval", "an integer >= 0", self.interval)


@dataclass
class QuickstartSection:
    """`opd-megatron quickstart` only: how the teacher is made (SFT on the task's reference answers, cached by
    its settings under `teacher_cache`) and the student's short SFT warm-up before OPD. Defaults from the measured
    CPU feasibility run (shared/docs/quickstart-feasibility.md)."""
    train_examples: int = 20000
    teacher_steps: int = 500
    teacher_lr: float = 1e-3
    teacher_batch_size: int = 128
    teacher_cache: str = "~/.cache/opd-megatron/quickstart-teachers"
    warmup_steps: int = 130
    warmup_lr: float = 1e-3
    warmup_batch_size: int = 64

    def validate(self) -> None:
        for key in ("train_examples", "teacher_steps", "teacher_batch_size", "warmup_batch_size"):
            _require(getattr(self, key) >= 1, f"quickstart.{key}", "an integer >= 1", getattr(self, key))
        _require(self.warmup_steps >= 0, "quickstart.warmup_steps", "an integer >= 0", self.warmup_steps)


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
        _require(m.num_attention_heads % p.tp == 0, "parallel.tp",
                 f"a divisor of model.num_attention_heads={m.num_attention_heads}", p.tp)
        _require(m.query_groups % p.tp == 0, "parallel.tp",
                 f"a divisor of the number of query groups ({m.query_groups})", p.tp)
        _require(m.ffn_hidden_size % p.tp == 0, "parallel.tp",
                 f"a divisor of model.ffn_hidden_size={m.ffn_hidden_size}", p.tp)
        _require(m.num_layers % p.pp == 0, "parallel.pp", f"a divisor of model.num_layers={m.num_layers}", p.pp)
        _require(self.data.seq_length <= m.max_position_embeddings, "data.seq_length",
                 f"at most model.max_position_embeddings={m.max_position_embeddings}", self.data.seq_length)
        if p.sequence_parallel:
            _require(self.data.seq_length % p.tp == 0, "data.seq_length",
                     f"a multiple of parallel.tp={p.tp} with sequence parallelism", self.data.seq_length)
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
        _require(p.global_batch_size == rows, "parallel.global_batch_size",
                 f"rollout.prompts_per_step x rollout.samples_per_prompt = {r.prompts_per_step} x "
                 f"{r.samples_per_prompt} = {rows} with run.algorithm=opd", p.global_batch_size)
        dense = t.kind in ("colocated", "inprocess", "self") or (
            t.kind == "multi" and all(m.kind in ("colocated", "inprocess") for m in t.members))
        if t.kind == "self":
            _require(p.pp == 1, "parallel.pp", "1 with teacher.kind=self (the self-teacher is the student's whole "
                     "model on one rank)", p.pp)
        needs_dense = []
        if o.loss == "divergence" and o.support == "full":
            needs_dense.append(f"opd.support=full (the {o.divergence} over the whole vocabulary)")
        if o.baseline == "reverse_kl":
            needs_dense.append("opd.baseline=reverse_kl (the exact per-state reverse KL)")
        if o.loss != "divergence" and o.estimator == "single_step":
            needs_dense.append("opd.estimator=single_step (MiniLLM: the step-t term exactly over the vocabulary)")
        if o.gates.teacher_entropy is not None:
            needs_dense.append("opd.gates.teacher_entropy")
        if o.loss == "cr_opd" and o.routing.teacher_support == "threshold":
            needs_dense.append("opd.routing.teacher_support=threshold")
        if needs_dense and not dense:
            raise ConfigError(f"teacher.kind={t.kind} gives sampled-token and top-k logprobs only, but "
                              f"{'; '.join(needs_dense)} needs the teacher's full distribution: use "
                              f"teacher.kind=colocated (or inprocess), or a top-k support "
                              f"(opd.support=teacher_topk with teacher.topk >= opd.support_k)")
        if not dense:
            need_k = 0
            if o.loss == "divergence":
                need_k = o.support_k if o.support in ("teacher_topk", "union") else 0
            if o.loss == "cr_opd":
                need_k = o.routing.teacher_top_k
            if o.gates.teacher_confidence is not None:
                need_k = max(need_k, 1)
            _require(t.topk >= need_k, "teacher.topk", f">= {need_k} for the configured support/routing/gates "
                     f"with a served teacher", t.topk)
            if o.loss == "divergence" and o.support in ("student_topk", "union"):
                _require(t.kind == "sglang" and t.score_student_topk >= o.support_k, "teacher.score_student_topk",
                         f">= opd.support_k={o.support_k} with teacher.kind=sglang (the teacher's logprobs on the "
                         f"student's top-k come from SGLang's token_ids_logprob; vLLM cannot score chosen ids)",
                         t.score_student_topk)
        if r.temperature != o.student_temperature and not o.allow_temperature_mismatch:
            raise ConfigError(f"rollout.temperature={r.temperature} differs from opd.student_temperature="
                              f"{o.student_temperature}: the loss's distribution would not be the one that samples "
                              f"(the sampler-mismatch weight pi_old/mu != 1 on every token); set them equal, or set "
                              f"opd.allow_temperature_mismatch=true if this is intended (then consider "
                              f"opd.gates.truncated_is to correct it)")
        if t.overlap and o.loss in ("policy_gradient", "cr_opd"):
            corrected = (o.loss == "policy_gradient" and o.ratio == "ppo") or o.gates.truncated_is is not None
            _require(corrected, "teacher.overlap", f"false with opd.loss={o.loss} unless the one-update staleness "
                     f"is corrected: opd.ratio=ppo (the PPO ratio against the sampling weights, policy_gradient "
                     f"only) or opd.gates.truncated_is=[0.5, 2.0] (weights pi/mu)", True)
        if o.loss == "divergence":
            _require(o.estimator == "immediate" and o.ratio == "logprob", "opd.estimator",
                     "the default (immediate, ratio logprob) with opd.loss=divergence: credit estimators and "
                     "ratios belong to opd.loss=policy_gradient or cr_opd", (o.estimator, o.ratio))
        if o.reference_kl_coef > 0:
            _require(self.checkpoint.load is not None, "checkpoint.load", "the starting checkpoint with "
                     "opd.reference_kl_coef > 0 (its weights are the frozen reference)", None)
        if o.on_policy_fraction < 1:
            _require(o.loss == "divergence", "opd.on_policy_fraction", "1.0 unless opd.loss=divergence (fixed-dataset "
                     "rows were not sampled by the student: a policy gradient on them has no behaviour policy)",
                     o.on_policy_fraction)
        if o.length_normalized:
            _require(o.estimator == "single_step", "opd.length_normalized", "false unless opd.estimator=single_step",
                     True)
        if o.outcome_beta > 0:
            _require(r.source == "task", "opd.outcome_beta", "0 unless rollout.source=task (the verifier gives "
                     "the outcome reward)", o.outcome_beta)
        for member in t.members:
            if member.model is not None and member.model.vocab_size != self.model.vocab_size:
                raise ConfigError(f"teacher.members[{member.name}].model.vocab_size={member.model.vocab_size} "
                                  f"differs from model.vocab_size={self.model.vocab_size}")
        if t.model is not None and t.model.vocab_size != self.model.vocab_size:
            raise ConfigError(f"teacher.model.vocab_size={t.model.vocab_size} differs from model.vocab_size="
                              f"{self.model.vocab_size}: student and teacher must share one vocabulary")

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


# ---------------------------------------------------------------------------------------------------------------
# Loading: YAML + dotted overrides, every key checked against the dataclass fields.
# ---------------------------------------------------------------------------------------------------------------

def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                validate: bool = True) -> RunConfig:
    """Build a RunConfig from a YAML file (optional) and `a.b=value` overrides (applied after the file)."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r}: expected a mapping of sections at the top level, "
                              f"got {type(raw).__name__}")
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected the form section.key=value, e.g. parallel.tp=2")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc.problem}); quote it or use "
                              f"the dotted form, e.g. rollout.task_options.length=4") from exc
        _set_dotted(raw, key.strip(), value)
    cfg = from_dict(raw)
    return cfg.validate() if validate else cfg


def from_dict(raw: dict[str, Any]) -> RunConfig:
    raw = dict(raw)
    model_raw = raw.get("model")
    if isinstance(model_raw, dict) and model_raw.get("preset") is not None:
        preset = model_raw["preset"]
        if preset not in MODEL_PRESETS:
            raise ConfigError(f"model.preset: unknown preset {preset!r}; expected one of "
                              f"{sorted(MODEL_PRESETS)}{_did_you_mean(preset, MODEL_PRESETS)}")
        raw["model"] = {**MODEL_PRESETS[preset], **model_raw}
    teacher_raw = raw.get("teacher")
    if isinstance(teacher_raw, dict) and isinstance(teacher_raw.get("model"), dict) \
            and teacher_raw["model"].get("preset") is not None:
        preset = teacher_raw["model"]["preset"]
        if preset not in MODEL_PRESETS:
            raise ConfigError(f"teacher.model.preset: unknown preset {preset!r}; expected one of "
                              f"{sorted(MODEL_PRESETS)}{_did_you_mean(preset, MODEL_PRESETS)}")
        raw["teacher"] = {**teacher_raw, "model": {**MODEL_PRESETS[preset], **teacher_raw["model"]}}
    return _build(RunConfig, raw, "")


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {'.'.join(parts[:i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(f"unknown config key {prefix + str(key)!r}{_did_you_mean(str(key), names, prefix)}; "
                              f"valid keys in {where}: {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key)
    if origin in (list, tuple):
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [v if item is Any else _coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, item = typing.get_args(hint) or (str, Any)
        return {str(k): v if item is Any else _coerce(item, v, f"{key}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}"
                              f"{_did_you_mean(str(value), [str(c) for c in choices])}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"config field {key} has an unsupported type {hint}")


def _check_with(prefix: str, math_config: type, section: Any) -> None:
    """Validate a section by building the math core's own config from it (one set of rules, named by key)."""
    try:
        math_config(**dataclasses.asdict(section))
    except ValueError as exc:
        raise ConfigError(f"{prefix}: {exc}") from exc


def _require(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


def _did_you_mean(word: str, options, prefix: str = "") -> str:
    by_lower = {str(option).lower(): str(option) for option in options}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.5)
    return f" (did you mean {prefix + by_lower[close[0]]!r}?)" if close else ""
