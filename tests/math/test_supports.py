"""Supports: k = V equals the full vocabulary (dense and sparse teacher), hand-built top-k supports in both modes,
the tie rule, the k = 1 pitfall, gradients, and the errors a sparse teacher or a bad k gives."""

import itertools

import pytest
import torch

from opd_megatron.math.divergences import DIVERGENCES, divergence_from_log_probs
from opd_megatron.math.supports import (MODES, SparseTeacherLogprobs, build_support, divergence_on_support,
                                        top_k_positions)
from opd_megatron.math.checks import MathInputError

F64 = torch.float64
NEG_INF = float("-inf")
PARAMS = {"generalized_jsd": {"beta": 0.3}, "skew_forward_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}
TOPK_SUPPORTS = ("teacher_topk", "student_topk", "union")


def random_logits(*shape, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def full_loss(kind, s, t, tau_s=1.0, tau_t=1.0):
    return divergence_on_support(kind, build_support(s, t, "full", student_temperature=tau_s,
                                                     teacher_temperature=tau_t), **PARAMS.get(kind, {}))


def sparse_from_dense(t, ids, tau_t=1.0, extra_ids=None):
    """What a server returns: the teacher's full-vocabulary log-probs on the requested ids."""
    logq = torch.log_softmax(t / tau_t, dim=-1)
    extra = {} if extra_ids is None else {"extra_ids": extra_ids, "extra_logprobs": logq.gather(-1, extra_ids)}
    return SparseTeacherLogprobs(ids=ids, logprobs=logq.gather(-1, ids), **extra)


def shuffled_vocab(leading, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(vocab, generator=g) for _ in range(int(torch.tensor(leading).prod()))]
                       ).view(*leading, vocab)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("support,mode", list(itertools.product(TOPK_SUPPORTS, MODES)))
def test_k_equal_to_vocab_is_the_full_loss_dense(kind, support, mode):
    s, t = random_logits(2, 3, 6, seed=1), random_logits(2, 3, 6, seed=2)
    supported = build_support(s, t, support, 6, mode, student_temperature=0.8, teacher_temperature=1.2)
    got = divergence_on_support(kind, supported, **PARAMS.get(kind, {}))
    torch.testing.assert_close(got, full_loss(kind, s, t, 0.8, 1.2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("support,mode", list(itertools.product(TOPK_SUPPORTS, MODES)))
def test_k_equal_to_vocab_is_the_full_loss_sparse(kind, support, mode):
    s, t = random_logits(2, 3, 6, seed=3), random_logits(2, 3, 6, seed=4)
    tau_t = 1.0 if mode == "tail" else 1.7  # a sparse tail is only known at the server's temperature
    # The server's logprobs are at temperature 1; renormalising log q / tau on the support is exact.
    teacher = sparse_from_dense(t, shuffled_vocab((2, 3), 6, seed=5))
    supported = build_support(s, teacher, support, 6, mode, student_temperature=0.8, teacher_temperature=tau_t)
    assert supported.sparse_teacher
    got = divergence_on_support(kind, supported, **PARAMS.get(kind, {}))
    torch.testing.assert_close(got, full_loss(kind, s, t, 0.8, tau_t), rtol=1e-12, atol=1e-12)


def by_hand(kind, p, q, ids, mode):
    """The support loss from probabilities: restrict to ids, then renormalise or append the tail."""
    p_s, q_s = p[ids], q[ids]
    if mode == "renormalized":
        p_s, q_s = p_s / p_s.sum(), q_s / q_s.sum()
    else:
        p_s, q_s = torch.cat([p_s, 1 - p_s.sum(0, keepdim=True)]), torch.cat([q_s, 1 - q_s.sum(0, keepdim=True)])
    return divergence_from_log_probs(kind, p_s.log(), q_s.log(), **PARAMS.get(kind, {}))


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("support,mode", list(itertools.product(TOPK_SUPPORTS, MODES)))
def test_top_k_support_against_a_hand_built_support(kind, support, mode):
    s, t = random_logits(4, 8, seed=6), random_logits(4, 8, seed=7)
    supported = build_support(s, t, support, 3, mode)
    got = divergence_on_support(kind, supported, **PARAMS.get(kind, {}))
    p, q = torch.softmax(s, -1), torch.softmax(t, -1)
    for row in range(4):
        teacher_top = set(torch.argsort(q[row], descending=True)[:3].tolist())
        student_top = set(torch.argsort(p[row], descending=True)[:3].tolist())
        ids = sorted({"teacher_topk": teacher_top, "student_topk": student_top,
                      "union": teacher_top | student_top}[support])
        assert sorted(supported.ids[row][supported.valid[row]].tolist()) == ids
        torch.testing.assert_close(got[row], by_hand(kind, p[row], q[row], ids, mode), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_tail_and_renormalized_differ_are_nonnegative_and_tail_is_below_full(kind):
    s, t = random_logits(3, 5, 10, seed=8), random_logits(3, 5, 10, seed=9)
    params = PARAMS.get(kind, {})
    tail = divergence_on_support(kind, build_support(s, t, "teacher_topk", 4, "tail"), **params)
    renormalized = divergence_on_support(kind, build_support(s, t, "teacher_topk", 4, "renormalized"), **params)
    full = full_loss(kind, s, t)
    assert (tail >= 0).all() and (renormalized >= 0).all()
    assert (tail - renormalized).abs().min() > 1e-6
    # Merging the complement into one outcome can only shrink an f-divergence (data processing).
    assert (tail <= full + 1e-12).all()


def test_k_equal_one_renormalized_degenerates_to_zero_but_tail_does_not():
    s = random_logits(2, 3, 6, seed=10).requires_grad_(True)
    t = random_logits(2, 3, 6, seed=11)
    for support in ("teacher_topk", "student_topk"):
        renormalized = divergence_on_support("forward_kl", build_support(s, t, support, 1, "renormalized"))
        assert (renormalized == 0).all()
        (grad,) = torch.autograd.grad(renormalized.sum(), s)
        assert (grad == 0).all()
        tail = divergence_on_support("forward_kl", build_support(s, t, support, 1, "tail"))
        assert (tail > 0).all()


def test_top_k_ties_lower_id_wins():
    values = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert top_k_positions(values, 1).tolist() == [1]
    assert top_k_positions(values, 2).tolist() == [1, 2]
    assert top_k_positions(values, 3).tolist() == [1, 2, 4]
    assert top_k_positions(values, 4).tolist() == [1, 2, 3, 4]
    masked = torch.tensor([[NEG_INF, 0.5, NEG_INF, NEG_INF]])
    assert top_k_positions(masked, 3).tolist() == [[0, 1, 2]]
    uniform = torch.zeros(2, 3, 7)
    assert (top_k_positions(uniform, 3) == torch.tensor([0, 1, 2])).all()


def test_top_k_matches_topk_without_ties():
    values = random_logits(4, 5, 30, seed=12)
    got = top_k_positions(values, 7)
    want = torch.topk(values, 7, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(got, want)


def test_union_has_no_duplicate_ids_and_between_k_and_2k_of_them():
    s, t = random_logits(5, 12, seed=13), random_logits(5, 12, seed=14)
    supported = build_support(s, t, "union", 4, "tail")
    assert supported.ids.shape == (5, 8) and supported.student_logp.shape == (5, 9)
    for row in range(5):
        ids = supported.ids[row][supported.valid[row]].tolist()
        assert len(ids) == len(set(ids)) and 4 <= len(ids) <= 8
    torch.testing.assert_close(supported.student_logp.exp().sum(-1), torch.ones(5, dtype=F64))
    torch.testing.assert_close(supported.teacher_logp.exp().sum(-1), torch.ones(5, dtype=F64))
    # A union of identical rankings is the top-k itself: the student's half is all unused slots.
    same = build_support(t, t, "union", 4, "renormalized")
    assert (same.ids[:, 4:] == -1).all() and torch.isneginf(same.student_logp[:, 4:]).all()


def test_names_say_which_support():
    s, t = random_logits(2, 6, seed=15), random_logits(2, 6, seed=16)
    assert build_support(s, t).name == "full"
    assert build_support(s, t, "teacher_topk", 4, "tail").name == "teacher_top4+tail"
    assert build_support(s, t, "student_topk", 2, "renormalized").name == "student_top2+renormalized"
    assert build_support(s, t, "union", 3, "tail").name == "union_top3+tail"


@pytest.mark.parametrize("support,mode", [("full", "renormalized")] + list(itertools.product(TOPK_SUPPORTS, MODES)))
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "generalized_jsd"])
def test_gradcheck_through_supports(kind, support, mode):
    s = random_logits(2, 6, seed=17).requires_grad_(True)
    t = random_logits(2, 6, seed=18)
    k = None if support == "full" else 3

    def loss(x):
        return divergence_on_support(kind, build_support(x, t, support, k, mode, student_temperature=0.9),
                                     **PARAMS.get(kind, {}))
    assert torch.autograd.gradcheck(loss, (s,))


def test_gradient_reaches_the_complement_only_in_tail_mode():
    s = random_logits(3, 8, seed=19).requires_grad_(True)
    t = random_logits(3, 8, seed=20)
    outside = torch.ones(3, 8, dtype=torch.bool)
    outside.scatter_(-1, build_support(s, t, "teacher_topk", 3).ids, False)
    for mode, reaches in (("renormalized", False), ("tail", True)):
        (grad,) = torch.autograd.grad(divergence_on_support("forward_kl", build_support(s, t, "teacher_topk", 3,
                                                                                        mode)).sum(), s)
        assert bool((grad[outside] != 0).all()) == reaches
        assert (grad[~outside] != 0).all()


def test_masked_vocabulary_with_k_beyond_the_unmasked_ids():
    masked = torch.tensor([False, False, True, True, False, True])
    s = random_logits(2, 6, seed=21).masked_fill(masked, NEG_INF).requires_grad_(True)
    t = random_logits(2, 6, seed=22).masked_fill(masked, NEG_INF)
    for kind, support, mode in itertools.product(DIVERGENCES, TOPK_SUPPORTS, MODES):
        value = divergence_on_support(kind, build_support(s, t, support, 5, mode), **PARAMS.get(kind, {}))
        torch.testing.assert_close(value, full_loss(kind, s, t), rtol=1e-12, atol=1e-12)
        (grad,) = torch.autograd.grad(value.sum(), s)
        assert torch.isfinite(grad).all()


# Sparse teacher
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_sparse_teacher_top_k_equals_the_dense_one(kind, mode):
    s, t = random_logits(2, 3, 9, seed=23), random_logits(2, 3, 9, seed=24)
    # The server returns its top 5 in its own order; we ask for the top 3 of them.
    top5 = torch.topk(t, 5, dim=-1).indices.flip(-1)
    teacher = sparse_from_dense(t, top5)
    sparse = divergence_on_support(kind, build_support(s, teacher, "teacher_topk", 3, mode), **PARAMS.get(kind, {}))
    dense = divergence_on_support(kind, build_support(s, t, "teacher_topk", 3, mode), **PARAMS.get(kind, {}))
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("support", ["student_topk", "union"])
@pytest.mark.parametrize("mode", MODES)
def test_sparse_teacher_with_logprobs_on_the_students_ids(support, mode):
    s, t = random_logits(2, 3, 9, seed=25), random_logits(2, 3, 9, seed=26)
    teacher = sparse_from_dense(t, torch.topk(t, 4, dim=-1).indices,
                                extra_ids=torch.topk(s, 4, dim=-1).indices)
    for kind in DIVERGENCES:
        sparse = divergence_on_support(kind, build_support(s, teacher, support, 4, mode), **PARAMS.get(kind, {}))
        dense = divergence_on_support(kind, build_support(s, t, support, 4, mode), **PARAMS.get(kind, {}))
        torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)


def test_sparse_ties_lower_id_wins_whatever_the_slot_order():
    s = random_logits(1, 6, seed=27)
    tied = SparseTeacherLogprobs(ids=torch.tensor([[5, 3, 1, 0]]),
                                 logprobs=torch.log(torch.tensor([[0.2, 0.2, 0.2, 0.1]], dtype=F64)))
    assert build_support(s, tied, "teacher_topk", 2).ids.tolist() == [[1, 3]]


def test_sparse_gradcheck():
    s = random_logits(2, 7, seed=28).requires_grad_(True)
    t = random_logits(2, 7, seed=29)
    teacher = sparse_from_dense(t, torch.topk(t, 3, dim=-1).indices, extra_ids=torch.topk(s, 3, dim=-1).indices)
    for support, mode in itertools.product(TOPK_SUPPORTS, MODES):
        assert torch.autograd.gradcheck(
            lambda x: divergence_on_support("reverse_kl", build_support(x, teacher, support, 3, mode)), (s,))


def test_sparse_teacher_errors_say_what_works():
    s, t = random_logits(2, 3, 8, seed=30), random_logits(2, 3, 8, seed=31)
    teacher = sparse_from_dense(t, torch.topk(t, 4, dim=-1).indices)
    with pytest.raises(MathInputError, match="support: 'full' needs .*dense teacher.*use 'teacher_topk'"):
        build_support(s, teacher, "full")
    with pytest.raises(MathInputError, match="extra_ids"):
        build_support(s, teacher, "student_topk", 4, "tail")
    with pytest.raises(MathInputError, match=r"k: expected at most 4 \(the teacher top-k returned"):
        build_support(s, teacher, "teacher_topk", 5)
    with pytest.raises(MathInputError, match="teacher_temperature: a sparse teacher's tail"):
        build_support(s, teacher, "teacher_topk", 4, "tail", teacher_temperature=2.0)
    with pytest.raises(MathInputError, match=r"teacher.ids: expected ids in \[0, V\) with V = 8"):
        build_support(s, SparseTeacherLogprobs(teacher.ids + 5, teacher.logprobs), "teacher_topk", 2)
    with pytest.raises(MathInputError, match="teacher.logprobs: the probabilities sum to more than 1"):
        build_support(s, SparseTeacherLogprobs(teacher.ids, t.gather(-1, teacher.ids) + 5), "teacher_topk", 2)
    with pytest.raises(MathInputError, match="teacher.ids .*teacher.logprobs"):
        build_support(s, SparseTeacherLogprobs(teacher.ids, teacher.logprobs[..., :3]), "teacher_topk", 2)
    with pytest.raises(MathInputError, match=r"teacher.ids: expected shape \[2, 3, k\]"):
        build_support(s, SparseTeacherLogprobs(teacher.ids[:1], teacher.logprobs[:1]), "teacher_topk", 2)
    with pytest.raises(MathInputError, match="teacher.ids: expected an integer tensor"):
        build_support(s, SparseTeacherLogprobs(teacher.ids.double(), teacher.logprobs), "teacher_topk", 2)
    with pytest.raises(MathInputError, match="teacher.logprobs: expected finite"):
        build_support(s, SparseTeacherLogprobs(teacher.ids, teacher.logprobs * float("nan")), "teacher_topk", 2)
    with pytest.raises(MathInputError, match="extra_ids / teacher.extra_logprobs: expected both"):
        build_support(s, SparseTeacherLogprobs(teacher.ids, teacher.logprobs, extra_ids=teacher.ids),
                      "teacher_topk", 2)


def test_bad_support_arguments():
    s, t = random_logits(2, 5, seed=32), random_logits(2, 5, seed=33)
    too_large = r"k: expected an integer >= 1 and at most 5 \(the vocabulary size V = 5\), got 6"
    with pytest.raises(MathInputError, match=too_large):
        build_support(s, t, "teacher_topk", 6)
    for bad_k in (0, None, 2.5):
        with pytest.raises(MathInputError, match="k: expected an integer >= 1"):
            build_support(s, t, "union", bad_k)
    with pytest.raises(MathInputError, match="k: not used by support 'full'"):
        build_support(s, t, "full", 3)
    with pytest.raises(MathInputError, match="support: expected one of"):
        build_support(s, t, "top_p", 3)
    with pytest.raises(MathInputError, match="mode: expected one of"):
        build_support(s, t, "teacher_topk", 3, "truncated")
    with pytest.raises(MathInputError, match=r"student_logits \(2, 5\), teacher_logits \(2, 4\)"):
        build_support(s, t[:, :4], "teacher_topk", 3)
    with pytest.raises(MathInputError, match="teacher: expected teacher logits"):
        build_support(s, {"ids": None}, "teacher_topk", 3)
    with pytest.raises(MathInputError, match="beta: required"):
        divergence_on_support("generalized_jsd", build_support(s, t))


def test_top_k_positions_breaks_ties_to_the_lower_position_on_every_row():
    """The fast path (topk of k + 1) and the tie rule agree with the definition, rows with ties at the k-th value
    (integer-valued logits, -inf rows) and without mixed in one tensor."""
    generator = torch.Generator().manual_seed(0)
    for trial in range(60):
        n = int(torch.randint(2, 40, (1,), generator=generator))
        values = torch.randint(0, 5, (4, n), generator=generator).float()
        values[1] = torch.randn(n, generator=generator)             # a row without ties
        values[2, : n // 2] = float("-inf")
        k = int(torch.randint(1, n + 1, (1,), generator=generator))
        want = [sorted(sorted(range(n), key=lambda i: (-float(row[i]), i))[:k]) for row in values]
        assert top_k_positions(values, k).tolist() == want, (trial, k)
