"""One call of a vLLM rollout server's weight-control routes (pause, reload, weight versions, weight transfer), shared
by the disk sync (rollout/served.py) and the NCCL sync (rollout/nccl_sync.py)."""

from __future__ import annotations

from typing import Any, Optional

import httpx

from opd_megatron.errors import RolloutServerError


def control_call(client: httpx.Client, url: str, method: str, path: str, body: Optional[dict],
                 missing_route: str) -> Any:
    """`method url+path` with the JSON `body`: the reply's JSON (None when the body is not JSON), or a
    RolloutServerError naming the server and the route for a transport failure or any status but 200; a 404 says
    `missing_route` (how to start the server so that the route exists)."""
    try:
        reply = client.request(method, url + path, json=body)
    except httpx.HTTPError as error:
        raise RolloutServerError(f"{url}{path}: {type(error).__name__}: {error}") from None
    if reply.status_code == 404:
        raise RolloutServerError(f"{url}{path}: HTTP 404: {missing_route}")
    if reply.status_code != 200:
        raise RolloutServerError(f"{url}{path}: HTTP {reply.status_code}: {reply.text[:300]}")
    try:
        return reply.json()
    except ValueError:
        return None


def check_reported_version(reply: Any, url: str, version: str, after: str) -> None:
    """A RolloutServerError unless `GET /weight_info`'s `reply` reports weight version `version` (after `after`:
    what was just done to the server, for the message); a reply that is not a JSON object reports none."""
    reported = reply.get("weight_version") if isinstance(reply, dict) else None
    if str(reported) != version:
        raise RolloutServerError(f"{url}: after {after} the server reports weight version {reported!r}, expected "
                                 f"{version!r}")
