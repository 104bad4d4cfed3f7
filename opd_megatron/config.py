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
}


@dataclass
class RunSection:
    """What the run is and where it writes."""
    name: str = "run"
    output_dir: str = "runs"           # the run directory is output_dir/name
    algorithm: Literal["sft"] = "sft"  # later issues add "opd"
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

    def validate(self) -> None:
        for key in ("tp", "pp", "micro_batch_size", "global_batch_size"):
            _require(getattr(self, key) >= 1, f"parallel.{key}", "an integer >= 1", getattr(self, key))
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

    def validate(self) -> None:
        _require(self.log_interval >= 1, "logging.log_interval", "an integer >= 1", self.log_interval)


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def validate(self) -> "RunConfig":
        """Checks that need no world size: each section, then the cross-section rules."""
        for f in dataclasses.fields(self):
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
        if self.optim.use_distributed_optimizer or m.dtype != "fp32":
            # Measured: megatron's distributed optimizer and mixed precision do not run on the CPU
            # (docs/megatron-on-cpu.md). Caught here so a laptop dry-run still accepts them.
            if self.run.device == "cpu":
                raise ConfigError("optim.use_distributed_optimizer / model.dtype=bf16|fp16 need run.device=cuda "
                                  "or auto on a GPU machine; with run.device=cpu use model.dtype=fp32 and "
                                  "optim.use_distributed_optimizer=false")
        return self

    def validate_for_world(self, world_size: int) -> "RunConfig":
        """Checks that need the number of processes; run before any model is built."""
        p = self.parallel
        if world_size % (p.tp * p.pp) != 0:
            raise ConfigError(f"world size {world_size} is not a multiple of parallel.tp x parallel.pp = "
                              f"{p.tp} x {p.pp} = {p.tp * p.pp}; launch tp*pp*dp processes "
                              f"(e.g. torchrun --nproc_per_node {p.tp * p.pp})")
        dp = p.dp(world_size)
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
        _set_dotted(raw, key.strip(), yaml.safe_load(text) if text.strip() else None)
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


def _require(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


def _did_you_mean(word: str, options, prefix: str = "") -> str:
    by_lower = {str(option).lower(): str(option) for option in options}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.5)
    return f" (did you mean {prefix + by_lower[close[0]]!r}?)" if close else ""
