"""Vocab-parallel top-k, top-p and sparse server input equal their single-device references at TP = 1, 2, 4
(one gloo process group per TP size runs every check, `topk_workers.all_checks`); argument errors are checked in
this process (they are raised before any communication; those that read values on the host, with the debug
checks on)."""

from __future__ import annotations

import pytest
import torch

from opd_megatron.math.supports import top_k_positions
from opd_megatron.parallel.shard import debug_checks
from opd_megatron.parallel.topk import (_PREFILTER_MAX_SHARE, _ordered_top_k, _prefilter_block, gather_owned,
                                        scatter_sparse_to_shards, top_p_mask_on_candidates, vocab_parallel_topk)
from opd_megatron.math.checks import MathInputError
from tests.harness import run_distributed
from tests.parallel import topk_workers

# 2 logits cases x (3 k + k = V) top-k, 2 x (3 k x 3 top_p) top-p, 3 k sparse, 3 bad server ids
EXPECTED_CHECKS = 2 * 4 + 2 * 9 + 3 + 3


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_parallel_topk_top_p_and_sparse_equal_reference(tp):
    checks = run_distributed(topk_workers.all_checks, world_size=tp, args=(tp,), timeout_s=120)
    assert checks == [EXPECTED_CHECKS] * tp


def test_single_process_without_distributed_equals_reference():
    full = topk_workers.tied_logits()
    for k in topk_workers.KS:
        values, ids = vocab_parallel_topk(full, k, topk_workers.VOCAB)
        assert torch.equal(ids, top_k_positions(full, k))
        assert torch.equal(values, full.gather(-1, ids))


def _prefilter_cases() -> list[tuple[str, torch.Tensor, int]]:
    """Rows wide enough for the block prefilter of `_ordered_top_k` (and some that are not), untied and tied."""
    gen = torch.Generator().manual_seed(7)
    width = 2000  # not a multiple of any block width: the partial last block is a candidate
    untied = torch.randn(12, width, generator=gen, dtype=torch.float64)
    few_values = torch.randint(0, 4, (12, width), generator=gen).double()  # ties everywhere, across blocks
    adversarial = few_values.clone()
    adversarial[0] = 1.0  # all equal: the lowest positions win
    adversarial[1] = float("-inf")  # a row without mass
    adversarial[2, ::2] = float("-inf")
    adversarial[3] = 0.0
    adversarial[3, [31, 32, 63, 64, 500, 998, 1999]] = 2.0  # the winners at block edges and in the partial block
    adversarial[4] = torch.arange(width, dtype=torch.float64).flip(0) // 50  # equal maxima in runs of blocks
    adversarial[5, -40:] = 9.0  # everything that wins lies in the partial last block (width 2000 = 62 x 32 + 16)
    float32 = torch.randn(12, 4096, generator=gen).round(decimals=1)  # float32 ties, a whole number of blocks
    return [(f"{name} k={k}", values, k) for name, values in (("untied", untied), ("tied", few_values),
                                                             ("adversarial", adversarial), ("float32", float32))
            for k in (1, 7, 15, 31)]


def test_block_prefilter_equals_plain_top_k():
    prefiltered = 0
    for name, values, k in _prefilter_cases():
        width = values.shape[-1]
        prefiltered += k * _prefilter_block(width, k) <= _PREFILTER_MAX_SHARE * width
        assert torch.equal(_ordered_top_k(values, k), top_k_positions(values, k)), name
        # k near the number of blocks, the rule's own fallback
        assert torch.equal(_ordered_top_k(values, width // 32), top_k_positions(values, width // 32)), name
    assert prefiltered >= 10  # the cases reach the prefilter, not only its fallback
    # a padded vocabulary (padding holds the largest values and must be masked) through vocab_parallel_topk
    padded = torch.cat([_prefilter_cases()[5][1], torch.full((12, 24), 1e9, dtype=torch.float64)], dim=-1)
    values, ids = vocab_parallel_topk(padded, 7, true_vocab_size=2000)
    assert torch.equal(ids, top_k_positions(padded[:, :2000], 7)) and int(ids.max()) < 2000


def test_padding_never_selected_single_shard():
    padded = torch.cat([torch.zeros(2, 5, dtype=torch.float64), torch.full((2, 3), 1e9, dtype=torch.float64)], -1)
    _, ids = vocab_parallel_topk(padded, 5, true_vocab_size=5)
    assert torch.equal(ids, torch.arange(5).expand(2, 5))


def test_k_larger_than_vocabulary_names_k_and_vocabulary():
    with pytest.raises(MathInputError, match=r"k: .*at most 37 \(the vocabulary size V = 37\), got 38"):
        vocab_parallel_topk(topk_workers.random_logits(), 38, topk_workers.VOCAB)
    with pytest.raises(MathInputError, match="k: "):
        vocab_parallel_topk(topk_workers.random_logits(), 0, topk_workers.VOCAB)


def test_bad_shard_inputs_name_the_argument():
    with pytest.raises(MathInputError, match="values_shard: expected a floating-point"):
        vocab_parallel_topk(torch.zeros(2, 4, dtype=torch.long), 1, 4)
    with debug_checks(), pytest.raises(MathInputError, match="values_shard: expected finite"):
        vocab_parallel_topk(torch.tensor([[0.0, float("nan")]]), 1, 2)
    with pytest.raises(MathInputError, match="true_vocab_size: .*at most 4"):
        vocab_parallel_topk(torch.zeros(2, 4), 1, 5)


def test_sparse_input_errors_name_the_argument():
    ids = torch.tensor([[0, 3]])
    with pytest.raises(MathInputError, match="ids: expected an integer tensor"):
        scatter_sparse_to_shards(ids.double(), torch.zeros(1, 2), 0, 4, 4)
    with pytest.raises(MathInputError, match="values: expected a tensor of the shape of ids"):
        scatter_sparse_to_shards(ids, torch.zeros(1, 3), 0, 4, 4)
    with debug_checks(), pytest.raises(MathInputError, match=r"vocabulary size is 4\), got id 4 "):
        scatter_sparse_to_shards(torch.tensor([[0, 4]]), torch.zeros(1, 2), 0, 4, 4)
    with pytest.raises(MathInputError, match="vocab_start / vocab_end"):
        scatter_sparse_to_shards(ids, torch.zeros(1, 2), 4, 4, 4)
    positions, owned, _ = scatter_sparse_to_shards(ids, torch.zeros(1, 2), 2, 4, 4)
    assert positions.tolist() == [[-1, 1]] and owned.tolist() == [[False, True]]
    assert gather_owned(torch.tensor([[5.0, 7.0]]), positions, owned, fill=-1.0).tolist() == [[-1.0, 7.0]]
    with debug_checks(), pytest.raises(MathInputError, match="local_positions: expected positions < 1"):
        gather_owned(torch.zeros(1, 1), positions, owned)


def test_top_p_ties_resolved_by_lower_id():
    # Two equal candidates of mass 0.4 each: with top_p = 0.3 only the first in (prob desc, id asc) order is in.
    logprobs = torch.log(torch.tensor([[0.4, 0.4, 0.2]], dtype=torch.float64))
    in_nucleus, complete = top_p_mask_on_candidates(logprobs, torch.tensor([[9, 2, 5]]), 0.3)
    assert in_nucleus.tolist() == [[False, True, False]] and complete.tolist() == [True]
    with pytest.raises(MathInputError, match="top_p: "):
        top_p_mask_on_candidates(logprobs, torch.tensor([[9, 2, 5]]), 0.0)
