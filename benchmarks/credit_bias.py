"""Bias and variance of every route-B credit estimator on a tiny tabular policy; writes docs/credit-bias.md.

The policy (vocabulary 3, length 3, a free logit table per prefix state) and its fixed teacher come from
`opd_megatron.math.credit_enumeration`, the same code `tests/math/test_credit_enumeration.py` asserts on. For each
estimator:
- bias, exact: every sequence (or every group of 3 rollouts, for the leave-one-out baseline) is enumerated, so
  `E[g]` is a sum; reported as `||E[g] - grad KL(pi||q)_seq||`, relative to `||grad KL||`, and the cosine;
- variance, Monte Carlo: `tr Cov[g(y)]` of the per-sequence gradient estimate, measured on `--repeats` batches of
  `--samples` rollouts, reported as mean +- standard error over the batches, and as a ratio to return-to-go.

    python -m benchmarks.credit_bias                       # a few seconds on 2 CPU cores
    python -m benchmarks.credit_bias --json runs/credit_bias.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from opd_megatron.math.credit_enumeration import (GROUP_SIZE, EstimatorSpec, TabularProblem,  # noqa: E402
                                                  standard_estimators)

DEFAULT_OUTPUT = REPO_ROOT / "docs" / "credit-bias.md"

INTERPRETATION = (
    "**Reading** (default seeds). The estimators that keep the whole future return, up to terms with zero mean "
    "given the state, are unbiased: return-to-go, all four baselines (even a random per-state constant), MiniLLM's "
    "single-step decomposition, GAE with a perfect value at every lambda, and GAE with lambda = 1 and any value; "
    "every one that drops or rescales part of the future return is biased. The immediate estimator [TM] is the "
    "most biased: its error is {imm_rel:.0f}% of the gradient's norm (cosine {imm_cos:.2f}); discounting's bias "
    "falls monotonically as gamma -> 1, and MiniLLM's length normalisation is biased too (it rescales each step's "
    "future return). Unbiasedness costs variance: "
    "return-to-go has {rtg_over_imm:.1f}x the immediate estimator's variance, and baselines buy back up to half of "
    "it: -RKL_t [vOPD] removes {vopd_cut:.0f}%, the perfect value {value_cut:.0f}%, the leave-one-out mean of "
    "{group} rollouts {loo_cut:.0f}%, while a baseline unrelated to the return (the random per-state constant) here "
    "adds {random_add:.0f}%. A perfect value makes GAE's lambda free of bias (gamma = 1), and lambda = 0 is then "
    "unbiased at {gae0_over_imm:.2f}x the immediate estimator's variance; with a zero value, GAE with lambda is the discounted "
    "estimator with gamma = lambda, so an inaccurate critic with a small lambda inherits the immediate estimator's "
    "bias.\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the student and teacher tables")
    parser.add_argument("--mc-seed", type=int, default=1, help="seed of the Monte Carlo rollouts")
    parser.add_argument("--samples", type=int, default=3000,
                        help=f"rollouts per Monte Carlo batch (a multiple of {GROUP_SIZE})")
    parser.add_argument("--repeats", type=int, default=20, help="Monte Carlo batches (for the standard error)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="markdown file to write")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    args = parser.parse_args(argv)
    if args.samples % GROUP_SIZE or args.samples < 2 * GROUP_SIZE or args.repeats < 2:
        parser.error(f"--samples must be a multiple of {GROUP_SIZE} (>= {2 * GROUP_SIZE}) and --repeats >= 2")
    return args


def measure(problem: TabularProblem, spec: EstimatorSpec, exact: torch.Tensor, samples: int, repeats: int,
            generator: torch.Generator) -> dict:
    expected = problem.expected_gradient(spec)
    bias = (expected - exact).norm().item()
    monte_carlo = problem.monte_carlo(spec, samples, repeats, generator)
    traces = monte_carlo.trace_cov
    return {"label": spec.label, "estimator": spec.estimator, "gamma": spec.gamma, "lam": spec.lam,
            "baseline": spec.baseline, "value": spec.value, "length_normalized": spec.length_normalized,
            "bias": bias, "relative_bias": bias / exact.norm().item(),
            "cosine": torch.nn.functional.cosine_similarity(expected, exact, dim=0).item(),
            "variance": traces.mean().item(), "variance_se": traces.std().item() / math.sqrt(repeats)}


def render(rows: list[dict], problem: TabularProblem, exact: torch.Tensor, predicted_bias: float,
           args: argparse.Namespace, seconds: float) -> str:
    by_label = {row["label"]: row for row in rows}
    rtg = next(row for row in rows if row["estimator"] == "return_to_go")
    imm = next(row for row in rows if row["estimator"] == "immediate")

    def pick(**match) -> dict:
        return next(row for row in rows if all(row[k] == v for k, v in match.items()))

    lines = [
        "# Credit estimators: exact bias and Monte Carlo variance",
        "",
        f"Written by `python -m benchmarks.credit_bias` ({datetime.date.today().isoformat()}, {seconds:.0f} s, "
        f"torch {torch.__version__}, float64). Problem: a tabular autoregressive student over a vocabulary of "
        f"{problem.vocab} and {problem.length} steps ({problem.num_states} prefix states x {problem.vocab} logits "
        f"= {exact.numel()} parameters, table seed {args.seed}) and a fixed tabular teacher; all "
        f"{len(problem.sequences)} sequences enumerated. Target: the exact `grad_theta KL(pi||q)_seq`, norm "
        f"{exact.norm().item():.4f}. The gradient estimate of a sequence is that of the route-B loss "
        f"`-sum_t log pi(y_t|s_t) sg(A_t)` (the single-step rows add MiniLLM's exact step-t reverse-KL gradient).",
        "",
        "- **bias**: `||E[g] - grad KL||`, exact by enumeration (the group baseline: over all "
        f"{len(problem.sequences)}^{GROUP_SIZE} groups of {GROUP_SIZE} independent rollouts); `1e-16`-level "
        "values are float64 rounding, i.e. zero.",
        f"- **variance**: `tr Cov[g(y)]` of the per-sequence estimate, mean +- standard error over {args.repeats} "
        f"Monte Carlo batches of {args.samples} rollouts (rollout seed {args.mc_seed}); "
        "the ratio is to return-to-go.",
        "",
        "| estimator | bias | bias / norm | cosine | variance (tr Cov) | vs return-to-go |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['label']} | {row['bias']:.3e} | {row['relative_bias']:.3f} | {row['cosine']:.4f} | "
                     f"{row['variance']:.3f} +- {row['variance_se']:.3f} | "
                     f"{row['variance'] / rtg['variance']:.2f} |")
    lines += [
        "",
        f"The immediate estimator's bias is the gradient through the state distribution it ignores: since "
        f"`KL_seq = sum_s d(s) RKL(s)`, `E[g_immediate] - grad KL = -sum_s grad d(s) RKL(s)`, computed separately by "
        f"autograd through `d(s)` alone; it matches the measured difference to {predicted_bias:.1e} "
        f"(`tests/math/test_credit_enumeration.py` asserts 1e-9). GAE with lambda = 1 is return-to-go minus the value "
        f"for any value, so its zero-value row equals the return-to-go row and its perfect-value row the "
        f"perfect-value baseline (up to Monte Carlo noise). The batch leave-one-out mean (`baseline=\"batch_mean\"`) "
        f"is the group mean of a single group: with one prompt it is the group row.",
        "",
        INTERPRETATION.format(
            imm_rel=100 * imm["relative_bias"], imm_cos=imm["cosine"],
            rtg_over_imm=rtg["variance"] / imm["variance"],
            vopd_cut=100 * (1 - pick(baseline="reverse_kl")["variance"] / rtg["variance"]),
            value_cut=100 * (1 - pick(estimator="baseline", value="perfect")["variance"] / rtg["variance"]),
            loo_cut=100 * (1 - pick(baseline="group_mean")["variance"] / rtg["variance"]), group=GROUP_SIZE,
            random_add=100 * (pick(value="state_constant")["variance"] / rtg["variance"] - 1),
            gae0_over_imm=pick(estimator="gae", lam=0.0, value="perfect")["variance"] / imm["variance"]),
    ]
    assert len(by_label) == len(rows), "estimator labels must be unique"
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    problem = TabularProblem(seed=args.seed)
    exact = problem.exact_gradient()
    generator = torch.Generator().manual_seed(args.mc_seed)
    rows = [measure(problem, spec, exact, args.samples, args.repeats, generator) for spec in standard_estimators()]
    immediate = problem.expected_gradient(EstimatorSpec("immediate", "immediate"))
    predicted_bias = (immediate - exact + problem.state_distribution_term()).norm().item()
    seconds = time.perf_counter() - started

    text = render(rows, problem, exact, predicted_bias, args, seconds)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"\nwrote {args.output}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"seed": args.seed, "mc_seed": args.mc_seed, "samples": args.samples,
                                         "repeats": args.repeats, "exact_gradient_norm": exact.norm().item(),
                                         "immediate_bias_prediction_error": predicted_bias, "rows": rows},
                                        indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
