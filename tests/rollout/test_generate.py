"""The megatron sampler: KV-cache greedy decoding equals a plain full-sequence argmax; sampled tokens' behaviour
log-probs equal the model's log-probs of the distribution sampled from (full softmax(z/T), or renormalised over the
top-k/top-p candidates) and their old log-probs the full softmax at policy_temperature; TP=2 and PP=2 generate
exactly the TP=1 greedy rollouts from the same checkpoint."""

import pytest
import torch

from tests.harness import run_distributed
from tests.rollout import generate_workers as w


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampler")
    ckpt = str(root / "init")
    out = {"tp1": run_distributed(w.sample, 1, args=(1, 1, None, ckpt), timeout_s=180)[0]}
    for name, (tp, pp) in {"tp2": (2, 1), "pp2": (1, 2)}.items():
        ranks = run_distributed(w.sample, tp * pp, args=(tp, pp, ckpt, None), timeout_s=240)
        out[name] = ranks
    return out


def _greedy_reference(logits: torch.Tensor, tokens: torch.Tensor, lengths, prompt_len: list[int]):
    """Every generated token is the argmax (lowest id on ties) of the plain forward at the column before it."""
    for b, p in enumerate(prompt_len):
        for col in range(p - 1, int(lengths[b]) - 1):
            assert int(tokens[b, col + 1]) == int(logits[b, col].argmax()), f"row {b} column {col}"


def test_greedy_equals_plain_argmax(runs):
    r = runs["tp1"]
    _greedy_reference(r["greedy_logits"], r["greedy"], r["greedy_lengths"], [len(p) for p in w.PROMPTS])
    # A row stops at the stop token or after max_new_tokens.
    for b, p in enumerate(w.PROMPTS):
        response = r["greedy"][b, len(p): int(r["greedy_lengths"][b])].tolist()
        assert 1 <= len(response) <= 10
        assert w.STOP not in response[:-1]


def test_behaviour_logprobs_full_softmax(runs):
    r = runs["tp1"]
    logp = r["sampled_logits"].log_softmax(-1)
    tokens = r["sampled"]
    expected = logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = r["sampled_mask"].bool()
    assert mask.sum() == 4 * 3 * 10
    assert (expected[mask] - r["sampled_logp"][mask]).abs().max() < 1e-5
    # Sampled at T = policy_temperature = 1 without truncation: mu and pi_old are one distribution.
    assert torch.equal(r["sampled_old"], r["sampled_logp"])
    assert (r["sampled"] < w.VOCAB).all()
    # Three samples per prompt differ from each other (temperature 1 on a near-uniform model).
    assert len({tuple(row.tolist()) for row in tokens[:3]}) == 3


def test_behaviour_logprobs_top_k_top_p(runs):
    r = runs["tp1"]
    scaled = r["nucleus_logits"] / 0.8
    tokens = r["nucleus"]
    mask = r["nucleus_mask"].bool()
    for b, col in mask.nonzero().tolist():
        row = scaled[b, col]
        top = torch.topk(row, 16)
        probs = top.values.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        kept = top.indices[mass_before < 0.7]
        token = int(tokens[b, col + 1])
        assert token in kept.tolist(), f"row {b} column {col}: {token} outside the nucleus"
        renorm = row[kept].log_softmax(-1)
        expected = float(renorm[kept.tolist().index(token)])
        assert abs(expected - float(r["nucleus_logp"][b, col])) < 1e-5
    # pi_old: the full softmax at policy_temperature 1, not the truncated one.
    full = r["nucleus_logits"].log_softmax(-1).gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    assert (full[mask] - r["nucleus_old"][mask]).abs().max() < 1e-5


def _nucleus_logprob(scaled: torch.Tensor, token: int, top_p: float, candidates: int = 64) -> float:
    """log mu(token) for top-p alone: the nucleus of softmax(scaled) (mass before < top_p) among the `candidates`
    most likely ids, renormalised (SamplingConfig's definition)."""
    full = scaled.log_softmax(-1)
    top = torch.topk(full, candidates)
    probs = top.values.exp()
    kept = top.indices[(probs.cumsum(-1) - probs) < top_p].tolist()
    assert token in kept, f"{token} outside the nucleus"
    return float(scaled[kept].log_softmax(-1)[kept.index(token)])


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
def test_old_logprobs_are_the_full_softmax_at_policy_temperature(runs, layout):
    """top_p 0.8, temperature 0.7, policy_temperature 0.7: old = log softmax(z/0.7)[y] over the whole vocabulary,
    behaviour = the same renormalised over the nucleus, so old < behaviour on every token (docs/opd-math.md, Route B:
    the PPO ratio vs the sampler-mismatch weight)."""
    ranks = runs[layout] if layout != "tp1" else [runs["tp1"]]
    for rank, r in enumerate(ranks[1:], start=1):      # every rank (TP and PP) holds the same batch
        for name in ("tempered", "tempered_logp", "tempered_old", "greedy_old"):
            assert torch.equal(r[name], ranks[0][name]), f"{layout} rank {rank}: {name} differs from rank 0"
    r = next(r for r in ranks if r["tempered_logits"] is not None)
    tokens, mask = r["tempered"], r["tempered_mask"].bool()
    scaled = r["tempered_logits"].double() / 0.7
    expected_old = scaled.log_softmax(-1).gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    assert mask.sum() == 4 * 2 * 6
    assert (expected_old[mask] - r["tempered_old"][mask].double()).abs().max() < 1e-5
    for b, col in mask.nonzero().tolist():
        expected = _nucleus_logprob(scaled[b, col], int(tokens[b, col + 1]), 0.8)
        assert abs(expected - float(r["tempered_logp"][b, col])) < 1e-5, f"row {b} column {col}"
    gap = (r["tempered_logp"] - r["tempered_old"])[mask]
    assert float(gap.min()) > 1e-3, f"mu(y) must exceed pi_old(y) (nucleus mass < 1), min log gap {float(gap.min())}"
    assert bool((r["tempered_old"][~mask] == 0).all()) and bool((r["tempered_logp"][~mask] == 0).all())
    # Greedy rows: behaviour log 1 = 0, old the full softmax at policy_temperature (1 here) of the argmax.
    greedy_mask = r["greedy_mask"].bool()
    expected = r["greedy_logits"].log_softmax(-1).gather(-1, r["greedy"][:, 1:].unsqueeze(-1)).squeeze(-1)
    assert (expected[greedy_mask] - r["greedy_old"][greedy_mask]).abs().max() < 1e-5


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_parallel_layouts_generate_the_tp1_greedy_rollouts(runs, layout):
    ref = runs["tp1"]
    for rank, r in enumerate(runs[layout]):
        assert torch.equal(r["greedy"], ref["greedy"]), f"{layout} rank {rank}"
        assert torch.equal(r["greedy_lengths"], ref["greedy_lengths"])
        assert r["calls"] == 4
    last = [r for r in runs[layout] if r["greedy_logits"] is not None]
    assert last
    assert (last[0]["greedy_logits"] - ref["greedy_logits"]).abs().max() < 1e-4
    # Sampled rollouts at another layout are a different draw of the same distribution: the behaviour
    # log-probs still equal that layout's model log-probs.
    r = last[0]
    logp = r["sampled_logits"].log_softmax(-1).gather(-1, r["sampled"][:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = r["sampled_mask"].bool()
    assert (logp[mask] - r["sampled_logp"][mask]).abs().max() < 1e-5
    assert (r["sampled"] < w.VOCAB).all()
