"""Process bodies for `test_supports.py` (importable: spawned processes load them; `diagnostics_workers.py`
shares the inputs and helpers).

`all_checks(tp)` runs every check of one TP size in one process group and returns the number of checks made.
Every rank builds the same full logits from a fixed seed, pads the vocabulary (37) to a multiple of tp with LARGE
values (a padding id would win every top-k if it were not masked), keeps its contiguous shard, and compares the
vocab-parallel result with the single-device reference on the unpadded logits: values, and the gradient wrt the
student logits gathered from all ranks' shards (padding columns must receive exactly 0); chunked along tokens equals
unchunked. `precision_checks` adds float32 (against the float64 reference, relative to the scale) and supports
whose complement holds so little mass that its terms shifted by the row maximum underflow (the tail's exact
recomputation), in float32 and float64, values and gradients."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from opd_megatron.math.supports import (SparseTeacherLogprobs, build_support, divergence_on_support,
                                        top_k_positions)
from opd_megatron.parallel.supports import vocab_parallel_build_support

N, VOCAB = 6, 37
KS = (1, 5, 12, VOCAB)  # 12 > V/tp = 10 at tp = 4; k = V covers the vocabulary (empty tail)
K_SERVED = 12
SUPPORTS = ("teacher_topk", "student_topk", "union")
MODES = ("renormalized", "tail")
KINDS = ("forward_kl", "reverse_kl")
TAU_S, TAU_T = 0.7, 1.3
TOL = 1e-10


def random_logits(seed: int) -> torch.Tensor:
    return torch.randn(N, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 2


def tied_logits(seed: int) -> torch.Tensor:
    """Few distinct values: ties at the k-th place, across shard boundaries."""
    return torch.randint(0, 3, (N, VOCAB), generator=torch.Generator().manual_seed(seed)).double()


def shard_of(full: torch.Tensor, tp: int, rank: int, pad_value: float = 1e3) -> torch.Tensor:
    padded_vocab = -(-VOCAB // tp) * tp
    padded = torch.cat([full, torch.full((N, padded_vocab - VOCAB), pad_value, dtype=full.dtype)], dim=-1)
    width = padded_vocab // tp
    return padded[:, rank * width:(rank + 1) * width].contiguous()


def gather_shards(shard: torch.Tensor, tp: int) -> torch.Tensor:
    """The padded `[N, tp * V/tp]` from every rank's shard."""
    pieces = [torch.empty_like(shard) for _ in range(tp)]
    dist.all_gather(pieces, shard.contiguous())
    return torch.cat(pieces, dim=-1)


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal -inf/+inf pattern, finite entries within TOL."""
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.equal(got[torch.isinf(got)],
                                                                            want[torch.isinf(want)]), name
    finite = ~torch.isinf(want)
    assert not torch.isnan(got).any(), name
    err = float((got[finite] - want[finite]).abs().max()) if finite.any() else 0.0
    assert err <= TOL, (name, err)


def sparse_teacher(teacher_full: torch.Tensor, student_full: torch.Tensor) -> SparseTeacherLogprobs:
    """A server's answer: the teacher's top-K_SERVED ids in a scrambled order with their log-probs, plus its
    log-probs on the student's top-K_SERVED ids as extras."""
    logq = torch.log_softmax(teacher_full, dim=-1)
    ids = top_k_positions(teacher_full, K_SERVED).flip(-1)
    extra = top_k_positions(student_full, K_SERVED)
    return SparseTeacherLogprobs(ids, logq.gather(-1, ids), extra, logq.gather(-1, extra))


def _init(tp: int) -> int:
    from opd_megatron.student.cpu_shims import apply_cpu_shims
    apply_cpu_shims()
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    return parallel_state.get_tensor_model_parallel_rank()


def _check_support(student_full, teacher_full, sparse: bool, support: str, k: int, mode: str, tp: int,
                   rank: int) -> int:
    tau_t = 1.0 if sparse and mode == "tail" else TAU_T
    teacher_ref = sparse_teacher(teacher_full, student_full) if sparse else teacher_full
    teacher_vp = teacher_ref if sparse else shard_of(teacher_full, tp, rank)
    weights = torch.rand(N, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) + 0.5
    checks = 0
    for kind in KINDS:
        leaf = shard_of(student_full, tp, rank).requires_grad_(True)
        got = vocab_parallel_build_support(leaf, teacher_vp, support, k, mode, student_temperature=TAU_S,
                                           teacher_temperature=tau_t, true_vocab_size=VOCAB)
        full_leaf = student_full.clone().requires_grad_(True)
        want = build_support(full_leaf, teacher_ref, support, k, mode, student_temperature=TAU_S,
                             teacher_temperature=tau_t)
        case = f"{'sparse' if sparse else 'dense'} {want.name} {kind}"
        assert got.name == want.name and got.sparse_teacher == sparse, case
        assert torch.equal(got.ids, want.ids), case
        assert int(got.ids.max()) < VOCAB, case
        assert_close(case + " student_logp", got.student_logp.detach(), want.student_logp.detach())
        assert_close(case + " teacher_logp", got.teacher_logp, want.teacher_logp)
        loss = divergence_on_support(kind, got)
        ref_loss = divergence_on_support(kind, want)
        assert_close(case + " loss", loss.detach(), ref_loss.detach())
        (loss * weights).sum().backward()
        (ref_loss * weights).sum().backward()
        grad = gather_shards(leaf.grad, tp)
        assert_close(case + " grad", grad[:, :VOCAB], full_leaf.grad)
        assert bool((grad[:, VOCAB:] == 0).all()), case + " padding grad"
        checks += 1
        if kind != KINDS[0]:
            continue
        # Chunked along tokens (4 + 2 rows, recomputed in backward) equals unchunked (one divergence suffices:
        # the support, not the loss, is chunked).
        chunked_leaf = shard_of(student_full, tp, rank).requires_grad_(True)
        chunked = vocab_parallel_build_support(chunked_leaf, teacher_vp, support, k, mode, student_temperature=TAU_S,
                                               teacher_temperature=tau_t, true_vocab_size=VOCAB, chunk_size=4)
        assert torch.equal(chunked.ids, got.ids), case + " chunked ids"
        chunked_loss = divergence_on_support(kind, chunked)
        assert_close(case + " chunked loss", chunked_loss.detach(), loss.detach())
        (chunked_loss * weights).sum().backward()
        assert_close(case + " chunked grad", chunked_leaf.grad, leaf.grad)
        if mode == "tail":
            # keep_softmax: the tail values kept from forward and scaled into the gradient (KeptTail).
            kept_leaf = shard_of(student_full, tp, rank).requires_grad_(True)
            kept = vocab_parallel_build_support(kept_leaf, teacher_vp, support, k, mode, student_temperature=TAU_S,
                                                teacher_temperature=tau_t, true_vocab_size=VOCAB, chunk_size=4,
                                                keep_softmax=True)
            kept_loss = divergence_on_support(kind, kept)
            assert_close(case + " kept loss", kept_loss.detach(), loss.detach())
            (kept_loss * weights).sum().backward()
            assert_close(case + " kept grad", kept_leaf.grad, leaf.grad)
    return checks


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error of the finite entries relative to the largest finite magnitude (infinities must agree)."""
    assert torch.equal(torch.isinf(got), torch.isinf(want)), "infinities differ"
    finite = ~torch.isinf(want)
    assert not torch.isnan(got).any()
    scale = max(float(want[finite].abs().max()), 1e-30) if finite.any() else 1.0
    return float((got[finite].double() - want[finite]).abs().max()) / scale if finite.any() else 0.0


def peaked_logits(student_full: torch.Tensor, teacher_full: torch.Tensor, k: int, drop: float) -> torch.Tensor:
    """The student's logits with every entry outside the teacher's top-k lowered by `drop`: the teacher top-k
    support's complement then holds mass ~exp(-drop), below what the row maximum's shift can represent (float32:
    drop 150, float64: drop 800), so the tail is recomputed with the complement's own shift."""
    outside = torch.ones_like(student_full, dtype=torch.bool).scatter_(-1, top_k_positions(teacher_full, k), False)
    return student_full - drop * outside


def precision_checks(tp: int, rank: int) -> int:
    """float32 inputs against the float64 reference (relative error <= 2e-5 of the scale: values and gradients),
    every support x mode (the tail also with keep_softmax), dense and sparse teacher; and the underflowing tail
    (peaked logits: the kept values' rows shifted by the complement) in float32 and float64. Returns the number
    of checks."""
    checks = 0
    student64, teacher64 = random_logits(4), random_logits(5)
    cases = [(torch.float32, student64, 2e-5)]
    cases += [(dtype, peaked_logits(student64, teacher64, 5, drop), tol)
              for dtype, drop, tol in ((torch.float32, 150.0, 2e-5), (torch.float64, 800.0, TOL))]
    for dtype, student_full, tol in cases:
        for sparse in (False, True):
            for support in SUPPORTS:
                for mode, keep in [(m, False) for m in MODES] + [("tail", True)]:
                    tau_t = 1.0 if sparse and mode == "tail" else TAU_T
                    teacher_ref = sparse_teacher(teacher64, student_full) if sparse else teacher64
                    teacher_vp = (SparseTeacherLogprobs(teacher_ref.ids, teacher_ref.logprobs.to(dtype),
                                                        teacher_ref.extra_ids, teacher_ref.extra_logprobs.to(dtype))
                                  if sparse else shard_of(teacher64, tp, rank).to(dtype))
                    leaf = shard_of(student_full, tp, rank).to(dtype).requires_grad_(True)
                    got = vocab_parallel_build_support(leaf, teacher_vp, support, 5, mode, student_temperature=TAU_S,
                                                       teacher_temperature=tau_t, true_vocab_size=VOCAB,
                                                       keep_softmax=keep)
                    full_leaf = student_full.clone().requires_grad_(True)
                    want = build_support(full_leaf, teacher_ref, support, 5, mode, student_temperature=TAU_S,
                                         teacher_temperature=tau_t)
                    case = f"{dtype} {'sparse' if sparse else 'dense'} {want.name}{' kept' if keep else ''}"
                    assert torch.equal(got.ids, want.ids), case
                    assert got.student_logp.dtype == dtype, case
                    for name, mine, reference in (("student_logp", got.student_logp, want.student_logp),
                                                  ("teacher_logp", got.teacher_logp, want.teacher_logp)):
                        assert _relative_error(mine.detach(), reference.detach()) <= tol, (case, name)
                    loss = divergence_on_support("forward_kl", got)
                    ref_loss = divergence_on_support("forward_kl", want)
                    assert _relative_error(loss.detach(), ref_loss.detach()) <= tol, (case, "loss")
                    loss.sum().backward()
                    ref_loss.sum().backward()
                    grad = gather_shards(leaf.grad, tp)
                    assert _relative_error(grad[:, :VOCAB], full_leaf.grad) <= tol, (case, "grad")
                    assert bool((grad[:, VOCAB:] == 0).all()), case + " padding grad"
                    checks += 1
    return checks


def all_checks(tp: int) -> int:
    rank = _init(tp)
    checks = precision_checks(tp, rank)
    cases = [(random_logits(0), random_logits(1), KS), (tied_logits(2), tied_logits(3), (5, 12))]
    for student_full, teacher_full, ks in cases:
        for sparse in (False, True):
            for support in SUPPORTS:
                for k in ks:
                    if sparse and (k > K_SERVED or (k == VOCAB)):
                        continue
                    for mode in MODES:
                        checks += _check_support(student_full, teacher_full, sparse, support, k, mode, tp, rank)
    return checks


def padding_only_rank_checks(tp: int) -> int:
    """A vocabulary of 6 ids padded to 8 per rank at TP=2: rank 1 holds only padding. The tail support with its
    values kept (keep_softmax) and recomputed give the reference's loss and gradient, and rank 1's gradient is 0."""
    rank = _init(tp)
    vocab, width = 6, 8
    gen = torch.Generator().manual_seed(9)
    student = torch.randn(5, vocab, generator=gen, dtype=torch.float64)
    teacher = torch.randn(5, vocab, generator=gen, dtype=torch.float64)
    padded_student = torch.cat([student, torch.full((5, tp * width - vocab), 3.0, dtype=torch.float64)], -1)
    padded_teacher = torch.cat([teacher, torch.full((5, tp * width - vocab), 3.0, dtype=torch.float64)], -1)
    cols = slice(rank * width, (rank + 1) * width)
    full_leaf = student.clone().requires_grad_(True)
    ref_loss = divergence_on_support("forward_kl", build_support(full_leaf, teacher, "teacher_topk", 3, "tail"))
    ref_loss.sum().backward()
    checks = 0
    for keep in (False, True):
        leaf = padded_student[:, cols].clone().requires_grad_(True)
        got = vocab_parallel_build_support(leaf, padded_teacher[:, cols], "teacher_topk", 3, "tail",
                                           true_vocab_size=vocab, keep_softmax=keep)
        loss = divergence_on_support("forward_kl", got)
        assert_close(f"padding-only rank keep={keep} loss", loss.detach(), ref_loss.detach())
        loss.sum().backward()
        grad = gather_shards(leaf.grad, tp)
        assert_close(f"padding-only rank keep={keep} grad", grad[:, :vocab], full_leaf.grad)
        assert bool((grad[:, vocab:] == 0).all())
        checks += 1
    return checks
