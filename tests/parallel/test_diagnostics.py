"""Vocab-parallel vocabulary statistics (`parallel/diagnostics.py`: teacher confidence, entropies, top-k overlap,
student mass on the teacher's support) equal their single-device definitions (`math/diagnostics.py`'s
`batch_diagnostics`, `math/gates.py`, `math/regularizers.py::entropy`) at TP = 1, 2, 4 (one gloo process group per
TP size, `diagnostics_workers.stats_checks`), for a teacher logits shard and a server's sparse answer."""

from __future__ import annotations

import pytest
import torch

from opd_megatron.math.diagnostics import DiagnosticsBatch, DiagnosticsSettings, batch_diagnostics
from opd_megatron.parallel.diagnostics import (vocab_parallel_student_mass_on_teacher_support,
                                               vocab_parallel_teacher_confidence, vocab_parallel_topk_overlap,
                                               vocab_parallel_vocab_entropy)
from tests.harness import run_distributed
from tests.parallel import diagnostics_workers, supports_workers

# confidence (+ gate) and entropies (+ gate), then overlap + mass for 3 k, dense and sparse teacher
EXPECTED_STATS_CHECKS = 2 + 3 * 2


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_parallel_statistics_equal_reference(tp):
    checks = run_distributed(diagnostics_workers.stats_checks, world_size=tp, args=(tp,), timeout_s=240)
    assert checks == [EXPECTED_STATS_CHECKS] * tp


def test_leading_dims_are_kept():
    student = supports_workers.random_logits(0).reshape(2, 3, -1)
    teacher = supports_workers.random_logits(1).reshape(2, 3, -1)
    assert vocab_parallel_topk_overlap(student, teacher, 4).shape == (2, 3)


def test_single_process_without_distributed_equals_batch_diagnostics():
    student, teacher = supports_workers.random_logits(0), supports_workers.random_logits(1)
    tau_s, tau_t, k = 0.7, 1.3, 5
    want = batch_diagnostics(DiagnosticsBatch(student_logits=student, teacher_logits=teacher),
                             DiagnosticsSettings(top_k=k, student_temperature=tau_s, teacher_temperature=tau_t))
    got = {"agreement/topk_overlap": vocab_parallel_topk_overlap(student, teacher, k),
           "agreement/student_mass_on_teacher_support": vocab_parallel_student_mass_on_teacher_support(
               student, teacher, k, tau_s),
           "entropy/teacher": vocab_parallel_vocab_entropy(teacher, tau_t),
           "entropy/student": vocab_parallel_vocab_entropy(student, tau_s)}
    for key, values in got.items():
        assert float(values.mean()) == pytest.approx(want[key], rel=1e-12, abs=1e-12), key
    confidence = vocab_parallel_teacher_confidence(teacher, tau_t)
    torch.testing.assert_close(confidence, torch.softmax(teacher / tau_t, -1).max(-1).values, rtol=1e-12, atol=0)
