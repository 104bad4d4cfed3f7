"""Weight sync to vLLM rollout servers over NCCL (GPU only), vLLM 0.32's weight-transfer engine: the trainer is rank
0 of one NCCL group with every worker of every server and broadcasts the student's weights bucket by bucket, with
no disk in between. `rollout.server.sync: nccl` (or `auto` on a GPU at PP = 1); `disk` (rollout/served.py) works
everywhere.

Protocol, read from vLLM 0.32.0's source (`vllm/entrypoints/rl/online/api_router.py`,
`vllm/distributed/weight_transfer/{nccl_common,nccl_engine,packed_tensor}.py`,
`vllm/distributed/device_communicators/pynccl.py`), and checked against it by `tests/rollout/test_nccl_sync.py`:
- the servers run with `--weight-transfer-config '{"backend": "nccl"}'` and `VLLM_SERVER_DEV_MODE=1`;
- once: `GET /get_world_size` per server (its workers, TP x PP x DP); the trainer mints an NCCL unique id
  (`ncclGetUniqueId`, 128 bytes) and sends it, standard base64, in `POST /init_weight_transfer_engine {"init_info":
  {"nccl_unique_id_b64", "rank_offset", "world_size", "packed": true, "packed_buffer_size_bytes",
  "packed_num_buffers"}}` to every server at once (server i's workers take ranks rank_offset_i + their worker rank,
  rank_offset_i = 1 + the workers of the servers before it: one group for all of them), while it joins as rank 0
  itself (`ncclCommInitRank` has no barrier: every rank must be in it together); then the one-element float32
  all-reduce every vLLM peer issues right after joining (`PyNcclCommunicator.from_unique_id_bytes`: a peer that
  skips it deadlocks the group), and only then do the init requests return;
- each sync: `POST /pause?mode=wait` (in-flight requests finish; the prefix cache is cleared), `POST
  /start_weight_update`, then per bucket `POST /update_weights {"update_info": {"names", "dtype_names", "shapes"}}`
  in a thread WHILE the trainer broadcasts the bucket (both sides block in the same NCCL call), `POST
  /finish_weight_update {"weight_version"}`, `POST /resume`. Between start and finish the servers' layers are
  being replaced, so the pause comes first;
- packing (`packed_tensor.pack_tensors`): tensors of HF names, whole (unsharded), in the declared order, as flat
  uint8 views concatenated until the running size EXCEEDS the buffer size (the tensor that crosses it stays in the
  bucket); the workers cut the same buckets from the metadata, so the declared metadata of one `/update_weights` is
  exactly one bucket here and one broadcast.

The student's tensors come from `student/hf_bridge.py::hf_tensors` (each gathered over TP, one parameter at a time,
on the trainer's rank 0): PP = 1 only (at PP > 1 the other stages' tensors would have to reach rank 0 first; use
the disk sync). This module has not run on a GPU: no GPU was lent to the session that wrote it; on the CPU its HTTP
order and bodies run against a fake server and its buckets are unpacked by vLLM's own `unpack_tensor`.
"""

from __future__ import annotations

import base64
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from opd_megatron.errors import RolloutServerError
from opd_megatron.rollout.control import check_reported_version, control_call
from opd_megatron.student.distributed import broadcast_failure

#: vLLM's defaults (`packed_tensor.DEFAULT_PACKED_BUFFER_SIZE_BYTES`); the trainer sends its own in init_info.
DEFAULT_BUCKET_BYTES = 1 << 30
NCCL_UNIQUE_ID_BYTES = 128


@dataclass
class Bucket:
    """One broadcast: the HF names, shapes and dtype names of its tensors, and their bytes concatenated `[n]`
    uint8."""
    names: list[str]
    shapes: list[list[int]]
    dtype_names: list[str]
    data: torch.Tensor

    def update_info(self) -> dict[str, Any]:
        return {"names": self.names, "dtype_names": self.dtype_names, "shapes": self.shapes}


def pack_buckets(tensors: Iterable[tuple[str, torch.Tensor]], buffer_size_bytes: int) -> Iterator[Bucket]:
    """vLLM's packing rule (`pack_tensors`): append each tensor's bytes, and close the bucket once the running size
    exceeds `buffer_size_bytes` (so a bucket ends with the tensor that crossed it; a tensor larger than the buffer
    is a bucket of its own, after the ones before it)."""
    names: list[str] = []
    shapes: list[list[int]] = []
    dtypes: list[str] = []
    parts: list[torch.Tensor] = []
    total = 0
    for name, tensor in tensors:
        flat = tensor.contiguous().view(-1).view(torch.uint8)
        names.append(name)
        shapes.append(list(tensor.shape))
        dtypes.append(str(tensor.dtype).removeprefix("torch."))
        parts.append(flat)
        total += flat.numel()
        if total > buffer_size_bytes:
            yield Bucket(names, shapes, dtypes, torch.cat(parts))
            names, shapes, dtypes, parts, total = [], [], [], [], 0
    if parts:
        yield Bucket(names, shapes, dtypes, torch.cat(parts))


class NcclChannel:
    """The trainer's end of the NCCL group (rank 0), on the current CUDA device, through torch's NCCL bindings
    (`torch.cuda.nccl`: a communicator from a unique id, no process group or TCP store)."""

    def __init__(self, world_size: int, unique_id: bytes):
        import torch.cuda.nccl as nccl

        self._nccl = nccl
        self.comm = nccl.init_rank(world_size, unique_id, 0)

    @staticmethod
    def new_unique_id() -> bytes:
        import torch.cuda.nccl as nccl

        return nccl.unique_id()

    def warm_up(self) -> None:
        """The one-element float32 all-reduce vLLM's communicator issues right after joining."""
        data = torch.zeros(1, device="cuda")
        self._nccl.all_reduce([data], comms=[self.comm])
        torch.cuda.synchronize()

    def broadcast(self, data: torch.Tensor) -> None:
        self._nccl.broadcast([data.cuda()], root=0, comms=[self.comm])
        torch.cuda.synchronize()


class VLLMNcclWeightSync:
    """`publish(version)` / `reload(urls)` like `served.DiskWeightSync`, over NCCL. `tensors()` yields the student's
    HF tensors (collective on every rank; non-empty on the driver only). `channel_factory(world_size, unique_id)`
    makes the trainer's NCCL end (`NcclChannel`; tests pass a recording one)."""

    def __init__(self, urls: Sequence[str], tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]],
                 is_driver: bool, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 channel_factory: Callable[[int, bytes], Any] = NcclChannel,
                 new_unique_id: Callable[[], bytes] = NcclChannel.new_unique_id, request_timeout_s: float = 600.0,
                 headers: Optional[dict[str, str]] = None):
        import httpx

        self.urls = list(urls)
        self.tensors = tensors
        self.is_driver = is_driver
        self.bucket_bytes = bucket_bytes
        self.channel_factory, self.new_unique_id = channel_factory, new_unique_id
        self.client = httpx.Client(headers=headers or {}, timeout=request_timeout_s, trust_env=False)
        self.channel = None
        self.version: Optional[int] = None
        self.seconds: list[float] = []
        self.reload_seconds: list[float] = []
        self.buckets = 0

    # -- HTTP ----------------------------------------------------------------------------------------------------
    def _call(self, url: str, method: str, path: str, body: Optional[dict] = None) -> Any:
        return control_call(self.client, url, method, path, body,
                            "start the rollout server with VLLM_SERVER_DEV_MODE=1 and --weight-transfer-config "
                            "'{\"backend\": \"nccl\"}'")

    def _on_all(self, method: str, path: str, body: Optional[dict] = None) -> list[Any]:
        return [self._call(url, method, path, body) for url in self.urls]

    # -- the group -----------------------------------------------------------------------------------------------
    def _connect(self) -> None:
        """The NCCL group of the trainer (rank 0) and every worker of every server (driver only)."""
        sizes = []
        for url in self.urls:
            reply = self._call(url, "GET", "/get_world_size")
            size = reply.get("world_size") if isinstance(reply, dict) else None
            if not isinstance(size, int) or size < 1:
                raise RolloutServerError(f"{url}/get_world_size: expected {{\"world_size\": N}}, got {reply!r}")
            sizes.append(size)
        world = 1 + sum(sizes)
        unique_id = self.new_unique_id()
        if len(unique_id) != NCCL_UNIQUE_ID_BYTES:
            raise RolloutServerError(f"an NCCL unique id is {NCCL_UNIQUE_ID_BYTES} bytes, got {len(unique_id)}")
        encoded = base64.b64encode(unique_id).decode()      # standard base64: vLLM refuses the URL-safe alphabet
        offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
        with ThreadPoolExecutor(max_workers=len(self.urls)) as pool:
            # The servers' workers block in ncclCommInitRank until the trainer joins: all at once.
            pending = [pool.submit(self._call, url, "POST", "/init_weight_transfer_engine", {"init_info": {
                "nccl_unique_id_b64": encoded, "rank_offset": offset, "world_size": world, "packed": True,
                "packed_buffer_size_bytes": self.bucket_bytes, "packed_num_buffers": 1}})
                for url, offset in zip(self.urls, offsets)]
            channel = self.channel_factory(world, unique_id)
            channel.warm_up()
            for future in pending:
                future.result()
        self.channel = channel

    # -- a sync --------------------------------------------------------------------------------------------------
    def publish(self, version: int) -> None:
        """Broadcast the current weights as version `version` (collective: every rank iterates the tensors)."""
        started = time.perf_counter()
        failure = None
        tensors = iter(self.tensors())
        try:
            if self.is_driver:
                if self.channel is None:
                    self._connect()
                self._send(tensors, str(version))
        except RolloutServerError as error:
            failure = str(error)
        finally:
            for _ in tensors:     # the TP gathers are collective: every rank goes through them all, sent or not
                pass
        failure = broadcast_failure(failure)
        if failure is not None:
            raise RolloutServerError(failure)
        self.version = version
        self.seconds.append(time.perf_counter() - started)

    def _send(self, tensors: Iterable[tuple[str, torch.Tensor]], version: str) -> None:
        started = time.perf_counter()
        self._on_all("POST", "/pause?mode=wait")
        try:
            self._on_all("POST", "/start_weight_update")
            with ThreadPoolExecutor(max_workers=len(self.urls)) as pool:
                for bucket in pack_buckets(tensors, self.bucket_bytes):
                    # The workers receive inside /update_weights: the request and the broadcast run together.
                    pending = [pool.submit(self._call, url, "POST", "/update_weights",
                                           {"update_info": bucket.update_info()}) for url in self.urls]
                    self.channel.broadcast(bucket.data)
                    for future in pending:
                        future.result()
                    self.buckets += 1
            self._on_all("POST", "/finish_weight_update", {"weight_version": version})
        finally:
            self._on_all("POST", "/resume")
        for url in self.urls:
            reply = self._call(url, "GET", "/weight_info")
            check_reported_version(reply, url, version, "the NCCL update")
        self.reload_seconds.append(time.perf_counter() - started)

    def reload(self, urls: Sequence[str]) -> None:
        """A server found on another version (restarted) cannot be brought back over NCCL from here alone: its
        workers left the group. Say so; the run resumes with the disk sync or a restart of the whole group."""
        raise RolloutServerError(f"rollout servers {list(urls)} lost the weights sent over NCCL (restarted?); "
                                 f"restart the run (it resumes from its checkpoint and re-forms the group) or use "
                                 f"rollout.server.sync=disk")

    def close(self) -> None:
        self.client.close()
