"""Property tests over shapes, masks (all-padding rows included), extreme logits (+-1e4, masked -inf entries) and
temperatures: no NaN or inf, divergences >= 0, supports below the full loss in tail mode, reductions finite."""

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from opd_megatron.math.divergences import DIVERGENCES, divergence_from_log_probs, reduce_loss
from opd_megatron.math.regularizers import entropy
from opd_megatron.math.supports import MODES, build_support, divergence_on_support

SETTINGS = settings(max_examples=60, deadline=None)
PARAMS = {"generalized_jsd": {"beta": 0.3}, "skew_forward_kl": {"alpha": 0.1}, "skew_reverse_kl": {"alpha": 0.1}}
NOISE = 1e-12
# Mostly moderate logits, with the extremes and masked entries drawn often enough to matter.
LOGIT = st.one_of(st.floats(-30, 30), st.sampled_from([1e4, -1e4, float("-inf")]), st.floats(-1e4, 1e4))
TEMPERATURE = st.floats(0.05, 20.0)


@st.composite
def logit_pairs(draw, shared_mask=True):
    """student and teacher logits [B, T, V] float64, at least one finite logit per position; with
    shared_mask the -inf entries (a masked vocabulary) are the same on both sides."""
    b, t, v = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 8))
    student = draw(arrays(np.float64, (b, t, v), elements=LOGIT))
    teacher = draw(arrays(np.float64, (b, t, v), elements=LOGIT))
    if shared_mask:
        masked = np.isneginf(student) | np.isneginf(teacher)
        student[masked] = -np.inf
        teacher[masked] = -np.inf
    for logits in (student, teacher):  # with a shared mask the all-masked rows coincide: it stays shared
        logits[np.isneginf(logits).all(axis=-1), 0] = 0.0
    return torch.from_numpy(student), torch.from_numpy(teacher)


def finite_and_nonnegative(value):
    return bool(torch.isfinite(value).all()) and bool((value >= -NOISE).all())


@SETTINGS
@given(pair=logit_pairs(), tau_s=TEMPERATURE, tau_t=TEMPERATURE)
def test_full_vocabulary_divergences_are_finite_nonnegative_with_finite_gradients(pair, tau_s, tau_t):
    student, teacher = pair
    student.requires_grad_(True)
    supported = build_support(student, teacher, "full", student_temperature=tau_s, teacher_temperature=tau_t)
    for kind in DIVERGENCES:
        value = divergence_on_support(kind, supported, **PARAMS.get(kind, {}))
        assert value.shape == student.shape[:-1]
        assert finite_and_nonnegative(value), kind
        if kind == "total_variation":
            assert (value <= 1 + NOISE).all()
        if kind == "generalized_jsd":  # JSD_beta <= h(beta), the entropy of the mixture's coin
            assert (value <= -(0.3 * math.log(0.3) + 0.7 * math.log(0.7)) + NOISE).all()
        (grad,) = torch.autograd.grad(value.sum(), student, retain_graph=True)
        assert torch.isfinite(grad).all(), kind


@SETTINGS
@given(pair=logit_pairs(shared_mask=False), tau_s=TEMPERATURE)
def test_unshared_masks_give_no_nan_and_bounded_divergences_stay_finite(pair, tau_s):
    # Where one side masks a token the other does not, plain KLs may be +inf (true value); never NaN. The
    # mixture-based divergences (JSD, skews with alpha > 0) and TV stay finite.
    student, teacher = pair
    supported = build_support(student, teacher, "full", student_temperature=tau_s)
    for kind in DIVERGENCES:
        value = divergence_on_support(kind, supported, **PARAMS.get(kind, {}))
        assert not torch.isnan(value).any() and (value >= -NOISE).all(), kind
        if kind not in ("forward_kl", "reverse_kl"):
            assert torch.isfinite(value).all(), kind


@SETTINGS
@given(pair=logit_pairs(), data=st.data(), tau_s=TEMPERATURE, tau_t=TEMPERATURE)
def test_top_k_supports_finite_nonnegative_and_tail_below_full(pair, data, tau_s, tau_t):
    student, teacher = pair
    student.requires_grad_(True)
    vocab = student.shape[-1]
    k = data.draw(st.integers(1, vocab))
    support = data.draw(st.sampled_from(["teacher_topk", "student_topk", "union"]))
    mode = data.draw(st.sampled_from(MODES))
    supported = build_support(student, teacher, support, k, mode, student_temperature=tau_s,
                              teacher_temperature=tau_t)
    full = build_support(student, teacher, "full", student_temperature=tau_s, teacher_temperature=tau_t)
    for kind in DIVERGENCES:
        value = divergence_on_support(kind, supported, **PARAMS.get(kind, {}))
        assert finite_and_nonnegative(value), (kind, supported.name)
        if mode == "tail":
            full_value = divergence_on_support(kind, full, **PARAMS.get(kind, {}))
            assert (value <= full_value + 1e-9 * (1 + full_value.abs())).all(), (kind, supported.name)
        (grad,) = torch.autograd.grad(value.sum(), student, retain_graph=True)
        assert torch.isfinite(grad).all(), (kind, supported.name)


@SETTINGS
@given(pair=logit_pairs(), tau=TEMPERATURE)
def test_float32_extremes_stay_finite(pair, tau):
    student, teacher = (x.float() for x in pair)
    for kind in DIVERGENCES:
        value = divergence_on_support(kind, build_support(student, teacher, "full", student_temperature=tau),
                                      **PARAMS.get(kind, {}))
        assert value.dtype == torch.float32 and torch.isfinite(value).all() and (value >= -1e-5).all(), kind


@SETTINGS
@given(pair=logit_pairs(), beta=st.floats(0, 1), alpha=st.floats(0, 1))
def test_any_beta_and_alpha_in_the_unit_interval(pair, beta, alpha):
    student, teacher = pair
    lp, lq = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    for kind, params in (("generalized_jsd", {"beta": beta}), ("skew_forward_kl", {"alpha": alpha}),
                         ("skew_reverse_kl", {"alpha": alpha})):
        assert finite_and_nonnegative(divergence_from_log_probs(kind, lp, lq, **params)), (kind, params)


@st.composite
def masked_batches(draw):
    b, t = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    per_position = draw(arrays(np.float64, (b, t), elements=st.floats(0, 1e4)))
    mask = draw(arrays(np.bool_, (b, t)))
    padding_rows = draw(arrays(np.bool_, (b,)))
    mask[padding_rows] = False  # all-padding rows, often the whole batch
    return torch.from_numpy(per_position), torch.from_numpy(mask)


@SETTINGS
@given(batch=masked_batches())
def test_reductions_finite_and_equal_to_their_definitions(batch):
    per_position, mask = batch
    per_position = per_position.masked_fill(~mask, float("inf"))  # padding may hold anything
    kept = per_position.masked_fill(~mask, 0.0)
    tokens = int(mask.sum())
    rows = [i for i in range(mask.shape[0]) if mask[i].any()]
    want = {"token_mean": kept.sum() / tokens if tokens else 0.0,
            "sequence_mean": (sum(kept[i].sum() / mask[i].sum() for i in rows) / len(rows)) if rows else 0.0,
            "constant": kept.sum() / (mask.shape[0] * 7)}
    for normalizer, expected in want.items():
        value = reduce_loss(per_position, mask, normalizer, max_length=7 if normalizer == "constant" else None)
        assert torch.isfinite(value)
        assert abs(float(value) - float(expected)) <= 1e-12 * (1 + abs(float(expected)))


@SETTINGS
@given(pair=logit_pairs(), tau=TEMPERATURE)
def test_entropy_between_zero_and_log_of_the_unmasked_vocabulary(pair, tau):
    logits, _ = pair
    value = entropy(logits, tau)
    allowed = (~torch.isneginf(logits)).sum(-1).double().log()
    assert torch.isfinite(value).all() and (value >= -NOISE).all() and (value <= allowed + 1e-9).all()

