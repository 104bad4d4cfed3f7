"""The rollout engine interface: prompts in, a `RolloutBatch` with behaviour and old log-probs out.

The training loop only sees this interface, so generation can move from the megatron student in-process
(`MegatronRolloutEngine`) to an inference server holding a copy of the student's weights (SGLang/vLLM, with weight
sync after each update) without touching the loop.
"""

from __future__ import annotations

import abc
from concurrent.futures import Future
from typing import Optional, Sequence

from opd_megatron.rollout.batch import RolloutBatch
from opd_megatron.rollout.generate import MegatronSampler, SamplingConfig


class RolloutTicket:
    """A generate() call in flight (`RolloutEngine.submit`): `future` where the engine works in the background,
    else the finished `batch`."""

    def __init__(self, batch: Optional[RolloutBatch] = None, future: Optional[Future] = None):
        self.batch, self.future = batch, future


class RolloutEngine(abc.ABC):
    @abc.abstractmethod
    def generate(self, prompts_ids: Sequence[Sequence[int]], config: SamplingConfig,
                 prompts: Optional[list[str]] = None, policy_version: int = 0,
                 sample_key: Optional[tuple] = None) -> RolloutBatch:
        """`config.n` samples per prompt, rows prompt-major, with behaviour log-probs (`mu`, the distribution
        sampled from) and old log-probs (full softmax at `config.policy_temperature`). sample_key (ints/strs, e.g.
        `("rollout", step)`) names the call: its randomness is a pure function of (run seed, key, DP rank), so
        the same key repeats the same rollouts and the DP replicas draw independently; None: a call counter."""

    def submit(self, prompts_ids: Sequence[Sequence[int]], config: SamplingConfig,
               prompts: Optional[list[str]] = None, policy_version: int = 0,
               sample_key: Optional[tuple] = None) -> RolloutTicket:
        """Start a generate() call; `collect` returns its batch. Every rank of a replica calls both, in the same
        order. An engine that cannot work in the background (it shares the student's weights) generates here."""
        return RolloutTicket(batch=self.generate(prompts_ids, config, prompts, policy_version, sample_key))

    def collect(self, ticket: RolloutTicket) -> RolloutBatch:
        return ticket.batch

    def sync_weights(self, policy_version: int) -> None:
        """Make the engine sample from the student's current weights (a no-op when it shares them); calls in
        flight finish first, on the weights they started with."""

    def policy_version(self, step: int) -> int:
        """The optimizer step whose weights the engine samples from now, at training step `step` (`step` itself
        when it shares the student's weights; the last synced version when it holds a copy)."""
        return step

    @property
    def holds_copy(self) -> bool:
        """Whether the engine samples from a copy of the weights (served): its log-probs are then checked against
        the trainer's before the first update."""
        return False

    def stats(self) -> dict[str, float]:
        """Counters for the step's metrics (weight-sync seconds, batches asked again, ...)."""
        return {}

    def close(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class MegatronRolloutEngine(RolloutEngine):
    """Samples from the training student itself (same weights, same TP/PP layout); see `rollout/generate.py`."""

    def __init__(self, module, vocab_size: int, pad_id: int, max_sequence_length: int, seed: int):
        self.sampler = MegatronSampler(module, vocab_size, pad_id, max_sequence_length, seed)

    def generate(self, prompts_ids, config, prompts=None, policy_version=0, sample_key=None) -> RolloutBatch:
        return self.sampler.generate(prompts_ids, config, prompts=prompts, policy_version=policy_version,
                                     sample_key=sample_key)

    def state_dict(self) -> dict:
        return {"calls": self.sampler.calls}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.calls = int(state.get("calls", 0))
