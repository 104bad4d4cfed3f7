"""Process bodies for `test_topk.py` (importable: spawned processes load them).

`all_checks(tp)` runs every check of one TP size in one process group: each rank builds the same full logits from
a fixed seed, pads the vocabulary to a multiple of tp with LARGE values (so a padding id would win if it were not
masked), keeps its contiguous shard and compares the vocab-parallel result with the single-device reference on
the unpadded logits. It returns the number of checks it made, so the test also sees that they ran."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from opd_megatron.math.supports import top_k_positions
from opd_megatron.parallel.shard import debug_checks
from opd_megatron.parallel.topk import (gather_owned, scatter_sparse_to_shards, vocab_parallel_logsumexp,
                                        vocab_parallel_top_p_mask, vocab_parallel_topk, vocab_shard_range)
from opd_megatron.math.cr_opd import RoutingConfig, student_reach
from opd_megatron.math.checks import MathInputError

N, VOCAB = 10, 37
KS = (1, 5, 12)  # 12 > V/tp = 10 at tp = 4
TOP_PS = (0.3, 0.8, 1.0)


def random_logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(N, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 2


def tied_logits() -> torch.Tensor:
    """Few distinct values, so equal maxima sit on every shard; row 0 all equal; row 1 ties at ids that straddle
    the shard boundaries of tp = 2 (18 | 19) and tp = 4 (9 | 10, 19 | 20, 29 | 30); row 2 holds -inf entries."""
    logits = torch.randint(0, 3, (N, VOCAB), generator=torch.Generator().manual_seed(1)).double()
    logits[0] = 1.0
    logits[1] = 0.0
    logits[1, [9, 10, 18, 19, 20, 29, 30, 36]] = 5.0
    logits[2, ::3] = float("-inf")
    return logits


def shard_of(full: torch.Tensor, tp: int, rank: int, pad_value: float = 1e3) -> torch.Tensor:
    padded_vocab = -(-VOCAB // tp) * tp
    padded = torch.cat([full, torch.full((N, padded_vocab - VOCAB), pad_value, dtype=full.dtype)], dim=-1)
    width = padded_vocab // tp
    return padded[:, rank * width:(rank + 1) * width].contiguous()


def _init(tp: int) -> int:
    from opd_megatron.student.cpu_shims import apply_cpu_shims
    apply_cpu_shims()
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    return parallel_state.get_tensor_model_parallel_rank()


def _check_topk(full: torch.Tensor, shard: torch.Tensor) -> int:
    checks = 0
    for k in KS:
        values, ids = vocab_parallel_topk(shard, k, VOCAB)
        ref_ids = top_k_positions(full, k)
        assert torch.equal(ids, ref_ids), (k, ids, ref_ids)
        assert torch.equal(values, full.gather(-1, ref_ids)), k
        assert int(ids.max()) < VOCAB
        checks += 1
    values, ids = vocab_parallel_topk(shard, VOCAB, VOCAB)  # k = the whole vocabulary: no padding id
    assert torch.equal(ids, torch.arange(VOCAB).expand(N, VOCAB)) and torch.equal(values, full)
    return checks + 1


def _check_top_p(full: torch.Tensor, shard: torch.Tensor) -> int:
    checks = 0
    ref_logp = torch.log_softmax(full, dim=-1)
    assert torch.allclose(vocab_parallel_logsumexp(shard, VOCAB), torch.logsumexp(full, dim=-1), atol=1e-12,
                          rtol=0)
    for k in KS:
        for top_p in TOP_PS:
            ids, logprobs, in_nucleus, complete = vocab_parallel_top_p_mask(shard, k, top_p, VOCAB)
            reach = student_reach(ref_logp, RoutingConfig(student_reach="top_p", student_top_p=top_p))
            assert torch.allclose(logprobs, ref_logp.gather(-1, ids), atol=1e-12, rtol=0)
            assert torch.equal(in_nucleus, reach.gather(-1, ids)), (k, top_p)
            # complete <=> the whole reference nucleus is among the k candidates
            assert torch.equal(complete, reach.sum(-1) == reach.gather(-1, ids).sum(-1)), (k, top_p)
            checks += 1
    return checks


def _check_sparse(full: torch.Tensor, shard: torch.Tensor, tp: int) -> int:
    checks = 0
    gen = torch.Generator().manual_seed(2)
    vocab_start, vocab_end = vocab_shard_range(shard.shape[-1])
    for k in KS:
        server_ids = torch.stack([torch.randperm(VOCAB, generator=gen)[:k] for _ in range(N)])
        server_logprobs = -torch.rand(N, k, dtype=torch.float64, generator=gen)
        local_positions, owned, values = scatter_sparse_to_shards(server_ids, server_logprobs, vocab_start,
                                                                  vocab_end, VOCAB)
        assert values is server_logprobs
        owners = owned.long()
        dist.all_reduce(owners)
        assert bool((owners == 1).all()), "every server id has exactly one owning rank"
        leaf = shard.clone().requires_grad_(True)
        mine = gather_owned(leaf, local_positions, owned, fill=0.0)
        total = mine.detach().clone()
        dist.all_reduce(total)
        assert torch.equal(total, full.gather(-1, server_ids)), k
        # The gradient reaches only this rank's owned ids: summed over ranks it is that of full.gather.
        weights = torch.rand(N, k, dtype=torch.float64, generator=gen)
        (mine * weights).sum().backward()
        full_leaf = full.clone().requires_grad_(True)
        (full_leaf.gather(-1, server_ids) * weights).sum().backward()
        assert torch.equal(leaf.grad, shard_of(full_leaf.grad, tp, dist.get_rank(), pad_value=0.0))
        checks += 1
    for bad in (VOCAB, -1, 10 ** 6):
        ids = torch.zeros(N, 3, dtype=torch.long)
        ids[4, 1] = bad
        try:
            with debug_checks():  # the ids are read on the host: a debug check (`shard.py`)
                scatter_sparse_to_shards(ids, torch.zeros(N, 3), vocab_start, vocab_end, VOCAB)
        except MathInputError as error:
            assert f"id {bad}" in str(error) and str(VOCAB) in str(error), str(error)
        else:
            raise AssertionError(f"server id {bad} outside the vocabulary was accepted")
        checks += 1
    return checks


def all_checks(tp: int) -> int:
    rank = _init(tp)
    checks = 0
    for full in (random_logits(), tied_logits()):
        checks += _check_topk(full, shard_of(full, tp, rank))
    # top-p against math/cr_opd.py::student_reach, whose torch.sort leaves the order of tied values unspecified: on
    # untied logits, once plain and once with -inf entries (pi_v = 0 is never reachable)
    checks += _check_top_p(random_logits(), shard_of(random_logits(), tp, rank))
    full = random_logits(3)
    full[:, ::4] = float("-inf")
    checks += _check_top_p(full, shard_of(full, tp, rank))
    checks += _check_sparse(random_logits(4), shard_of(random_logits(4), tp, rank), tp)
    return checks
