"""The sampler's randomness and the log-probs it records, on fixed logits (`randomness_workers.FixedLogits`):

- data-parallel replicas draw independent noise: with the same prompt and logits on both DP ranks, row b of the two
  ranks matches at the rate sum_v p_v^2 of independent draws (exact two-sided binomial test, alpha = 1e-3), not
  always; the TP ranks of one replica agree on every token;
- every path is an exact sample over a vocabulary sharded on TP=2 (203 ids, real ids on both ranks, padding with
  large logits): Pearson chi-square goodness of fit against the exact renormalised target, alpha = 1e-3, and no draw
  outside the target's support;
- a sample key makes a call's draws reproducible (resume), another key draws anew;
- old log-probs are the full softmax at policy_temperature, behaviour log-probs the tempered/truncated
  distribution sampled from.
"""

import math

import pytest
import torch

from tests.harness import run_distributed
from tests.rollout import randomness_workers as w
from tests.rollout.stat_checks import binomial_two_sided_pvalue, chi_square_pvalue

ALPHA = 1e-3
ROWS = 4000          # draws per call and rank


@pytest.fixture(scope="module")
def dp2():
    """World 2 at tp=1: two DP replicas."""
    return run_distributed(w.draws, 2, args=(1, ROWS), timeout_s=240)


@pytest.fixture(scope="module")
def tp2_dp2():
    """World 4: TP=2 x DP=2 (megatron's groups: TP {0,1}, {2,3}; DP {0,2}, {1,3})."""
    return run_distributed(w.draws, 4, args=(2, ROWS), timeout_s=300)


@pytest.fixture(scope="module")
def keyed():
    return run_distributed(w.keys_and_logprobs, 2, args=(2, 2000), timeout_s=240)


def _replicas(ranks: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in ranks:
        out.setdefault(r["dp_rank"], []).append(r)
    return out


def _assert_independent(a: torch.Tensor, b: torch.Tensor, probs: torch.Tensor, what: str) -> None:
    """Row-wise matches of two independent draw sequences from `probs` are Binomial(n, sum_v p_v^2)."""
    matches, n = int((a == b).sum()), a.numel()
    rate = float((probs ** 2).sum())
    pvalue = binomial_two_sided_pvalue(matches, n, rate)
    assert pvalue >= ALPHA, (f"{what}: {matches}/{n} rows drew the same token, expected about {n * rate:.0f} "
                             f"(sum_v p_v^2 = {rate:.4f}) for independent draws; two-sided binomial p = {pvalue:.2e} "
                             f"< {ALPHA}: the draws share their noise")


@pytest.mark.parametrize("layout", ["dp2", "tp2_dp2"])
def test_data_parallel_replicas_draw_independently(layout, request):
    ranks = request.getfixturevalue(layout)
    replicas = _replicas(ranks)
    assert sorted(replicas) == [0, 1], f"expected DP ranks 0 and 1, got {sorted(replicas)}"
    for mode, settings in w.MODES.items():
        for dp, members in replicas.items():
            # One replica, one draw: every TP rank returns the same tokens.
            for r in members[1:]:
                assert torch.equal(r[mode], members[0][mode]), \
                    f"{mode}: TP rank {r['tp_rank']} of DP replica {dp} sampled other tokens than TP rank 0"
        _assert_independent(replicas[0][0][mode], replicas[1][0][mode], w.target_probs(**settings),
                            f"{layout} {mode}: DP replicas 0 and 1")


@pytest.mark.parametrize("mode", list(w.MODES))
def test_tp_sharded_sampling_is_exact(tp2_dp2, mode):
    probs = w.target_probs(**w.MODES[mode])
    for dp, members in _replicas(tp2_dp2).items():
        tokens = members[0][mode]
        outside = tokens[(tokens < 0) | (tokens >= w.VOCAB) | (probs[tokens.clamp(0, w.VOCAB - 1)] == 0)]
        assert outside.numel() == 0, f"{mode}: ids {sorted(set(outside.tolist()))[:10]} have target probability 0"
        counts = torch.bincount(tokens, minlength=w.VOCAB).double()
        assert counts[128:].sum() > 0, "no draw from TP rank 1's ids"
        pvalue, df = chi_square_pvalue(counts, probs)
        assert pvalue >= ALPHA, (f"{mode}, DP replica {dp}: chi-square goodness of fit p = {pvalue:.2e} < {ALPHA} "
                                 f"({df} df, {tokens.numel()} draws): not an exact sample of the target")


def test_sample_key_reproduces_the_draws(keyed):
    probs = w.target_probs(**w.MODES["top_p"])
    for rank, r in enumerate(keyed):
        assert torch.equal(r["key_a"], r["key_a_again"]), f"rank {rank}: the same key drew other tokens"
        assert torch.equal(r["key_a"], r["key_a_resumed"]), \
            f"rank {rank}: a fresh sampler (call counter 0) drew other tokens for the same key"
        assert torch.equal(r["gumbel_key_a"], r["gumbel_key_a_resumed"]), f"rank {rank}: Gumbel path, same key"
        _assert_independent(r["key_a"], r["key_b"], probs, f"rank {rank}: keys ('rollout', 3) and ('rollout', 4)")
        assert not torch.equal(r["counter"][0], r["counter"][1]), f"rank {rank}: two unkeyed calls drew alike"
        assert torch.equal(r["counter"][1], r["counter_restored"]), \
            f"rank {rank}: a sampler restored at call 1 did not repeat the second call"
        assert len(r["key_errors"]) == 4 and all("sample_key" in e for e in r["key_errors"]), r["key_errors"]
        assert (w.target_probs(**w.MODES["gumbel"])[r["eval_key"]] > 0).all()
    assert all(torch.equal(keyed[0][k], keyed[1][k]) for k in ("key_a", "key_b", "gumbel_key_a")), \
        "the TP ranks disagree"


@pytest.mark.parametrize("name", ["greedy", "gumbel_same_t", "gumbel_other_t", "top_k", "nucleus", "top_k_top_p"])
def test_old_and_behaviour_logprobs(keyed, name):
    tokens, behaviour, old, mask, kwargs = keyed[0][f"lp_{name}"]
    for r in keyed[1:]:
        other = r[f"lp_{name}"]
        assert all(torch.equal(x, y) for x, y in zip(other[:4], (tokens, behaviour, old, mask))), "TP ranks differ"
    assert mask.shape == (64, 1) and bool((mask == 1).all())
    logits = w.full_logits()
    # old: log softmax(z / policy_temperature)[y] over the full (true) vocabulary.
    expected_old = torch.log_softmax(logits / kwargs["policy_temperature"], -1)[tokens]
    assert (old.double() - expected_old).abs().max() < 1e-5 * max(1.0, float(expected_old.abs().max())), name
    if kwargs["temperature"] == 0:
        assert bool((tokens == int(logits.argmax())).all()), "greedy rows must take the argmax"
        assert bool((behaviour == 0).all()), "greedy behaviour log-prob is log 1 = 0"
        return
    expected_behaviour = w.target_probs(**kwargs)[tokens].log()
    assert (behaviour.double() - expected_behaviour).abs().max() < 1e-5 * max(1.0, float(expected_behaviour.abs().max()))
    if name == "gumbel_same_t":
        assert torch.equal(old, behaviour), "one distribution sampled and scored: mu = pi_old"
    if name == "nucleus":
        # Renormalising over the nucleus raises every kept token's probability: mu(y) > pi_old(y) by the log of
        # the nucleus mass, the same for every row.
        kept = w.target_probs(**kwargs) > 0
        nucleus_mass = float(torch.softmax(logits / 0.7, -1)[kept].sum())
        assert nucleus_mass < 0.95
        gap = behaviour.double() - old.double()
        assert (gap - (-math.log(nucleus_mass))).abs().max() < 1e-5, (gap.min(), gap.max(), nucleus_mass)
