"""Process groups: torch.distributed + megatron-core model-parallel state, gloo on the CPU and NCCL on a GPU.

One process without a launcher is a world of one (a local TCP store on a free port); under torchrun the usual
RANK/WORLD_SIZE/MASTER_ADDR environment is used. The config's tp x pp must divide the world size: that is checked
from the environment before any process group or model is built. Every process group, megatron's TP/PP/DP groups
included, times out a collective after `run.collective_timeout_s` (gloo raises on the waiting ranks; NCCL's own
watchdog aborts the communicator).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from opd_megatron.config import RunConfig
from opd_megatron.student.cpu_shims import apply_cpu_shims, seed_model_parallel_rng


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits in the layout."""
    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda but torch.cuda.is_available() is False; use run.device=auto or cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_parallel(cfg: RunConfig, timeout_s: Optional[float] = None) -> ParallelContext:
    """Initialise torch.distributed (if not yet) and megatron's model-parallel groups for `cfg.parallel`, with
    collectives timing out after `timeout_s` (default `run.collective_timeout_s`)."""
    timeout_s = cfg.run.collective_timeout_s if timeout_s is None else timeout_s
    world_size = dist.get_world_size() if dist.is_initialized() else world_size_from_env()
    cfg.validate_for_world(world_size)
    device = resolve_device(cfg.run.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        apply_cpu_shims()
        # Two ranks on two cores: one intra-op thread each keeps them from fighting over the cores.
        if world_size > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                    timeout=timedelta(seconds=timeout_s))
    p = cfg.parallel
    # megatron's own groups take their timeout in minutes (30 by default), not the default group's.
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
                                             expert_model_parallel_size=p.ep,
                                             distributed_timeout_minutes=timeout_s / 60)
    ctx = ParallelContext(
        rank=dist.get_rank(), world_size=dist.get_world_size(), tp=p.tp, pp=p.pp,
        dp=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(), device=device)
    seed_everything(cfg.run.seed, ctx)
    return ctx


def seed_everything(seed: int, ctx: ParallelContext) -> None:
    """The same default seed on every rank (so CPU-initialised weights agree before TP splits them) plus
    megatron's per-TP-rank stream for dropout inside tensor-parallel regions."""
    torch.manual_seed(seed)
    if ctx.device.type == "cuda":
        from megatron.core import tensor_parallel
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        seed_model_parallel_rng(seed, ctx.tp_rank)


def heartbeat_store(timeout_s: float) -> Optional[dist.Store]:
    """A client connection of its own to the job's rendezvous store (MASTER_ADDR:MASTER_PORT: rank 0's, or
    torchrun's agent's), for the watchdog's heartbeats (`loop/watchdog.py`): its own socket, so a heartbeat waiting on
    the store never holds the process group's connection; each operation gives up after `timeout_s`. None for a world
    of one or without a launcher's environment."""
    if world_size_from_env() <= 1 or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    return dist.PrefixStore("opd-megatron/heartbeat/", store)


def abort_process(code: int) -> NoReturn:
    """End this process at once with `code`: no atexit handlers, no process-group teardown (either can wait forever
    on a hung peer), no flush but the caller's own. What the hang watchdog ends a rank with."""
    os._exit(code)


def broadcast_failure(failure: Optional[str]) -> Optional[str]:
    """The driver's failure message (or None) on every rank, so that all of them raise together."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return failure
    holder = [failure]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def destroy_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
