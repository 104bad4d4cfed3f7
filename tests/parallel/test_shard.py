"""The debug switch of the vocab-parallel input checks (`parallel/shard.py`): off by default, on from
`OPD_DEBUG_CHECKS=1` or `set_debug_checks` / `debug_checks`; off, the checks that need a host read or another rank
are skipped (a bad token id or a NaN logit gives a number, as in megatron's cross entropy), on, they raise. The
checks that cost nothing run either way. How many collectives each setting adds at TP > 1 is asserted by
`divergences_workers.parity_worker`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from opd_megatron.math.checks import MathInputError
from opd_megatron.parallel import divergences as vp
from opd_megatron.parallel.shard import DEBUG_CHECKS_ENV, debug_checks, debug_checks_enabled, set_debug_checks


def test_environment_variable_sets_the_default():
    """Read once at import: each value in a fresh import of the module (in a child process, so that this one's
    classes stay as they are)."""
    probe = """
import importlib, os
import opd_megatron.parallel.shard as shard
for value in (None, "0", "", "1", "true", "on"):
    os.environ.pop(shard.DEBUG_CHECKS_ENV, None)
    if value is not None:
        os.environ[shard.DEBUG_CHECKS_ENV] = value
    print(importlib.reload(shard).debug_checks_enabled())
"""
    env = {k: v for k, v in os.environ.items() if k != DEBUG_CHECKS_ENV}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False", "True", "True", "True"]


def test_setter_and_block_restore_the_previous_setting():
    before = debug_checks_enabled()
    assert set_debug_checks(True) is before
    assert set_debug_checks(False) is True and not debug_checks_enabled()
    with debug_checks():
        assert debug_checks_enabled()
        with debug_checks(False):
            assert not debug_checks_enabled()
        assert debug_checks_enabled()
    assert not debug_checks_enabled()
    set_debug_checks(before)


def test_value_checks_run_only_in_debug_mode():
    logits = torch.randn(2, 3, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    outside = torch.full((2, 3), 11)
    nan_logits = logits.clone()
    nan_logits[1, 2, 4] = float("nan")
    with debug_checks(False):
        # Hot path: an id no rank owns reads no logit (log-prob -logsumexp); NaN logits give NaN.
        torch.testing.assert_close(vp.vocab_parallel_token_logprobs(logits, outside), -torch.logsumexp(logits, -1))
        assert torch.isnan(vp.vocab_parallel_reverse_kl(nan_logits, logits)[1, 2])
    with debug_checks():
        with pytest.raises(MathInputError, match=r"token_ids: expected token ids in \[0, 11\)"):
            vp.vocab_parallel_token_logprobs(logits, outside)
        with pytest.raises(MathInputError, match="student_logits_shard: expected finite values"):
            vp.vocab_parallel_reverse_kl(nan_logits, logits)


def test_free_checks_run_either_way():
    logits = torch.randn(2, 3, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for enabled in (False, True):
        with debug_checks(enabled):
            with pytest.raises(MathInputError, match="token_ids: expected an integer tensor"):
                vp.vocab_parallel_token_logprobs(logits, torch.zeros(2, 3))
            with pytest.raises(MathInputError, match="token_ids: expected shape"):
                vp.vocab_parallel_token_logprobs(logits, torch.zeros(2, 2, dtype=torch.long))
            with pytest.raises(MathInputError, match="expected equal shapes"):
                vp.vocab_parallel_forward_kl(logits, logits[..., :-1])
            with pytest.raises(MathInputError, match="keep_softmax"):
                vp.vocab_parallel_divergence("forward_kl", logits, logits, keep_softmax=True)
            with pytest.raises(MathInputError, match="beta: required"):
                vp.vocab_parallel_divergence("generalized_jsd", logits, logits)
