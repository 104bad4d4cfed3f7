"""Process bodies for `test_diagnostics.py` (importable: spawned processes load them), on the inputs of
`supports_workers.py`: each rank keeps its shard of the same full logits (vocabulary 37 padded to a multiple of tp
with LARGE values) and compares the vocab-parallel statistics with their single-device definitions on the
unpadded logits."""

from __future__ import annotations

import torch

from opd_megatron.math.diagnostics import DiagnosticsBatch, DiagnosticsSettings, batch_diagnostics
from opd_megatron.math.gates import teacher_confidence_gate, teacher_entropy_gate
from opd_megatron.math.regularizers import entropy as ref_entropy
from opd_megatron.math.supports import top_k_positions
from opd_megatron.parallel.diagnostics import (vocab_parallel_student_mass_on_teacher_support,
                                               vocab_parallel_teacher_confidence, vocab_parallel_topk_overlap,
                                               vocab_parallel_vocab_entropy)
from tests.parallel.supports_workers import (K_SERVED, N, TAU_S, TAU_T, TOL, VOCAB, _init, assert_close,
                                             random_logits, shard_of, sparse_teacher)


def _check_stats(student_full, teacher_full, tp: int, rank: int) -> int:
    student, teacher = shard_of(student_full, tp, rank), shard_of(teacher_full, tp, rank)
    logq = torch.log_softmax(teacher_full / TAU_T, dim=-1)
    confidence = vocab_parallel_teacher_confidence(teacher, TAU_T, VOCAB)
    assert_close("confidence", confidence, logq.max(dim=-1).values.exp())
    for threshold in (0.2, 0.5):
        assert torch.equal(confidence >= threshold, teacher_confidence_gate(
            threshold, teacher_logits=teacher_full, teacher_temperature=TAU_T)), threshold
    teacher_entropy = vocab_parallel_vocab_entropy(teacher, TAU_T, VOCAB)
    student_entropy = vocab_parallel_vocab_entropy(student, TAU_S, VOCAB)
    assert_close("teacher entropy", teacher_entropy, ref_entropy(teacher_full, TAU_T))
    assert_close("student entropy", student_entropy, ref_entropy(student_full, TAU_S))
    for max_entropy in (1.5, 2.5):
        assert torch.equal(teacher_entropy <= max_entropy, teacher_entropy_gate(teacher_full, max_entropy, TAU_T))
    checks = 2
    served = sparse_teacher(teacher_full, student_full)
    for k in (1, 5, K_SERVED):
        ref = batch_diagnostics(DiagnosticsBatch(student_logits=student_full, teacher_logits=teacher_full),
                                DiagnosticsSettings(top_k=k, student_temperature=TAU_S, teacher_temperature=TAU_T))
        ref_served = batch_diagnostics(DiagnosticsBatch(student_logits=student_full, teacher_topk_ids=served.ids,
                                                        teacher_topk_logprobs=served.logprobs),
                                       DiagnosticsSettings(top_k=k, student_temperature=TAU_S))
        assert abs(ref["entropy/teacher"] - float(teacher_entropy.mean())) <= TOL
        assert abs(ref["entropy/student"] - float(student_entropy.mean())) <= TOL
        for teacher_vp, want in ((teacher, ref), (served, ref_served)):
            overlap = vocab_parallel_topk_overlap(student, teacher_vp, k, VOCAB)
            mass = vocab_parallel_student_mass_on_teacher_support(student, teacher_vp, k, TAU_S, VOCAB)
            # per position, the definitions of diagnostics.py
            in_teacher = torch.zeros(N, VOCAB, dtype=torch.bool).scatter_(-1, top_k_positions(teacher_full, k), True)
            in_student = torch.zeros_like(in_teacher).scatter_(-1, top_k_positions(student_full, k), True)
            assert_close(f"overlap {k}", overlap, (in_teacher & in_student).sum(-1).double() / k)
            pi = torch.softmax(student_full / TAU_S, dim=-1)
            assert_close(f"mass {k}", mass, torch.where(in_teacher, pi, 0.0).sum(-1))
            assert abs(want["agreement/topk_overlap"] - float(overlap.mean())) <= TOL, k
            assert abs(want["agreement/student_mass_on_teacher_support"] - float(mass.mean())) <= TOL, k
            checks += 1
    return checks


def stats_checks(tp: int) -> int:
    rank = _init(tp)
    return _check_stats(random_logits(4), random_logits(5), tp, rank)
