"""A local HTTP proxy in front of a real vLLM rollout server that misbehaves on purpose (fault tests of
rollout/served.py): every request is forwarded unchanged, and `/v1/completions` replies are altered by `mode`:
- `shift_logprobs`: every sampled token's log-prob lowered by `shift` (a server whose `mu` is not the student's:
  wrong weights, wrong logprobs mode);
- `drop_token_ids`: the first `count` replies lose `token_ids` (malformed rows), later ones pass through;
- `pass`: nothing altered (a server to stop mid-run: `stop()`).
`completions` counts the `/v1/completions` requests seen."""

from __future__ import annotations

from tests.completions_proxy import CompletionsProxy


class MisbehavingProxy(CompletionsProxy):
    def __init__(self, upstream: str, mode: str, shift: float = 0.5, count: int = 1):
        super().__init__(upstream)
        self.mode, self.shift, self.count = mode, shift, count

    def alter(self, reply: dict, seen: int) -> dict:
        for choice in reply.get("choices", []):
            if self.mode == "shift_logprobs":
                logprobs = choice["logprobs"]
                logprobs["token_logprobs"] = [v - self.shift for v in logprobs["token_logprobs"]]
            elif self.mode == "drop_token_ids" and seen <= self.count:
                choice.pop("token_ids", None)
        return reply
