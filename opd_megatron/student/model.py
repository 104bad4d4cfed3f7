"""The student: a megatron-core GPTModel built from the model and parallel sections of the run config.

Layer spec: TransformerEngine's when TE imports and a GPU is present, megatron-core's local spec otherwise.
Weights are initialised on the CPU from the full (unsplit) tensor on the CPU path (`use_cpu_initialization`), so
the same seed gives the same model at every TP layout. Pipeline stages draw their layers from the same seed in
parallel, so a PP>1 run started from scratch is a different (equally valid) model: to start several layouts from the
same weights, initialise once and load the checkpoint (`checkpoint.load`), as the parity tests do. GPU runs
initialise on the device (megatron's default).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

from opd_megatron.config import ConfigError, ModelSection, ParallelSection, RopeScalingSection

VOCAB_PAD_MULTIPLE = 128  # padded vocab is a multiple of lcm(128, tp): identical at every tp <= 128 that divides it


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Round the tokenizer's vocabulary up so every TP rank holds an equal shard. The pad multiple does not depend
    on tp for tp in {1, 2, 4, ..., 128}, so checkpoints reshard between layouts without changing the embedding."""
    multiple = math.lcm(VOCAB_PAD_MULTIPLE, tp)
    return ((vocab_size + multiple - 1) // multiple) * multiple


def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("transformer_engine.pytorch")
    except ImportError:
        return False
    return True


def build_transformer_config(model: ModelSection, parallel: ParallelSection, on_gpu: bool) -> TransformerConfig:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[model.dtype]
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        kv_channels=model.head_dim,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.activation == "swiglu",
        activation_func=F.silu if model.activation == "swiglu" else F.gelu,
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        init_method_std=model.init_method_std,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=model.dtype == "bf16",
        fp16=model.dtype == "fp16",
        # The loss function returns (sum of token losses, number of tokens); megatron's schedule and
        # finalize_model_grads divide by the global token count, so the update is a per-token mean over the
        # whole global batch whatever the micro-batching and data parallelism.
        calculate_per_token_loss=True,
        use_cpu_initialization=not on_gpu,
        # Fused CUDA kernels exist only on the GPU path.
        bias_activation_fusion=on_gpu and model.add_bias_linear,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        # megatron's default ("full") is deprecated in favour of [] (the same meaning) and warns on every build.
        cuda_graph_scope=[],
        **moe_config(model, parallel, on_gpu),
    )


def moe_config(model: ModelSection, parallel: ParallelSection, on_gpu: bool) -> dict:
    """TransformerConfig keys of a mixture-of-experts model (none for a dense one): megatron-core's MoELayer with
    a top-k softmax router; tokens reach their experts by all-to-all over the expert-parallel group on the GPU and
    by all-gather on the CPU (megatron's all-to-all dispatcher creates a CUDA stream). The router's auxiliary
    load-balancing loss is off: megatron adds it inside the layer, outside the OPD loss accounting."""
    if model.num_moe_experts is None:
        return {}
    _define_missing_te_gemm()
    return dict(
        num_moe_experts=model.num_moe_experts,
        moe_router_topk=model.moe_router_topk,
        # top-1 routing needs the softmax over all experts before the top-k (over one expert it has no gradient).
        moe_router_pre_softmax=model.moe_router_topk == 1,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size or model.ffn_hidden_size,
        expert_model_parallel_size=parallel.ep,
        moe_token_dispatcher_type="alltoall" if on_gpu else "allgather",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_grouped_gemm=False,
    )


def _define_missing_te_gemm() -> None:
    """megatron-core 0.16.1's router gating (`moe_utils.RouterGatingLinearFunction`) tests `te_general_gemm is not
    None`, a name its module imports only when TransformerEngine imports: without TE every MoE forward raises
    NameError. Defining it as None takes the plain torch.mm branch that follows (the one meant for this case)."""
    from megatron.core.transformer.moe import moe_utils
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def layer_spec(model: ModelSection, use_te: bool):
    experts = model.num_moe_experts  # None: the dense MLP
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
        return get_gpt_layer_with_transformer_engine_spec(num_experts=experts, moe_grouped_gemm=False,
                                                          qk_layernorm=model.qk_layernorm)
    return get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False, qk_layernorm=model.qk_layernorm,
                                    normalization=model.normalization)


def _apply_llama3_rope_scaling(module: GPTModel, scaling: RopeScalingSection) -> None:
    """Llama 3.1 / 3.2's frequency scaling with all four of the checkpoint's parameters. GPTModel's own
    `rope_scaling=True` passes only the factor (low / high frequency factors and the original context fixed at
    Llama 3.1's 1 / 4 / 8192), so its `_apply_scaling` is called here with every one of them instead."""
    rotary = module.rotary_pos_emb
    rotary.inv_freq = rotary._apply_scaling(
        rotary.inv_freq, factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
        high_freq_factor=scaling.high_freq_factor,
        original_max_position_embeddings=scaling.original_max_position_embeddings)


@dataclass(frozen=True)
class StudentModel:
    """The local pipeline stage of the student, and what a caller needs to use it."""
    module: GPTModel
    config: TransformerConfig
    vocab_size: int          # the tokenizer's true size: ids >= this are padding and carry no mass
    padded_vocab_size: int


def build_student(model: ModelSection, parallel: ParallelSection, device: torch.device,
                  pre_process: Optional[bool] = None, post_process: Optional[bool] = None) -> StudentModel:
    """Build this rank's pipeline stage. Needs megatron's model-parallel state initialised.
    pre_process / post_process (default: whether this rank is the first / last pipeline stage) say whether the
    stage holds the embedding / the final norm and output layer; a whole model on one stage (a colocated
    teacher, `parallel.pp == 1`) sets both, whatever the student's pipeline layout."""
    on_gpu = device.type == "cuda"
    use_te = transformer_engine_available() and on_gpu
    if parallel.sequence_parallel and not use_te:
        # megatron-core's local spec uses torch norms, which assert `not config.sequence_parallel` (their weight
        # gradients would need the TP all-reduce that TE's and apex's norms mark themselves for).
        raise ConfigError("parallel.sequence_parallel=true needs TransformerEngine's layer spec (a GPU with the "
                          "`gpu` extra installed); megatron-core's local spec used here does not support it: set "
                          "parallel.sequence_parallel=false")
    if model.num_moe_experts is not None and parallel_state.get_expert_model_parallel_world_size() != parallel.ep:
        raise ConfigError(f"parallel.ep={parallel.ep}, but megatron's process groups were initialised with expert "
                          f"parallel size {parallel_state.get_expert_model_parallel_world_size()}")
    config = build_transformer_config(model, parallel, on_gpu)
    padded = padded_vocab_size(model.embedding_rows, parallel.tp)
    scaling = model.rope_scaling
    module = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model, use_te),
        vocab_size=padded,
        max_sequence_length=model.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage() if pre_process is None else pre_process,
        post_process=parallel_state.is_pipeline_last_stage() if post_process is None else post_process,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type=model.position_embedding,
        rotary_base=model.rotary_base,
        seq_len_interpolation_factor=scaling.factor if scaling is not None and scaling.type == "linear" else None,
        parallel_output=True,  # logits stay vocab-sharded [B, S, V/tp]
    )
    if scaling is not None and scaling.type == "llama3":
        _apply_llama3_rope_scaling(module, scaling)
    module.to(device)
    return StudentModel(module=module, config=config, vocab_size=model.vocab_size, padded_vocab_size=padded)


def parameter_count(module: torch.nn.Module) -> int:
    """The whole student's parameter count, on every rank (collective over its model-parallel group, TP x PP):
    each rank counts its TP shards, TP-replicated tensors (norms) only on TP rank 0, and not the last pipeline
    stage's copy of tied embeddings (megatron marks it `shared`)."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    parallel = parallel_state.model_parallel_is_initialized()
    counted = [p for p in module.parameters() if not parallel or (
        not getattr(p, "shared", False) and param_is_not_tensor_parallel_duplicate(p))]
    count = torch.tensor([float(sum(p.numel() for p in counted))], dtype=torch.float64)
    if parallel:
        dist.all_reduce(count, group=parallel_state.get_model_parallel_group())
    return int(count.item())
