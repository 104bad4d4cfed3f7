"""Which samples each step trains on: a resumable global-batch order, and one data-parallel rank's share of it.

Every rank builds the same sampler and draws the same global batches (no communication needed); `split_for_rank`
then hands each data-parallel rank its contiguous slice, cut into micro-batches. Two samplers: GlobalBatchSampler
shuffles a finite dataset epoch by epoch (JSONL); StreamBatchSampler takes consecutive indices of an endless order
that the dataset already shuffled (an indexed corpus blend, data/indexed.py::CorpusBlend).
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import torch

# Mixes (seed, epoch) into one generator seed; a large odd multiplier keeps nearby seeds' epochs apart.
_EPOCH_SEED_STRIDE = 1_000_003


class GlobalBatchSampler:
    """Yields the sample indices of each global batch, forever, in a deterministic order.

    Epoch e visits every index once, in the order of a permutation drawn from a torch.Generator seeded by
    (seed, e) (or in order when shuffle is False). A global batch that reaches the end of an epoch continues
    into the next one, so no sample is dropped or repeated within an epoch. The position is three numbers,
    saved with the checkpoint, so a resumed run draws exactly the batches the interrupted one would have.
    """

    def __init__(self, num_samples: int, global_batch_size: int, seed: int, shuffle: bool = True) -> None:
        if num_samples < 1:
            raise ValueError(f"GlobalBatchSampler: num_samples must be >= 1, got {num_samples}")
        if global_batch_size < 1:
            raise ValueError(f"GlobalBatchSampler: global_batch_size must be >= 1, got {global_batch_size}")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0            # index into the current epoch's order of the next sample to draw
        self.consumed_samples = 0
        self._order: list[int] = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed * _EPOCH_SEED_STRIDE + epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        batch: list[int] = []
        while len(batch) < self.global_batch_size:
            take = min(self.global_batch_size - len(batch), self.num_samples - self.position)
            batch += self._order[self.position:self.position + take]
            self.position += take
            if self.position == self.num_samples:
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
        self.consumed_samples += len(batch)
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "epoch" not in state:
            raise ValueError(f"sampler state {dict(state)} is not an epoch sampler's (a JSONL dataset's); was the "
                             f"checkpoint saved by a run on an indexed corpus (data.format: indexed)?")
        epoch, position, consumed = int(state["epoch"]), int(state["position"]), int(state["consumed_samples"])
        # consumed = epoch * num_samples + position holds only for the dataset size the state was saved with.
        if not 0 <= position < self.num_samples or epoch * self.num_samples + position != consumed:
            raise ValueError(f"sampler state {dict(state)} does not fit a dataset of {self.num_samples} samples "
                             f"(expected consumed_samples = epoch * {self.num_samples} + position); did the "
                             f"training data change since the checkpoint?")
        self.epoch, self.position, self.consumed_samples = epoch, position, consumed
        self._order = self._epoch_order(epoch)


class StreamBatchSampler:
    """Yields consecutive global batches of an endless sample order: batch b is samples [b*G, (b+1)*G).

    The dataset owns the order (a blend's windows, shuffled by the seed); the position is the consumed-sample count.
    The state also records `order`, a description of what the order is drawn from (CorpusBlend.order_description:
    corpus sizes, weights, seed, seq_length), and a resume whose order differs is refused rather than continued on
    other samples.
    """

    def __init__(self, global_batch_size: int, order: dict[str, Any]) -> None:
        if global_batch_size < 1:
            raise ValueError(f"StreamBatchSampler: global_batch_size must be >= 1, got {global_batch_size}")
        self.global_batch_size = global_batch_size
        # As it comes back from a checkpoint (tuples as lists): compared with what a resume saved.
        self.order = json.loads(json.dumps(order))
        self.consumed_samples = 0

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        batch = list(range(self.consumed_samples, self.consumed_samples + self.global_batch_size))
        self.consumed_samples += self.global_batch_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed_samples, "order": self.order}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "order" not in state:
            raise ValueError(f"sampler state {dict(state)} is not a stream sampler's (an indexed corpus's); was the "
                             f"checkpoint saved by a run on JSONL data (data.format: jsonl)?")
        saved = json.loads(json.dumps(state["order"]))
        if saved != self.order:
            changed = sorted(key for key in set(saved) | set(self.order) if saved.get(key) != self.order.get(key))
            raise ValueError(f"the indexed data changed since the checkpoint ({', '.join(changed)} differ: saved "
                             f"{ {key: saved.get(key) for key in changed} }, now "
                             f"{ {key: self.order.get(key) for key in changed} }); resuming would read other "
                             f"samples than the interrupted run. Restore the data config or start a new run")
        consumed = int(state["consumed_samples"])
        if consumed < 0:
            raise ValueError(f"sampler state {dict(state)}: consumed_samples must be >= 0")
        self.consumed_samples = consumed


def split_for_rank(global_indices: list[int], dp_rank: int, dp_size: int, micro_batch_size: int) -> list[list[int]]:
    """This data-parallel rank's micro-batches: the rank's contiguous 1/dp_size of the global batch, in order,
    cut into micro-batches of micro_batch_size."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"split_for_rank: dp_rank must be in [0, {dp_size}), got {dp_rank}")
    if len(global_indices) % (dp_size * micro_batch_size) != 0:
        raise ValueError(f"split_for_rank: a global batch of {len(global_indices)} does not divide into "
                         f"dp_size x micro_batch_size = {dp_size} x {micro_batch_size}")
    per_rank = len(global_indices) // dp_size
    mine = global_indices[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    return [mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]
