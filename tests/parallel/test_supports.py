"""Vocab-parallel supports (`parallel/supports.py`) equal their single-device reference (`math/supports.py`) at
TP = 1, 2, 4 (one gloo process group per TP size runs every check,
`supports_workers.all_checks`); argument errors are checked in this process (raised before any communication;
those that read values on the host, with the debug checks on)."""

from __future__ import annotations

import pytest
import torch

from opd_megatron.math.supports import build_support, divergence_on_support
from opd_megatron.parallel.supports import vocab_parallel_build_support
from opd_megatron.math.checks import MathInputError
from opd_megatron.parallel.shard import debug_checks
from tests.harness import run_distributed
from tests.parallel import supports_workers as workers

# supports x modes x divergence kinds: random logits dense (4 k) + sparse (3 k), tied logits dense + sparse (2 k)
# + precision checks: (float32, float32 underflowing tail, float64 underflowing tail) x dense/sparse x supports x modes
EXPECTED_SUPPORT_CHECKS = 3 * 2 * 2 * (4 + 3 + 2 + 2) + 3 * 2 * 3 * (2 + 1)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_parallel_supports_equal_reference(tp):
    checks = run_distributed(workers.all_checks, world_size=tp, args=(tp,), timeout_s=240)
    assert checks == [EXPECTED_SUPPORT_CHECKS] * tp


def test_single_process_without_distributed_equals_reference():
    student, teacher = workers.random_logits(0), workers.random_logits(1)
    for mode in workers.MODES:
        got = vocab_parallel_build_support(student, teacher, "union", 5, mode, student_temperature=0.7)
        want = build_support(student, teacher, "union", 5, mode, student_temperature=0.7)
        assert torch.equal(got.ids, want.ids)
        workers.assert_close(mode, divergence_on_support("reverse_kl", got), divergence_on_support("reverse_kl", want))


def test_leading_dims_are_kept():
    student, teacher = workers.random_logits(0).reshape(2, 3, -1), workers.random_logits(1).reshape(2, 3, -1)
    got = vocab_parallel_build_support(student, teacher, "teacher_topk", 4, "tail")
    assert got.student_logp.shape == (2, 3, 5) and got.ids.shape == (2, 3, 4)


def test_argument_errors_name_the_argument():
    student, teacher = workers.random_logits(0), workers.random_logits(1)
    served = workers.sparse_teacher(teacher, student)
    with pytest.raises(MathInputError, match="support: 'full' is not built vocab-parallel"):
        vocab_parallel_build_support(student, teacher, "full", 5)
    with pytest.raises(MathInputError, match="support: "):
        vocab_parallel_build_support(student, teacher, "bogus", 5)
    with pytest.raises(MathInputError, match="k: .*at most 37"):
        vocab_parallel_build_support(student, teacher, "teacher_topk", 38)
    with pytest.raises(MathInputError, match="k: expected at most 12"):
        vocab_parallel_build_support(student, served, "teacher_topk", 13)
    with pytest.raises(MathInputError, match="teacher_temperature: a sparse teacher's tail"):
        vocab_parallel_build_support(student, served, "teacher_topk", 5, "tail", teacher_temperature=2.0)
    with pytest.raises(MathInputError, match="true_vocab_size"):
        vocab_parallel_build_support(student, teacher, "teacher_topk", 5, true_vocab_size=38)
    with pytest.raises(MathInputError, match="teacher: expected a teacher logits shard"):
        vocab_parallel_build_support(student, [1.0], "teacher_topk", 5)
    foreign = served.ids.clone()
    foreign[0, 0] = workers.VOCAB  # a server id outside the student's vocabulary
    with debug_checks(), pytest.raises(MathInputError, match=r"teacher.ids: expected ids in \[0, V\) with V = 37"):
        vocab_parallel_build_support(student, workers.SparseTeacherLogprobs(foreign, served.logprobs),
                                     "teacher_topk", 5)
    without_extras = workers.SparseTeacherLogprobs(served.ids, served.logprobs)
    with debug_checks(), pytest.raises(MathInputError, match="teacher: support 'student_topk' needs"):
        vocab_parallel_build_support(student, without_extras, "student_topk", 12)


def test_float32_within_1e5_relative():
    student, teacher = workers.random_logits(0).float(), workers.random_logits(1).float()
    for mode in workers.MODES:
        leaf, ref_leaf = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
        got = divergence_on_support("forward_kl", vocab_parallel_build_support(leaf, teacher, "union", 5, mode))
        want = divergence_on_support("forward_kl", build_support(ref_leaf, teacher, "union", 5, mode))
        got.sum().backward()
        want.sum().backward()
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-5, atol=1e-6)


def test_tail_gradient_passes_gradcheck():
    """`_SupportTail`'s closed-form backward against finite differences (float64, tp = 1): both outputs (the
    support slots and the tail bucket), every support with a dense and a sparse teacher, ordinary and peaked
    logits (a tail of mass ~exp(-800), recomputed with the complement's own shift), and a divergence on top.
    (keep_softmax turns its kept values into the gradient in place, so it allows one backward per graph, not
    gradcheck's several: `test_kept_tail_values_allow_one_backward`; its values are held to the reference by the
    precision checks of `supports_workers.py`.)"""
    student, teacher = workers.random_logits(0)[:3], workers.random_logits(1)[:3]
    peaked = workers.peaked_logits(workers.random_logits(0), workers.random_logits(1), 5, 800.0)[:3]
    served = workers.sparse_teacher(workers.random_logits(1), workers.random_logits(0))
    served = workers.SparseTeacherLogprobs(*(None if t is None else t[:3] for t in (served.ids, served.logprobs,
                                                                                  served.extra_ids,
                                                                                  served.extra_logprobs)))
    for logits in (student, peaked):
        for support in workers.SUPPORTS:
            for given in (teacher, served):
                def slots_and_tail(x, given=given, support=support):
                    supported = vocab_parallel_build_support(x, given, support, 5, "tail", student_temperature=0.7,
                                                             chunk_size=2)
                    logp = supported.student_logp
                    return (logp.masked_fill(torch.isinf(logp), 0.0),
                            divergence_on_support("forward_kl", supported))
                assert torch.autograd.gradcheck(slots_and_tail, (logits.clone().requires_grad_(True),))


def test_kept_tail_values_allow_one_backward():
    """keep_softmax scales the kept tail values into the gradient in place: the gradient equals the recomputing
    path's, and a second backward through the same graph is refused with a message, not computed from the scaled
    buffer."""
    student, teacher = workers.random_logits(0), workers.random_logits(1)
    grads = []
    for keep in (False, True):
        leaf = student.clone().requires_grad_(True)
        loss = divergence_on_support("forward_kl", vocab_parallel_build_support(
            leaf, teacher, "union", 5, "tail", chunk_size=4, keep_softmax=keep)).sum()
        loss.backward(retain_graph=True)
        grads.append(leaf.grad.clone())
        if keep:
            with pytest.raises(RuntimeError, match="keep_softmax=False"):
                loss.backward()
    workers.assert_close("kept grad", grads[1], grads[0])


def test_a_rank_holding_only_padding():
    """TP=2 over 6 ids padded to 8 a rank: the second rank owns no real id; the tail support, kept or recomputed,
    still equals the reference (the kept path once indexed the empty shard)."""
    assert run_distributed(workers.padding_only_rank_checks, world_size=2, args=(2,), timeout_s=240) == [2, 2]
