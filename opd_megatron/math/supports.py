"""Route A supports: which vocabulary entries enter the divergence sums, for a dense teacher (logits `[..., V]`)
or a sparse one (top-k ids + logprobs, as a server returns them) [Survey].

Supports: `full`; `teacher_topk` (the teacher's k most likely ids); `student_topk`; `union` (teacher top-k
union student top-k, between k and 2k ids). Modes on a top-k support S:
- `renormalized`: both distributions restricted to S and renormalised there, `p_v / sum_S p`. Only the
  student logits in S receive gradient.
- `tail`: S plus one extra outcome, the tail bucket, holding `1 - sum_S p` on each side. The student's tail is
  computed from its full distribution (log-sum-exp over the complement of S), so every logit receives gradient.
  Merging outcomes can only shrink an f-divergence (data processing), so a tail-mode loss is <= the full loss
  (dense teacher; tested).

`build_support` returns a `SupportedDistributions` (both sides' log-probs on the support and the support's
name, e.g. "teacher_top64+tail"); `divergence_on_support` evaluates any divergence of `divergences.py` on
it. With `k = V` every support equals the full vocabulary and the losses equal the full-vocabulary ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from opd_megatron.math.divergences import (check_logits, compute_dtype, divergence_from_log_probs,
                                           log_probs)
from opd_megatron.math.checks import (MathInputError, require_choice, require_finite, require_positive,
                                      require_positive_int, require_same_shape)

SUPPORTS = ("full", "teacher_topk", "student_topk", "union")
MODES = ("renormalized", "tail")
# A server's top-k probabilities may sum a little over 1 by rounding; more than this means logits were passed.
_SPARSE_MASS_SLACK = 1e-3


@dataclass(frozen=True)
class SparseTeacherLogprobs:
    """A teacher known only on some ids per position, as an inference server returns it.

    ids `[..., k_t]` (integer, global vocabulary ids, distinct per position) and logprobs `[..., k_t]` (the
    teacher's log-probabilities `log q_v` of those ids over the FULL vocabulary, e.g. its top-k; k_t may be 0
    when extra ids are given). Optionally extra_ids `[..., e]` and extra_logprobs `[..., e]`: the teacher's
    log-probabilities on further requested ids (typically the student's top-k; -1 = an unused slot), which
    `student_topk` and `union` supports need. An id present in both takes its value from `ids`/`logprobs`.

    student_ids `[..., k_s]` (optional; -1 = unused, distinct otherwise): the ids the student's top-k is chosen
    from. A served teacher can only score ids it was sent, so the loop ranks the student's top-k_s in a
    forward-only pass before the request and sends them (`TeacherRequest.extra_ids`); given here, `student_topk`
    and `union` take the k of these ids that the student's logits rank highest (`top_k_among`, ties to the lower
    id) instead of ranking the whole vocabulary. Where the ids were ranked from the same logits (the same
    weights and batch: the loop without teacher.overlap) that is exactly the whole-vocabulary top-k, since the
    top-k_s (k_s >= k) contains it; where they are stale (teacher.overlap ranks one update earlier), it is the
    student's best k among the ids the teacher scored, never an id without a teacher value. None: rank the
    whole vocabulary (the teacher must then hold a value for every winner)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    extra_ids: torch.Tensor | None = None
    extra_logprobs: torch.Tensor | None = None
    student_ids: torch.Tensor | None = None


@dataclass(frozen=True)
class SupportedDistributions:
    """Both distributions on one support, ready for `divergence_on_support`.

    student_logp `[..., K(+1)]` (carries the student's gradient), teacher_logp `[..., K(+1)]` (detached): log
    probabilities on the support slots, normalised over the slots; in `tail` mode the last slot is the tail
    bucket. ids `[..., K]`: the global vocabulary id of each (non-tail) slot, -1 for an unused slot (a `union`
    id already taken by the teacher's half); unused slots hold -inf on both sides and contribute 0."""

    student_logp: torch.Tensor
    teacher_logp: torch.Tensor
    ids: torch.Tensor
    support: str
    k: int | None
    mode: str | None
    sparse_teacher: bool

    @property
    def name(self) -> str:
        """`full`, or e.g. `teacher_top64+tail`, `student_top8+renormalized`, `union_top16+tail`."""
        if self.support == "full":
            return "full"
        prefix = {"teacher_topk": "teacher", "student_topk": "student", "union": "union"}[self.support]
        return f"{prefix}_top{self.k}+{self.mode}"

    @property
    def valid(self) -> torch.Tensor:
        """`[..., K]` bool: the slot holds a vocabulary id."""
        return self.ids >= 0


def safe_logsumexp(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """`logsumexp` that returns -inf with a zero (not NaN) gradient where every entry is -inf, as happens for
    the tail bucket when the support covers the whole vocabulary."""
    shift = x.detach().amax(dim=dim, keepdim=True)
    shift = shift.masked_fill(torch.isneginf(shift), 0.0)
    total = (x - shift).exp().sum(dim=dim, keepdim=True)
    empty = total == 0
    out = torch.where(empty, torch.full_like(total, float("-inf")),
                      shift + torch.log(torch.where(empty, torch.ones_like(total), total)))
    return out if keepdim else out.squeeze(dim)


def log_normalize(x: torch.Tensor) -> torch.Tensor:
    """`log_softmax` over the last dim (max subtracted first, as torch does, for precision) that leaves a row
    of all -inf (a support on which one side has no mass) all -inf, with a zero gradient instead of NaN."""
    shift = x.detach().amax(dim=-1, keepdim=True)
    shifted = x - shift.masked_fill(torch.isneginf(shift), 0.0)
    total = shifted.exp().sum(dim=-1, keepdim=True)
    return shifted - torch.log(torch.where(total == 0, torch.ones_like(total), total))


# Block pre-filter of `top_k_positions` on long rows (a vocabulary): blocks of 64, then of 8 of those (measured on
# 1,020 x 32,000 logits, k = 64, one thread: 0.074 CPU-s against 0.114 for `torch.topk` of k + 1 on whole rows).
_PREFILTER_BLOCKS = (64, 8)


def _top_blocks(values: torch.Tensor, positions: Optional[torch.Tensor], k: int,
                block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """values `[r, m]` (m a multiple of `block`) and their positions `[r, m]` (None: 0..m-1) -> the k blocks of the
    largest maxima, as (values `[r, k * block]`, positions `[r, k * block]`), and per row whether the k-th block
    maximum is above the (k+1)-th: then every value outside the kept blocks is below the kept blocks' k distinct
    maxima, so below the row's k-th largest value, and the row's top-k lies in the kept blocks."""
    rows, width = values.shape
    blocks = values.reshape(rows, width // block, block)
    top = torch.topk(blocks.amax(dim=-1), k + 1, dim=-1)
    kept = top.indices[:, :k]
    picked = blocks.gather(1, kept.unsqueeze(-1).expand(-1, -1, block)).reshape(rows, k * block)
    where = (kept.unsqueeze(-1) * block + torch.arange(block, device=values.device)).reshape(rows, k * block)
    if positions is not None:
        where = positions.gather(1, where)
    return picked, where, top.values[:, k - 1] > top.values[:, k]


def top_k_positions(values: torch.Tensor, k: int) -> torch.Tensor:
    """Positions `[..., k]` of the k largest entries of `values [..., n]` along the last dim, in ascending
    position order. Ties are resolved deterministically: among equal values the lower position (for
    vocabulary logits: the lower token id) wins, unlike `torch.topk` whose tie order is unspecified."""
    n = values.shape[-1]
    if k >= n:
        return torch.arange(n, device=values.device).expand(*values.shape[:-1], n).clone()
    first = _PREFILTER_BLOCKS[0]
    if k > 0 and values.dim() == 2 and n % first == 0 and n // first > 4 * (k + 1):
        # Narrow each row to k blocks of 64, then to k blocks of 8 of those, then topk(k + 1): exact wherever each
        # stage's k-th block maximum is above its (k+1)-th and the k-th value above the (k+1)-th (no tie near the
        # boundary, so no choice among equal values); the other rows take the whole-row path.
        candidates, positions = values, None
        sure = torch.ones(values.shape[0], dtype=torch.bool, device=values.device)
        for block in _PREFILTER_BLOCKS:
            candidates, positions, kept_above = _top_blocks(candidates, positions, k, block)
            sure &= kept_above
        top = torch.topk(candidates, k + 1, dim=-1)
        sure &= top.values[:, k - 1] > top.values[:, k]
        found = positions.gather(1, top.indices[:, :k]).sort(dim=-1).values
        if not bool(sure.all()):
            found[~sure] = _whole_row_top_k(values[~sure], k)
        return found
    return _whole_row_top_k(values, k)


def _whole_row_top_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """`top_k_positions` on whole rows, k < n."""
    # Fast path: the k largest of topk(k + 1) are the answer wherever the k-th value is strictly above the next
    # (no tie across the boundary, so no choice among equal values); only the other rows need the O(n) tie rule.
    top = torch.topk(values, k + 1, dim=-1)
    positions = top.indices[..., :k].sort(dim=-1).values
    tie = ~(top.values[..., k - 1] > top.values[..., k])
    if bool(tie.any()):
        rows = values[tie]
        kth = top.values[..., k - 1][tie].unsqueeze(-1)
        above = rows > kth
        tied = rows == kth
        need = k - above.sum(dim=-1, keepdim=True)
        take = above | (tied & (torch.cumsum(tied, dim=-1, dtype=torch.int32) <= need))
        positions[tie] = take.nonzero()[:, -1].view(-1, k)
    return positions


def check_sparse_teacher(teacher: SparseTeacherLogprobs, leading: tuple[int, ...], vocab: int,
                         values: bool = True) -> None:
    """Types and shapes of a sparse teacher's fields for positions `leading`; with `values` (the default) also
    what needs the values (read on the host): ids in the vocabulary, finite log-probs summing to at most 1,
    distinct `student_ids`. The vocab-parallel twin checks the values only with its debug checks on."""
    if (teacher.extra_ids is None) != (teacher.extra_logprobs is None):
        raise MathInputError("teacher.extra_ids / teacher.extra_logprobs: expected both or neither, got one")
    extras = teacher.extra_ids is not None
    # (name, ids, lp name, lp, smallest k, smallest id): -1 marks an unused extra slot.
    pairs = [("teacher.ids", teacher.ids, "teacher.logprobs", teacher.logprobs, 0 if extras else 1, 0)]
    if extras:
        pairs.append(("teacher.extra_ids", teacher.extra_ids, "teacher.extra_logprobs", teacher.extra_logprobs, 1,
                      -1))
    for ids_name, ids, lp_name, lp, min_k, min_id in pairs:
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dtype == torch.bool:
            raise MathInputError(f"{ids_name}: expected an integer tensor of vocabulary ids")
        if not isinstance(lp, torch.Tensor) or not lp.is_floating_point():
            raise MathInputError(f"{lp_name}: expected a floating-point tensor of log-probabilities")
        require_same_shape(**{ids_name: ids, lp_name: lp})
        if ids.dim() < 1 or tuple(ids.shape[:-1]) != tuple(leading) or ids.shape[-1] < min_k:
            raise MathInputError(f"{ids_name}: expected shape [{', '.join(map(str, leading))}, k] (the positions "
                                 f"of student_logits, k >= {min_k}), got {tuple(ids.shape)}")
        if values:
            _require_ids_in(ids_name, ids, min_id, vocab, "the student's vocabulary")
            require_finite(lp_name, lp)
    if teacher.student_ids is not None:
        _check_student_ids(teacher.student_ids, leading, vocab, values)
    if values:
        mass = torch.logsumexp(teacher.logprobs.double(), dim=-1).exp()
        if (mass > 1 + _SPARSE_MASS_SLACK).any():
            raise MathInputError(f"teacher.logprobs: the probabilities sum to more than 1 (up to "
                                 f"{float(mass.max()):.4g}) at some position: expected log-probabilities over the "
                                 f"full vocabulary (log_softmax), not logits")


def _require_ids_in(name: str, ids: torch.Tensor, min_id: int, vocab: int, what: str) -> None:
    if ids.numel() and ((ids < min_id) | (ids >= vocab)).any():
        raise MathInputError(f"{name}: expected ids in [{min_id}, V) with V = {vocab} ({what}), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")


def _check_student_ids(ids: torch.Tensor, leading: tuple[int, ...], vocab: int, values: bool) -> None:
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dtype == torch.bool:
        raise MathInputError("teacher.student_ids: expected an integer tensor of vocabulary ids")
    if ids.dim() < 1 or tuple(ids.shape[:-1]) != tuple(leading) or ids.shape[-1] < 1:
        raise MathInputError(f"teacher.student_ids: expected shape [{', '.join(map(str, leading))}, k_s] (the "
                             f"positions of student_logits, k_s >= 1), got {tuple(ids.shape)}")
    if not values:
        return
    _require_ids_in("teacher.student_ids", ids, -1, vocab, "-1 = unused")
    ordered = ids.sort(dim=-1).values
    if ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any():
        raise MathInputError("teacher.student_ids: an id appears twice at one position; expected distinct ids "
                             "(the student's top-k_s)")


def check_sparse_request(teacher: SparseTeacherLogprobs, support: str, k: int, mode: str,
                         teacher_temperature: float) -> None:
    """What a top-k support asks of a sparse teacher: `k <= k_t` where the teacher's top-k is the support, and
    temperature 1 for the tail (the tail mass of `log q / tau` is unknown)."""
    k_teacher = teacher.ids.shape[-1]
    if support in ("teacher_topk", "union") and k > k_teacher:
        raise MathInputError(f"k: expected at most {k_teacher} (the teacher top-k returned: teacher.ids has "
                             f"{k_teacher} per position) for support {support!r}, got {k}")
    if mode == "tail" and teacher_temperature != 1.0:
        raise MathInputError(f"teacher_temperature: a sparse teacher's tail mass is unknown at temperature "
                             f"{teacher_temperature}; expected 1.0 with mode 'tail', or use mode "
                             f"'renormalized'")


def sparse_teacher_topk(teacher: SparseTeacherLogprobs, k: int) -> torch.Tensor:
    """The teacher's top-k ids `[..., k]` among the served ones, ascending, ties to the lower id: the returned
    slots are sorted by id first, so that the position tie rule of `top_k_positions` is the id rule."""
    by_id = torch.argsort(teacher.ids, dim=-1, stable=True)
    sorted_ids = teacher.ids.gather(-1, by_id)
    chosen = top_k_positions(teacher.logprobs.gather(-1, by_id), k)
    return sorted_ids.gather(-1, chosen).long()


def sparse_teacher_logprobs(teacher: SparseTeacherLogprobs, ids: torch.Tensor, valid: torch.Tensor, support: str,
                            k: int, teacher_temperature: float, dtype: torch.dtype,
                            require_found: bool = True) -> torch.Tensor:
    """A sparse teacher's `log q / tau` at the support ids `[..., K]` (`ids` with unused slots clamped to 0 and
    marked False in `valid`, where the result is -inf), looked up among `ids` and `extra_ids`. require_found:
    an id in neither is an error (counted on the host); without it such a slot holds an arbitrary served value."""
    all_ids, all_lp = teacher.ids.long(), teacher.logprobs.detach().to(dtype)
    if teacher.extra_ids is not None:
        all_ids = torch.cat([all_ids, teacher.extra_ids.long()], dim=-1)
        all_lp = torch.cat([all_lp, teacher.extra_logprobs.detach().to(dtype)], dim=-1)
    lq_s, found = lookup_ids(ids, all_ids, all_lp)
    if require_found:
        missing = int((valid & ~found).sum())
        if missing:
            raise MathInputError(f"teacher: support {support!r} needs the teacher's logprobs on the student's "
                                 f"top-{k} ids; {missing} of them are in neither teacher.ids nor "
                                 f"teacher.extra_ids (request them from the server as extra_ids/extra_logprobs, "
                                 f"or use support 'teacher_topk')")
    return (lq_s / teacher_temperature).masked_fill(~valid, float("-inf"))


def top_k_among(values: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """The k ids `[..., k]` among `candidates [..., n]` (global ids, distinct, -1 = unused) whose `values
    [..., n]` (the student's logits at the candidates) are largest, in ascending id order; ties to the lower id,
    as `top_k_positions` (the candidates are sorted by id first, so its position rule is the id rule). An unused
    candidate never beats a used one; a position with fewer than k used candidates gets -1 slots.
    `k > n` is an error."""
    if k > candidates.shape[-1]:
        raise MathInputError(f"k: expected at most {candidates.shape[-1]} (the student ids the teacher scored: "
                             f"teacher.student_ids has {candidates.shape[-1]} per position), got {k}")
    by_id = torch.argsort(candidates, dim=-1, stable=True)
    sorted_ids = candidates.gather(-1, by_id)
    ranked = values.gather(-1, by_id).masked_fill(sorted_ids < 0, float("-inf"))
    return sorted_ids.gather(-1, top_k_positions(ranked, k)).long()


def lookup_ids(query_ids: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values at query_ids `[..., K]` from the pairs (ids, values) `[..., n]`, and whether each was found.
    `[..., K, n]` comparisons: fine for the small k and n a server returns."""
    match = query_ids.unsqueeze(-1) == ids.unsqueeze(-2)
    first = match.to(torch.int8).argmax(dim=-1)  # the first match: `ids` come before the extras
    return values.gather(-1, first), match.any(dim=-1)


def support_ids(support: str, teacher_ids: Optional[torch.Tensor],
                student_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """The ids `[..., K]` a top-k support holds, from the teacher's and the student's top-k ids `[..., k]`:
    one of them, or for `union` the teacher's k followed by the student's k with the ids the teacher already
    holds replaced by -1 (an unused slot, -inf on both sides: it adds 0). Shared by the vocab-parallel twin."""
    if support == "teacher_topk":
        return teacher_ids
    if support == "student_topk":
        return student_ids
    taken = (student_ids.unsqueeze(-1) == teacher_ids.unsqueeze(-2)).any(dim=-1)
    return torch.cat([teacher_ids, student_ids.masked_fill(taken, -1)], dim=-1)


def build_support(student_logits: torch.Tensor, teacher: torch.Tensor | SparseTeacherLogprobs,
                  support: str = "full", k: int | None = None, mode: str = "renormalized", *,
                  student_temperature: float = 1.0, teacher_temperature: float = 1.0) -> SupportedDistributions:
    """Both distributions on the chosen support [Survey]: `pi = softmax(z^S / tau_S)` from student_logits
    `[..., V]` and `q` from teacher (dense logits `[..., V]`, detached, `softmax(z^T / tau_T)`; or a
    `SparseTeacherLogprobs`) -> `SupportedDistributions` with log-probs `[..., K(+1)]`.

    support: `full` (K = V; `k` must be None and `mode` is not used), `teacher_topk`, `student_topk` (K = k),
    `union` (K = 2k slots, k to 2k of them used). mode: `renormalized` or `tail` (module docstring).

    Top-k: ranked by the logits (temperature does not change the order), ties resolved deterministically, the
    lower token id wins; the student's ranking is taken without gradient. `k > V` is an error.

    Pitfall: `teacher_topk` or `student_topk` with k = 1 and `renormalized` makes both sides the point mass on
    the same id, so every divergence is 0 with zero gradient: the loss silently does nothing. Use `tail` (a
    two-outcome divergence, top-1 vs rest) or a larger k.

    Sparse teacher: `full` is unavailable (the teacher is unknown outside the ids it returned): an error says
    what works. `teacher_topk` needs k <= k_t; `student_topk` and `union` need the teacher's logprobs on the
    student's top-k ids (in `ids` or `extra_ids`); with `teacher.student_ids` the student's top-k is taken among
    those ids (`SparseTeacherLogprobs`). The tail is `1 - sum_S q` from the returned logprobs,
    so a teacher temperature != 1 is only possible with `renormalized` (renormalising `log q / tau` on S is
    exact: the unknown normaliser cancels), not with `tail`. Where the student has no mass outside S (S
    covers the vocabulary) the teacher's tail is set to 0 too: the returned logprobs sum to 1 only up to
    rounding, and a rounding residue against a zero student tail would make forward KL infinite."""
    dtype = _check_support_inputs(student_logits, teacher, support, mode, student_temperature, teacher_temperature)
    sparse = isinstance(teacher, SparseTeacherLogprobs)
    if support == "full":
        return _full_support(student_logits, teacher, sparse, k, student_temperature, teacher_temperature, dtype)
    vocab = student_logits.shape[-1]
    require_positive_int("k", k, at_most=vocab, what=f"the vocabulary size V = {vocab}")
    if sparse:
        check_sparse_request(teacher, support, k, mode, teacher_temperature)
    ids = _topk_support_ids(student_logits, teacher, support, k, sparse)
    valid = ids >= 0
    safe_ids = ids.clamp_min(0)

    neg_inf = float("-inf")
    scaled_s = student_logits.to(dtype) / student_temperature
    scaled_t = None if sparse else teacher.detach().to(dtype) / teacher_temperature
    # Renormalised: from the scaled logits on S directly, not from the global log-probs, whose large
    # magnitude (~1e4 where S holds little mass) would leave rounding noise above 1e-12 in the loss.
    # Tail: from the global log-probs, which the tail bucket needs anyway.
    lp = torch.log_softmax(scaled_s, dim=-1) if mode == "tail" else scaled_s
    lp_s = lp.gather(-1, safe_ids).masked_fill(~valid, neg_inf)
    if sparse:
        lq_s = sparse_teacher_logprobs(teacher, safe_ids, valid, support, k, teacher_temperature, dtype)
    else:
        lq = torch.log_softmax(scaled_t, dim=-1) if mode == "tail" else scaled_t
        lq_s = lq.gather(-1, safe_ids).masked_fill(~valid, neg_inf)

    if mode == "renormalized":
        lp_s, lq_s = log_normalize(lp_s), log_normalize(lq_s)
    else:
        in_support = torch.zeros(lp.shape, dtype=torch.int32, device=lp.device)
        in_support = in_support.scatter_add(-1, safe_ids, valid.to(torch.int32)) > 0
        tail_p = safe_logsumexp(lp.masked_fill(in_support, neg_inf), keepdim=True)
        tail_q = (sparse_tail(lq_s, tail_p) if sparse
                  else safe_logsumexp(lq.masked_fill(in_support, neg_inf), keepdim=True))
        lp_s = torch.cat([lp_s, tail_p], dim=-1)
        lq_s = torch.cat([lq_s, tail_q], dim=-1)
    return SupportedDistributions(lp_s, lq_s, ids, support, k, mode, sparse)


def _check_support_inputs(student_logits: torch.Tensor, teacher: torch.Tensor | SparseTeacherLogprobs,
                          support: str, mode: str, student_temperature: float,
                          teacher_temperature: float) -> torch.dtype:
    """`build_support`'s argument checks that do not depend on k; returns the compute dtype."""
    require_choice("support", support, SUPPORTS)
    require_choice("mode", mode, MODES)
    check_logits("student_logits", student_logits)
    require_positive("student_temperature", student_temperature)
    require_positive("teacher_temperature", teacher_temperature)
    if isinstance(teacher, SparseTeacherLogprobs):
        check_sparse_teacher(teacher, tuple(student_logits.shape[:-1]), student_logits.shape[-1])
        return compute_dtype(student_logits, teacher.logprobs)
    if isinstance(teacher, torch.Tensor):
        check_logits("teacher_logits", teacher)
        require_same_shape(student_logits=student_logits, teacher_logits=teacher)
        return compute_dtype(student_logits, teacher)
    raise MathInputError(f"teacher: expected teacher logits [..., V] (a tensor) or SparseTeacherLogprobs, "
                         f"got {type(teacher).__name__}")


def _full_support(student_logits: torch.Tensor, teacher: torch.Tensor | SparseTeacherLogprobs, sparse: bool,
                  k: int | None, student_temperature: float, teacher_temperature: float,
                  dtype: torch.dtype) -> SupportedDistributions:
    """Support `full`: both log-softmaxes over the vocabulary (a dense teacher only)."""
    if sparse:
        raise MathInputError("support: 'full' needs the teacher on the whole vocabulary (dense teacher logits "
                             "[..., V]); with a sparse teacher (top-k ids + logprobs) use 'teacher_topk' "
                             "(k <= the returned k), or 'student_topk'/'union' with the teacher's logprobs on "
                             "the student's top-k ids as extra_ids/extra_logprobs")
    if k is not None:
        raise MathInputError(f"k: not used by support 'full' (expected None), got {k!r}")
    lp = log_probs(student_logits, student_temperature, dtype)
    lq = log_probs(teacher.detach(), teacher_temperature, dtype)
    vocab = student_logits.shape[-1]
    ids = torch.arange(vocab, device=lp.device).expand(*student_logits.shape[:-1], vocab)
    return SupportedDistributions(lp, lq, ids, "full", None, None, False)


def _topk_support_ids(student_logits: torch.Tensor, teacher: torch.Tensor | SparseTeacherLogprobs, support: str,
                      k: int, sparse: bool) -> torch.Tensor:
    """The ids `[..., K]` of a top-k support, ranked by the raw logits (a temperature does not change the order,
    its rounding could break ties), the student's without gradient."""
    teacher_ids = student_ids = None
    if support in ("teacher_topk", "union"):
        teacher_ids = sparse_teacher_topk(teacher, k) if sparse else top_k_positions(teacher.detach(), k)
    if support in ("student_topk", "union"):
        if sparse and teacher.student_ids is not None:
            candidates = teacher.student_ids.long()
            student_ids = top_k_among(student_logits.detach().gather(-1, candidates.clamp_min(0)), candidates, k)
        else:
            student_ids = top_k_positions(student_logits.detach(), k)
    return support_ids(support, teacher_ids, student_ids)


def sparse_tail(teacher_logp_on_support: torch.Tensor, student_tail: torch.Tensor) -> torch.Tensor:
    """A sparse teacher's tail bucket `log(1 - sum_S q)` `[..., 1]` from its log-probs on the support `[..., K]`;
    -inf where the student's tail is -inf (S covers the vocabulary: the served log-probs sum to 1 only up to
    rounding, and a residue against a zero student tail would make forward KL infinite)."""
    covered = safe_logsumexp(teacher_logp_on_support, keepdim=True).clamp_max(0.0)
    return torch.log(-torch.expm1(covered)).masked_fill(torch.isneginf(student_tail), float("-inf"))


def divergence_on_support(kind: str, supported: SupportedDistributions, *, beta: float | None = None,
                          alpha: float | None = None) -> torch.Tensor:
    """Per-position divergence `kind` (one of `divergences.DIVERGENCES`, with its `beta` or `alpha`) between
    the student and the teacher on `supported` -> `[...]`: the sum over the support slots (and the tail bucket)
    of the divergence's terms, with `supported.name` saying which support that was. With k = V it equals the
    full-vocabulary function of the same name."""
    return divergence_from_log_probs(kind, supported.student_logp, supported.teacher_logp, beta=beta, alpha=alpha)
