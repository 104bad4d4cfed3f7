"""Exact p-values for the sampler's distributional tests (no scipy here): chi-square goodness of fit and the
two-sided binomial test, both in float64 with torch's special functions."""

from __future__ import annotations

import math

import torch


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson's chi-square goodness of fit of `counts [V]` (observed draws per id) to `probs [V]` (the exact
    target, summing to 1). Ids whose expected count is below `min_expected` are pooled into one bin (the usual
    validity rule for the chi-square approximation), and that bin joins the smallest other bin if it is itself
    below it. Draws on ids of probability 0 are not scored here: check them separately (they are impossible).
    Returns (p-value = P[chi2_df >= statistic], df)."""
    probs = probs.double()
    counts = counts.double()
    total = float(counts.sum())
    expected = probs * total
    support = probs > 0
    small = support & (expected < min_expected)
    big = (support & ~small).nonzero().squeeze(-1)
    obs = counts[big].tolist()
    exp = expected[big].tolist()
    if bool(small.any()):
        pooled_obs, pooled_exp = float(counts[small].sum()), float(expected[small].sum())
        if pooled_exp >= min_expected or not exp:
            obs.append(pooled_obs)
            exp.append(pooled_exp)
        else:
            i = min(range(len(exp)), key=exp.__getitem__)
            obs[i] += pooled_obs
            exp[i] += pooled_exp
    obs_t, exp_t = torch.tensor(obs, dtype=torch.float64), torch.tensor(exp, dtype=torch.float64)
    statistic = float(((obs_t - exp_t) ** 2 / exp_t).sum())
    df = len(obs) - 1
    if df < 1:
        raise ValueError(f"chi-square needs >= 2 bins, got {len(obs)} (support {int(support.sum())} ids)")
    # Survival function of chi2_df: the regularised upper incomplete gamma Q(df/2, x/2).
    pvalue = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                           torch.tensor(statistic / 2, dtype=torch.float64)))
    return pvalue, df


def binomial_two_sided_pvalue(successes: int, trials: int, p: float) -> float:
    """Exact two-sided binomial test (the definition of scipy's `binomtest`): the probability under
    Binomial(trials, p) of every outcome no more likely than the observed one."""
    k = torch.arange(trials + 1, dtype=torch.float64)
    log_pmf = (torch.lgamma(torch.tensor(trials + 1.0, dtype=torch.float64)) - torch.lgamma(k + 1)
               - torch.lgamma(trials - k + 1) + k * math.log(p) + (trials - k) * math.log1p(-p))
    observed = log_pmf[successes]
    # Relative slack as scipy uses, so outcomes as likely as the observed one count despite rounding.
    return float(log_pmf[log_pmf <= observed + 1e-7].exp().sum().clamp(max=1.0))
