"""A Hugging Face checkpoint's `config.json` as `model.*` keys: what `model.from_hf` fills in, what `dry-run` reads
for an HF student or teacher, and the inverse written by the export (`student/hf_bridge.py`).

Plain JSON reading (no torch, no transformers), so that the config can be resolved and checked before anything is
built. Supported: Llama (2, 3, 3.1/3.2 with `rope_scaling` of type `llama3`, linear scaling), Qwen2 / Qwen2.5 (QKV
bias) and Qwen3 (per-head QK norm), dense. Anything the megatron-core student cannot reproduce exactly is refused
with the key and its value (sliding-window attention, other RoPE types, biases megatron does not place the same
way, activations other than SiLU).

Vocabulary: `config.json`'s `vocab_size` is the embedding's row count, which for Qwen (151,936 rows, 151,665
tokens) is larger than the tokenizer. `model.vocab_size` is the tokenizer's true size (ids at or past it are
padding: masked to -inf in every loss, so no mass is ever put on a row no token can reach), read from the
checkpoint's `tokenizer.json`; `model.checkpoint_vocab_size` keeps the row count so that the embedding loads and
exports with its shape.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from opd_megatron.config.loader import ConfigError

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
# transformers' names for the llama3 scaling's parameters, with Llama 3.1's values where a key is absent.
LLAMA3_ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# Keys of `model.*` that describe training rather than the checkpoint's architecture: a user may set them freely
# beside `model.from_hf`.
TRAINING_KEYS = frozenset({"from_hf", "from_hf_layers", "dtype", "init_method_std", "hidden_dropout",
                           "attention_dropout", "preset"})


class HFBridgeError(ConfigError):
    """An HF checkpoint this framework cannot load or a model it cannot export; the message names the file, the
    config key or the tensor, and what was expected."""


def read_hf_config(path: str | Path) -> dict[str, Any]:
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        raise HFBridgeError(f"{str(path)!r} is not a Hugging Face checkpoint directory: no {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise HFBridgeError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise HFBridgeError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    return config


def hf_family(config: dict[str, Any], where: str = CONFIG_FILE) -> str:
    """`llama`, `qwen2` or `qwen3` from config.json's `architectures`; anything else is an HFBridgeError."""
    architectures = config.get("architectures") or []
    known = [SUPPORTED_ARCHITECTURES[a] for a in architectures if a in SUPPORTED_ARCHITECTURES]
    if not known:
        raise HFBridgeError(f"{where}: architectures={architectures} (model_type={config.get('model_type')!r}) is not "
                            f"supported; expected one of {sorted(SUPPORTED_ARCHITECTURES)}")
    return known[0]


def rope_from_hf(config: dict[str, Any], where: str) -> tuple[float, Optional[dict[str, Any]]]:
    """(theta, the `model.rope_scaling` mapping or None). transformers >= 5 writes `rope_parameters: {rope_type,
    rope_theta, ...}`; 4.x writes `rope_theta` and `rope_scaling: {rope_type | type, factor, ...}`."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise HFBridgeError(f"{where}: rope_parameters / rope_scaling={params!r} is not a mapping")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        scaling = {"type": "llama3", "factor": float(params["factor"])}
        scaling.update({key: type(default)(params.get(key, default)) for key, default in LLAMA3_ROPE_DEFAULTS.items()})
        return theta, scaling
    if rope_type == "linear":
        return theta, {"type": "linear", "factor": float(params["factor"])}
    raise HFBridgeError(f"{where}: rope_type={rope_type!r} is not supported; expected 'default' (plain RoPE), "
                        f"'llama3' (Llama 3.1 / 3.2) or 'linear'")


def _refuse(config: dict[str, Any], where: str, key: str, expected: Any) -> None:
    if config.get(key, expected) not in (expected, None):
        raise HFBridgeError(f"{where}: {key}={config[key]!r} is not supported; expected {expected!r}")


def tokenizer_vocab_size(path: str | Path) -> Optional[int]:
    """The number of ids the checkpoint's `tokenizer.json` can produce (its largest id + 1, added tokens
    included), or None without one. Counted from the JSON so that the config resolves without loading a
    tokenizer; `data/tokenizer.py` counts the same on the loaded one."""
    file = Path(path) / TOKENIZER_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
        vocab = (data.get("model") or {}).get("vocab") or {}
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))  # Unigram: a list
        ids += [token["id"] for token in data.get("added_tokens") or []]
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as error:
        raise HFBridgeError(f"{file}: not a tokenizers JSON file ({type(error).__name__}: {error})") from None
    return max(ids) + 1 if ids else None


def model_keys_from_hf(path: str | Path) -> dict[str, Any]:
    """The `model.*` keys of the Llama / Qwen2 / Qwen3 checkpoint at `path` (its config.json, and its
    tokenizer.json for the true vocabulary size)."""
    return _model_keys(path, tokenizer_vocab_size(path))


def _model_keys(path: str | Path, tokens: Optional[int]) -> dict[str, Any]:
    """`model_keys_from_hf` with the tokenizer's id count `tokens` already read (None: no tokenizer.json)."""
    config = read_hf_config(path)
    where = str(Path(path) / CONFIG_FILE)
    family = hf_family(config, where)
    _refuse(config, where, "hidden_act", "silu")
    _refuse(config, where, "mlp_bias", False)
    _refuse(config, where, "use_sliding_window", False)
    # Llama's and Qwen3's attention_bias puts a bias on o_proj too, which megatron's add_qkv_bias does not.
    _refuse(config, where, "attention_bias", False)
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size",
                "max_position_embeddings", "rms_norm_eps"):
        if key not in config:
            raise HFBridgeError(f"{where}: no {key!r}; a Llama / Qwen config.json has one")
    heads = int(config["num_attention_heads"])
    theta, rope_scaling = rope_from_hf(config, where)
    rows = int(config["vocab_size"])
    if tokens is not None and tokens > rows:
        raise HFBridgeError(f"{Path(path) / TOKENIZER_FILE}: ids up to {tokens - 1}, but {where} has vocab_size="
                            f"{rows} embedding rows; the tokenizer does not belong to this model")
    vocab = rows if tokens is None else tokens
    return dict(
        num_layers=int(config["num_hidden_layers"]),
        hidden_size=int(config["hidden_size"]),
        ffn_hidden_size=int(config["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(config.get("num_key_value_heads") or heads),
        kv_channels=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
        vocab_size=vocab,
        checkpoint_vocab_size=rows if rows != vocab else None,
        max_position_embeddings=int(config["max_position_embeddings"]),
        normalization="RMSNorm",
        norm_epsilon=float(config["rms_norm_eps"]),
        activation="swiglu",
        position_embedding="rope",
        rotary_base=int(theta) if theta.is_integer() else theta,
        rope_scaling=rope_scaling,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        add_bias_linear=False,
        add_qkv_bias=family == "qwen2",
        qk_layernorm=family == "qwen3",
        num_moe_experts=None,
    )


def _number(value: Any) -> Optional[float]:
    """`value` as a float when it is one (YAML reads `1e-5` without a dot as a string), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _same(given: Any, value: Any) -> bool:
    # rms_norm_eps is often the float32 rounding of 1e-5 (9.999999747378752e-06): the same value to a user.
    if isinstance(value, (int, float)) and not isinstance(value, bool) and _number(given) is not None:
        return math.isclose(_number(given), float(value), rel_tol=1e-6)
    return given == value


def resolve_from_hf(section: dict[str, Any], key: str) -> dict[str, Any]:
    """The model section `section` (a config mapping, at config key `key`, e.g. `model`) with every
    architecture key filled from `section["from_hf"]`'s checkpoint, and `from_hf_layers` applied to the layer
    count. An explicit key that contradicts the checkpoint is a ConfigError naming both values."""
    path = section.get("from_hf")
    if path is None:
        return section
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{key}.from_hf={path!r}: expected the path of a Hugging Face checkpoint directory")
    if section.get("preset") is not None:
        raise ConfigError(f"{key}.preset={section['preset']!r} and {key}.from_hf={path!r} both give the model's "
                          f"shape; keep one")
    tokens = tokenizer_vocab_size(path)  # read once: a Qwen tokenizer.json is ~7 MB of JSON
    derived = _model_keys(path, tokens)
    layers = section.get("from_hf_layers")
    if layers is not None:
        total = derived["num_layers"]
        if (not isinstance(layers, list) or not layers or not all(isinstance(i, int) and 0 <= i < total
                                                                  for i in layers) or len(set(layers)) != len(layers)):
            raise ConfigError(f"{key}.from_hf_layers={layers!r}: expected a non-empty list of distinct layer indices "
                              f"in [0, {total}) ({path} has {total} layers)")
        derived["num_layers"] = len(layers)
    rows = derived["checkpoint_vocab_size"] or derived["vocab_size"]
    given_vocab = section.get("vocab_size")
    fewest = derived["vocab_size"] if tokens is not None else 1
    if isinstance(given_vocab, int) and not isinstance(given_vocab, bool) and fewest <= given_vocab <= rows:
        # The tokenizer's true size inside the embedding's rows, given by the user (e.g. a checkpoint without a
        # tokenizer.json here, whose tokenizer lives elsewhere).
        derived["vocab_size"] = given_vocab
        derived["checkpoint_vocab_size"] = rows if rows != given_vocab else None
    resolved = dict(section)
    for name, value in derived.items():
        if name in section and name not in TRAINING_KEYS and not _agrees(section[name], value):
            raise ConfigError(f"{key}.{name}={section[name]!r} contradicts {key}.from_hf={path!r}, whose checkpoint "
                              f"has {name}={value!r}; drop {key}.{name} (from_hf sets it) or use another checkpoint")
        resolved[name] = value  # the checkpoint's exact value, also where an explicit key agreed with it
    return resolved


def _agrees(given: Any, value: Any) -> bool:
    if isinstance(value, dict) and isinstance(given, dict):  # rope_scaling: the keys given must match
        return set(given) <= set(value) and all(_same(given[k], value[k]) for k in given)
    return _same(given, value)


__all__ = ["HFBridgeError", "SUPPORTED_ARCHITECTURES", "read_hf_config", "hf_family", "rope_from_hf",
           "tokenizer_vocab_size", "model_keys_from_hf", "resolve_from_hf"]
