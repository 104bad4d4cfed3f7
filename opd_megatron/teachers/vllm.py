"""vLLM teacher: scores student rollouts with vLLM's OpenAI-compatible server (`POST /v1/completions`).

request  {"model": name, "prompt": [[ids...], ...], "max_tokens": 0, "echo": true, "prompt_logprobs": k,
          "temperature": T}
reply    `choices[i]` (matched by its `index`) has `prompt_logprobs`: one entry per prompt token, null at t=0,
         else a dict keyed by token id (a decimal string) -> {"logprob", "rank", "decoded_token"} that holds the
         actual token ids[t] and the top-k (k entries if the actual token is among them, else k+1). Entry t is
         log q(ids[t] | ids[:t]), i.e. label column t-1.

vLLM cannot score arbitrary ids at a position, so `scores_extra_ids` is False; k is capped by the server's
--max-logprobs (20 by default; set teacher.server.max_topk to the server's value); an out-of-vocabulary id is HTTP
400.
"""

from __future__ import annotations

import math

from typing import Any, Optional

from opd_megatron.teachers.base import TeacherError, TeacherRequest
from opd_megatron.teachers.http import RowScores, ServedTeacher, excerpt, logprob_value, token_id, top_k


class VLLMTeacher(ServedTeacher):
    """`VLLMTeacher(config)`: config is an `HTTPTeacherConfig` or a mapping of its keys, e.g.
    `{"urls": ["http://127.0.0.1:8000"], "model": "teacher", "vocab_size": 512}`. `model` is the served model
    name (--served-model-name); if empty, the server's first model is used."""

    health_path = "/health"
    score_path = "/v1/completions"
    models_path = "/v1/models"
    default_max_topk = 20  # vLLM's --max-logprobs default
    scores_extra_ids = False

    def __init__(self, config):
        self.max_model_len: Optional[int] = None
        super().__init__(config)

    def identities(self) -> dict[str, str]:
        """url -> `<served name> (<root>)` of `GET /v1/models` (the root is the checkpoint the server loaded);
        teacher.server.model must be served (if empty, the first server's first model is taken). Keeps the smallest
        max_model_len."""
        identities = {}
        for url in self.config.urls:
            reply = self.transport.get_json(url, self.models_path)
            models = reply.get("data") if isinstance(reply, dict) else None
            served = {m["id"]: m for m in models or [] if isinstance(m, dict) and isinstance(m.get("id"), str)} \
                if isinstance(models, list) else {}
            if not served:
                raise TeacherError(f"{self.name}: {url}{self.models_path} lists no models: {excerpt(reply)}")
            if not self.config.model:
                self.config.model = self.name = next(iter(served))
            if self.config.model not in served:
                raise TeacherError(f"{self.name}: {url} serves {sorted(served)}, not teacher.server.model="
                                   f"{self.config.model!r}")
            entry = served[self.config.model]
            length = entry.get("max_model_len")
            if isinstance(length, int) and not isinstance(length, bool):
                self.max_model_len = length if self.max_model_len is None else min(self.max_model_len, length)
            root = entry.get("root")
            identities[url] = f"{self.config.model} ({root})" if isinstance(root, str) else self.config.model
        return identities

    def payload(self, request: TeacherRequest, rows: list[int]) -> dict:
        prompts = [request.row(b) for b in rows]
        if self.max_model_len is not None:
            too_long = [b for b, ids in zip(rows, prompts) if len(ids) > self.max_model_len - 1]
            if too_long:
                raise TeacherError(f"{self.name}: rows {too_long} are longer than the server's max_model_len - 1 "
                                   f"= {self.max_model_len - 1} tokens (the longest prompt vLLM scores)")
        body = {
            "prompt": prompts,
            "max_tokens": 0,
            "echo": True,
            # At least 1: the reply then always holds the actual token; the top-k entries are ignored when k = 0.
            "prompt_logprobs": max(request.topk, 1),
            "temperature": self.config.temperature,
        }
        if self.config.model:
            body["model"] = self.config.model
        return body

    def parse(self, request: TeacherRequest, rows: list[int], reply: Any, where: str) -> list[RowScores]:
        model = reply.get("model") if isinstance(reply, dict) else None
        if isinstance(model, str) and self.config.model and model != self.config.model:
            raise TeacherError(f"{where}: the reply is from model {excerpt(model)}, not teacher.server.model="
                               f"{self.config.model!r}")
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list) or len(choices) != len(rows):
            raise TeacherError(f"{where}: expected {len(rows)} choices, got "
                               f"{len(choices) if isinstance(choices, list) else excerpt(reply)}")
        by_index = {c.get("index"): c for c in choices
                    if isinstance(c, dict) and isinstance(c.get("index"), int) and not isinstance(c["index"], bool)}
        if set(by_index) != set(range(len(rows))):
            found = [c.get("index") if isinstance(c, dict) else None for c in choices]
            raise TeacherError(f"{where}: choice indices {excerpt(found)} are not the integers 0..{len(rows) - 1}")
        return [self._parse_row(request, b, by_index[i], f"{where} row {b}") for i, b in enumerate(rows)]

    def _parse_row(self, request: TeacherRequest, b: int, choice: dict, where: str) -> RowScores:
        ids = request.row(b)
        positions = choice.get("prompt_logprobs")
        if not isinstance(positions, list) or len(positions) != len(ids):
            raise TeacherError(f"{where}: prompt_logprobs has "
                               f"{len(positions) if isinstance(positions, list) else excerpt(positions)} "
                               f"entries, expected {len(ids)} (one per prompt token)")
        if positions[0] is not None:
            raise TeacherError(f"{where}: prompt_logprobs[0] should be null (the first token has no logprob)")
        start, k = int(request.score_start[b]), request.topk
        scores = RowScores(sampled=[], topk_ids=[] if k else None, topk_logprobs=[] if k else None)
        for t in range(start + 1, len(ids)):  # entry t is label column t - 1
            entry = positions[t]
            fast = _fast_entry(entry, ids[t], k)
            if fast is not None:
                sampled, best_ids, best = fast
                scores.sampled.append(sampled)
                if k:
                    scores.topk_ids.append(best_ids)
                    scores.topk_logprobs.append(best)
                continue
            # Something is off in this position: the checked path below names exactly what.
            entry_where = f"{where} column {t - 1} (prompt_logprobs[{t}])"
            if not isinstance(entry, dict):
                raise TeacherError(f"{entry_where}: expected a dict of token id -> logprob, got {excerpt(entry)}")
            values = [(token_id(key, entry_where), _logprob(item, entry_where)) for key, item in entry.items()]
            by_id = dict(values)
            if ids[t] not in by_id:
                raise TeacherError(f"{entry_where}: the actual token {ids[t]} is missing (ids {sorted(by_id)[:8]}): "
                                   f"the reply is not aligned with the request")
            scores.sampled.append(by_id[ids[t]])
            if k:
                best_ids, best = top_k(values, k, entry_where)
                scores.topk_ids.append(best_ids)
                scores.topk_logprobs.append(best)
        return scores


def _fast_entry(entry: Any, actual: int, k: int):
    """One well-formed position of a reply in one pass: (actual token's logprob, top-k ids, top-k logprobs), or None
    when anything is unusual (then the checked path raises the precise error). Same rules as the checked path:
    every value a finite number <= 0, ids decimal strings, the actual token present, >= k entries, ties to the
    lower id."""
    if type(entry) is not dict or len(entry) < k:
        return None
    values = []
    for key, item in entry.items():
        # ids: ASCII decimal strings of at most 18 digits (within int64); anything else takes the checked path.
        if type(item) is not dict or type(key) is not str or not key.isascii() or not key.isdigit() or len(key) > 18:
            return None
        value = item.get("logprob")
        if type(value) is not float and (type(value) is not int or value < -1e300):
            return None
        if not -math.inf < value <= 1e-4:
            return None
        values.append((-value, int(key)))
    by_id = {i: -v for v, i in values}
    if actual not in by_id:
        return None
    if not k:
        return by_id[actual], None, None
    best = sorted(values)[:k]
    return by_id[actual], [i for _, i in best], [-v for v, _ in best]


def _logprob(item: Any, where: str) -> float:
    if not isinstance(item, dict) or "logprob" not in item:
        raise TeacherError(f"{where}: expected {{logprob, rank, decoded_token}}, got {excerpt(item)}")
    return logprob_value(item["logprob"], where)
