"""compute/student_flops, the x axis of equal-compute comparisons: 6 N per trained token, 2 N per rollout token."""

import torch

from opd_megatron.loop.metrics import student_compute
from opd_megatron.student.model import parameter_count


def test_student_compute_counts_rollouts_only_for_sampled_rows():
    lengths = torch.tensor([10.0, 7.0, 3.0])
    on_policy = torch.tensor([1.0, 0.0, 1.0])           # the middle row is a fixed-dataset row: no rollout
    out = student_compute(lengths, on_policy, parameters=1000)
    assert out["compute/student_trained_tokens"] == 20.0
    assert out["compute/student_rollout_tokens"] == 13.0
    assert out["compute/student_flops"] == (6 * 20 + 2 * 13) * 1000
    offline = student_compute(lengths, torch.zeros(3), parameters=1000)
    assert offline["compute/student_flops"] == 6 * 20 * 1000


def test_student_parameters_without_a_process_group():
    module = torch.nn.Linear(4, 3)                      # 12 weights + 3 biases
    assert parameter_count(module) == 15
