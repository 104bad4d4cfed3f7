"""The report's compute axis: x = cumulative/<key> is the running sum of a per-step key (compute/student_flops),
each step counted once (a resumed run logs a step again), 0 at the evaluation before the first step."""

from opd_megatron.tools.sweep import series, with_running_sum


def test_cumulative_x_sums_per_step_values_once_per_step():
    records = [{"step": 0, "eval/score": 0.1},                              # before training
               {"step": 1, "compute/student_flops": 10.0},
               {"step": 2, "compute/student_flops": 20.0, "eval/score": 0.3},
               {"step": 2, "compute/student_flops": 20.0},                   # a resumed run logs step 2 again
               {"step": 3, "compute/student_flops": 40.0},
               {"step": 3, "eval/score": 0.6}]                              # the final evaluation, its own record
    assert series(records, "cumulative/compute/student_flops", "eval/score") == [(0.0, 0.1), (30.0, 0.3),
                                                                                 (70.0, 0.6)]
    summed = with_running_sum(records, "compute/student_flops")
    assert [r["cumulative/compute/student_flops"] for r in summed] == [0.0, 10.0, 30.0, 30.0, 70.0, 70.0]
    assert series(records, "step", "eval/score") == [(0.0, 0.1), (2.0, 0.3), (3.0, 0.6)]
