"""GPU paths, selected automatically where a GPU is present: NCCL, bf16, TransformerEngine's layer spec."""

import pytest
import torch

from tests.harness import run_distributed
from tests.student import gpu_workers as gw

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_training_on_gpu_uses_nccl_and_te_when_installed():
    result = run_distributed(gw.bf16_steps, 1, args=(1, 5), timeout_s=300)[0]
    assert result["device"].startswith("cuda") and result["backend"] == "nccl"
    assert result["param_dtype"] == "torch.bfloat16"
    assert result["losses"][-1] < result["losses"][0]
    if result["te"]:
        assert result["qkv_layer"].startswith("TE"), result["qkv_layer"]
    else:
        assert result["qkv_layer"] == "ColumnParallelLinear"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_on_two_gpus_matches_tp1_loss_at_first_step():
    tp1 = run_distributed(gw.bf16_steps, 1, args=(1, 1), timeout_s=300)[0]["losses"][0]
    tp2 = run_distributed(gw.bf16_steps, 2, args=(2, 1), timeout_s=300)[0]["losses"][0]
    assert abs(tp1 - tp2) <= 2e-2 * tp1  # bf16
