"""Hugging Face Llama / Qwen2 / Qwen3 checkpoints <-> the megatron-core GPTModel at any TP/PP layout.

    model = model_section_from_hf_config(hf_dir)                 # config.json -> ModelSection
    student = load_hf_checkpoint(hf_dir, parallel, device)       # build this rank's stage and fill it
    export_hf_checkpoint(student.module, model, out_dir, hf_config=read_hf_config(hf_dir))   # collective

Loading reads only this rank's pipeline stage and TP shard: every tensor is opened with safetensors' `safe_open`
and sliced (`get_slice`) to the rows / columns this rank holds, so no rank ever holds the whole model (a 70B load
at TP=8 x PP=4 reads 1/32 of it per rank). Local files only (`model.safetensors`, or the shards named by
`model.safetensors.index.json`); nothing is downloaded.

Layouts (megatron-core 0.16 local spec; the TransformerEngine spec names its fused norms differently and is
mapped too):
- `linear_qkv` (column-parallel) holds, per query group g, the group's query heads then its one key head then its
  one value head: rows `[q_g (heads/groups * d); k_g (d); v_g (d)]` for g = 0..groups-1. TP rank r holds the
  contiguous groups `[r * groups/tp, (r + 1) * groups/tp)`. HF keeps q_proj / k_proj / v_proj apart, head-major.
- `linear_fc1` of the gated MLP (column-parallel) holds on TP rank r `[gate_r; up_r]`, each the rank's
  `ffn/tp` rows of HF's gate_proj / up_proj (so the TP=1 tensor is `[gate; up]`, and the concatenation of the TP
  shards is `[gate_0; up_0; gate_1; up_1; ...]`, not `[gate; up]`).
- `linear_proj` / `linear_fc2` (row-parallel) hold the rank's columns of o_proj / down_proj.
- word embeddings and the output layer are vocab-parallel over the padded vocabulary (`model.padded_vocab_size`):
  rows past HF's vocabulary are zero (the loss masks them to -inf) and are dropped again on export.
- norms (input / post-attention / final, Qwen3's per-head q_norm / k_norm) are replicated.

Export: every TP group all-gathers its shards one tensor at a time; TP rank 0 of data-parallel replica 0 on each
pipeline stage writes its stage as one safetensors file (`model.safetensors` at PP=1, else
`model-0000s-of-0000P.safetensors` plus `model.safetensors.index.json`), and global rank 0 writes `config.json`.
A writer holds one pipeline stage's unsharded tensors at a time, never the whole model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from opd_megatron.config import ModelSection, ParallelSection
from opd_megatron.config.hf import (CONFIG_FILE, SUPPORTED_ARCHITECTURES, HFBridgeError, hf_family, model_keys_from_hf,
                                    read_hf_config)
from opd_megatron.config.loader import build_dataclass

_ARCHITECTURE_OF_TYPE = {family: arch for arch, family in SUPPORTED_ARCHITECTURES.items()}
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def model_section_from_hf_config(path: str | Path, dtype: str = "fp32") -> ModelSection:
    """The ModelSection of the Llama / Qwen2 / Qwen3 checkpoint at `path` (its config.json; `config/hf.py`).
    `dtype` is the training precision (fp32 on the CPU), not the checkpoint's storage dtype."""
    model = build_dataclass(ModelSection, {**model_keys_from_hf(path), "dtype": dtype}, "model.")
    model.validate()
    return model


def check_exportable(model: ModelSection) -> None:
    """An HFBridgeError naming the first `model.*` key a Llama / Qwen checkpoint cannot express."""
    expected = dict(normalization="RMSNorm", activation="swiglu", position_embedding="rope", add_bias_linear=False,
                    num_moe_experts=None)
    for key, value in expected.items():
        if getattr(model, key) != value:
            raise HFBridgeError(f"model.{key}={getattr(model, key)!r} has no Llama / Qwen2 / Qwen3 form (expected "
                                f"{value!r}); this model cannot be exported as a Hugging Face checkpoint")


def _rope_parameters(model: ModelSection) -> dict[str, Any]:
    theta = float(model.rotary_base)
    scaling = model.rope_scaling
    if scaling is None:
        return {"rope_type": "default", "rope_theta": theta}
    if scaling.type == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": scaling.factor}
    return {"rope_type": "llama3", "rope_theta": theta, "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor, "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings}


def hf_config_from_model_section(model: ModelSection, family: str,
                                 base: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """config.json for `model` as a `family` checkpoint; keys of `base` (e.g. the loaded checkpoint's config:
    token ids, chat settings) are kept unless the model's shape overrides them."""
    if family not in _ARCHITECTURE_OF_TYPE:
        raise HFBridgeError(f"family={family!r} is not supported; expected one of {sorted(_ARCHITECTURE_OF_TYPE)}")
    check_exportable(model)
    config = dict(base or {})
    config.update(
        architectures=[_ARCHITECTURE_OF_TYPE[family]], model_type=family, hidden_act="silu",
        num_hidden_layers=model.num_layers, hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size, num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.query_groups, head_dim=model.head_dim, vocab_size=model.embedding_rows,
        max_position_embeddings=model.max_position_embeddings, rms_norm_eps=model.norm_epsilon,
        rope_theta=float(model.rotary_base), tie_word_embeddings=model.tie_embeddings,
        dtype=_DTYPE_NAMES[model.dtype])
    # transformers >= 5 reads `rope_parameters` (and converts a 4.x `rope_scaling`); one source of truth.
    config["rope_parameters"] = _rope_parameters(model)
    config.pop("rope_scaling", None)
    if "layer_types" in config:
        # transformers 5's per-layer attention kinds (Qwen2 / Qwen3): one per layer, all full attention here
        # (sliding windows are refused on load); a layer-pruned model has fewer layers than its source.
        config["layer_types"] = ["full_attention"] * model.num_layers
    if family != "qwen2":
        config["attention_bias"] = False
    return config


# -- reading slices of safetensors files --------------------------------------------------------------------------
class SafetensorsCheckpoint:
    """The tensors of an HF checkpoint directory, by name, read in slices. Use as a context manager (the files
    stay open while a model loads)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX_FILE
        # transformers' order: a single model.safetensors wins over an index beside it.
        if (self.path / WEIGHTS_FILE).is_file():
            weight_map = None
        elif index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            raise HFBridgeError(f"{str(self.path)!r}: no {WEIGHTS_FILE} or {INDEX_FILE} (only safetensors "
                                f"checkpoints are supported)")
        self._weight_map = weight_map
        self._handles: dict[str, Any] = {}

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def _file_of(self, name: str) -> str:
        if self._weight_map is None:
            return WEIGHTS_FILE
        if name not in self._weight_map:
            raise HFBridgeError(f"{str(self.path)!r}: tensor {name!r} is missing ({INDEX_FILE} does not list it)")
        return self._weight_map[name]

    def _handle(self, file: str):
        """The open safetensors file `file` (opened once, kept until exit)."""
        if file not in self._handles:
            from safetensors import safe_open
            self._handles[file] = safe_open(str(self.path / file), framework="pt").__enter__()
        return self._handles[file]

    def _slice(self, name: str):
        file = self._file_of(name)
        handle = self._handle(file)
        if name not in handle.keys():
            raise HFBridgeError(f"{str(self.path / file)!r}: tensor {name!r} is missing")
        return handle.get_slice(name)

    def names(self) -> list[str]:
        """Every tensor name of the checkpoint (the index's, or the single file's)."""
        if self._weight_map is not None:
            return list(self._weight_map)
        return list(self._handle(WEIGHTS_FILE).keys())

    def shape(self, name: str) -> list[int]:
        return list(self._slice(name).get_shape())

    def read(self, name: str, rows: Optional[tuple[int, int]] = None,
             cols: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Rows `[a, b)` and / or columns `[c, d)` of tensor `name`; only that part is read from disk."""
        part = self._slice(name)
        r = slice(*rows) if rows else slice(None)
        if cols is None:
            return part[r]
        return part[r, slice(*cols)]


# -- one megatron parameter <-> its HF tensors ------------------------------------------------------------------
@dataclass(frozen=True)
class _Mapping:
    kind: str               # replicated | row | qkv | fc1 | vocab
    hf_names: tuple[str, ...]


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LAYER_PARAMS = {
    "input_layernorm.weight": ("replicated", ("input_layernorm.weight",)),
    "self_attention.linear_qkv.layer_norm_weight": ("replicated", ("input_layernorm.weight",)),  # TE spec
    "self_attention.linear_qkv.weight": ("qkv", ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                 "self_attn.v_proj.weight")),
    "self_attention.linear_qkv.bias": ("qkv", ("self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                               "self_attn.v_proj.bias")),
    "self_attention.linear_proj.weight": ("row", ("self_attn.o_proj.weight",)),
    "self_attention.q_layernorm.weight": ("replicated", ("self_attn.q_norm.weight",)),
    "self_attention.k_layernorm.weight": ("replicated", ("self_attn.k_norm.weight",)),
    "pre_mlp_layernorm.weight": ("replicated", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.layer_norm_weight": ("replicated", ("post_attention_layernorm.weight",)),  # TE spec
    "mlp.linear_fc1.weight": ("fc1", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mlp.linear_fc2.weight": ("row", ("mlp.down_proj.weight",)),
}


def _mapping(module, name: str, tie_embeddings: bool, hf_layers: Optional[Sequence[int]] = None) -> _Mapping:
    """The HF tensors behind megatron parameter `name` of this stage. Layer indices in `name` are local to the
    stage; megatron's `layer_number` (1-based, global) gives the model's layer, and `hf_layers` (a layer-pruned
    load, `model.from_hf_layers`) the checkpoint's layer of each of the model's layers (None: the same index)."""
    if name == "embedding.word_embeddings.weight":
        return _Mapping("vocab", ("model.embed_tokens.weight",))
    if name == "output_layer.weight":
        # With tied embeddings at PP>1 the last stage keeps its own copy of the embedding as the output layer.
        return _Mapping("vocab", ("model.embed_tokens.weight" if tie_embeddings else "lm_head.weight",))
    if name == "decoder.final_layernorm.weight":
        return _Mapping("replicated", ("model.norm.weight",))
    match = _LAYER.match(name)
    if match and match.group(2) in _LAYER_PARAMS:
        layer = module.decoder.layers[int(match.group(1))].layer_number - 1
        if hf_layers is not None:
            layer = hf_layers[layer]
        kind, suffixes = _LAYER_PARAMS[match.group(2)]
        return _Mapping(kind, tuple(f"model.layers.{layer}.{s}" for s in suffixes))
    raise HFBridgeError(f"megatron parameter {name!r} has no Hugging Face counterpart in this bridge "
                        f"(supported: Llama / Qwen2 / Qwen3 with megatron-core's local or TE layer spec)")


def _parameters(module) -> list[tuple[str, torch.Tensor]]:
    """This stage's tensors in state-dict order (identical on every TP rank), without `_extra_state`."""
    return [(name, tensor) for name, tensor in module.state_dict(keep_vars=True).items()
            if isinstance(tensor, torch.Tensor) and not name.endswith("_extra_state")]


def _tp() -> tuple[int, int]:
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def _rows(rank: int, per_rank: int) -> tuple[int, int]:
    return rank * per_rank, (rank + 1) * per_rank


def _read_local(ckpt: SafetensorsCheckpoint, mapping: _Mapping, local_shape: Sequence[int], model: ModelSection,
                rank: int, tp: int) -> torch.Tensor:
    """This TP rank's shard of one megatron parameter, read from the HF tensors (only the needed slices)."""
    kind, names = mapping.kind, mapping.hf_names
    if kind == "replicated":
        return ckpt.read(names[0])
    if kind == "row":
        return ckpt.read(names[0], cols=_rows(rank, local_shape[1]))
    if kind == "fc1":
        rows = _rows(rank, local_shape[0] // 2)
        return torch.cat([ckpt.read(names[0], rows=rows), ckpt.read(names[1], rows=rows)])
    if kind == "qkv":
        groups, d = model.query_groups // tp, model.head_dim
        per_group = model.num_attention_heads // model.query_groups * d
        q = ckpt.read(names[0], rows=_rows(rank, groups * per_group))
        k = ckpt.read(names[1], rows=_rows(rank, groups * d))
        v = ckpt.read(names[2], rows=_rows(rank, groups * d))
        rest = q.shape[1:]
        return torch.cat([q.reshape(groups, per_group, *rest), k.reshape(groups, d, *rest),
                          v.reshape(groups, d, *rest)], dim=1).reshape(-1, *rest)
    # vocab: this rank's rows of the padded vocabulary; rows past the checkpoint's vocabulary are zero.
    start, end = _rows(rank, local_shape[0])
    hf_vocab = ckpt.shape(names[0])[0]
    out = torch.zeros(local_shape, dtype=torch.float32)
    if start < hf_vocab:
        real = ckpt.read(names[0], rows=(start, min(end, hf_vocab)))
        out = out.to(real.dtype)
        out[: real.shape[0]] = real
    return out


_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Saved beside the weights by some checkpoints but not weights: a tied model's lm_head copy (transformers ties it to
# the embedding on load), the RoPE inverse frequencies of old Llama checkpoints (recomputed from the config).
_NOT_WEIGHTS = re.compile(r"^(lm_head\.weight|model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq)$")


def _layer_tensors_read(module) -> set[str]:
    """The per-layer HF tensor names (`self_attn.q_proj.weight`, ...) the decoder layers of `module` read."""
    return {suffix for name, _ in _parameters(module) if (match := _LAYER.match(name))
            and match.group(2) in _LAYER_PARAMS for suffix in _LAYER_PARAMS[match.group(2)][1]}


def unread_hf_tensors(names: Sequence[str], module, model: ModelSection) -> list[str]:
    """The tensors of a checkpoint (`names`) that no parameter of a model built from `model` reads: a bias,
    a norm or a tower config.json does not announce. Loading while ignoring them would give other logits than
    transformers. The decoder layers of a model have one parameter set, so `module` (any pipeline stage) tells
    which per-layer tensors are read; with `model.from_hf_layers` the checkpoint's other layers are left out on
    purpose."""
    per_layer = _layer_tensors_read(module)
    layers = range(model.num_layers) if model.from_hf_layers is None else None
    unread = []
    for name in names:
        if name in ("model.embed_tokens.weight", "model.norm.weight") or _NOT_WEIGHTS.match(name):
            continue
        match = _HF_LAYER.match(name)
        if match and match.group(2) in per_layer and (layers is None or int(match.group(1)) in layers):
            continue
        unread.append(name)
    return unread


def load_hf_weights(module, model: ModelSection, path: str | Path) -> None:
    """Fill this rank's stage (`module`, a GPTModel built from `model` at the current TP/PP layout) from the HF
    checkpoint at `path`, reading only this rank's slices. Every parameter of the stage must be found, and every
    weight of the checkpoint must be one the model reads."""
    rank, tp = _tp()
    with SafetensorsCheckpoint(path) as ckpt, torch.no_grad():
        unread = unread_hf_tensors(ckpt.names(), module, model)
        if unread:
            shown = ", ".join(repr(n) for n in unread[:6]) + (f" and {len(unread) - 6} more" if len(unread) > 6 else "")
            raise HFBridgeError(f"{str(path)!r}: nothing in the model reads the tensors {shown}: config.json does "
                                f"not describe them (a bias, a norm or another module this bridge does not map); "
                                f"the model reads model.embed_tokens.weight, model.norm.weight, lm_head.weight "
                                f"and per layer {sorted(_layer_tensors_read(module))}")
        for name, param in _parameters(module):
            mapping = _mapping(module, name, model.tie_embeddings, model.from_hf_layers)
            local = _read_local(ckpt, mapping, tuple(param.shape), model, rank, tp)
            if tuple(local.shape) != tuple(param.shape):
                raise HFBridgeError(f"{str(path)!r}: {' + '.join(mapping.hf_names)} give a TP-rank-{rank} shard of "
                                    f"shape {tuple(local.shape)} for megatron {name!r}, expected "
                                    f"{tuple(param.shape)} (config.json and the weights disagree?)")
            param.copy_(local)


def load_hf_checkpoint(path: str | Path, parallel: ParallelSection, device: torch.device,
                       dtype: str = "fp32"):
    """Build this rank's stage of the checkpoint's model (`student.model.build_student`) and load its weights.
    Needs megatron's model-parallel state initialised at `parallel`'s layout."""
    from opd_megatron.student.model import build_student
    model = model_section_from_hf_config(path, dtype)
    student = build_student(model, parallel, device)
    load_hf_weights(student.module, model, path)
    return student


# -- export ----------------------------------------------------------------------------------------------------------
def _gather_tp(tensor: torch.Tensor, tp: int) -> list[torch.Tensor]:
    if tp == 1:
        return [tensor]
    shards = [torch.empty_like(tensor) for _ in range(tp)]
    dist.all_gather(shards, tensor.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return shards


def _to_hf(mapping: _Mapping, shards: list[torch.Tensor], model: ModelSection) -> dict[str, torch.Tensor]:
    """The HF tensors of one megatron parameter from its TP shards (rank order). Inverse of `_read_local`."""
    kind, names = mapping.kind, mapping.hf_names
    if kind == "replicated":
        return {names[0]: shards[0]}
    if kind == "row":
        return {names[0]: torch.cat(shards, dim=1)}
    if kind == "vocab":
        return {names[0]: torch.cat(shards)[: model.embedding_rows]}
    if kind == "fc1":
        gate, up = zip(*(shard.chunk(2) for shard in shards))
        return {names[0]: torch.cat(gate), names[1]: torch.cat(up)}
    d = model.head_dim
    per_group = model.num_attention_heads // model.query_groups * d
    parts = [[], [], []]
    for shard in shards:
        rest = shard.shape[1:]
        q, k, v = shard.reshape(-1, per_group + 2 * d, *rest).split([per_group, d, d], dim=1)
        for out, part in zip(parts, (q, k, v)):
            out.append(part.reshape(-1, *rest))
    return {name: torch.cat(part) for name, part in zip(names, parts)}


def hf_tensors(module, model: ModelSection, dtype: Optional[torch.dtype] = None
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """This stage's weights as whole HF tensors `(name, tensor)`, one megatron parameter at a time, each gathered
    over the TP group (collective: every rank of the stage iterates to the end; the tensors come out on TP rank 0
    of data-parallel replica 0 only, in `dtype` (default: the parameter's), on the parameter's device)."""
    rank, tp = _tp()
    writer = rank == 0 and parallel_state.get_data_parallel_rank() == 0
    for name, param in _parameters(module):
        if name == "output_layer.weight" and model.tie_embeddings:
            continue  # the last stage's copy of the tied embedding: HF keeps only embed_tokens
        shards = _gather_tp(param.detach(), tp)
        if writer:
            for hf_name, tensor in _to_hf(_mapping(module, name, model.tie_embeddings), shards, model).items():
                yield hf_name, tensor.to(dtype or tensor.dtype).contiguous()


def _stage_file(pp_rank: int, pp: int) -> str:
    return WEIGHTS_FILE if pp == 1 else f"model-{pp_rank + 1:05d}-of-{pp:05d}.safetensors"


def export_hf_checkpoint(module, model: ModelSection, directory: str | Path, family: Optional[str] = None,
                         hf_config: Optional[dict[str, Any]] = None, dtype: Optional[torch.dtype] = None) -> Path:
    """Write the model (this rank's `module` and every other rank's) as an HF checkpoint in `directory`.
    Collective over all ranks. `family` (llama / qwen2 / qwen3) defaults to `hf_config`'s architecture;
    `dtype` (default: the parameters') is the storage dtype."""
    from safetensors.torch import save_file
    if family is None:
        if hf_config is None:
            raise HFBridgeError("export_hf_checkpoint: give family= (llama / qwen2 / qwen3) or hf_config=")
        family = hf_family(hf_config, "hf_config")
    config = hf_config_from_model_section(model, family, hf_config)
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")  # what the files hold, not the training precision
    config.pop("torch_dtype", None)  # transformers 4's name of `dtype`: one source of truth
    directory = Path(directory)
    rank, tp = _tp()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    writer = rank == 0 and parallel_state.get_data_parallel_rank() == 0
    # To host memory tensor by tensor: a GPU holds one gathered parameter at a time, not the stage.
    tensors = {name: tensor.cpu() for name, tensor in hf_tensors(module, model, dtype)}
    if writer:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(directory / _stage_file(pp_rank, pp)), metadata={"format": "pt"})
    names = list(tensors) if writer else []
    world = dist.get_world_size() if dist.is_initialized() else 1
    gathered: list[Any] = [None] * world
    if world > 1:
        dist.all_gather_object(gathered, (pp_rank, names))
    else:
        gathered = [(pp_rank, names)]
    if not dist.is_initialized() or dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if pp > 1:
            weight_map = {name: _stage_file(stage, pp) for stage, stage_names in gathered for name in stage_names}
            (directory / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": dict(sorted(
                weight_map.items()))}, indent=2))
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    if world > 1:
        dist.barrier()
    return directory


__all__ = ["HFBridgeError", "SUPPORTED_ARCHITECTURES", "SafetensorsCheckpoint", "read_hf_config", "hf_family",
           "model_section_from_hf_config", "hf_config_from_model_section", "load_hf_weights",
           "load_hf_checkpoint", "export_hf_checkpoint", "hf_tensors"]
