"""Exact expectations of route-B gradient estimators on a tiny tabular autoregressive policy. [Ours]

The student `pi_theta` writes `T` tokens from a vocabulary of `V`; its logits are a free table `theta[s]` `[V]` for
every prefix state `s = y_<t` (`1 + V + ... + V^(T-1)` states: 13 for V = T = 3), the teacher `q` a fixed table of
the same shape. Every sequence is enumerated (`V^T` = 27), so expectations over `y ~ pi` are exact sums:
- the exact gradient of `KL(pi || q)_seq = sum_y pi(y) sum_t -r_t(y)` is one autograd call through both `pi(y)` and
  `r_t`;
- an estimator's expected gradient is `sum_y pi(y) g(y)`, with `g(y)` the gradient of the route-B loss of the one
  sequence `y` (`Z = 1`): `g(y) = -sum_t A_t (e_{y_t} - pi(.|s_t))` in the row of `s_t` (the softmax score);
- estimators whose baseline looks at other rollouts (leave-one-out means) are enumerated over all `V^(T n)`
  groups of `n` independent rollouts.
So an estimator's bias is a number, not a Monte Carlo estimate. Advantages come from `opd_megatron.math.credit`, so
this checks the implementation, not a re-derivation.

This lives in the package, beside `credit.py`, because two consumers outside it share it:
`tests/math/test_credit_enumeration.py` asserts the exact identities and `benchmarks/credit_bias.py` reports the same
quantities as a table; neither should import the other.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from opd_megatron.math import credit

GROUP_SIZE = 3  # rollouts per prompt for the leave-one-out baselines (27^3 groups enumerated)


@dataclass(frozen=True)
class EstimatorSpec:
    """One credit estimator as `credit.advantages` is called for it, plus how its inputs are made here.

    `value`: the per-state table fed as `values` (GAE, `baseline="value"`): `"perfect"` the exact
    `V(s_t) = E[G^gamma_t | s_t]`, `"zero"`, or `"state_constant"` (a fixed random number per state, unrelated to
    the returns). `estimator="single_step"` adds MiniLLM's exact step-t term (route A reverse KL at each visited
    state) to the sampled-token gradient.
    """

    label: str
    estimator: str
    gamma: float = 1.0
    lam: float = 1.0
    baseline: str | None = None
    value: str | None = None
    length_normalized: bool = False

    @property
    def grouped(self) -> bool:
        return self.baseline == "group_mean"


@dataclass(frozen=True)
class MonteCarloResult:
    """Per repeat `r`: `means[r]` `[P]` the mean per-sequence gradient of `samples` rollouts and `trace_cov[r]` the
    trace of the sample covariance of the per-sequence gradient estimate."""

    means: torch.Tensor
    trace_cov: torch.Tensor


class TabularProblem:
    """A tabular student (`theta` `[S, V]`) and teacher (`teacher` `[S, V]`) over all prefixes of length < T."""

    def __init__(self, vocab: int = 3, length: int = 3, seed: int = 0, student_scale: float = 1.0,
                 teacher_scale: float = 1.5, dtype: torch.dtype = torch.float64) -> None:
        self.vocab, self.length = vocab, length
        self.offsets = [sum(vocab ** k for k in range(t)) for t in range(length + 1)]  # first state of depth t
        self.num_states = self.offsets[-1]
        generator = torch.Generator().manual_seed(seed)
        self.theta = student_scale * torch.randn(self.num_states, vocab, generator=generator, dtype=dtype)
        self.teacher = teacher_scale * torch.randn(self.num_states, vocab, generator=generator, dtype=dtype)
        self.state_constant = 2.0 * torch.randn(self.num_states, generator=generator, dtype=dtype)
        self.sequences = torch.tensor(list(itertools.product(range(vocab), repeat=length)), dtype=torch.long)
        self._values: dict[float, torch.Tensor] = {}  # state_values per gamma (theta is fixed)

    # ---- the policy ---------------------------------------------------------------------------------------------
    def state_ids(self, sequences: torch.Tensor) -> torch.Tensor:
        """`[M, T]`: the index of the prefix state `s_t = y_<t` of every position."""
        ids = torch.empty_like(sequences)
        prefix = torch.zeros(sequences.shape[0], dtype=torch.long)
        for t in range(self.length):
            ids[:, t] = self.offsets[t] + prefix
            prefix = prefix * self.vocab + sequences[:, t]
        return ids

    def token_log_probs(self, theta: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
        """`log pi_theta(y_t | s_t)` `[M, T]` (differentiable in `theta`)."""
        log_probs = torch.log_softmax(theta, dim=-1)[self.state_ids(sequences)]
        return log_probs.gather(-1, sequences.unsqueeze(-1)).squeeze(-1)

    def log_ratio(self, sequences: torch.Tensor) -> torch.Tensor:
        """`r_t = log q(y_t|s_t) - log pi(y_t|s_t)` `[M, T]`, no gradient."""
        return (self.token_log_probs(self.teacher, sequences) - self.token_log_probs(self.theta, sequences)).detach()

    def sequence_probs(self) -> torch.Tensor:
        """`pi(y)` `[V^T]` for every enumerated sequence."""
        return self.token_log_probs(self.theta, self.sequences).sum(-1).exp()

    def state_reverse_kl(self, theta: torch.Tensor | None = None) -> torch.Tensor:
        """`RKL(s) = sum_v pi_v (log pi_v - log q_v)` `[S]`."""
        log_pi = torch.log_softmax(self.theta if theta is None else theta, dim=-1)
        return (log_pi.exp() * (log_pi - torch.log_softmax(self.teacher, dim=-1))).sum(-1)

    def state_distribution(self, theta: torch.Tensor | None = None) -> torch.Tensor:
        """`d(s)` `[S]`: the probability that a rollout passes through prefix `s` (each depth sums to 1)."""
        theta = self.theta if theta is None else theta
        probs = self.token_log_probs(theta, self.sequences).sum(-1).exp()
        return torch.zeros(self.num_states, dtype=theta.dtype).index_add(
            0, self.state_ids(self.sequences).flatten(), probs.repeat_interleave(self.length))

    def state_values(self, gamma: float = 1.0) -> torch.Tensor:
        """The exact value `V(s) = E[G^gamma_t | s_t = s]` `[S]` (the perfect value head)."""
        if gamma in self._values:
            return self._values[gamma]
        returns = credit.returns_to_go(self.log_ratio(self.sequences), self.full_mask(len(self.sequences)), gamma)
        weight = self.sequence_probs()[:, None].expand(-1, self.length).flatten()
        ids = self.state_ids(self.sequences).flatten()
        totals = torch.zeros(self.num_states, dtype=returns.dtype).index_add(0, ids, weight * returns.flatten())
        self._values[gamma] = totals / self.state_distribution()
        return self._values[gamma]

    def full_mask(self, rows: int) -> torch.Tensor:
        return torch.ones(rows, self.length, dtype=torch.bool)

    # ---- exact gradients ----------------------------------------------------------------------------------------
    def exact_gradient(self) -> torch.Tensor:
        """`grad_theta KL(pi || q)_seq` `[S * V]` by autograd: `KL = sum_y pi(y) sum_t (log pi - log q)(y_t|s_t)`."""
        theta = self.theta.clone().requires_grad_(True)
        log_pi = self.token_log_probs(theta, self.sequences)
        log_q = self.token_log_probs(self.teacher, self.sequences)
        kl = (log_pi.sum(-1).exp() * (log_pi - log_q).sum(-1)).sum()
        return torch.autograd.grad(kl, theta)[0].flatten()

    def state_distribution_term(self) -> torch.Tensor:
        """`sum_s grad d(s) * RKL(s)` `[S * V]` (states moving, per-state KL frozen) by autograd. Since
        `KL_seq = sum_s d(s) RKL(s)`, the exact gradient is this plus `sum_s d(s) grad RKL(s)`, and the immediate
        estimator's expectation is the second part alone: its bias is minus this term."""
        theta = self.theta.clone().requires_grad_(True)
        objective = (self.state_distribution(theta) * self.state_reverse_kl().detach()).sum()
        return torch.autograd.grad(objective, theta)[0].flatten()

    def per_sequence_gradients(self, sequences: torch.Tensor, advantages: torch.Tensor,
                               route_a: bool = False) -> torch.Tensor:
        """`g(y)` `[M, S * V]`: the gradient of `-sum_t log pi(y_t|s_t) A_t` (the route-B loss of one sequence,
        `Z = 1`), closed form for the softmax table; `route_a` adds `sum_t grad RKL(s_t)` (states fixed)."""
        states = self.state_ids(sequences)
        log_pi = torch.log_softmax(self.theta, dim=-1)
        pi = log_pi.exp()
        score = torch.nn.functional.one_hot(sequences, self.vocab).to(pi.dtype) - pi[states]     # [M, T, V]
        contribution = -advantages.unsqueeze(-1) * score
        if route_a:
            rkl = self.state_reverse_kl()
            rkl_grad = pi * (log_pi - torch.log_softmax(self.teacher, dim=-1) - rkl[:, None])  # d RKL(s) / d theta[s]
            contribution = contribution + rkl_grad[states]
        grads = torch.zeros(sequences.shape[0], self.num_states, self.vocab, dtype=pi.dtype)
        grads.scatter_add_(1, states.unsqueeze(-1).expand(-1, -1, self.vocab), contribution)
        return grads.flatten(1)

    # ---- estimators ---------------------------------------------------------------------------------------------
    def advantages(self, spec: EstimatorSpec, sequences: torch.Tensor) -> torch.Tensor:
        """`credit.advantages` for `spec` on `sequences` `[M, T]` (consecutive groups of `GROUP_SIZE` rollouts of
        the one prompt when `spec.grouped`)."""
        states = self.state_ids(sequences)
        kwargs = {}
        if spec.value is not None:
            table = {"perfect": lambda: self.state_values(spec.gamma),
                     "zero": lambda: torch.zeros(self.num_states, dtype=self.theta.dtype),
                     "state_constant": lambda: self.state_constant}[spec.value]()
            kwargs["values"] = table[states]
        if spec.baseline == "reverse_kl":
            kwargs["reverse_kl"] = self.state_reverse_kl()[states]
        if spec.estimator == "gae":
            kwargs["lam"] = spec.lam
        if spec.baseline is not None:
            kwargs["baseline"] = spec.baseline
        if spec.baseline == "group_mean":
            kwargs["group_size"] = GROUP_SIZE
        if spec.length_normalized:
            kwargs["length_normalized"] = True
        return credit.advantages(self.log_ratio(sequences), self.full_mask(sequences.shape[0]), spec.estimator,
                                 spec.gamma, **kwargs)

    def expected_gradient(self, spec: EstimatorSpec) -> torch.Tensor:
        """`E_{y ~ pi}[g(y)]` `[S * V]` exactly: over every sequence, or over every group of `GROUP_SIZE`
        independent rollouts (each member's gradient weighted by `P(group) / n`) when `spec.grouped`."""
        if spec.grouped:
            sequences, weights = self.enumerate_groups(GROUP_SIZE)
        else:
            sequences, weights = self.sequences, self.sequence_probs()
        grads = self.per_sequence_gradients(sequences, self.advantages(spec, sequences),
                                            route_a=spec.estimator == "single_step")
        return weights @ grads

    def enumerate_groups(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every group of `size` rollouts: sequences `[N^size * size, T]` (consecutive rows form a group) and each
        row's weight `P(group) / size` `[N^size * size]`."""
        count = len(self.sequences)
        index = torch.cartesian_prod(*[torch.arange(count)] * size).reshape(-1, size)
        probs = self.sequence_probs()[index]                                   # [groups, size]
        weights = (probs.prod(-1, keepdim=True) / size).expand(-1, size)
        return self.sequences[index.flatten()], weights.flatten()

    # ---- sampling -----------------------------------------------------------------------------------------------
    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """`count` rollouts `[count, T]` from `pi`."""
        sequences = torch.zeros(count, self.length, dtype=torch.long)
        probs = torch.softmax(self.theta, dim=-1)
        for t in range(self.length):
            state = self.state_ids(sequences)[:, t]
            sequences[:, t] = torch.multinomial(probs[state], 1, generator=generator).squeeze(-1)
        return sequences

    def monte_carlo(self, spec: EstimatorSpec, samples: int, repeats: int,
                    generator: torch.Generator) -> MonteCarloResult:
        """`repeats` independent batches of `samples` rollouts (a multiple of `GROUP_SIZE`; consecutive rollouts
        form a group): per batch, the mean per-sequence gradient and the trace of its per-sequence covariance."""
        means, traces = [], []
        for _ in range(repeats):
            sequences = self.sample(samples, generator)
            grads = self.per_sequence_gradients(sequences, self.advantages(spec, sequences),
                                                route_a=spec.estimator == "single_step")
            means.append(grads.mean(0))
            traces.append(grads.var(0, correction=1).sum())
        return MonteCarloResult(means=torch.stack(means), trace_cov=torch.stack(traces))


def standard_estimators() -> list[EstimatorSpec]:
    """The estimators the benchmark tabulates (and the test checks): gamma in {0, 0.5, 0.9, 1}, the baselines,
    MiniLLM's single-step decomposition, GAE with lambda in {0, 0.5, 1} and a perfect or a zero value."""
    specs = [EstimatorSpec("immediate (gamma = 0) [TM]", "immediate"),
             EstimatorSpec("discounted gamma = 0.5", "discounted", gamma=0.5),
             EstimatorSpec("discounted gamma = 0.9", "discounted", gamma=0.9),
             EstimatorSpec("return-to-go (gamma = 1) [MiniLLM]", "return_to_go"),
             EstimatorSpec(f"baseline: group leave-one-out mean (n = {GROUP_SIZE})", "baseline",
                           baseline="group_mean"),
             EstimatorSpec("baseline: -RKL_t closed form [vOPD]", "baseline", baseline="reverse_kl"),
             EstimatorSpec("baseline: perfect value V(s_t)", "baseline", baseline="value", value="perfect"),
             EstimatorSpec("baseline: random per-state constant", "baseline", baseline="value",
                           value="state_constant"),
             EstimatorSpec("single-step decomposition [MiniLLM]", "single_step"),
             EstimatorSpec("single-step, length-normalised [MiniLLM]", "single_step", length_normalized=True)]
    for value in ("perfect", "zero"):
        for lam in (0.0, 0.5, 1.0):
            specs.append(EstimatorSpec(f"GAE lambda = {lam:g}, {value} value [Survey]", "gae", lam=lam, value=value))
    return specs
