import itertools

import pytest

from opd_megatron.data.batch_indices import GlobalBatchSampler, split_for_rank


def take(sampler, n):
    return list(itertools.islice(sampler, n))


def test_unshuffled_order_crosses_epochs_without_dropping():
    sampler = GlobalBatchSampler(num_samples=5, global_batch_size=4, seed=0, shuffle=False)
    assert take(sampler, 3) == [[0, 1, 2, 3], [4, 0, 1, 2], [3, 4, 0, 1]]
    assert sampler.state_dict() == {"epoch": 2, "position": 2, "consumed_samples": 12}


def test_batch_larger_than_dataset_spans_several_epochs():
    sampler = GlobalBatchSampler(num_samples=3, global_batch_size=7, seed=0, shuffle=False)
    assert next(sampler) == [0, 1, 2, 0, 1, 2, 0]
    assert sampler.state_dict() == {"epoch": 2, "position": 1, "consumed_samples": 7}


def test_shuffled_epochs_are_permutations_seeded_by_seed_and_epoch():
    sampler = GlobalBatchSampler(num_samples=12, global_batch_size=4, seed=7)
    batches = take(sampler, 6)  # two epochs exactly
    epoch0, epoch1 = sum(batches[:3], []), sum(batches[3:], [])
    assert sorted(epoch0) == list(range(12)) and sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1 and epoch0 != list(range(12))
    assert take(GlobalBatchSampler(12, 4, seed=7), 6) == batches
    assert take(GlobalBatchSampler(12, 4, seed=8), 3) != batches[:3]


def test_resume_continues_with_identical_batches():
    full = take(GlobalBatchSampler(num_samples=10, global_batch_size=4, seed=3), 7)
    first = GlobalBatchSampler(num_samples=10, global_batch_size=4, seed=3)
    assert take(first, 3) == full[:3]
    state = first.state_dict()
    assert state == {"epoch": 1, "position": 2, "consumed_samples": 12}
    resumed = GlobalBatchSampler(num_samples=10, global_batch_size=4, seed=3)
    resumed.load_state_dict(dict(state))
    assert take(resumed, 4) == full[3:7]
    assert resumed.consumed_samples == 28


def test_state_from_a_different_dataset_size_is_rejected():
    sampler = GlobalBatchSampler(num_samples=10, global_batch_size=4, seed=3)
    with pytest.raises(ValueError, match="does not fit a dataset of 10 samples .* did the training data change"):
        sampler.load_state_dict({"epoch": 1, "position": 2, "consumed_samples": 14})  # saved with 12 samples
    with pytest.raises(ValueError, match="does not fit a dataset of 10 samples"):
        sampler.load_state_dict({"epoch": 0, "position": 11, "consumed_samples": 11})


def test_split_for_rank_union_is_the_global_batch_in_order():
    global_batch = [9, 4, 7, 1, 0, 3, 8, 2, 6, 5, 11, 10]
    per_rank = [split_for_rank(global_batch, rank, dp_size=3, micro_batch_size=2) for rank in range(3)]
    assert per_rank[0] == [[9, 4], [7, 1]]
    assert per_rank[1] == [[0, 3], [8, 2]]
    assert per_rank[2] == [[6, 5], [11, 10]]
    assert [i for rank in per_rank for micro in rank for i in micro] == global_batch
    assert split_for_rank(global_batch, 0, dp_size=1, micro_batch_size=4) == [global_batch[:4], global_batch[4:8],
                                                                            global_batch[8:]]


def test_split_for_rank_rejects_bad_shapes():
    with pytest.raises(ValueError, match="global batch of 10 does not divide into dp_size x micro_batch_size = 2 x 4"):
        split_for_rank(list(range(10)), 0, dp_size=2, micro_batch_size=4)
    with pytest.raises(ValueError, match=r"dp_rank must be in \[0, 2\), got 2"):
        split_for_rank(list(range(8)), 2, dp_size=2, micro_batch_size=4)
