"""Top-k, top-p and sparse (server top-k) inputs on TP-sharded logits, without gathering the vocabulary.

Layout (megatron's `ColumnParallelLinear` output layer): TP rank r holds the padded-vocabulary ids
`[r * V/tp, (r + 1) * V/tp)` as `values_shard [..., V/tp]`; ids `>= true_vocab_size` are padding and are never
selected and carry no mass.

- `vocab_parallel_topk`: the global top-k from a local top-k per rank and an all-gather of only the k candidates
  per rank (`[tp, N, k]` values + ids). Ties are resolved as the single-device reference
  `math/supports.py::top_k_positions`: among equal values the lower token id wins, and the ids come back in
  ascending id order, so the pair is equal element for element.
- `vocab_parallel_logsumexp` + `top_p_mask_on_candidates` (or both at once, `vocab_parallel_top_p_mask`): the
  student's nucleus restricted to its top-k, with the definition of `math/cr_opd.py::student_reach` ("top_p": `v` is
  reachable when the mass of the tokens before it in sorted order is `< p`).
- `scatter_sparse_to_shards` + `gather_owned`: which entries of a server's top-k answer (global ids, replicated on
  every TP rank) this rank owns, and this rank's logits at them; an all-reduce SUM over TP of `gather_owned(...,
  fill=0)` is the student's logits at the server's ids, exactly (each entry has one owner, the others add 0).

Communication per `vocab_parallel_topk` call: one all-gather of `tp * N * min(k, V/tp)` values and as many int64
ids; `vocab_parallel_logsumexp`: two all-reduces of `N` values. Nothing of size V crosses ranks.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from opd_megatron.math.checks import MathInputError, require_finite, require_floating, require_positive_int
from opd_megatron.math.supports import top_k_positions
from opd_megatron.parallel.shard import debug_checks_enabled


def _tp_group(group: Optional[dist.ProcessGroup]) -> Optional[dist.ProcessGroup]:
    """The given group, else megatron's TP group when it is initialised; None means a single process (no
    communication), so the functions also run without torch.distributed (tp = 1)."""
    if group is not None:
        return group
    from megatron.core import parallel_state
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise MathInputError("group: expected the TP process group (or megatron's model parallel initialised); "
                             "torch.distributed runs on several processes but no TP group is known")
    return None


def _rank_and_size(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    return (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))


def vocab_shard_range(shard_size: int, group: Optional[dist.ProcessGroup] = None) -> tuple[int, int]:
    """`(vocab_start, vocab_end)`: the padded-vocabulary ids `[start, end)` this TP rank holds."""
    rank, _ = _rank_and_size(_tp_group(group))
    return rank * shard_size, (rank + 1) * shard_size


def _check_shard(values_shard: torch.Tensor, true_vocab_size: int, tp: int, check_values: bool = True) -> None:
    if not isinstance(values_shard, torch.Tensor):
        raise MathInputError(f"values_shard: expected a tensor [..., V/tp], got {type(values_shard).__name__}")
    if values_shard.dim() < 1 or values_shard.shape[-1] < 1:
        raise MathInputError(f"values_shard: expected a tensor [..., V/tp] with V/tp >= 1, got shape "
                             f"{tuple(values_shard.shape)}")
    require_floating("values_shard", values_shard)
    padded = values_shard.shape[-1] * tp
    require_positive_int("true_vocab_size", true_vocab_size, at_most=padded,
                         what=f"the padded vocabulary: {tp} shards of {values_shard.shape[-1]}")
    if check_values and debug_checks_enabled():  # a read of the shard and a host sync: a debug check
        require_finite("values_shard", values_shard.detach())


def _mask_padding(values_shard: torch.Tensor, vocab_start: int, true_vocab_size: int) -> torch.Tensor:
    """values_shard with the padding ids (global id >= true_vocab_size) set to -inf; no copy when none is here."""
    shard = values_shard.shape[-1]
    real = true_vocab_size - vocab_start
    if real >= shard:
        return values_shard
    return values_shard.masked_fill(torch.arange(shard, device=values_shard.device) >= max(real, 0),
                                    float("-inf"))


# The block-maximum prefilter pays where its candidates are few against the row: at most this share of it.
_PREFILTER_MAX_SHARE = 0.25


def _prefilter_block(width: int, k: int) -> int:
    """The block width of `_ordered_top_k`'s prefilter: the power of two at or below `2 sqrt(width / k)`, within
    [32, 128]. Its two selections, a top-k of `width / block` block maxima and one of `k * block` candidates,
    each cost about a fixed amount per k plus a share of their width; measured on the CPU (V = 32k and 152k, k =
    20 and 65, 1 and 2 threads) this rule picked the fastest width or one within 15% of it, and 16 was slower
    everywhere (more blocks to rank, a slower block-maximum pass)."""
    return int(min(128, max(32, 2 ** math.floor(math.log2(2.0 * math.sqrt(width / k))))))


@torch.no_grad()
def _ordered_top_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """`top_k_positions(values, k)` for `values [n, width]` (finite or -inf), equal element for element, with a
    block-maximum prefilter where the row is wide against k: split the row into blocks of `b` positions, take
    the k best blocks by their maximum (ties to the lower block, `top_k_positions`), and select among only those
    blocks' `k * b` entries (kept in ascending position order, so the position tie rule carries over); the
    `width mod b` last positions, not a whole block, are always candidates.

    Exact, ties included [Ours]. Let `m` be the k-th best block maximum and `x` an entry of a block that was
    not chosen: that block's maximum is `<= m` (every block above `m` is chosen), so `x <= m`. Each of the k
    chosen blocks holds an entry ranked before `x` in the order (value descending, position ascending): its
    maximum, which is `> m >= x`, or `= m`; in the latter case either `x < m`, or `x = m` is its own unchosen
    block's maximum, and the chosen blocks of maximum `m` are the lowest-numbered ones, so their maximum sits at
    a lower position. k entries rank before `x`: it is not in the top-k.

    Cost on the CPU (measured in `docs/performance.md`): a block-maximum pass over the row and two small
    selections, against `torch.topk` over the whole row whose cost grows with both the width and k."""
    rows, width = values.shape
    if k >= width:
        return torch.arange(width, device=values.device).expand(values.shape)
    block = _prefilter_block(width, k)
    blocks = width // block
    if rows == 0 or k * block > _PREFILTER_MAX_SHARE * width:
        return top_k_positions(values, k)
    whole = blocks * block
    tiled = values[:, :whole].unflatten(-1, (blocks, block))  # a view: no copy of the row
    chosen = top_k_positions(tiled.amax(dim=-1), k)  # [n, k] block numbers, ascending
    candidates = tiled[torch.arange(rows, device=values.device)[:, None], chosen].flatten(1)  # [n, k * block]
    if whole < width:  # the last, partial block: always a candidate, after the others (higher positions)
        candidates = torch.cat([candidates, values[:, whole:]], dim=-1)
    picked = top_k_positions(candidates, k)
    in_blocks = picked < k * block
    from_blocks = chosen.gather(-1, (picked // block).clamp_max(k - 1)) * block + picked % block
    return torch.where(in_blocks, from_blocks, picked - k * block + whole)


def vocab_parallel_topk(values_shard: torch.Tensor, k: int, true_vocab_size: int,
                        group: Optional[dist.ProcessGroup] = None, *,
                        check_values: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries over the whole (unpadded) vocabulary of TP-sharded `values_shard [..., V/tp]`.

    Returns `(values [..., k], ids [..., k])`, identical on every TP rank: `ids` are global vocabulary ids in
    ascending order (the convention of `top_k_positions`), `values` the entries at them. Ties: among equal
    values the lower id wins, across shards too, so the result equals `top_k_positions` on the gathered,
    unpadded logits exactly. Padding ids (`>= true_vocab_size`) never appear. No gradient (a ranking): gather
    the logits at `ids` (e.g. with `scatter_sparse_to_shards` + `gather_owned`) where one is needed.

    Each rank takes its local top-`min(k, V/tp)` under the same order (value descending, id ascending), which
    holds every global winner from its shard; the candidates are all-gathered (`[tp, N, min(k, V/tp)]`) and
    the global top-k taken from them. Concatenated in rank order the candidate ids are already ascending, so
    the position tie rule of `top_k_positions` is the id tie rule. `k > true_vocab_size` is an error.
    NaN/+inf values are an error with the debug checks on (`shard.set_debug_checks`); check_values=False skips
    that check even then (a caller that has checked the shard already).
    """
    group = _tp_group(group)
    rank, tp = _rank_and_size(group)
    _check_shard(values_shard, true_vocab_size, tp, check_values)
    require_positive_int("k", k, at_most=true_vocab_size, what=f"the vocabulary size V = {true_vocab_size}")
    shard = values_shard.shape[-1]
    leading = tuple(values_shard.shape[:-1])
    values = _mask_padding(values_shard.detach().reshape(-1, shard), rank * shard, true_vocab_size)

    local_k = min(k, shard)
    positions = _ordered_top_k(values, local_k)
    local_values = values.gather(-1, positions)
    local_ids = positions + rank * shard
    if tp > 1:
        gathered_values = [torch.empty_like(local_values) for _ in range(tp)]
        gathered_ids = [torch.empty_like(local_ids) for _ in range(tp)]
        dist.all_gather(gathered_values, local_values.contiguous(), group=group)
        dist.all_gather(gathered_ids, local_ids.contiguous(), group=group)
        local_values = torch.cat(gathered_values, dim=-1)
        local_ids = torch.cat(gathered_ids, dim=-1)
    # A padding candidate holds -inf and the highest ids, so it loses every tie: it only could be chosen if
    # fewer than k real ids existed, which the check on k excludes.
    chosen = top_k_positions(local_values, k)
    return local_values.gather(-1, chosen).reshape(*leading, k), local_ids.gather(-1, chosen).reshape(*leading, k)


@torch.no_grad()
def vocab_parallel_logsumexp(values_shard: torch.Tensor, true_vocab_size: int,
                             group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """`log sum_v exp(z_v)` over the unpadded vocabulary, `[...]`, from shards `[..., V/tp]` (no gradient):
    local max -> all-reduce MAX -> local exp-sum -> all-reduce SUM, as megatron's vocab-parallel cross
    entropy. A row of all -inf gives -inf."""
    group = _tp_group(group)
    rank, tp = _rank_and_size(group)
    _check_shard(values_shard, true_vocab_size, tp)
    shard = values_shard.shape[-1]
    values = _mask_padding(values_shard.detach(), rank * shard, true_vocab_size)
    shift = values.amax(dim=-1)
    if tp > 1:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    shift = shift.masked_fill(torch.isneginf(shift), 0.0)
    total = (values - shift.unsqueeze(-1)).exp().sum(dim=-1)
    if tp > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return shift + total.log()


def top_p_mask_on_candidates(candidate_logprobs: torch.Tensor, candidate_ids: torch.Tensor,
                             top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's top-p nucleus on its top-k candidates, as `math/cr_opd.py::student_reach` ("top_p") defines it.

    candidate_logprobs `[..., k]`: log-probabilities over the FULL vocabulary (globally normalised) at
    candidate_ids `[..., k]`, the top-k of `vocab_parallel_topk`. `v` is in the nucleus when the mass of the
    tokens before it in sorted order (probability descending, ties by id ascending) is `< top_p`, and
    `pi_v > 0`. Every token before a top-k member is itself in the top-k, so that mass is exact.

    Returns `(in_nucleus [..., k] bool, complete [...] bool)`: `complete` says the nucleus lies inside the
    top-k (the k candidates hold mass `>= top_p`); where it is False the true nucleus also holds tokens
    outside the top-k (raise k). With `top_p = 1` rounding can leave it False even when k covers the
    vocabulary.
    """
    require_floating("candidate_logprobs", candidate_logprobs)
    if tuple(candidate_ids.shape) != tuple(candidate_logprobs.shape):
        raise MathInputError(f"candidate_ids: expected the shape of candidate_logprobs "
                             f"{tuple(candidate_logprobs.shape)}, got {tuple(candidate_ids.shape)}")
    if not (0.0 < float(top_p) <= 1.0):
        raise MathInputError(f"top_p: expected a probability in (0, 1], got {top_p}")
    logp = candidate_logprobs.detach()
    by_id = torch.argsort(candidate_ids, dim=-1, stable=True)
    order = by_id.gather(-1, torch.argsort(logp.gather(-1, by_id), dim=-1, descending=True, stable=True))
    sorted_p = logp.gather(-1, order).exp()
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    in_nucleus = torch.zeros_like(logp, dtype=torch.bool).scatter_(-1, order, mass_before < top_p)
    complete = sorted_p.sum(dim=-1) >= top_p
    return in_nucleus & (logp > -math.inf), complete


@torch.no_grad()
def vocab_parallel_top_p_mask(values_shard: torch.Tensor, k: int, top_p: float, true_vocab_size: int,
                              group: Optional[dist.ProcessGroup] = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k then top-p within it, from TP-sharded student logits `[..., V/tp]` (at the sampling temperature).

    Returns `(ids [..., k], logprobs [..., k], in_nucleus [..., k], complete [...])`: the global top-k ids
    (ascending, as `vocab_parallel_topk`), the student's log-probabilities there over the full vocabulary, the
    nucleus mask of `top_p_mask_on_candidates` and whether the nucleus lies within the top-k."""
    values, ids = vocab_parallel_topk(values_shard, k, true_vocab_size, group)
    logprobs = values - vocab_parallel_logsumexp(values_shard, true_vocab_size, group).unsqueeze(-1)
    in_nucleus, complete = top_p_mask_on_candidates(logprobs, ids, top_p)
    return ids, logprobs, in_nucleus, complete


class OwnedSparse(NamedTuple):
    """This TP rank's share of a sparse answer `[..., k]`: local_positions (index into the shard, -1 where
    not owned), owned (bool), values (as given: the answer is replicated on every TP rank)."""

    local_positions: torch.Tensor
    owned: torch.Tensor
    values: torch.Tensor


def scatter_sparse_to_shards(ids: torch.Tensor, values: torch.Tensor, vocab_start: int, vocab_end: int,
                             true_vocab_size: int) -> OwnedSparse:
    """Which entries of a server's top-k answer (global ids `[..., k]`, values `[..., k]`, e.g. teacher
    logprobs, the same on every TP rank) this rank owns: those with `vocab_start <= id < vocab_end`.

    No communication: the answer is small and every rank holds it; the ownership split is what lets each rank
    read its own logits at the ids (`gather_owned`) and an all-reduce SUM combine them. Every id must lie in
    `[0, true_vocab_size)` (a padding id or a foreign tokenizer's id is an error naming the id).
    """
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise MathInputError(f"ids: expected an integer tensor of global vocabulary ids, got "
                             f"{ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    if not isinstance(values, torch.Tensor) or tuple(values.shape) != tuple(ids.shape):
        raise MathInputError(f"values: expected a tensor of the shape of ids {tuple(ids.shape)}, got "
                             f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}")
    if ids.dim() < 1 or ids.shape[-1] < 1:
        raise MathInputError(f"ids: expected shape [..., k] with k >= 1, got {tuple(ids.shape)}")
    require_positive_int("true_vocab_size", true_vocab_size)
    if not (isinstance(vocab_start, int) and isinstance(vocab_end, int) and 0 <= vocab_start < vocab_end):
        raise MathInputError(f"vocab_start / vocab_end: expected integers 0 <= vocab_start < vocab_end, got "
                             f"{vocab_start!r}, {vocab_end!r}")
    if debug_checks_enabled():  # read on the host: a debug check
        outside = (ids < 0) | (ids >= true_vocab_size)
        if outside.any():
            bad = int(ids[outside][0])
            raise MathInputError(f"ids: expected global vocabulary ids in [0, {true_vocab_size}) (the vocabulary "
                                 f"size is {true_vocab_size}), got id {bad} ({int(outside.sum())} ids outside)")
    owned = (ids >= vocab_start) & (ids < vocab_end)
    local_positions = torch.where(owned, ids - vocab_start, -1).long()
    return OwnedSparse(local_positions, owned, values)


def gather_owned(logits_shard: torch.Tensor, local_positions: torch.Tensor, owned: torch.Tensor,
                 fill: float = 0.0) -> torch.Tensor:
    """This rank's `logits_shard [..., V/tp]` at its owned entries, `fill` elsewhere: `[..., k]`.

    With `fill = 0` an all-reduce SUM over TP gives the logits at the server's ids exactly. The gradient
    reaches only the owned positions of this rank's shard."""
    if tuple(local_positions.shape) != tuple(owned.shape) or \
            tuple(local_positions.shape[:-1]) != tuple(logits_shard.shape[:-1]):
        raise MathInputError(f"local_positions / owned: expected shape [..., k] with the leading dims of "
                             f"logits_shard {tuple(logits_shard.shape[:-1])}, got {tuple(local_positions.shape)} "
                             f"and {tuple(owned.shape)}")
    if debug_checks_enabled() and owned.any() and int(local_positions[owned].max()) >= logits_shard.shape[-1]:
        raise MathInputError(f"local_positions: expected positions < {logits_shard.shape[-1]} (the shard width), "
                             f"got {int(local_positions[owned].max())}: vocab_start/vocab_end do not match the shard")
    picked = logits_shard.gather(-1, local_positions.clamp_min(0))
    return torch.where(owned, picked, torch.full_like(picked, fill))
