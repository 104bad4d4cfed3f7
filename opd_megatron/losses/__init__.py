"""OPD losses (single-device references). Route A: distributional divergences at visited states
(`distributional.py`) on a chosen support (`supports.py`); route B: sampled-token log-ratio policy gradient
(`policy_gradient.py`); regularisers (`regularizers.py`). Both routes share `reduce_loss` and its NORMALIZERS."""

from opd_megatron.losses.distributional import (DIVERGENCES, NORMALIZERS, divergence_from_log_probs, forward_kl,
                                                generalized_jsd, reduce_loss, reverse_kl, skew_forward_kl,
                                                skew_reverse_kl, total_variation)
from opd_megatron.losses.policy_gradient import PolicyGradientStats, policy_gradient_loss, token_log_ratio
from opd_megatron.losses.regularizers import KL_ESTIMATORS, entropy, reference_kl
from opd_megatron.losses.supports import (MODES, SUPPORTS, SparseTeacherLogprobs, SupportedDistributions,
                                          build_support, divergence_on_support, top_k_positions)

__all__ = [
    "DIVERGENCES", "NORMALIZERS", "divergence_from_log_probs", "forward_kl", "generalized_jsd", "reduce_loss",
    "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "total_variation",
    "PolicyGradientStats", "policy_gradient_loss", "token_log_ratio",
    "KL_ESTIMATORS", "entropy", "reference_kl",
    "MODES", "SUPPORTS", "SparseTeacherLogprobs", "SupportedDistributions", "build_support",
    "divergence_on_support", "top_k_positions",
]
