"""Exact enumeration of the credit estimators on a tiny tabular autoregressive policy (vocabulary 3, length 3, all 27
sequences): which estimators are unbiased for grad KL(pi || q)_seq, by how much the others miss, and their variance
by Monte Carlo. float64 throughout; exact claims hold to 1e-9. Run with -s to see the numbers.

Sign convention: an estimator's per-sequence gradient is that of the route-B loss `L = -sum_t log pi(y_t|s_t) A_t`
(descent direction), so the unbiased estimators' expectation equals `+grad KL(pi || q)_seq`."""

import pytest
import torch

from opd_megatron.math.credit_enumeration import GROUP_SIZE, EstimatorSpec, TabularProblem, standard_estimators
from opd_megatron.math.policy_gradient import policy_gradient_loss

EXACT = 1e-9
# ||E[g_immediate] - grad KL|| for the default tables (seed 0); docs/credit-bias.md reports the same number.
IMMEDIATE_BIAS = 1.010856105726793


@pytest.fixture(scope="module")
def problem():
    return TabularProblem(seed=0)


@pytest.fixture(scope="module")
def exact(problem):
    return problem.exact_gradient()


def bias(problem, exact, spec):
    return (problem.expected_gradient(spec) - exact).norm().item()


def test_the_enumeration_is_complete(problem):
    assert problem.sequences.shape == (27, 3) and problem.num_states == 13
    assert abs(problem.sequence_probs().sum().item() - 1) < 1e-12
    distribution = problem.state_distribution()
    for depth in range(3):
        assert abs(distribution[problem.offsets[depth]:problem.offsets[depth + 1]].sum().item() - 1) < 1e-12
    # KL_seq = sum_s d(s) RKL(s): the sequence KL is the state-weighted per-state KL
    log_pi = problem.token_log_probs(problem.theta, problem.sequences)
    kl = (problem.sequence_probs() * (log_pi - problem.token_log_probs(problem.teacher, problem.sequences)).sum(-1))
    assert abs(kl.sum().item() - (distribution * problem.state_reverse_kl()).sum().item()) < 1e-12


def test_return_to_go_expectation_is_the_exact_gradient(problem, exact):
    spec = EstimatorSpec("return_to_go", "return_to_go")
    expected = problem.expected_gradient(spec)
    print(f"\n||grad KL_seq|| = {exact.norm().item():.6f}; return-to-go error {(expected - exact).norm().item():.2e}")
    assert (expected - exact).norm().item() < EXACT

    # the same expectation through autograd of the route-B loss itself: rows weighted by pi(y), Z = 27 * 1
    theta = problem.theta.clone().requires_grad_(True)
    sequences = problem.sequences
    logp = problem.token_log_probs(theta, sequences)
    weights = problem.sequence_probs()[:, None].expand(-1, 3)
    loss, _ = policy_gradient_loss(logp, problem.advantages(spec, sequences), torch.ones(27, 3, dtype=bool),
                                   weights=weights, normalizer="constant", max_length=1)
    gradient = torch.autograd.grad(loss * 27, theta)[0].flatten()
    assert (gradient - exact).norm().item() < EXACT


def test_immediate_estimator_misses_the_state_distribution_term(problem, exact):
    immediate = problem.expected_gradient(EstimatorSpec("immediate", "immediate"))
    difference = immediate - exact
    # prediction 1: the dropped future-return terms, E[-sum_t grad log pi(y_t|s_t) * (-G_{t+1})], with G_{t+1}
    # summed here directly (not by credit.py)
    sequences, probs = problem.sequences, problem.sequence_probs()
    log_ratio = problem.log_ratio(sequences)
    future = log_ratio.flip(-1).cumsum(-1).flip(-1) - log_ratio
    dropped = probs @ problem.per_sequence_gradients(sequences, -future)
    # prediction 2: minus the gradient through the state distribution, sum_s grad d(s) RKL(s), by autograd
    through_states = -problem.state_distribution_term()
    print(f"\nimmediate estimator: ||E[g] - grad KL|| = {difference.norm().item():.9f} "
          f"(||grad KL|| = {exact.norm().item():.6f}, cosine "
          f"{torch.nn.functional.cosine_similarity(immediate, exact, dim=0).item():.4f}); "
          f"predicted {dropped.norm().item():.9f} (dropped future terms), {through_states.norm().item():.9f} "
          f"(state-distribution gradient)")
    assert (difference - dropped).norm().item() < EXACT
    assert (difference - through_states).norm().item() < EXACT
    assert difference.norm().item() == pytest.approx(IMMEDIATE_BIAS, rel=1e-6)


def test_discounted_bias_shrinks_monotonically_as_gamma_goes_to_one(problem, exact):
    gammas = [0.0, 0.5, 0.9, 0.99, 1.0]
    biases = [bias(problem, exact, EstimatorSpec(f"gamma {g}", "discounted", gamma=g)) for g in gammas]
    print("\ndiscounted bias by gamma: " + ", ".join(f"{g}: {b:.3e}" for g, b in zip(gammas, biases)))
    assert biases[0] == pytest.approx(IMMEDIATE_BIAS, rel=1e-6)          # gamma = 0 is the immediate estimator
    assert all(a > b for a, b in zip(biases, biases[1:]))
    assert biases[-2] > 1e-3 and biases[-1] < EXACT


@pytest.mark.parametrize("spec", [
    EstimatorSpec("per-state constant", "baseline", baseline="value", value="state_constant"),
    EstimatorSpec("perfect value", "baseline", baseline="value", value="perfect"),
    EstimatorSpec("-RKL_t [vOPD]", "baseline", baseline="reverse_kl"),
    EstimatorSpec("group leave-one-out", "baseline", baseline="group_mean"),
    EstimatorSpec("single-step decomposition [MiniLLM]", "single_step"),
], ids=lambda spec: spec.label)
def test_baselines_independent_of_the_sampled_token_change_nothing(problem, exact, spec):
    error = bias(problem, exact, spec)
    print(f"\n{spec.label}: ||E[g] - grad KL|| = {error:.2e}")
    assert error < EXACT


def test_a_group_mean_that_includes_the_rollout_itself_scales_the_gradient(problem, exact):
    """Why the group baseline leaves the rollout out: including it makes b depend on y_t, and the expectation
    becomes (1 - 1/n) grad KL."""
    sequences, weights = problem.enumerate_groups(GROUP_SIZE)
    returns = problem.advantages(EstimatorSpec("rtg", "return_to_go"), sequences)
    group_mean = returns.reshape(-1, GROUP_SIZE, 3).mean(1, keepdim=True).expand(-1, GROUP_SIZE, 3).reshape(-1, 3)
    expected = weights @ problem.per_sequence_gradients(sequences, returns - group_mean)
    assert (expected - (1 - 1 / GROUP_SIZE) * exact).norm().item() < EXACT


def test_token_dependent_rescaling_is_biased(problem, exact):
    normalised = bias(problem, exact, EstimatorSpec("length-normalised", "single_step", length_normalized=True))
    print(f"\nsingle-step length-normalised bias {normalised:.3e}")
    assert normalised > 0.1


def test_gae_with_a_perfect_value(problem, exact):
    sequences = problem.sequences
    perfect = EstimatorSpec("gae", "gae", lam=1.0, value="perfect")
    values = problem.state_values(1.0)[problem.state_ids(sequences)]
    returns = problem.advantages(EstimatorSpec("rtg", "return_to_go"), sequences)
    # lambda = 1: return-to-go minus the value, elementwise, and unbiased
    torch.testing.assert_close(problem.advantages(perfect, sequences), returns - values, rtol=0, atol=1e-12)
    assert bias(problem, exact, perfect) < EXACT
    # with the perfect value every lambda is unbiased (each delta has zero mean given its state) ...
    for lam in (0.0, 0.5):
        assert bias(problem, exact, EstimatorSpec("gae", "gae", lam=lam, value="perfect")) < EXACT
    # ... while with a zero value lambda = 0 is the immediate estimator and lambda = 1 return-to-go
    assert bias(problem, exact, EstimatorSpec("gae", "gae", lam=0.0, value="zero")) == \
        pytest.approx(IMMEDIATE_BIAS, rel=1e-6)
    assert bias(problem, exact, EstimatorSpec("gae", "gae", lam=1.0, value="zero")) < EXACT


def test_monte_carlo_variance(problem):
    """Per-sequence gradient variance tr Cov[g] by Monte Carlo (fixed seed); the batch means agree with the exact
    expectations within their sampling error."""
    generator = torch.Generator().manual_seed(1)
    samples, repeats = 3000, 4
    variances = {}
    print()
    for spec in standard_estimators():
        result = problem.monte_carlo(spec, samples, repeats, generator)
        variances[spec] = result.trace_cov.mean().item()
        # ||mean of N per-sequence gradients - E[g]||^2 has expectation tr Cov / N
        error = (result.means.mean(0) - problem.expected_gradient(spec)).norm().item()
        tolerance = 4 * (variances[spec] / (samples * repeats)) ** 0.5
        print(f"  {spec.label:45s} tr Cov = {variances[spec]:7.3f} +- "
              f"{result.trace_cov.std().item() / repeats ** 0.5:.3f}   MC mean error {error:.4f} "
              f"(tolerance {tolerance:.4f})")
        assert error < tolerance

    def variance(**match):
        return next(v for spec, v in variances.items() if all(getattr(spec, k) == x for k, x in match.items()))

    rtg = variance(estimator="return_to_go")
    assert variance(estimator="immediate") < rtg / 3                       # immediate: low variance (and biased)
    assert variance(baseline="reverse_kl") < 0.7 * rtg                     # -RKL_t [vOPD] removes a large share
    assert variance(baseline="value", value="perfect") < 0.7 * rtg
    assert variance(baseline="group_mean") < rtg
    assert variance(estimator="gae", value="perfect", lam=0.0) < rtg / 3   # perfect-value TD(0): unbiased and low
