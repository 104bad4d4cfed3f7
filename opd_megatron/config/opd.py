"""The run config's `opd` section: the OPD objective (docs/opd-math.md), one sub-section per part of it, each named
after the math module it configures.

    opd:
      loss: divergence (route A) | policy_gradient (route B) | cr_opd (route B with CR-OPD routing)
      kl_coef, normalizer, student_temperature, allow_temperature_mismatch, chunk_size, nonfinite, max_skipped_steps
      route_a:         the divergence and its support            math/divergences.py, math/supports.py
      policy_gradient: route B's ratio and clipping              math/policy_gradient.py
      credit:          advantages from the per-token reward       math/credit.py
      cr_opd:          CR-OPD's candidate set and routed loss     math/cr_opd.py (RoutingConfig)
      gates:           token gates and truncated IS               math/gates.py (GateConfig)
      regularizers:    entropy bonus, KL to the reference        math/regularizers.py
      mixtures:        the on-policy fraction                     math/mixtures.py

`cr_opd` and `gates` are the math modules' own configs: they check their values when built, and the loader reports
a bad one under its key (`opd.cr_opd.form: expected one of [...]`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from opd_megatron.config.loader import require
from opd_megatron.math.cr_opd import RoutingConfig
from opd_megatron.math.gates import GateConfig


@dataclass
class RouteASection:
    """Route A (opd.loss=divergence): a divergence between the student's and the teacher's next-token
    distributions at the visited states, over a support. `full` needs dense teacher logits (colocated or
    in-process); the top-k supports work with served teachers."""
    divergence: Literal["reverse_kl", "forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv"] = "reverse_kl"
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    support: Literal["full", "teacher_topk", "student_topk", "union"] = "full"
    support_k: int = 16
    support_mode: Literal["renormalized", "tail"] = "tail"

    def validate(self) -> None:
        require(0.0 <= self.jsd_beta <= 1.0, "opd.route_a.jsd_beta", "a float in [0, 1]", self.jsd_beta)
        require(0.0 <= self.skew_alpha <= 1.0, "opd.route_a.skew_alpha", "a float in [0, 1]", self.skew_alpha)
        require(self.support_k >= 1, "opd.route_a.support_k", "an integer >= 1", self.support_k)


@dataclass
class PolicyGradientSection:
    """Route B's update (opd.loss=policy_gradient): the sampled-token policy gradient on the log-ratio reward.
    ratio `logprob`: the plain log-probability term; `ppo`: the ratio pi_theta / pi_theta_old, clipped to
    [1 - clip_eps_low, 1 + clip_eps_high] (and a dual clip at `dual_clip` for negative advantages)."""
    ratio: Literal["logprob", "ppo"] = "logprob"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    dual_clip: Optional[float] = None


@dataclass
class CreditSection:
    """Credit assignment of route B and CR-OPD: the advantage A_t from the per-token reward r_t (the log-ratio).
    outcome_beta > 0 adds the verifier's reward: A = outcome_alpha * A_opd + outcome_beta * (R - b_R).
    value_*: GAE-OPD's value head (estimator gae, or baseline value)."""
    estimator: Literal["immediate", "return_to_go", "discounted", "baseline", "single_step", "gae"] = "immediate"
    gamma: float = 1.0
    gae_lambda: float = 0.95
    baseline: Optional[Literal["group_mean", "batch_mean", "reverse_kl", "value"]] = None
    length_normalized: bool = False      # single_step: MiniLLM's G_(t+1) / (T - t - 1)
    outcome_alpha: float = 1.0
    outcome_beta: float = 0.0
    value_lr: float = 1e-3
    value_coef: float = 1.0

    def validate(self) -> None:
        require(0.0 <= self.gamma <= 1.0, "opd.credit.gamma", "a float in [0, 1]", self.gamma)
        require(0.0 <= self.gae_lambda <= 1.0, "opd.credit.gae_lambda", "a float in [0, 1]", self.gae_lambda)


@dataclass
class RegularizersSection:
    """Terms added to the OPD loss: an entropy bonus, and KL(pi || ref) to the frozen starting weights
    (checkpoint.load) with the k1/k2/k3 estimator."""
    entropy_coef: float = 0.0
    reference_kl_coef: float = 0.0
    reference_kl_estimator: Literal["k1", "k2", "k3"] = "k3"


@dataclass
class MixturesSection:
    """Where the training sequences come from. on_policy_fraction (GKD's lambda): the share of batches sampled by
    the student (each step's whole batch is one or the other); the other batches are fixed rows (the task's
    reference answers or rollout.answer_key), trained with the same loss (0 = offline logit distillation on a
    corpus)."""
    on_policy_fraction: float = 1.0


@dataclass
class OpdSection:
    """The OPD objective: which loss, the settings every loss shares, and one sub-section per part (module
    docstring)."""
    loss: Literal["divergence", "policy_gradient", "cr_opd"] = "divergence"
    kl_coef: float = 1.0                 # scales the OPD term (the log-ratio reward / the divergence)
    normalizer: Literal["token_mean", "sequence_mean", "constant"] = "token_mean"
    student_temperature: float = 1.0
    # Sampling at a rollout.temperature other than student_temperature trains pi on states of another
    # distribution; the sampler-mismatch weight pi_theta_old / mu then differs from 1 on every token (corrected
    # by truncated IS, logged as mismatch/*). Refused unless this says it is intended.
    allow_temperature_mismatch: bool = False
    # Tokens per chunk of the vocab-parallel ops (None: all at once). 512 measured faster than all rows at once
    # (5-45%) with a half to a third of the memory (docs/performance.md, "Dense divergences: dedicated kernels").
    chunk_size: Optional[int] = 512
    nonfinite: Literal["skip", "stop"] = "skip"
    max_skipped_steps: int = 10
    route_a: RouteASection = field(default_factory=RouteASection)
    policy_gradient: PolicyGradientSection = field(default_factory=PolicyGradientSection)
    credit: CreditSection = field(default_factory=CreditSection)
    cr_opd: RoutingConfig = field(default_factory=RoutingConfig)
    gates: GateConfig = field(default_factory=GateConfig)
    regularizers: RegularizersSection = field(default_factory=RegularizersSection)
    mixtures: MixturesSection = field(default_factory=MixturesSection)

    def validate(self) -> None:
        a, c, reg = self.route_a, self.credit, self.regularizers
        a.validate()
        require(self.student_temperature > 0, "opd.student_temperature", "a positive number",
                self.student_temperature)
        c.validate()
        require(0.0 <= self.mixtures.on_policy_fraction <= 1.0, "opd.mixtures.on_policy_fraction",
                "a float in [0, 1]", self.mixtures.on_policy_fraction)
        require(self.kl_coef > 0, "opd.kl_coef", "a positive number", self.kl_coef)
        require(reg.reference_kl_coef >= 0 and reg.entropy_coef >= 0, "opd.regularizers.reference_kl_coef",
                "numbers >= 0 (opd.regularizers.reference_kl_coef, opd.regularizers.entropy_coef)",
                (reg.reference_kl_coef, reg.entropy_coef))
        require(self.chunk_size is None or self.chunk_size >= 1, "opd.chunk_size", "null or an integer >= 1",
                self.chunk_size)
        require(self.max_skipped_steps >= 0, "opd.max_skipped_steps", "an integer >= 0", self.max_skipped_steps)
        if c.estimator == "baseline":
            require(c.baseline is not None, "opd.credit.baseline",
                    "one of group_mean, batch_mean, reverse_kl, value with opd.credit.estimator=baseline", None)
        else:
            require(c.baseline is None, "opd.credit.baseline", f"null with opd.credit.estimator={c.estimator} (set "
                    f"opd.credit.estimator=baseline to subtract a baseline)", c.baseline)
        if c.estimator == "return_to_go":
            require(c.gamma == 1.0, "opd.credit.gamma", "1.0 with opd.credit.estimator=return_to_go (use "
                    "discounted)", c.gamma)

    @property
    def uses_value_head(self) -> bool:
        return self.loss != "divergence" and (self.credit.estimator == "gae" or self.credit.baseline == "value")
