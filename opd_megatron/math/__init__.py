"""The OPD math as pure, shape-documented tensor functions on one device: the single-device references.

Each module is one concept of `docs/opd-math.md`: `divergences.py` (route A: KL both ways, generalized JSD, skew
KLs, TV, and the loss normalisers), `supports.py` (the support a divergence runs over: full, top-k, union,
renormalised or tail, dense or sparse teacher), `policy_gradient.py` (route B: the sampled-token log-ratio update
with PPO clipping), `credit.py` (credit assignment: immediate, return-to-go, discounted, baselines, GAE-OPD,
outcome hybrids), `cr_opd.py` (CR-OPD vocabulary routing), `gates.py` (token gates and weights, truncated
importance sampling), `regularizers.py` (reference KL, entropy), `mixtures.py` (the on-policy fraction and
teacher-mixed sampling), `diagnostics.py` (the logged statistics of a batch), `checks.py` (argument checks naming
the argument). `credit_enumeration.py` computes estimators' exact bias and variance on a tabular problem.

Rule (tested by `tests/test_layout.py`): nothing here imports from the package outside `math/`. Where a formula
has a vocabulary-parallel twin it lives in `parallel/` under the same file name.
"""
