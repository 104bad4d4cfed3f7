"""Everything megatron-core 0.16.1 needs to train on a machine without CUDA, in one place.

megatron-core is written for GPUs: a handful of calls hard-code `device="cuda"`, the CUDA RNG tracker or CUDA
synchronisation. Each shim below redirects exactly one such call to the CPU, says why, and carries a `probe` that
shows the failure it fixes. `tests/student/test_cpu_shims.py` runs every probe in a fresh process with that shim
left out: if a newer megatron-core no longer fails there the test fails (drop the shim), and the model, optimizer
and checkpoint tests fail if a new CUDA call appears (add one). The whole story: docs/megatron-on-cpu.md.

`apply_cpu_shims()` does nothing when CUDA is available: GPU runs use megatron-core unmodified.
`show_one_missing_gpu_packages_warning()` keeps one of the warnings megatron-core gives at import on such a machine.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
import warnings
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Shim:
    name: str
    why: str
    apply: Callable[[], None]
    probe: Callable[[], None]   # exercises the megatron call the shim fixes; raises if it fails


_CPU = torch.device("cpu")
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like")


def _to_cpu(device):
    if device is None:
        return None
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")) or (
            isinstance(device, torch.device) and device.type == "cuda"):
        return _CPU
    return device


class _CudaNamespaceOnCpu(types.SimpleNamespace):
    """Stands in for `torch.cuda` inside one megatron module: synchronisation is a no-op on the CPU."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def synchronize(*args, **kwargs):
        return None

    @staticmethod
    def current_device():
        return _CPU


class _TorchWithCpuFactories(types.ModuleType):
    """Stands in for `torch` inside one megatron module: tensor factories asked for `device="cuda"` build on the
    CPU, and `torch.cuda` is `_CudaNamespaceOnCpu`. Everything else is the real torch."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaNamespaceOnCpu()
        for name in _FACTORIES:
            setattr(self, name, self._redirect(getattr(torch, name)))

    @staticmethod
    def _redirect(factory):
        @functools.wraps(factory)
        def build(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _to_cpu(kwargs["device"])
            return factory(*args, **kwargs)
        return build

    def __getattr__(self, name):
        return getattr(torch, name)


def _redirect_module_to_cpu(module_name: str) -> None:
    module = importlib.import_module(module_name)
    if not isinstance(module.torch, _TorchWithCpuFactories):
        module.torch = _TorchWithCpuFactories()


# -- 1. torch.cuda.current_device -------------------------------------------------------------------------------
def _apply_current_device():
    # RotaryEmbedding (inv_freq and the position table), GlobalMemoryBuffer.get_tensor (dot-product attention)
    # and DDP's grad buffers pass `device=torch.cuda.current_device()`; on a CUDA-less torch that raises.
    # Returning the CPU device makes them allocate on the CPU. This one is global: the calls are spread over
    # many modules (a module-local redirect is used below where a module also needs other CUDA calls).
    torch.cuda.current_device = lambda: _CPU


def _probe_current_device():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    RotaryEmbedding(kv_channels=8, rotary_percent=1.0)(4)


# -- 2. the model-parallel RNG tracker ----------------------------------------------------------------------------
class CpuRNGStatesTracker:
    """megatron's CudaRNGStatesTracker over the CPU generator: named RNG streams (one per TP rank for dropout in
    tensor-parallel regions) that `fork()` swaps in and out, as the CUDA tracker does with CUDA generators."""

    def __init__(self, *args, **kwargs):
        self.reset()

    def reset(self):
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _apply_rng_tracker():
    # model_parallel_cuda_manual_seed seeds CUDA generators and the stock tracker's fork() swaps CUDA RNG states:
    # neither exists without CUDA. Install a tracker over the CPU generator and mark it initialised so that
    # megatron's initialize_rng_tracker() keeps it.
    from megatron.core.tensor_parallel import random as mrandom
    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    if not isinstance(mrandom._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
        mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def _probe_rng_tracker():
    from megatron.core.tensor_parallel import random as mrandom
    mrandom.initialize_rng_tracker(force_reset=True)
    mrandom.get_cuda_rng_tracker().add("probe-rng", 1234)
    with mrandom.get_cuda_rng_tracker().fork("probe-rng"):
        torch.rand(1)


def seed_model_parallel_rng(seed: int, tp_rank: int, ep_rank: int = 0, etp_rank: int = 0) -> None:
    """CPU twin of megatron's `model_parallel_cuda_manual_seed`, with the same seed offsets (2718 + tp_rank for
    the tensor-parallel stream) so dropout streams line up with what megatron does on the GPU."""
    from megatron.core.tensor_parallel import random as mrandom
    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)


# -- 3. the default causal mask -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _causal_mask_cpu(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _apply_causal_mask():
    # FusedScaleMaskSoftmax builds the causal mask with torch.ones(sq, sq, device="cuda") when the model is called
    # with attention_mask=None (the causal case); fused_softmax imported the function by name, so patch it there.
    from megatron.core.fusions import fused_softmax
    fused_softmax.get_default_causal_mask = _causal_mask_cpu


def _probe_causal_mask():
    from megatron.core.fusions import fused_softmax
    fused_softmax.get_default_causal_mask(4)


# -- 4. device="cuda" tensor factories in the schedules, p2p, optimizer and grad-norm code ------------------------
_CUDA_FACTORY_MODULES = (
    "megatron.core.pipeline_parallel.schedules",       # total_num_tokens = torch.zeros([], device="cuda")
    "megatron.core.pipeline_parallel.p2p_communication",  # torch.cuda.synchronize() after batched p2p
    "megatron.core.optimizer.optimizer",               # found_inf / _scale_one buffers on "cuda"
    "megatron.core.optimizer.clip_grads",              # grad-norm all-reduce buffers on "cuda"
    "megatron.core.utils",                             # local_multi_tensor_l2_norm returns a "cuda" tensor
    "megatron.core.distributed.param_and_grad_buffer",  # a warm-up tensor on "cuda"
    "megatron.core.dist_checkpointing.strategies.filesystem_async",  # torch.cuda.synchronize() before writing
    "megatron.core.dist_checkpointing.strategies.async_utils",  # torch.cuda.synchronize() in the sync save path
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",  # a "cuda" flag tensor when reusing plans
)


def _apply_cuda_factories():
    # Only inside these modules: a module-local `torch` whose factories map device="cuda" to the CPU.
    for name in _CUDA_FACTORY_MODULES:
        _redirect_module_to_cpu(name)


def _probe_cuda_factories():
    from megatron.core.optimizer import clip_grads
    clip_grads.torch.zeros(1, dtype=torch.int, device="cuda")
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    filesystem_async.torch.cuda.synchronize()


# -- 5. clip_grad_by_total_norm_fp32 --------------------------------------------------------------------------------
def _clip_grad_by_total_norm_fp32_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's clip_grad_by_total_norm_fp32 without its `grad.type() == 'torch.cuda.FloatTensor'` assert:
    the same scale (max_norm / (total_norm + 1e-6), applied only when < 1) with torch._foreach_mul_."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _apply_clip_grad():
    # The non-distributed optimizer's clip_grad_norm calls this; it asserts CUDA float grads. Both the module
    # and the optimizer module (which imported it by name) get the CPU version.
    from megatron.core.optimizer import clip_grads, optimizer
    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32_cpu
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32_cpu


def _probe_clip_grad():
    from megatron.core.optimizer import optimizer
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    optimizer.clip_grad_by_total_norm_fp32([p], 1.0, 10.0)


# -- 6. the tied embedding copy on the last pipeline stage -----------------------------------------------------
@contextlib.contextmanager
def _tensor_cuda_is_identity():
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _apply_tied_embedding_copy():
    # With tied embeddings and pp > 1, LanguageModule.setup_embeddings_and_output_layer moves the last stage's copy
    # of the embedding to CUDA (`weight.data = weight.data.cuda()`) before all-reducing it with the first stage.
    # Run that method with Tensor.cuda as the identity (only for the duration of the call).
    from megatron.core.models.common.language_module.language_module import LanguageModule
    original = LanguageModule.setup_embeddings_and_output_layer
    if getattr(original, "_opd_cpu_shim", False):
        return

    @functools.wraps(original)
    def setup_embeddings_and_output_layer(self, *args, **kwargs):
        with _tensor_cuda_is_identity():
            return original(self, *args, **kwargs)

    setup_embeddings_and_output_layer._opd_cpu_shim = True
    LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


def _probe_tied_embedding_copy():
    # Reaching the call needs two pipeline stages; the PP=2 tied-embedding parity test runs it for real.
    # Here: does the method megatron would run still call Tensor.cuda?
    import inspect
    from megatron.core.models.common.language_module.language_module import LanguageModule
    method = LanguageModule.setup_embeddings_and_output_layer
    if not getattr(method, "_opd_cpu_shim", False) and ".cuda()" in inspect.getsource(method):
        raise RuntimeError("LanguageModule.setup_embeddings_and_output_layer calls Tensor.cuda() (no CUDA here)")


SHIMS: tuple[Shim, ...] = (
    Shim("current_device", "torch.cuda.current_device() raises without CUDA", _apply_current_device,
         _probe_current_device),
    Shim("rng_tracker", "the model-parallel RNG tracker forks CUDA generators", _apply_rng_tracker,
         _probe_rng_tracker),
    Shim("causal_mask", "the default causal mask is built on device='cuda'", _apply_causal_mask,
         _probe_causal_mask),
    Shim("cuda_factories", "schedules/p2p/optimizer/grad-norm build tensors on device='cuda'", _apply_cuda_factories,
         _probe_cuda_factories),
    Shim("clip_grad", "clip_grad_by_total_norm_fp32 asserts torch.cuda.FloatTensor grads", _apply_clip_grad,
         _probe_clip_grad),
    Shim("tied_embedding_copy", "the last stage's tied embedding copy is moved with Tensor.cuda()",
         _apply_tied_embedding_copy, _probe_tied_embedding_copy),
)

_applied: set[str] = set()


def apply_cpu_shims(skip: tuple[str, ...] = ()) -> list[str]:
    """Apply every shim (except `skip`, used by the tests) when CUDA is absent. Returns the names applied."""
    if torch.cuda.is_available():
        return []
    for shim in SHIMS:
        if shim.name not in skip and shim.name not in _applied:
            shim.apply()
            _applied.add(shim.name)
    return sorted(_applied)


# megatron-core 0.16.1 warns at import, in each module that falls back to torch, that it found neither
# TransformerEngine nor apex: six warnings on importing GPTModel, the same news each time.
MISSING_GPU_PACKAGES = r"(Transformer Engine and Apex are|Apex is) not installed"
# The one kept: the optimizer's ("Falling back to Torch optimizers"), which every import of megatron.core gives.
MISSING_GPU_PACKAGES_SHOWN_FROM = r"megatron\.core\.optimizer\Z"


def show_one_missing_gpu_packages_warning() -> None:
    """Warnings filters under which a process shows megatron-core's "Transformer Engine and Apex are not installed"
    once (the optimizer's) instead of once per module that falls back; every other warning as before. Install them
    before megatron-core is imported (at a command's start); a second call changes nothing."""
    warnings.filterwarnings("ignore", message=MISSING_GPU_PACKAGES)
    warnings.filterwarnings("default", message=MISSING_GPU_PACKAGES, module=MISSING_GPU_PACKAGES_SHOWN_FROM)
