"""Run a test body on N gloo processes.

    results = run_distributed(my_module.worker, world_size=2, args=(path,), timeout_s=120)

Each process gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (a free port on 127.0.0.1) and runs
`fn(*args)`; the return values come back in rank order. The worker must be importable from a module (not defined in
a test function): processes are started with "spawn", as dist_checkpointing's own helper process requires. If a rank
raises, its traceback is shown and the others are stopped; if the body runs past `timeout_s`, all are killed.
Megatron's model-parallel state and the process group are destroyed at the end of each process.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from opd_megatron.student.distributed import free_port


class DistributedTestError(AssertionError):
    pass


def _worker(fn: Callable, rank: int, world_size: int, port: int, out_dir: str, args: Sequence[Any],
            env: dict[str, str]) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    os.environ.update(env)
    import torch
    torch.set_num_threads(1)
    outcome: tuple[str, Any]
    try:
        outcome = ("ok", fn(*args))
    except BaseException:  # noqa: BLE001 - any failure of the body is reported with its traceback
        outcome = ("error", traceback.format_exc())
    finally:
        from opd_megatron.student.distributed import destroy_parallel
        try:
            destroy_parallel()
        except Exception:  # noqa: BLE001 - teardown after a failure must not hide the failure
            pass
    with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as handle:
        pickle.dump(outcome, handle)


def run_distributed(fn: Callable, world_size: int, args: Sequence[Any] = (), timeout_s: float = 180.0,
                    env: dict[str, str] | None = None) -> list[Any]:
    context = multiprocessing.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [context.Process(target=_worker, args=(fn, rank, world_size, port, out_dir, tuple(args), env or {}),
                                 daemon=False) for rank in range(world_size)]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout_s
        failed_at = None
        while any(p.is_alive() for p in procs):
            now = time.monotonic()
            if failed_at is None and any((Path(out_dir) / f"rank{r}.pkl").exists() and _is_error(out_dir, r)
                                         for r in range(world_size)):
                failed_at = now  # a rank failed: give the others a moment to report, then stop them
            if now > deadline or (failed_at is not None and now - failed_at > 10):
                break
            time.sleep(0.05)
        alive = [r for r, p in enumerate(procs) if p.is_alive()]
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
        results, errors = [], []
        for rank in range(world_size):
            path = Path(out_dir) / f"rank{rank}.pkl"
            if not path.exists():
                errors.append(f"rank {rank}: no result (exit code {procs[rank].exitcode}"
                              f"{', killed after timeout' if rank in alive and failed_at is None else ''})")
                results.append(None)
                continue
            status, value = pickle.loads(path.read_bytes())
            if status == "error":
                errors.append(f"rank {rank} raised:\n{value}")
            results.append(value)
        if errors:
            head = (f"distributed test body {fn.__module__}.{fn.__name__} on {world_size} processes failed"
                    + (f" (timed out after {timeout_s:.0f} s)" if alive and failed_at is None else ""))
            raise DistributedTestError(head + "\n" + "\n".join(errors))
        return results


def _is_error(out_dir: str, rank: int) -> bool:
    try:
        return pickle.loads((Path(out_dir) / f"rank{rank}.pkl").read_bytes())[0] == "error"
    except Exception:  # noqa: BLE001 - a file being written is not yet an error
        return False
