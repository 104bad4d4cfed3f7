"""megatron's optimizer (Adam, and the parity tests' plain SGD) on the CPU takes the same step as a single-process
PyTorch reference."""

import pytest

from tests.harness import run_distributed
from tests.student import optimizer_workers as ow
from tests.student import parity_workers as pw


@pytest.mark.parametrize("extra", [
    ("optim.clip_grad=1.0", "optim.warmup_steps=0", "optim.decay_style=cosine"),
    ("optim.clip_grad=0.05", "optim.warmup_steps=2", "optim.decay_style=linear", "optim.min_lr=1e-4"),
    pw.SGD,  # the parity tests' optimizer: its update must be exactly -lr * (the token-mean gradient)
], ids=["cosine", "warmup-linear-clipping", "sgd"])
def test_megatron_optimizer_equals_pytorch_reference(extra):
    result = run_distributed(ow.megatron_vs_reference, 1, args=(4, extra), timeout_s=180)[0]
    assert result["moved"] > 1e-4                # the weights did change
    assert result["worst_rel"] <= 1e-5, result
    for ours, ref in result["grad_norms"]:
        assert abs(ours - ref) <= 1e-5 * ref
    lrs = result["lrs"]
    if extra == pw.SGD:
        assert lrs == [pytest.approx(0.5)] * 4  # constant
    elif "optim.warmup_steps=2" in extra:
        # megatron's warmup starts from 0 at the first step, reaches lr after warmup_steps steps, then decays.
        assert lrs[0] == 0.0 and lrs[1] == pytest.approx(5e-4) and lrs[2] == pytest.approx(1e-3)
        assert lrs[3] < lrs[2]
    else:
        assert lrs[0] == pytest.approx(1e-3) and lrs[1] < lrs[0]
