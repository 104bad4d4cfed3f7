"""Process bodies for `test_sampler_randomness.py` (importable: spawned processes load them).

The sampler runs on `FixedLogits`, a stand-in for the megatron GPTModel stage that returns this TP rank's shard of
one fixed logit vector at every position (the sampler's module contract: `set_input_tensor`, a parameter for the
device, `forward(tokens, positions, mask, inference_context=..., runtime_gather_output=...) -> [B, s, V/tp]`), so
every row of a call draws one token from the same known distribution. The vocabulary, 203 ids, is not a multiple of
128; padded to 256 over TP=2, rank 0 holds ids 0..127 and rank 1 ids 128..202 plus 53 padding ids, whose logits
are LARGE (a padding id would win if it were not masked).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from opd_megatron.rollout.generate import MegatronSampler, SamplingConfig

VOCAB, PADDED = 203, 256
PAD_LOGIT = 30.0
PROMPT = [[1]]
# name -> the sampling settings (every path of `_sample_shard` that draws noise); each target mass lies on both
# TP shards (ids >= 128 hold 10-23% of it).
MODES = {
    "gumbel": dict(temperature=0.7),                               # full softmax, Gumbel-max over the shards
    "top_k": dict(temperature=1.0, top_k=12),                      # renormalised top-12
    "top_p": dict(temperature=1.0, top_p=0.7),                     # nucleus of the full distribution (36 ids)
    "top_k_top_p": dict(temperature=1.3, top_k=40, top_p=0.8),     # nucleus of the renormalised top-40
}


def full_logits() -> torch.Tensor:
    """The fixed logits `[VOCAB]` float64."""
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.5


def target_probs(temperature: float, top_k: int = 0, top_p: float = 1.0, **_) -> torch.Tensor:
    """The exact distribution the sampler must draw from `[VOCAB]` float64 (single device): softmax(z/T), top-k
    renormalised, then the nucleus (ids in probability order, ties to the lower id, kept while the mass before
    them is < top_p) renormalised."""
    probs = torch.softmax(full_logits() / temperature, dim=-1)
    if top_k:
        keep = torch.zeros(VOCAB, dtype=torch.bool)
        keep[torch.topk(probs, top_k).indices] = True
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum()
    if top_p < 1.0:
        order = torch.argsort(-probs, stable=True)
        mass_before = probs[order].cumsum(0) - probs[order]
        keep = torch.zeros(VOCAB, dtype=torch.bool)
        keep[order[mass_before < top_p]] = True
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum()
    return probs


class FixedLogits(torch.nn.Module):
    """This TP rank's shard `[V/tp]` of `full_logits()` (float32, padding at PAD_LOGIT) at every position."""

    def __init__(self, tp: int, tp_rank: int):
        super().__init__()
        padded = torch.cat([full_logits().float(), torch.full((PADDED - VOCAB,), PAD_LOGIT)])
        width = PADDED // tp
        self.register_buffer("shard", padded[tp_rank * width: (tp_rank + 1) * width].clone())
        self.anchor = torch.nn.Parameter(torch.zeros(1))       # the sampler reads the device from a parameter
        self.config = SimpleNamespace(hidden_size=1, params_dtype=torch.float32)

    def set_input_tensor(self, tensor) -> None:
        pass

    def forward(self, tokens, positions, attention_mask, inference_context=None, runtime_gather_output=None):
        return self.shard.expand(tokens.shape[0], tokens.shape[1], -1).clone()


def _init(tp: int) -> MegatronSampler:
    from opd_megatron.student.cpu_shims import apply_cpu_shims
    apply_cpu_shims()
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    module = FixedLogits(tp, parallel_state.get_tensor_model_parallel_rank())
    return MegatronSampler(module, VOCAB, pad_id=0, max_sequence_length=4, seed=5)


def first_tokens(sampler: MegatronSampler, rows: int, sample_key: Optional[tuple] = None, **settings) -> torch.Tensor:
    """One generate call of `rows` one-token responses to the same prompt: the sampled ids `[rows]`."""
    config = SamplingConfig(max_new_tokens=1, n=rows, **settings)
    batch = (sampler.generate(PROMPT, config) if sample_key is None
             else sampler.generate(PROMPT, config, sample_key=sample_key))
    return batch.tokens[:, 1].clone()


def draws(tp: int, rows: int) -> dict:
    """Every mode's draws of one call without a sample key (the call-counter path, as today's main has it), with
    this rank's TP and DP ranks."""
    sampler = _init(tp)
    out = {"tp_rank": parallel_state.get_tensor_model_parallel_rank(),
           "dp_rank": parallel_state.get_data_parallel_rank()}
    for name, settings in MODES.items():
        out[name] = first_tokens(sampler, rows, **settings)
    return out


def keys_and_logprobs(tp: int, rows: int) -> dict:
    """Sample keys (same key -> same tokens, whatever the call counter or sampler instance; another key -> other
    draws; None -> the call counter) and the log-probs returned with the tokens."""
    sampler = _init(tp)
    settings = MODES["top_p"]
    out = {"key_a": first_tokens(sampler, rows, ("rollout", 3), **settings),
           "key_a_again": first_tokens(sampler, rows, ("rollout", 3), **settings),
           "key_b": first_tokens(sampler, rows, ("rollout", 4), **settings),
           "eval_key": first_tokens(sampler, rows, ("eval", 3, 0, "sampled"), **MODES["gumbel"])}
    resumed = MegatronSampler(sampler.module, VOCAB, pad_id=0, max_sequence_length=4, seed=5)
    out["key_a_resumed"] = first_tokens(resumed, rows, ("rollout", 3), **settings)       # calls 0, not 4
    out["gumbel_key_a"] = first_tokens(sampler, rows, ("rollout", 3), **MODES["gumbel"])
    out["gumbel_key_a_resumed"] = first_tokens(resumed, rows, ("rollout", 3), **MODES["gumbel"])
    # No key: the call counter; a sampler whose counter is restored repeats the next call.
    counted = MegatronSampler(sampler.module, VOCAB, pad_id=0, max_sequence_length=4, seed=5)
    out["counter"] = [first_tokens(counted, rows, **settings) for _ in range(2)]
    restored = MegatronSampler(sampler.module, VOCAB, pad_id=0, max_sequence_length=4, seed=5)
    restored.calls = 1
    out["counter_restored"] = first_tokens(restored, rows, **settings)
    errors = []
    for bad in (("rollout", 1.5), ["rollout", 1], (), ("rollout", True)):
        try:
            sampler.generate(PROMPT, SamplingConfig(max_new_tokens=1), sample_key=bad)
        except ValueError as exc:
            errors.append(str(exc))
    out["key_errors"] = errors

    # (tokens, behaviour, old) per setting: old at policy_temperature over the full vocabulary, behaviour under
    # what was sampled from.
    logprob_settings = {
        "greedy": dict(temperature=0.0, policy_temperature=0.7),
        "gumbel_same_t": dict(temperature=0.7, policy_temperature=0.7),
        "gumbel_other_t": dict(temperature=0.7, policy_temperature=1.3),
        "top_k": dict(MODES["top_k"], policy_temperature=1.0),
        "nucleus": dict(temperature=0.7, top_p=0.8, policy_temperature=0.7),
        "top_k_top_p": dict(MODES["top_k_top_p"], policy_temperature=0.9),
    }
    for name, kwargs in logprob_settings.items():
        batch = sampler.generate(PROMPT, SamplingConfig(max_new_tokens=1, n=64, **kwargs), sample_key=("lp", name))
        out[f"lp_{name}"] = (batch.tokens[:, 1].clone(), batch.behaviour_logprobs[:, 0].clone(),
                             batch.old_logprobs[:, 0].clone(), batch.loss_mask.clone(), kwargs)
    return out
