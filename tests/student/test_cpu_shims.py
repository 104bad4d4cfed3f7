"""Each CPU shim is still needed (its probe fails without it, in a fresh process) and together they suffice (every
probe passes with all of them; the model, optimizer and checkpoint tests cover the rest). If a newer megatron-core
fixes one of these calls, the test names the shim to delete; if it adds a CUDA call, the training tests fail."""

import inspect
import importlib
import subprocess
import sys

import pytest
import torch

from opd_megatron.student import cpu_shims

pytestmark = [pytest.mark.cpu_only,
              pytest.mark.skipif(torch.cuda.is_available(), reason="the shims apply only without CUDA")]

_PROBE = """
import sys
from opd_megatron.student import cpu_shims
skip = tuple(n for n in sys.argv[1].split(",") if n)
cpu_shims.apply_cpu_shims(skip=skip)
names = sys.argv[2].split(",")
for shim in cpu_shims.SHIMS:
    if shim.name in names:
        shim.probe()
print("PROBES-OK")
"""


def _run_probe(skip: str, probes: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PROBE, skip, probes], capture_output=True, text=True, timeout=120)


def test_all_probes_pass_with_all_shims():
    result = _run_probe("", ",".join(s.name for s in cpu_shims.SHIMS))
    assert result.returncode == 0 and "PROBES-OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("shim", [s.name for s in cpu_shims.SHIMS])
def test_each_shim_is_still_needed(shim):
    result = _run_probe(shim, shim)
    assert result.returncode != 0, (
        f"megatron-core no longer needs the CPU shim {shim!r} (its probe passed without it): remove it from "
        f"opd_megatron/student/cpu_shims.py")
    assert "cuda" in result.stderr.lower() or "rng state" in result.stderr.lower(), result.stderr[-2000:]


@pytest.mark.parametrize("module_name", cpu_shims._CUDA_FACTORY_MODULES)
def test_each_redirected_module_still_calls_cuda(module_name):
    source = inspect.getsource(importlib.import_module(module_name))
    assert 'device="cuda"' in source or "device='cuda'" in source or "torch.cuda." in source, (
        f"{module_name} no longer calls CUDA: drop it from cpu_shims._CUDA_FACTORY_MODULES")


def test_shims_do_nothing_on_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_shims.apply_cpu_shims() == []


def test_cpu_rng_tracker_forks_reproducibly():
    tracker = cpu_shims.CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 42)
    outer = torch.get_rng_state()
    with tracker.fork("model-parallel-rng"):
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outer)  # the default stream is untouched
    saved = tracker.get_states()  # what megatron's activation checkpointing keeps before a forward
    with tracker.fork("model-parallel-rng"):
        second = torch.rand(3)
    assert not torch.equal(first, second)  # the forked stream advanced
    expected = torch.rand(6, generator=torch.Generator().manual_seed(42))
    assert torch.equal(torch.cat([first, second]), expected)
    # The recompute restores the saved states and must draw the very same dropout mask again; a get_states() that
    # handed out the live states (not a snapshot) would resume after `second` instead.
    tracker.set_states(saved)
    with tracker.fork("model-parallel-rng"):
        again = torch.rand(3)
    assert torch.equal(again, second), f"replayed draws {again.tolist()}, expected {second.tolist()}"


_IMPORT_MEGATRON = """
import warnings
warnings.simplefilter("default")          # what a plain `python script.py` shows
from opd_megatron.student import cpu_shims
cpu_shims.show_one_missing_gpu_packages_warning()
cpu_shims.show_one_missing_gpu_packages_warning()      # a second call changes nothing
import megatron.core.models.gpt, megatron.core.optimizer, megatron.core.tensor_parallel
warnings.warn("another warning stays")
"""


def test_megatrons_missing_gpu_packages_warning_is_shown_once():
    """megatron-core warns that Transformer Engine and Apex are not installed once per module that falls back: six
    times on importing GPTModel. With the filter, a process shows it once, and every other warning as before."""
    result = subprocess.run([sys.executable, "-c", _IMPORT_MEGATRON], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    shown = [line for line in result.stderr.splitlines() if "not installed" in line]
    assert len(shown) == 1 and "Transformer Engine and Apex are not installed" in shown[0], result.stderr
    assert "another warning stays" in result.stderr
