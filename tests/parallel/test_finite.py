"""`parallel/finite.py::nonfinite_on_any_tp_rank` answers "is there a NaN or +inf?" exactly (-inf is a legal logit:
padding, masked ids), whichever path it takes: a sum whose value settles it, or the element-wise check when the sum
does not (an overflow of finite values, +inf or NaN)."""

import pytest
import torch

from opd_megatron.parallel import finite
from opd_megatron.parallel.finite import nonfinite_on_any_tp_rank

INF, NAN = float("inf"), float("nan")


def _logits(*values: float) -> torch.Tensor:
    x = torch.randn(3, 5, 70)
    for i, v in enumerate(values):
        x[1, i, 7 * i] = v
    return x


@pytest.mark.parametrize("values, expected", [
    ((), False), ((-INF,), False), ((-INF, -INF), False), ((INF,), True), ((NAN,), True), ((INF, -INF), True),
    ((NAN, -INF), True), ((3e38, 3e38), False), ((-3e38, -3e38), False), ((3e38, 3e38, INF), True),
])
def test_nan_and_positive_infinity_only(values, expected):
    assert nonfinite_on_any_tp_rank(_logits(*values)) is expected


def test_a_second_shard_and_absent_ones():
    assert nonfinite_on_any_tp_rank(_logits(), None, _logits(NAN)) is True
    assert nonfinite_on_any_tp_rank(None, _logits(-INF)) is False


def test_a_finite_sum_settles_it_without_the_elementwise_check(monkeypatch):
    """The common case (every logit finite, or some -inf) costs one reduction: the element-wise pass runs only
    when the sum is +inf or NaN."""
    calls = []
    original = finite._has_nan_or_posinf

    def counted(t):
        calls.append(1)
        return original(t)

    monkeypatch.setattr(finite, "_has_nan_or_posinf", counted)
    assert nonfinite_on_any_tp_rank(_logits(-INF), _logits()) is False
    assert calls == []
    assert nonfinite_on_any_tp_rank(_logits(3e38, 3e38)) is False      # the sum overflows: checked element-wise
    assert calls == [1]


@pytest.mark.parametrize("bad, expected", [(None, True), (NAN, False), (INF, False), (-INF, False)])
def test_all_finite_over_several_tensors(bad, expected):
    tensors = [torch.randn(4, 5), torch.randn(7)]
    if bad is not None:
        tensors[1][3] = bad
    assert finite.all_finite(tensors) is expected


def test_all_finite_tells_an_overflowing_sum_from_an_infinity():
    assert finite.all_finite([torch.full((4,), 3e38), torch.full((4,), 3e38)]) is True
    assert finite.all_finite([]) is True
