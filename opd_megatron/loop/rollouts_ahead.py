"""Asynchronous rollouts with a staleness bound (`rollout.max_staleness`), for an engine that holds a copy of the
student's weights (rollout/served.py).

At step s the rollouts of steps s+1 .. s+k (k = max_staleness) are requested from the engine in the background,
with the weights it holds now (version v <= s), while step s trains; the engine's weight sync lets batches in
flight finish on the weights they started with, so every batch is of one version and reaches training at step
t <= v + k: staleness `t - v <= k` by construction (reported per step as rollout/staleness_*). The loss handles the
stale rows (loop/opd.py::_served_old_logprobs): pi_theta_old is the current forward (the proximal policy of
decoupled PPO) and the sampler-mismatch weight pi_theta_old / mu carries the staleness, corrected by truncated IS
(docs/opd-math.md, Route B).

Exact resume: a checkpoint holds the batches already requested for later steps (waited for at the save), so a
resumed run trains on the same rows the uninterrupted run would have; at another layout they are dropped and
requested again (with the resumed weights: a different, equally valid run)."""

from __future__ import annotations

import logging
from typing import Callable

from opd_megatron.rollout.batch import RolloutBatch
from opd_megatron.rollout.engine import RolloutEngine, RolloutTicket
from opd_megatron.rollout.generate import SamplingConfig
from opd_megatron.rollout.prompts import Prompt

log = logging.getLogger("opd_megatron.loop.rollouts_ahead")


class RolloutsAhead:
    """`take(step, version)`: step `step`'s prompts and rows, and requests for the next `max_staleness` on-policy
    steps. `prompts_of(step)` gives a step's prompts on this rank (a pure function of the step), `on_policy(step)`
    whether it samples at all (GKD's fixed-dataset steps do not)."""

    def __init__(self, engine: RolloutEngine, sampling: SamplingConfig, prompts_of: Callable[[int], list[Prompt]],
                 on_policy: Callable[[int], bool], train_steps: int, max_staleness: int):
        self.engine, self.sampling = engine, sampling
        self.prompts_of, self.on_policy = prompts_of, on_policy
        self.train_steps, self.max_staleness = train_steps, max_staleness
        self.tickets: dict[int, RolloutTicket] = {}

    def _submit(self, step: int, version: int) -> RolloutTicket:
        prompts = self.prompts_of(step)
        # The noise is a pure function of (run seed, step, data-parallel rank, prompt): an exact resume replays it.
        return self.engine.submit([p.ids for p in prompts], self.sampling, [p.text for p in prompts],
                                  policy_version=version, sample_key=("rollout", step))

    def take(self, step: int, version: int) -> tuple[list[Prompt], RolloutBatch]:
        """Step `step`'s prompts and batch; the steps after it, up to `max_staleness` ahead, are requested now with
        weights version `version` (before this step's batch is waited for, so that they run while it trains)."""
        ticket = self.tickets.pop(step, None) or self._submit(step, version)
        for ahead in range(step + 1, min(step + self.max_staleness, self.train_steps - 1) + 1):
            if ahead not in self.tickets and self.on_policy(ahead):
                self.tickets[ahead] = self._submit(ahead, version)
        return self.prompts_of(step), self.engine.collect(ticket)

    def state_dict(self) -> dict:
        """The batches requested for later steps (waited for here; collective within the replica)."""
        batches = {step: self.engine.collect(ticket) for step, ticket in sorted(self.tickets.items())}
        self.tickets = {step: RolloutTicket(batch=batch) for step, batch in batches.items()}
        return {"batches": batches}

    def load_state_dict(self, state: dict) -> None:
        batches: dict[int, RolloutBatch] = state.get("batches") or {}
        self.tickets = {int(step): RolloutTicket(batch=batch) for step, batch in batches.items()}
