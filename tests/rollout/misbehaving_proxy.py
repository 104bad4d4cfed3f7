"""A local HTTP proxy in front of a real vLLM rollout server that misbehaves on purpose (fault tests of
rollout/served.py): every request is forwarded unchanged, and `/v1/completions` replies are altered by `mode`:
- `shift_logprobs`: every sampled token's log-prob lowered by `shift` (a server whose `mu` is not the student's:
  wrong weights, wrong logprobs mode);
- `drop_token_ids`: the first `count` replies lose `token_ids` (malformed rows), later ones pass through;
- `pass`: nothing altered (a server to stop mid-run: `stop()`).
`completions` counts the `/v1/completions` requests seen."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx


class MisbehavingProxy:
    def __init__(self, upstream: str, mode: str, shift: float = 0.5, count: int = 1):
        self.upstream, self.mode, self.shift, self.count = upstream, mode, shift, count
        self.completions = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):     # quiet
                pass

            def _forward(self, method: str) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else None
                reply = httpx.request(method, proxy.upstream + self.path, content=body, timeout=120.0,
                                      headers={"content-type": self.headers.get("content-type", "application/json")})
                content = reply.content
                if method == "POST" and self.path.startswith("/v1/completions") and reply.status_code == 200:
                    content = json.dumps(proxy.alter(reply.json())).encode()
                self.send_response(reply.status_code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                self._forward("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def alter(self, reply: dict) -> dict:
        with self.lock:
            self.completions += 1
            seen = self.completions
        for choice in reply.get("choices", []):
            if self.mode == "shift_logprobs":
                logprobs = choice["logprobs"]
                logprobs["token_logprobs"] = [v - self.shift for v in logprobs["token_logprobs"]]
            elif self.mode == "drop_token_ids" and seen <= self.count:
                choice.pop("token_ids", None)
        return reply

    def __enter__(self) -> "MisbehavingProxy":
        self.thread.start()
        return self

    def stop(self) -> None:
        """The server gone, as a killed one is: its port refuses connections from now on."""
        self.server.shutdown()
        self.server.server_close()

    def __exit__(self, *exc) -> None:
        self.stop()
