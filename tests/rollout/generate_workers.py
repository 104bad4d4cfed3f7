"""Process bodies for the sampler tests: the same checkpoint at TP=1, TP=2 and PP=2 samples the same greedy
rollouts, with behaviour and old log-probs equal to a plain full-sequence forward (importable: spawned processes load
it)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from opd_megatron.config import load_config
from opd_megatron.rollout.generate import MegatronSampler, SamplingConfig
from opd_megatron.student.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from opd_megatron.student.distributed import init_parallel
from opd_megatron.student.model import build_student
from opd_megatron.student.optimizer import wrap_for_training

VOCAB = 300          # padded to 384: padding ids must never be sampled
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14]]
STOP = 2


def config(tp: int, pp: int):
    return load_config(None, ["model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=128",
                              "model.num_attention_heads=4", "model.num_query_groups=2",
                              f"model.vocab_size={VOCAB}", "model.max_position_embeddings=64", "data.seq_length=32", "run.seed=3",
                              f"parallel.tp={tp}", f"parallel.pp={pp}"])


def _full_logits(module, tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """A plain forward on whole sequences (no KV cache), vocab gathered (test only), on the last stage; the
    pipeline is run by hand with send/recv, as the sampler does."""
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp > 1 and not parallel_state.is_pipeline_first_stage():
        hidden = torch.empty(tokens.shape[1], tokens.shape[0], module.config.hidden_size)
        dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        module.set_input_tensor(hidden)
    out = module(tokens, positions, None)
    if pp > 1 and not parallel_state.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
        return None
    group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(out) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, out.contiguous(), group=group)
    return torch.cat(shards, dim=-1)


def sample(tp: int, pp: int, checkpoint: Optional[str], save_to: Optional[str]) -> dict:
    cfg = config(tp, pp)
    ctx = init_parallel(cfg)
    trainable = wrap_for_training(build_student(cfg.model, cfg.parallel, ctx.device), cfg.optim, cfg.model, 10)
    if checkpoint is not None:
        load_checkpoint(resolve_checkpoint(checkpoint), trainable, ctx, load_optimizer=False)
    if save_to is not None:
        save_checkpoint(save_to, 0, trainable, ctx, {}, cfg.to_dict())
    sampler = MegatronSampler(trainable.ddp, VOCAB, pad_id=0, max_sequence_length=64, seed=11)
    greedy = sampler.generate(PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0.0, stop_ids=(STOP,)))
    sampled = sampler.generate(PROMPTS, SamplingConfig(max_new_tokens=10, temperature=1.0, n=3))
    nucleus = sampler.generate(PROMPTS, SamplingConfig(max_new_tokens=6, temperature=0.8, top_k=16, top_p=0.7, n=2))
    # top-p 0.8 at temperature 0.7, the loss at 0.7: mu (the nucleus, renormalised) != pi_old (the full softmax).
    tempered = sampler.generate(PROMPTS, SamplingConfig(max_new_tokens=6, temperature=0.7, top_p=0.8, n=2,
                                                        policy_temperature=0.7), sample_key=("rollout", 0))
    out = {"greedy": greedy.tokens, "greedy_lengths": greedy.lengths, "sampled": sampled.tokens,
           "sampled_logp": sampled.behaviour_logprobs, "sampled_mask": sampled.loss_mask,
           "nucleus": nucleus.tokens, "nucleus_logp": nucleus.behaviour_logprobs, "nucleus_mask": nucleus.loss_mask,
           "greedy_old": greedy.old_logprobs, "greedy_mask": greedy.loss_mask,
           "sampled_old": sampled.old_logprobs, "nucleus_old": nucleus.old_logprobs,
           "tempered": tempered.tokens, "tempered_logp": tempered.behaviour_logprobs,
           "tempered_old": tempered.old_logprobs, "tempered_mask": tempered.loss_mask, "calls": sampler.calls}
    module = sampler._core().eval()
    with torch.no_grad():
        for name, batch in (("greedy", greedy), ("sampled", sampled), ("nucleus", nucleus), ("tempered", tempered)):
            logits = _full_logits(module, batch.tokens[:, :-1])
            out[f"{name}_logits"] = None if logits is None else logits[..., :VOCAB].clone()
            out[f"{name}_padding_max"] = None if logits is None else float(logits[..., VOCAB:].max()) if \
                logits.shape[-1] > VOCAB else None
    return out
