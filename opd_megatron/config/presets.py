"""Model presets: published shapes. A preset fills the model section; keys given beside it override the preset.

Sources: Llama 3 model card / config.json (meta-llama/Meta-Llama-3-8B, -70B); Qwen3 technical report table 1 and
config.json of Qwen/Qwen3-{0.6B,1.7B,4B,8B,14B,32B}; the others at their entries.
"""

from __future__ import annotations

from typing import Any

from opd_megatron.config.loader import ConfigError, did_you_mean

_LLAMA_STYLE = dict(normalization="RMSNorm", activation="swiglu", position_embedding="rope", add_bias_linear=False)
_GPT2_STYLE = dict(normalization="LayerNorm", activation="gelu", position_embedding="learned_absolute",
                   add_bias_linear=True, norm_epsilon=1e-5, tie_embeddings=True)
_LLAMA32_ROPE = dict(type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)
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
    # meta-llama/Llama-3.2-{1B,3B} config.json (tied embeddings; llama3 rope scaling of the 131072 context).
    "llama3.2-1b": dict(num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
                        num_query_groups=8, kv_channels=64, vocab_size=128256, max_position_embeddings=131072,
                        rotary_base=500000, norm_epsilon=1e-5, tie_embeddings=True, rope_scaling=_LLAMA32_ROPE,
                        **_LLAMA_STYLE),
    "llama3.2-3b": dict(num_layers=28, hidden_size=3072, ffn_hidden_size=8192, num_attention_heads=24,
                        num_query_groups=8, kv_channels=128, vocab_size=128256, max_position_embeddings=131072,
                        rotary_base=500000, norm_epsilon=1e-5, tie_embeddings=True, rope_scaling=_LLAMA32_ROPE,
                        **_LLAMA_STYLE),
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


def with_preset(raw_model: Any, key: str) -> Any:
    """The raw model section `raw_model` (of the config key `key`) with its preset's shape filled in under the keys
    it gives; anything else (no preset, not a mapping) is returned as it is, for the typed build to judge."""
    if not isinstance(raw_model, dict) or raw_model.get("preset") is None:
        return raw_model
    check_preset(raw_model["preset"], key)
    return {**MODEL_PRESETS[raw_model["preset"]], **raw_model}


def check_preset(preset: Any, key: str) -> None:
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"{key}.preset: unknown preset {preset!r}; expected one of "
                          f"{sorted(MODEL_PRESETS)}{did_you_mean(str(preset), MODEL_PRESETS)}")
