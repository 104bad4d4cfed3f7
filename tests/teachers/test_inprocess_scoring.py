"""`score_columns`, the in-process teacher's chunked scoring pass (no [tokens, V] log-prob tensor): its numbers equal
`log_softmax(logits / T)` gathered (sampled ids, top-k in descending order with ties to the lower id, extra ids),
and NaN or +inf logits are an error while a -inf logit (a token of probability 0) is not."""

import pytest
import torch

from opd_megatron.math.supports import top_k_positions
from opd_megatron.teachers.inprocess import NonFiniteLogitsError, descending_topk, score_columns


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_equals_log_softmax_gathered(temperature):
    gen = torch.Generator().manual_seed(5)
    n, vocab, k = 9, 300, 6
    storage = torch.randn(n, vocab + 20, generator=gen) * 4
    logits = storage[:, :vocab]                       # a strided view, as the teacher's [:, :-1, :V] slice is
    logits[2, 10:20] = 30.0                           # ten equal top logits across the top-k boundary: ties
    logits[3, 5] = float("-inf")
    labels = torch.randint(0, vocab, (n,), generator=gen)
    extra_ids = torch.randint(0, vocab, (n, 3), generator=gen)
    extra_ids[:, -1] = -1
    sampled, topk_lp, topk_ids, extra = score_columns(logits, temperature, labels, k, extra_ids,
                                                      torch.empty(n, vocab))
    reference = torch.log_softmax(logits / temperature, dim=-1)
    scale = float(reference[torch.isfinite(reference)].abs().max())
    torch.testing.assert_close(sampled, reference.gather(-1, labels[:, None])[:, 0], atol=1e-6 * scale, rtol=0)
    positions = top_k_positions(reference, k)
    want_lp, want_ids = descending_topk(reference.gather(-1, positions), positions)
    assert torch.equal(topk_ids, want_ids)
    assert topk_ids[2].tolist() == list(range(10, 16))   # ties to the lower id
    torch.testing.assert_close(topk_lp, want_lp, atol=1e-6 * scale, rtol=0)
    used = extra_ids >= 0
    torch.testing.assert_close(extra[used], reference.gather(-1, extra_ids.clamp_min(0))[used], atol=1e-6 * scale,
                               rtol=0)
    assert bool((extra[~used] == 0).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_logits_are_an_error(bad):
    logits = torch.randn(4, 50)
    logits[1, 7] = bad
    with pytest.raises(NonFiniteLogitsError):
        score_columns(logits, 1.0, torch.zeros(4, dtype=torch.long), 3, None, torch.empty(4, 50))
