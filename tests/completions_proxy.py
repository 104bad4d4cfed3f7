"""A local HTTP proxy in front of a real vLLM server (127.0.0.1) for fault tests: every request is forwarded
unchanged, and each `/v1/completions` reply passes through `alter(reply, seen)` (`seen`: 1 for the first such
request), which returns the reply to send, altered or not, or None to send the server's bytes unchanged. Subclasses:
tests/rollout/misbehaving_proxy.py (a rollout server that misbehaves), tests/teachers/test_degrading_vllm_real.py (a
teacher whose replies degrade). `completions` counts the `/v1/completions` requests seen."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

import httpx


class CompletionsProxy:
    def __init__(self, upstream: str):
        self.upstream = upstream
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
                    with proxy.lock:
                        proxy.completions += 1
                        seen = proxy.completions
                    altered = proxy.alter(reply.json(), seen)
                    if altered is not None:
                        content = json.dumps(altered).encode()   # NaN is written as NaN, as Python servers do
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

    def alter(self, reply: dict, seen: int) -> Optional[dict]:
        return None

    def __enter__(self):
        self.thread.start()
        return self

    def stop(self) -> None:
        """The server gone, as a killed one is: its port refuses connections from now on."""
        self.server.shutdown()
        self.server.server_close()

    def __exit__(self, *exc) -> None:
        self.stop()
