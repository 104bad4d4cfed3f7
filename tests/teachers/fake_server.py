"""Local fake teacher servers on 127.0.0.1 for the HTTP client tests: a deterministic toy "model", replies in
SGLang's and vLLM's formats, and hooks to misbehave (hang, drop, wrong lengths, 429/503, counting concurrency)."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional

VOCAB = 64


def toy_logprobs(prefix: list[int], vocab: int = VOCAB) -> list[float]:
    """log q(. | prefix) of a toy model: a softmax over smooth, prefix-dependent logits."""
    shift = 0.11 * sum(prefix) + 0.7 * len(prefix)
    logits = [3.0 * math.sin(0.37 * v + shift) + 0.01 * v for v in range(vocab)]
    top = max(logits)
    norm = top + math.log(sum(math.exp(x - top) for x in logits))
    return [x - norm for x in logits]


def toy_topk(prefix: list[int], k: int) -> list[tuple[int, float]]:
    lp = toy_logprobs(prefix)
    return sorted(enumerate(lp), key=lambda e: (-e[1], e[0]))[:k]


def sglang_generate(body: dict, model: Optional[Callable[[list[int]], Any]] = None) -> list[dict]:
    """A /generate reply built as SGLang 0.5.23 builds it (logprob_result_processor.py + tokenizer_manager.py):
    entries for origin_input_ids[logprob_start_len:], entry 0 null, each a [logprob, id, null] triple; the
    token_ids_logprob entries list the row's sent ids in the order sent (logits_processor.py:
    `logprobs[pos, token_ids]`). `model(ids)`: a real teacher's log-probs `[len(ids), V]` of a row (row j =
    log q(. | ids[:j+1]), see `causal_lm_logprobs`); None: the toy model."""
    rows = body["input_ids"]
    starts = body["logprob_start_len"]
    starts = starts if isinstance(starts, list) else [starts] * len(rows)
    k = body.get("top_logprobs_num") or 0
    ids_lists = body.get("token_ids_logprob")
    out = []
    for i, ids in enumerate(rows):
        s = starts[i]
        rows = None if model is None else model(ids)
        tokens, tops, chosen = [], [], []
        for p in range(s, len(ids)):
            first = p == s
            lp = toy_logprobs(ids[:p]) if rows is None else [float(v) for v in rows[p - 1]]
            ranked = toy_topk(ids[:p], k) if rows is None else sorted(enumerate(lp), key=lambda e: (-e[1], e[0]))[:k]
            tokens.append([None if first else lp[ids[p]], ids[p], None])
            tops.append(None if first else [[v, t, None] for t, v in ranked])
            if ids_lists is not None:
                chosen.append(None if first else [[lp[t], t, None] for t in ids_lists[i]])
        meta = {"id": f"req-{i}", "finish_reason": {"type": "length", "length": 0}, "prompt_tokens": len(ids),
                "completion_tokens": 0, "cached_tokens": 0, "input_token_logprobs": tokens,
                "output_token_logprobs": []}
        if k:
            meta["input_top_logprobs"] = tops
            meta["output_top_logprobs"] = []
        if ids_lists is not None:
            meta["input_token_ids_logprobs"] = chosen
            meta["output_token_ids_logprobs"] = []
        out.append({"text": "", "output_ids": [], "meta_info": meta})
    return out


def causal_lm_logprobs(model: Callable[[Any], Any]) -> Callable[[list[int]], Any]:
    """`model` (token ids `[1, T]` -> logits `[1, T, V]`, or an HF causal LM) as `sglang_generate`'s `model`:
    float32 log_softmax of the row's logits, as SGLang's InputLogprobProcessor computes prompt logprobs."""
    import torch

    @torch.no_grad()
    def row_logprobs(ids: list[int]):
        out = model(torch.tensor([ids]))
        logits = getattr(out, "logits", out)[0].float()
        return torch.log_softmax(logits, dim=-1).tolist()
    return row_logprobs


def vllm_completions(body: dict) -> dict:
    """A /v1/completions reply with echo + prompt_logprobs as vLLM's OpenAI server gives it."""
    k = body["prompt_logprobs"]
    choices = []
    for i, ids in enumerate(body["prompt"]):
        positions: list[Optional[dict]] = [None]
        for t in range(1, len(ids)):
            lp = toy_logprobs(ids[:t])
            ranked = sorted(range(VOCAB), key=lambda v: (-lp[v], v))
            entry = {str(ids[t]): {"logprob": lp[ids[t]], "rank": ranked.index(ids[t]) + 1, "decoded_token": "x"}}
            for rank, v in enumerate(ranked[:k], start=1):
                entry[str(v)] = {"logprob": lp[v], "rank": rank, "decoded_token": "x"}
            positions.append(entry)
        choices.append({"index": i, "text": "", "logprobs": None, "finish_reason": "length",
                        "prompt_logprobs": positions, "prompt_token_ids": ids})
    return {"id": "cmpl-1", "object": "text_completion", "model": body.get("model"), "choices": choices}


class Reply:
    """What a route returns: a status, a JSON (or raw bytes) body, headers; or drop the connection / hang."""

    def __init__(self, body: Any = None, status: int = 200, headers: Optional[dict] = None, drop: bool = False,
                 hang_s: float = 0.0):
        self.body, self.status, self.headers, self.drop, self.hang_s = body, status, headers or {}, drop, hang_s


Route = Callable[[dict, dict], Any]  # (json body or {}, headers) -> Reply or a JSON-able object


class FakeServer:
    """A threaded HTTP server on 127.0.0.1 (a free port) answering routes[(method, path)](body, headers)."""

    def __init__(self, routes: dict[tuple[str, str], Route]):
        self.routes = routes
        self.requests: list[tuple[str, str, dict, dict]] = []  # (method, path, headers, body)
        self.inflight = 0
        self.max_inflight = 0
        self._lock = threading.Lock()
        self._connections: set = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                with server._lock:
                    server._connections.add(self.connection)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else {}
                headers = {k.lower(): v for k, v in self.headers.items()}
                with server._lock:
                    server.requests.append((method, self.path, headers, body))
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                try:
                    route = server.routes.get((method, self.path))
                    reply = route(body, headers) if route else Reply({"error": "not found"}, 404)
                    reply = reply if isinstance(reply, Reply) else Reply(reply)
                    if reply.hang_s:
                        time.sleep(reply.hang_s)
                    if reply.drop:
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    data = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                    self.send_response(reply.status)
                    for key, value in reply.headers.items():
                        self.send_header(key, value)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass
                finally:
                    with server._lock:
                        server.inflight -= 1

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def posts(self, path: str) -> list[dict]:
        return [body for method, p, _, body in self.requests if method == "POST" and p == path]

    def stop(self) -> None:
        """Stop listening and cut every open (keep-alive) connection, as a killed server would."""
        self.httpd.shutdown()
        self.httpd.server_close()
        with self._lock:
            for sock in self._connections:
                try:
                    sock.shutdown(2)
                except OSError:
                    pass
            self._connections.clear()

    def __enter__(self) -> "FakeServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def sglang_routes(generate: Route = lambda body, headers: sglang_generate(body),
                  model_path: str = "toy/teacher") -> dict:
    return {("GET", "/health_generate"): lambda b, h: Reply(b"", 200),
            ("GET", "/health"): lambda b, h: Reply(b"", 200),
            ("GET", "/get_model_info"): lambda b, h: {"model_path": model_path, "served_model_name": model_path,
                                                      "tokenizer_path": model_path, "is_generation": True,
                                                      "weight_version": "default"},
            ("POST", "/generate"): generate}


def vllm_routes(completions: Route = lambda body, headers: vllm_completions(body), model: str = "teacher",
                max_model_len: int = 256) -> dict:
    return {("GET", "/health"): lambda b, h: Reply(b"", 200),
            ("GET", "/v1/models"): lambda b, h: {"object": "list", "data": [
                {"id": model, "object": "model", "owned_by": "vllm", "root": "/models/toy",
                 "max_model_len": max_model_len}]},
            ("POST", "/v1/completions"): completions}


def free_port() -> int:
    """A port nothing listens on (bound then released)."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_request(lengths=(9, 6, 12), score_start=(4, 1, 7), length: int = 12, topk: int = 0, extra: int = 0,
                 seed: int = 0):
    """A TeacherRequest over toy ids (right-padded with -7, never sent), optionally with extra_ids [B, L-1, E]."""
    import torch
    from opd_megatron.teachers.base import TeacherRequest
    gen = torch.Generator().manual_seed(seed)
    b = len(lengths)
    tokens = torch.randint(0, VOCAB, (b, length), generator=gen)
    for row, n in enumerate(lengths):
        tokens[row, n:] = -7
    extra_ids = None
    if extra:
        extra_ids = torch.randint(0, VOCAB, (b, length - 1, extra), generator=gen)
        extra_ids[:, :, -1] = -1  # one unused slot per column
    return TeacherRequest(tokens=tokens, lengths=torch.tensor(lengths), score_start=torch.tensor(score_start),
                          topk=topk, extra_ids=extra_ids)


def expected_scores(request):
    """The toy model's label-aligned sampled logprobs, top-k and extra logprobs, [B, L-1, ...] as in base.py."""
    import torch
    b, columns, k = request.batch_size, request.columns, request.topk
    sampled = torch.zeros(b, columns)
    topk_ids = torch.zeros(b, columns, k, dtype=torch.int64)
    topk_lp = torch.zeros(b, columns, k)
    extra = None if request.extra_ids is None else torch.zeros(request.extra_ids.shape)
    for row in range(b):
        ids = request.row(row)
        for c in range(int(request.score_start[row]), len(ids) - 1):
            lp = toy_logprobs(ids[:c + 1])
            sampled[row, c] = lp[ids[c + 1]]
            for j, (t, v) in enumerate(toy_topk(ids[:c + 1], k)):
                topk_ids[row, c, j], topk_lp[row, c, j] = t, v
            if extra is not None:
                for e, t in enumerate(request.extra_ids[row, c].tolist()):
                    extra[row, c, e] = lp[t] if t >= 0 else 0.0
    return sampled, topk_ids, topk_lp, extra


def assert_matches_toy(scores, request) -> None:
    """`scores` equal the toy model's expected_scores at every label column (and are zero elsewhere)."""
    import torch
    sampled, topk_ids, topk_lp, extra = expected_scores(request)
    assert torch.equal(scores.valid, request.valid_mask())
    torch.testing.assert_close(scores.sampled_logprobs, sampled)
    if request.topk:
        assert torch.equal(scores.topk_ids, topk_ids)
        torch.testing.assert_close(scores.topk_logprobs, topk_lp)
    else:
        assert scores.topk_ids is None and scores.topk_logprobs is None
    if extra is not None:
        torch.testing.assert_close(scores.extra_logprobs, extra)
