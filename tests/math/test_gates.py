"""Token gates: each keep set against a direct check, their product as w_t, keep rates over masked tokens, the
truncated importance-sampling boundaries, and refused bad input."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from opd_megatron.math.gates import (GateConfig, clip_log_ratio, log_ratio_gate, sign_gate, student_entropy_gate,
                                     teacher_confidence_gate, teacher_entropy_gate, token_weights,
                                     truncated_importance_weight)
from opd_megatron.math.checks import MathInputError

F64 = torch.float64


def entropy_direct(logits):
    """H(softmax(z)) by a Python loop over the vocabulary."""
    out = torch.zeros(logits.shape[:-1], dtype=F64)
    for index in torch.cartesian_prod(*[torch.arange(n) for n in logits.shape[:-1]]).reshape(-1, logits.dim() - 1):
        row = logits[tuple(index)]
        p = [math.exp(x - max(row.tolist())) for x in row.tolist()]
        total = sum(p)
        out[tuple(index)] = -sum(pi / total * math.log(pi / total) for pi in p if pi > 0)
    return out


def between(values):
    """A threshold halfway between two middle values, so rounding cannot decide the comparison."""
    ordered = values.flatten().sort().values
    middle = len(ordered) // 2
    return float((ordered[middle - 1] + ordered[middle]) / 2)


def batch(seed=0, b=3, t=5, v=6):
    g = torch.Generator().manual_seed(seed)
    return dict(teacher_logits=3 * torch.randn(b, t, v, generator=g, dtype=F64),
                student_logits=3 * torch.randn(b, t, v, generator=g, dtype=F64),
                log_ratio=2 * torch.randn(b, t, generator=g, dtype=F64),
                student_logprobs=-torch.rand(b, t, generator=g, dtype=F64) * 2,
                behaviour_logprobs=-torch.rand(b, t, generator=g, dtype=F64) * 2)


def test_teacher_confidence_gate_dense_and_sparse():
    x = batch(seed=1)
    q = torch.softmax(x["teacher_logits"], -1)
    c = between(q.max(-1).values)
    expected = q.max(-1).values >= c
    assert torch.equal(teacher_confidence_gate(c, teacher_logits=x["teacher_logits"]), expected)
    top = torch.log_softmax(x["teacher_logits"], -1).topk(2, -1)
    assert torch.equal(teacher_confidence_gate(c, teacher_topk_logprobs=top.values), expected)
    assert expected.any() and not expected.all()
    hot = teacher_confidence_gate(c, teacher_logits=x["teacher_logits"], teacher_temperature=0.25)
    assert torch.equal(hot, torch.softmax(x["teacher_logits"] / 0.25, -1).max(-1).values >= c)


def test_entropy_gates_against_a_direct_entropy():
    x = batch(seed=2)
    h_teacher = entropy_direct(x["teacher_logits"])
    h_student = entropy_direct(x["student_logits"])
    h = between(h_teacher)
    assert torch.equal(teacher_entropy_gate(x["teacher_logits"], h), h_teacher <= h)
    hs = between(h_student)
    assert torch.equal(student_entropy_gate(x["student_logits"], hs), h_student >= hs)
    assert torch.equal(student_entropy_gate(x["student_logits"], hs, keep="low"), h_student <= hs)
    # A one-hot teacher (other logits -inf) has entropy 0, not NaN.
    one_hot = torch.tensor([[0.0, -math.inf, -math.inf]], dtype=F64)
    assert teacher_entropy_gate(one_hot, 0.0).tolist() == [True]


def test_sign_and_log_ratio_gates():
    r = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], dtype=F64)
    assert sign_gate(r, "negative").tolist() == [True, True, False, False, False]
    assert sign_gate(r, "positive").tolist() == [False, False, False, True, True]
    assert log_ratio_gate(r, 0.5).tolist() == [False, True, True, True, False]
    assert clip_log_ratio(r, 0.5).tolist() == [-0.5, -0.5, 0.0, 0.5, 0.5]


def test_truncated_importance_weight_boundaries_are_kept():
    behaviour = torch.zeros(6, dtype=F64)
    ratios = [0.4999, 0.5, 1.0, 1.7, 2.0, 2.0001]
    student = torch.log(torch.tensor(ratios, dtype=F64))
    weight, inside = truncated_importance_weight(student, behaviour, 0.5, 2.0)
    assert inside.tolist() == [False, True, True, True, True, False]
    torch.testing.assert_close(weight, torch.tensor([0.0, 0.5, 1.0, 1.7, 2.0, 0.0], dtype=F64), rtol=1e-15, atol=0)
    # No gradient flows through the weight (sg).
    student.requires_grad_()
    weight, _ = truncated_importance_weight(student, behaviour)
    assert not weight.requires_grad


def test_product_and_keep_rates():
    x = batch(seed=3)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2] = False
    config = GateConfig(teacher_confidence=0.3, teacher_entropy=1.2, student_entropy=0.6, sign="negative",
                        log_ratio_clip=2.5, truncated_is=(0.5, 2.0))
    result = token_weights(config, mask, **x)
    q = torch.softmax(x["teacher_logits"], -1)
    gates = {"teacher_confidence": q.max(-1).values >= 0.3,
             "teacher_entropy": entropy_direct(x["teacher_logits"]) <= 1.2,
             "student_entropy": entropy_direct(x["student_logits"]) >= 0.6,
             "sign": x["log_ratio"] < 0,
             "log_ratio_clip": x["log_ratio"].abs() <= 2.5}
    ratio = torch.exp(x["student_logprobs"] - x["behaviour_logprobs"])
    gates["truncated_is"] = (ratio >= 0.5) & (ratio <= 2.0)
    kept = mask.clone()
    for gate in gates.values():
        kept &= gate
    torch.testing.assert_close(result.weights, torch.where(kept, ratio, 0.0), rtol=1e-15, atol=0)
    assert torch.equal(result.keep, kept)
    total = int(mask.sum())
    expected_rates = {name: int((gate & mask).sum()) / total for name, gate in gates.items()}
    expected_rates["all"] = int(kept.sum()) / total
    assert result.keep_rates == pytest.approx(expected_rates, abs=1e-15)
    assert 0 < result.keep_rates["all"] < 1
    assert torch.equal(result.log_ratio, x["log_ratio"])


def test_no_gate_is_the_mask_and_clip_mode_drops_nothing():
    x = batch(seed=4)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(0)) < 0.6
    result = token_weights(GateConfig(), mask)
    assert torch.equal(result.weights, mask.to(result.weights.dtype))
    assert result.keep_rates == {"all": 1.0}
    result = token_weights(GateConfig(log_ratio_clip=1.0, log_ratio_clip_mode="clip"), mask, log_ratio=x["log_ratio"])
    assert torch.equal(result.keep, mask)
    assert torch.equal(result.log_ratio, x["log_ratio"].clamp(-1.0, 1.0))
    inside = (x["log_ratio"].abs() <= 1.0) & mask
    assert result.keep_rates["log_ratio_clip"] == pytest.approx(int(inside.sum()) / int(mask.sum()), abs=1e-15)
    empty = token_weights(GateConfig(sign="positive"), torch.zeros(3, 5), log_ratio=x["log_ratio"])
    assert empty.keep_rates == {"sign": 0.0, "all": 0.0} and not empty.weights.any()


def test_bad_input_names_the_argument():
    x = batch(seed=5)
    mask = torch.ones(3, 5)
    for name, kwargs in [("teacher_confidence", dict(teacher_confidence=0.0)),
                         ("teacher_confidence", dict(teacher_confidence=1.5)),
                         ("teacher_entropy", dict(teacher_entropy=-1.0)),
                         ("student_entropy", dict(student_entropy=math.nan)),
                         ("student_entropy_keep", dict(student_entropy_keep="middle")),
                         ("sign", dict(sign="zero")),
                         ("log_ratio_clip", dict(log_ratio_clip=0.0)),
                         ("log_ratio_clip_mode", dict(log_ratio_clip_mode="cut")),
                         ("truncated_is", dict(truncated_is=(1.2, 2.0))),
                         ("truncated_is", dict(truncated_is=(0.5, 0.9))),
                         ("truncated_is", dict(truncated_is=(-0.1, 2.0))),
                         ("truncated_is", dict(truncated_is=(0.5,)))]:
        with pytest.raises(MathInputError, match=name):
            GateConfig(**kwargs)
    with pytest.raises(MathInputError, match="teacher_logits"):
        token_weights(GateConfig(teacher_entropy=1.0), mask)
    with pytest.raises(MathInputError, match="behaviour_logprobs"):
        token_weights(GateConfig(truncated_is=(0.5, 2.0)), mask, student_logprobs=x["student_logprobs"])
    with pytest.raises(MathInputError, match="log_ratio"):
        token_weights(GateConfig(sign="negative"), mask, log_ratio=x["log_ratio"][:, :-1])
    with pytest.raises(MathInputError, match="teacher_logits"):
        nan = x["teacher_logits"].clone()
        nan[0, 0, 0] = math.nan
        token_weights(GateConfig(teacher_confidence=0.5), mask, teacher_logits=nan)
    with pytest.raises(MathInputError, match="mask"):
        token_weights(GateConfig(), torch.full((3, 5), 0.3))
    with pytest.raises(MathInputError, match="teacher_temperature"):
        teacher_entropy_gate(x["teacher_logits"], 1.0, teacher_temperature=0.0)


@settings(max_examples=50, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 5), v=st.integers(1, 8), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([1.0, 1e4]), keep_share=st.sampled_from([0.0, 0.5, 1.0]),
       tau=st.sampled_from([0.5, 1.0, 2.0]))
def test_property_weights_finite_and_rates_in_unit_interval(b, t, v, seed, scale, keep_share, tau):
    g = torch.Generator().manual_seed(seed)
    x = dict(teacher_logits=scale * torch.randn(b, t, v, generator=g, dtype=F64),
             student_logits=scale * torch.randn(b, t, v, generator=g, dtype=F64),
             log_ratio=scale * torch.randn(b, t, generator=g, dtype=F64),
             student_logprobs=-scale * torch.rand(b, t, generator=g, dtype=F64),
             behaviour_logprobs=-scale * torch.rand(b, t, generator=g, dtype=F64))
    mask = torch.rand(b, t, generator=g) < keep_share
    mask[0] = False  # an all-padding row
    config = GateConfig(teacher_confidence=0.5, teacher_entropy=1.0, student_entropy=0.1, sign="negative",
                        log_ratio_clip=3.0, truncated_is=(0.5, 2.0))
    result = token_weights(config, mask, student_temperature=tau, teacher_temperature=tau, **x)
    assert torch.isfinite(result.weights).all() and (result.weights >= 0).all()
    assert (result.weights[~mask] == 0).all()
    assert all(0.0 <= rate <= 1.0 for rate in result.keep_rates.values())
    assert result.keep_rates["all"] <= min(rate for name, rate in result.keep_rates.items() if name != "all")
