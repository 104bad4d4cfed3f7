"""Sampling rollouts from the megatron student at its TP/PP layout, with a KV cache, never gathering the vocabulary.

Why our own loop rather than megatron-core's `StaticInferenceEngine`: the engine gathers the full vocabulary of the
last position on every TP rank (its GPTModel post-processing asserts `runtime_gather_output` in inference), needs a
megatron tokenizer object, and on the CPU needs CUDA factories, `Tensor.cuda` and `torch.cuda.Event` redirected
(docs/megatron-on-cpu.md). This loop uses the same model and the same `StaticInferenceContext` KV cache, keeps
the output layer vocab-parallel (`[B, V/tp]` per rank) and samples from the shards with two small all-reduces:
- full-vocabulary sampling by the Gumbel-max trick: each rank draws Gumbel noise for its own ids, takes its local
  max of z/T + g, and the global max (ties to the lower id) is an exact sample of softmax(z/T);
- top-k / top-p: the distributed top-k of `parallel/topk.py` (k candidates per rank), top-p within it, and one draw
  from a generator seeded identically on every TP rank.
Two log-probs of each sampled token are recorded, from the logits it was sampled from (docs/opd-math.md, Route B):
- behaviour `mu(y_t)`: under the distribution actually sampled from, softmax(z/T) renormalised over the top-k / top-p
  candidates when they apply (0 for greedy rows): the sampler-mismatch weight's denominator;
- old `pi_theta_old(y_t)`: under the loss's distribution, the full softmax(z / policy_temperature) over the true
  vocabulary (`opd.student_temperature`), by the vocab-parallel log-prob the loss itself uses: the PPO ratio's
  denominator, so the ratio is 1 on fresh rollouts whatever the sampling temperature / top-k / top-p.

Pipeline parallelism: each decode step runs stage by stage, hidden states `[s, B, H]` sent to the next stage with
point-to-point ops over the pipeline group; the last stage samples and broadcasts the tokens to every stage.

Static batching: prompts of different lengths share one KV cache; generation starts at the shortest prompt and a row
whose prompt is longer has its prompt token forced at that column (as megatron's static engine does), so positions
are the column indices of the batch for every row.

Randomness is a pure function of (run seed, sample key, data-parallel rank, column): the key names the call (the loop
passes `("rollout", step)`, `("eval", step, chunk, kind)`; without one, the sampler's call counter, saved for resume),
so a resumed run repeats its rollouts exactly. The DP rank makes the replicas draw independent noise (with shared
noise, row b of every replica would be the same draw and the gradient variance would not fall as 1/dp). Within one
replica the TP ranks agree on every token: the top-k/top-p draw uses one generator seeded alike on all of them, and
the Gumbel noise of each rank (seeded with its TP rank too) covers only its own ids, so the noise of the whole
vocabulary is still i.i.d. and the global argmax an exact sample.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from opd_megatron.errors import NonFiniteLossError
from opd_megatron.parallel.finite import nonfinite_on_any_tp_rank
from opd_megatron.parallel.topk import top_p_mask_on_candidates, vocab_parallel_logsumexp, vocab_parallel_topk
from opd_megatron.parallel.divergences import vocab_parallel_token_logprobs
from opd_megatron.rollout.batch import RolloutBatch
from opd_megatron.student.lm_loss import mask_padded_vocab


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy. top_k 0 = off; top_p 1.0 = off. With both, top-p applies to the renormalised top-k
    distribution; with top_p alone the nucleus is taken over the full distribution among the `top_p_candidates`
    most likely ids (default 64; a nucleus needing more ids is cut there). n: samples per prompt.
    policy_temperature: the temperature of the loss's distribution (`opd.student_temperature`), at which the
    sampled tokens' `old_logprobs` (the PPO ratio's denominator) are taken over the full vocabulary."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    top_p_candidates: int = 64
    n: int = 1
    stop_ids: tuple[int, ...] = ()
    policy_temperature: float = 1.0

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not self.policy_temperature > 0:
            raise ValueError(f"policy_temperature (the loss's opd.student_temperature) must be > 0, "
                             f"got {self.policy_temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.n < 1 or self.top_p_candidates < 1:
            raise ValueError(f"top_k >= 0, n >= 1 and top_p_candidates >= 1 expected, got top_k={self.top_k}, "
                             f"n={self.n}, top_p_candidates={self.top_p_candidates}")


def _seed(*parts) -> int:
    """A 63-bit generator seed that is a pure function of `parts` (ints, strs and tuples of them): 8 bytes of the
    sha256 of their repr, which tells ("a:b",) from ("a", "b")."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)


def _call_key(sample_key: Optional[tuple], calls: int) -> tuple:
    """What names a generate() call in the seeds: the caller's key, else the call counter."""
    if sample_key is None:
        return ("call", calls)
    if not isinstance(sample_key, tuple) or not sample_key or not all(
            isinstance(part, (int, str)) and not isinstance(part, bool) for part in sample_key):
        raise ValueError(f"sample_key must be a non-empty tuple of ints and strs naming the call (e.g. "
                         f"('rollout', step)), got {sample_key!r}")
    return ("key",) + sample_key


@contextmanager
def _vocab_sharded_output(module):
    """Keep the output layer's logits vocab-parallel during inference (GPTModel would gather them)."""
    layer = getattr(module, "output_layer", None)
    if layer is None:
        yield
        return
    original = layer.forward

    def forward(input_, weight=None, runtime_gather_output=None, **kwargs):
        return original(input_, weight=weight, runtime_gather_output=False, **kwargs)

    layer.forward = forward
    try:
        yield
    finally:
        del layer.forward


class MegatronSampler:
    """Generates from a megatron GPTModel stage (`StudentModel.module`, unwrapped or DDP-wrapped) on every rank of
    its TP/PP layout. All ranks of a model replica call `generate` with the same prompts."""

    def __init__(self, module, vocab_size: int, pad_id: int, max_sequence_length: int, seed: int = 0,
                 use_pipeline: bool = True):
        """use_pipeline=False: the module holds every layer on this rank (a colocated teacher on the last stage)
        and runs without pipeline communication, whatever the student's layout."""
        self.module = module
        self.use_pipeline = use_pipeline
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.max_sequence_length = max_sequence_length
        self.seed = seed
        self.calls = 0          # generate() calls so far: the seeds' key when a call has no sample_key (saved)

    def _pp(self) -> int:
        return parallel_state.get_pipeline_model_parallel_world_size() if self.use_pipeline else 1

    def _core(self):
        module = self.module
        while hasattr(module, "module") and not hasattr(module, "set_input_tensor"):
            module = module.module
        return module

    @torch.no_grad()
    def generate(self, prompts_ids: Sequence[Sequence[int]], config: SamplingConfig,
                 prompts: Optional[list[str]] = None, policy_version: int = 0,
                 sample_key: Optional[tuple] = None) -> RolloutBatch:
        """Sample `config.n` responses per prompt. Returns the batch (rows prompt-major: prompt i's samples are rows
        i*n .. i*n+n-1, sharing group id i) with behaviour and old log-probs, identical on every rank of the
        replica. sample_key (a tuple of ints/strs, e.g. `("rollout", step)`) names the call: the same key on the
        same DP rank draws the same noise (exact resume), another key or DP rank independent noise; None uses the
        call counter instead."""
        config.validate()
        rows, prompt_lens, total = self._prompt_rows(prompts_ids, config)
        key = _call_key(sample_key, self.calls)
        self.calls += 1
        tokens, behaviour, old = self._decode(rows, prompt_lens, total, config, key)
        responses, logps, old_logps = _cut_responses(tokens, behaviour, old, prompt_lens, config)
        group_ids = [i for i in range(len(prompts_ids)) for _ in range(config.n)]
        row_prompts = [p for p in (prompts or []) for _ in range(config.n)]
        return RolloutBatch.from_sequences(rows, responses, self.pad_id, behaviour_logprobs=logps,
                                           group_ids=group_ids, prompts=row_prompts, policy_version=policy_version,
                                           old_logprobs=old_logps)

    def _prompt_rows(self, prompts_ids: Sequence[Sequence[int]], config: SamplingConfig
                     ) -> tuple[list[list[int]], torch.Tensor, int]:
        """The rows (each prompt `config.n` times), their prompt lengths `[B]` and the padded width: longest prompt
        plus max_new_tokens, checked against the model's positions."""
        if not prompts_ids:
            raise ValueError("generate needs at least one prompt")
        rows = [list(p) for p in prompts_ids for _ in range(config.n)]
        prompt_lens = torch.tensor([len(p) for p in rows])
        if int(prompt_lens.min()) < 1:
            raise ValueError("every prompt needs at least one token")
        total = int(prompt_lens.max()) + config.max_new_tokens
        if total > self.max_sequence_length:
            raise ValueError(f"a prompt of {int(prompt_lens.max())} tokens + max_new_tokens {config.max_new_tokens} "
                             f"= {total} exceeds the model's max_position_embeddings {self.max_sequence_length}; "
                             f"shorten the prompt or lower max_new_tokens")
        return rows, prompt_lens, total

    def _decode(self, rows: list[list[int]], prompt_lens: torch.Tensor, total: int, config: SamplingConfig,
                key: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fill `tokens [B, total]` column by column with the static KV cache: prompt columns are forced, the rest
        sampled until every row stopped or reached its end. Returns tokens and the behaviour and old log-probs
        `[B, total-1]` (column j scores token j+1, zero where not sampled)."""
        dp_rank = parallel_state.get_data_parallel_rank()
        batch = len(rows)
        tokens = torch.full((batch, total), self.pad_id, dtype=torch.long)
        for b, p in enumerate(rows):
            tokens[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        behaviour = torch.zeros(batch, total - 1)
        old = torch.zeros(batch, total - 1)
        done = torch.zeros(batch, dtype=torch.bool)
        ends = prompt_lens + config.max_new_tokens           # one past the last column a row may fill
        stop = torch.tensor(sorted(set(config.stop_ids)), dtype=torch.long)

        module = self._core()
        was_training = module.training
        module.eval()
        context = StaticInferenceContext(batch, total)
        device = next(module.parameters()).device
        column = int(prompt_lens.min())             # the column filled next
        try:
            with _vocab_sharded_output(module):
                logits = self._forward(module, tokens[:, :column].to(device), 0, context)
                while True:
                    sampled, logp, old_logp = self._sample_last(logits, config,
                                                                _seed(self.seed, key, dp_rank, column), batch)
                    forced = column < prompt_lens
                    fresh = ~forced & ~done
                    tokens[:, column] = torch.where(fresh, sampled, tokens[:, column])
                    behaviour[:, column - 1] = torch.where(fresh, logp, behaviour[:, column - 1])
                    old[:, column - 1] = torch.where(fresh, old_logp, old[:, column - 1])
                    if stop.numel():
                        done |= fresh & torch.isin(sampled, stop)
                    done |= ~forced & (column + 1 >= ends)
                    if bool(done.all()) or column + 1 >= total:
                        break
                    logits = self._forward(module, tokens[:, column: column + 1].to(device), column, context)
                    column += 1
        finally:
            module.train(was_training)
        return tokens, behaviour, old

    def _forward(self, module, tokens: torch.Tensor, offset: int, context: StaticInferenceContext):
        """One step of every pipeline stage on `tokens [B, s]` at positions offset..offset+s-1. Returns the last
        position's logits shard `[B, V/tp]` on the last stage, None elsewhere."""
        positions = torch.arange(offset, offset + tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
        pp = self._pp()
        hidden_shape = (tokens.shape[1], tokens.shape[0], module.config.hidden_size)
        if pp > 1 and not parallel_state.is_pipeline_first_stage():
            received = torch.empty(hidden_shape, dtype=module.config.params_dtype, device=tokens.device)
            dist.recv(received, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            module.set_input_tensor(received)
        out = module(tokens, positions, None, inference_context=context, runtime_gather_output=True)
        if pp > 1:
            module.set_input_tensor(None)
        context.sequence_len_offset += tokens.shape[1]
        context.enable_decode_mode()
        if pp > 1 and not parallel_state.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
            return None
        return out[:, -1, :]

    def _sample_last(self, logits: Optional[torch.Tensor], config: SamplingConfig, seed: int, batch: int):
        """Sample one token per row on the last stage from the logits shard `[B, V/tp]`, then broadcast (tokens,
        behaviour log-probs, old log-probs) to every pipeline stage. Returns CPU tensors `[B]`, `[B]`, `[B]`."""
        pp = self._pp()
        if logits is not None:
            logits = logits.float()
            if nonfinite_on_any_tp_rank(logits):
                # A broken model: every stage learns it from the broadcast below and raises the same error.
                sampled, logp, old = torch.full((batch,), -1, dtype=torch.long), torch.zeros(batch), torch.zeros(batch)
            else:
                sampled, logp, old = self._sample_shard(logits, config, seed)
        else:
            sampled = logp = old = None
        if pp > 1:
            packed = torch.empty(3, batch, dtype=torch.float64)     # float64 holds every token id exactly
            if logits is not None:
                packed[0], packed[1], packed[2] = sampled.double().cpu(), logp.double().cpu(), old.double().cpu()
            last = parallel_state.get_pipeline_model_parallel_last_rank()
            dist.broadcast(packed, src=last, group=parallel_state.get_pipeline_model_parallel_group())
            sampled, logp, old = packed[0].long(), packed[1].float(), packed[2].float()
        if bool((sampled < 0).any()):
            raise NonFiniteLossError("the model being sampled from produced NaN/inf logits; its weights are broken "
                                     "(the last good checkpoint is kept)")
        return sampled.cpu(), logp.cpu(), old.cpu()

    def _sample_shard(self, logits: torch.Tensor, config: SamplingConfig, seed: int):
        """One token per row from the TP-sharded logits `[B, V/tp]` (padding ids never), the same on every TP rank.
        Returns CPU tensors: sampled ids `[B]`, behaviour log-probs `[B]` (the distribution sampled from) and old
        log-probs `[B]` (full softmax at `config.policy_temperature`)."""
        group = parallel_state.get_tensor_model_parallel_group()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        start = tp_rank * logits.shape[-1]
        logits = mask_padded_vocab(logits, self.vocab_size)
        truncate = config.top_k > 0 or config.top_p < 1.0
        if config.temperature == 0:
            sampled, behaviour = self._global_argmax(logits, start, group), torch.zeros(logits.shape[0])
        elif not truncate:
            sampled = self._gumbel_max(logits / config.temperature, start, group, _seed(seed, "gumbel", tp_rank))
            behaviour = self._token_logprobs(logits, sampled, config.temperature, group)
            if config.policy_temperature == config.temperature:
                return sampled, behaviour, behaviour          # one distribution: mu = pi_theta_old
        else:
            sampled, behaviour = self._top_k_top_p(logits / config.temperature, config, group,
                                                   _seed(seed, "candidates"))
        return sampled, behaviour, self._token_logprobs(logits, sampled, config.policy_temperature, group)

    def _token_logprobs(self, logits: torch.Tensor, ids: torch.Tensor, temperature: float, group) -> torch.Tensor:
        """`log softmax(z / temperature)[ids]` over the true vocabulary, `[B]` on the CPU: the loss's own
        vocab-parallel log-prob (never gathers the vocabulary)."""
        return vocab_parallel_token_logprobs(logits, ids.to(logits.device), temperature, self.vocab_size,
                                             group=group).cpu()

    @staticmethod
    def _gumbel_max(scaled: torch.Tensor, start: int, group, seed: int) -> torch.Tensor:
        """An exact sample of softmax(scaled) over the TP shards `[B, V/tp]` (padding at -inf): argmax of
        scaled + g with g i.i.d. Gumbel(0, 1) per id, drawn by each rank for its own ids from a generator seeded
        with its TP rank (independent noise per shard is what makes the global argmax exact)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        uniform = torch.rand(scaled.shape, generator=gen).clamp_(min=1e-20).to(scaled.device)
        return MegatronSampler._global_argmax(scaled - torch.log(-torch.log(uniform)), start, group)

    def _top_k_top_p(self, scaled: torch.Tensor, config: SamplingConfig, group, seed: int):
        """Top-k then top-p on the renormalised top-k distribution (the order of HF's logits warpers and vLLM);
        with top-p alone, the nucleus of the full distribution within `top_p_candidates` candidates. One draw per
        row from a generator seeded alike on every TP rank, so they all pick the same id. Returns CPU ids `[B]`
        and their log-probs under the renormalised candidates `[B]` (the behaviour log-probs)."""
        ids, logp_candidates = truncated_candidates(scaled, config, self.vocab_size, group)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        choice = torch.multinomial(logp_candidates.exp().cpu(), 1, generator=gen).squeeze(-1)
        rows = torch.arange(ids.shape[0])
        return ids.cpu()[rows, choice], logp_candidates.cpu()[rows, choice]

    @staticmethod
    def _global_argmax(values: torch.Tensor, start: int, group) -> torch.Tensor:
        """Global argmax over the TP shards of `values [B, V/tp]`, ties to the lower id (two all-reduces)."""
        local_max, local_arg = values.max(dim=-1)
        global_max = local_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        big = torch.iinfo(torch.long).max
        hit = values == global_max.unsqueeze(-1)
        first = torch.where(hit.any(-1), hit.float().argmax(-1) + start, torch.full_like(local_arg, big))
        dist.all_reduce(first, op=dist.ReduceOp.MIN, group=group)
        return first.cpu()


def truncated_candidates(scaled: torch.Tensor, config: SamplingConfig, vocab_size: int, group
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k / top-p sampling distribution of the TP-sharded, temperature-scaled logits `[N, V/tp]` (padding
    ids at -inf): candidate ids `[N, k]` and their log-probs `[N, k]` renormalised over the kept ones (-inf for the
    dropped), replicated on every TP rank. k is top_k, or top_p_candidates with top-p alone."""
    k = min(config.top_k if config.top_k > 0 else config.top_p_candidates, vocab_size)
    values, ids = vocab_parallel_topk(scaled, k, vocab_size, group)
    if config.top_k > 0:
        candidate_logp = values - torch.logsumexp(values, dim=-1, keepdim=True)
    else:
        candidate_logp = values - vocab_parallel_logsumexp(scaled, vocab_size, group).unsqueeze(-1)
    keep = torch.isfinite(values)
    if config.top_p < 1.0:
        keep &= top_p_mask_on_candidates(candidate_logp, ids, config.top_p)[0]
    masked = values.masked_fill(~keep, float("-inf"))
    return ids, masked - torch.logsumexp(masked, dim=-1, keepdim=True)


def sampling_token_logprobs(logits_shard: torch.Tensor, labels: torch.Tensor, config: SamplingConfig,
                            vocab_size: int, group=None) -> torch.Tensor:
    """`log mu(labels)` `[...]`: the log-probs of `labels [...]` under the distribution the sampler draws from with
    `config` (softmax(z / T), renormalised over the top-k / top-p candidates when they apply), from the TP-sharded
    logits `[..., V/tp]`: what a rollout engine reports as its behaviour log-prob, computed by the trainer to check
    the engine against it. -inf where a label is outside the kept candidates (the sampler could not draw it)."""
    if config.temperature <= 0:
        raise ValueError("sampling_token_logprobs: greedy sampling (temperature 0) has no behaviour distribution")
    group = group if group is not None else parallel_state.get_tensor_model_parallel_group()
    if not (config.top_k > 0 or config.top_p < 1.0):
        return vocab_parallel_token_logprobs(logits_shard, labels, config.temperature, vocab_size, group=group)
    shape = labels.shape
    flat = logits_shard.reshape(-1, logits_shard.shape[-1]).float()
    scaled = mask_padded_vocab(flat, vocab_size) / config.temperature
    ids, logp = truncated_candidates(scaled, config, vocab_size, group)
    hit = ids == labels.reshape(-1, 1).to(ids.device)
    picked = torch.where(hit, logp, torch.zeros_like(logp)).sum(-1)
    return torch.where(hit.any(-1), picked, torch.full_like(picked, float("-inf"))).reshape(shape)


def _cut_responses(tokens: torch.Tensor, behaviour: torch.Tensor, old: torch.Tensor, prompt_lens: torch.Tensor,
                   config: SamplingConfig) -> tuple[list[list[int]], list[list[float]], list[list[float]]]:
    """Each row's response: up to and including the first stop token, or max_new_tokens; with its behaviour and
    old log-probs."""
    stop_ids = set(config.stop_ids)
    responses, logps, old_logps = [], [], []
    for b in range(tokens.shape[0]):
        p = int(prompt_lens[b])
        gen = tokens[b, p: p + config.max_new_tokens].tolist()
        cut = len(gen)
        for i, t in enumerate(gen):
            if t in stop_ids:
                cut = i + 1
                break
        responses.append(gen[:cut])
        logps.append(behaviour[b, p - 1: p - 1 + cut].tolist())
        old_logps.append(old[b, p - 1: p - 1 + cut].tolist())
    return responses, logps, old_logps
