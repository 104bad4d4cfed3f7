"""Vocab-parallel CR-OPD (`parallel/cr_opd.py`) equals the single-device reference `math/cr_opd.py::cr_opd_loss`, value,
gradient and statistics, at TP = 1, 2, 4 on gloo processes (float64 and float32; chunked along tokens equals
unchunked; every position masked gives zero loss and gradient), for both routed forms (matched, the default, and
kl_target), threshold / top-k teacher supports, top-p / top-k / threshold student reach, the three routing weights,
and a dense or sparse teacher; on routed positions each rank's gradient is exactly 0 off `{y_t} U C_t`.
On a vocabulary of 203 (sampled ids and candidates on every TP rank, padding at TP = 2 and 4) the twin also meets
the spec's properties: matched, the push on z_{y_t} is the plain PG term's, C_t gets minus it split by rho_t,
linear in A; kl_target, the mass moved off y_t and onto C_t is delta_t; A >= 0 and an empty C_t give exactly the
plain PG term.

One process group per TP size runs every check (starting processes dominates the cost); the workers return
maximum errors and booleans, asserted here."""

from __future__ import annotations

import pytest
import torch

from opd_megatron.math import cr_opd as ref
from opd_megatron.parallel.cr_opd import _NormalizerAndLogits, vocab_parallel_cr_opd_loss
from opd_megatron.math.checks import MathInputError
from opd_megatron.parallel.shard import Shard, debug_checks
from tests.harness import run_distributed
from tests.parallel import cr_opd_workers as workers

FLOAT64 = 1e-10
FLOAT32_REL = 1e-5


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_parity_with_single_device_reference(tp):
    results = run_distributed(workers.parity_worker, world_size=tp, args=(tp,), timeout_s=300)
    assert len(results) == tp and all(results)
    failures = [f"rank {rank}: {name} = {value}" for rank, result in enumerate(results)
                for name, value in result.items()
                if not (value if isinstance(value, bool) else value <= (FLOAT32_REL if "float32" in name else FLOAT64))]
    assert not failures, "\n".join(failures)


def test_without_model_parallel_state_runs_as_tp1():
    """Outside an initialised megatron state (no group) the loss runs as tp = 1, [B, T, V] in and [B, T] out."""
    data = workers._inputs()
    config = workers.CONFIGS["topk_top_p_q"]
    student = data["student"].reshape(2, 5, -1).requires_grad_(True)
    shaped = {k: data[k].reshape(2, 5) for k in ("ids", "advantages", "mask")}
    teacher = data["teacher"].reshape(2, 5, -1)
    loss, stats = vocab_parallel_cr_opd_loss(student, shaped["ids"], shaped["advantages"], shaped["mask"],
                                             teacher_logits_shard=teacher, config=config)
    expected, ref_stats = ref.cr_opd_loss(student, shaped["ids"], shaped["advantages"], shaped["mask"],
                                          teacher_logits=teacher, config=config)
    assert loss.shape == (2, 5) and stats.candidate_count.shape == (2, 5)
    torch.testing.assert_close(loss, expected, rtol=0, atol=FLOAT64)
    assert torch.equal(stats.candidate_count, ref_stats.candidate_count)


def test_sparse_teacher_id_outside_the_vocabulary_is_an_error():
    data = workers._inputs()
    logp, ids = torch.log_softmax(data["teacher"], -1).topk(workers.SPARSE_K, dim=-1)
    ids[3, 0] = workers.VOCAB
    with debug_checks(), pytest.raises(MathInputError,
                                       match=r"teacher_topk_ids: expected integer global vocabulary ids in \[0, 37\)"):
        vocab_parallel_cr_opd_loss(data["student"], data["ids"], data["advantages"], data["mask"],
                                   teacher_topk_ids=ids, teacher_topk_logprobs=logp,
                                   config=workers.CONFIGS["topk_topk_q"])


def test_ids_path_gradient_passes_gradcheck():
    """The ids path's one differentiable read of the student (`_NormalizerAndLogits`: the global normaliser and the
    logits at `[y_t, teacher top-k]`, a repeated id included; backward the normaliser's softmax plus a scatter)
    against finite differences (float64, tp = 1, temperature 1 and 0.8, in chunks of 3 rows and unchunked). The
    loss itself holds stop-gradients (`sg pi(y_t)`, `sg P_t`), so its gradient is the reference's, not the
    derivative of its value: that is the parity tests' to check."""
    data = workers._inputs()
    ids = torch.cat([data["ids"].unsqueeze(-1), data["teacher"].topk(4, dim=-1).indices], dim=-1)
    ids[0, 1] = ids[0, 0]
    shard = Shard(workers.VOCAB, None, None)
    for temperature, chunk_size in ((1.0, 3), (0.8, None)):
        def normalizer_and_logits(x, temperature=temperature, chunk_size=chunk_size):
            return _NormalizerAndLogits.apply(x, ids, shard, temperature, torch.float64, chunk_size)
        assert torch.autograd.gradcheck(normalizer_and_logits, (data["student"].clone().requires_grad_(True),))
