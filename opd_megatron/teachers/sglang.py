"""SGLang teacher: scores student rollouts with SGLang's native `POST /generate` (also behind `sglang-router`).

Protocol as read in SGLang 0.5.23's source (docs/teachers.md has the file/line references; the pinned version is
checked by tests/teachers/test_sglang_protocol.py):

request  {"input_ids": [[ids...], ...], "sampling_params": {"max_new_tokens": 0, "temperature": T},
          "return_logprob": true, "logprob_start_len": [s_b, ...], "top_logprobs_num": k,
          "token_ids_logprob": [[ids of row b...], ...]}
reply    one object per row; `meta_info.input_token_logprobs` is a list of [logprob, token_id, text|null], one per
         input token from position s on (`origin_input_ids[s:]`), the first one's logprob null: entry i is
         log q(ids[s+i] | ids[:s+i]), i.e. label column s+i-1. `input_top_logprobs` and `input_token_ids_logprobs`
         are lists of the same length whose entries are lists of such triples (null at entry 0).

So sending logprob_start_len = score_start puts entry i at column score_start + i - 1: entries 1..n-1-s cover
exactly the scored columns score_start .. lengths-2, and entry 0 (null) is the column before, never scored.

`token_ids_logprob` is ONE id list per row, scored at every position in the order sent (logits_processor.py
`get_token_ids_logprobs`: `logprobs[pos, token_ids]`; detokenised into [logprob, id, text] triples by
tokenizer_manager.py). The student's top-k differs per column, so a row sends the sorted union of its scored
columns' `extra_ids` (bounded by teacher.server.max_extra_ids) and each column's ids are picked from the
reply (`http._pick_extra`, by id, so the reply's order does not matter). The training loop fills `extra_ids` with the
student's top-k from a forward-only pass (`loop/teacher_scoring.py::TeacherScoring.student_topk`) for the
student_topk / union supports.
"""

from __future__ import annotations

from typing import Any

import torch

from opd_megatron.teachers.base import TeacherError, TeacherRequest
from opd_megatron.teachers.http import RowScores, ServedTeacher, excerpt, logprob_value, token_id, top_k

#: The SGLang version whose protocol this client follows (tests/teachers/test_sglang_protocol.py reads its source).
SGLANG_VERSION = "0.5.23"


class SGLangTeacher(ServedTeacher):
    """`SGLangTeacher(config)`: config is an `HTTPTeacherConfig` or a mapping of its keys (urls, model, vocab_size,
    transport knobs). `model`, if given, must match the server's served_model_name or model_path."""

    health_path = "/health_generate"
    score_path = "/generate"
    model_info_path = "/get_model_info"
    scores_extra_ids = True

    def start_checks(self) -> None:
        super().start_checks()
        if len(set(self.served.values())) > 1:
            raise TeacherError(f"{self.name}: the teacher URLs serve different models: {self.served}")

    def identities(self) -> dict[str, str]:
        """url -> the model_path of `GET /get_model_info`; teacher.server.model, if set, must be its model_path or
        served_model_name."""
        identities = {}
        for url in self.config.urls:
            info = self.transport.get_json(url, self.model_info_path)
            if not isinstance(info, dict) or not isinstance(info.get("model_path"), str):
                raise TeacherError(f"{self.name}: {url}{self.model_info_path} has no model_path: {excerpt(info)}")
            names = {info[key] for key in ("model_path", "served_model_name") if isinstance(info.get(key), str)}
            if self.config.model and self.config.model not in names:
                raise TeacherError(f"{self.name}: {url} serves {sorted(names)}, not teacher.server.model="
                                   f"{self.config.model!r}")
            identities[url] = info["model_path"]
        return identities

    def payload(self, request: TeacherRequest, rows: list[int]) -> dict:
        body = {
            "input_ids": [request.row(b) for b in rows],
            "sampling_params": {"max_new_tokens": 0, "temperature": self.config.temperature},
            "return_logprob": True,
            "logprob_start_len": [int(request.score_start[b]) for b in rows],
            "top_logprobs_num": request.topk,
            "return_text_in_logprobs": False,
        }
        if request.extra_ids is not None:
            body["token_ids_logprob"] = [self._union(request, b) for b in rows]
        return body

    def _union(self, request: TeacherRequest, b: int) -> list[int]:
        """The distinct extra ids of row b's scored columns: SGLang scores ONE id list at every position."""
        start, stop = int(request.score_start[b]), int(request.lengths[b]) - 1
        ids = request.extra_ids[b, start:stop]
        union = sorted({int(i) for i in ids[ids >= 0].tolist()})
        if len(union) > self.config.max_extra_ids:
            raise TeacherError(f"{self.name}: row {b} asks for {len(union)} distinct extra ids, above "
                               f"teacher.server.max_extra_ids={self.config.max_extra_ids} (each is scored at every "
                               f"position); raise the bound or ask for fewer")
        # A row without extra ids still sends one (unread) so every row takes the same server path.
        return union or [0]

    def parse(self, request: TeacherRequest, rows: list[int], reply: Any, where: str) -> list[RowScores]:
        if not isinstance(reply, list):
            raise TeacherError(f"{where}: expected a list of {len(rows)} results for a batch, got "
                               f"{type(reply).__name__}")
        if len(reply) != len(rows):
            raise TeacherError(f"{where}: {len(reply)} results for {len(rows)} rows")
        return [self._parse_row(request, b, item, f"{where} row {b}") for b, item in zip(rows, reply)]

    def _parse_row(self, request: TeacherRequest, b: int, item: Any, where: str) -> RowScores:
        meta = item.get("meta_info") if isinstance(item, dict) else None
        if not isinstance(meta, dict):
            raise TeacherError(f"{where}: no meta_info in the result: {excerpt(item)}")
        ids = request.row(b)
        start = int(request.score_start[b])
        expected = len(ids) - start  # origin_input_ids[logprob_start_len:]
        token_entries = _entries(meta, "input_token_logprobs", expected, where)
        sampled = []
        for i in range(1, expected):     # entry i is label column start + i - 1
            entry = token_entries[i]
            at = f"{where} column {start + i - 1} (input_token_logprobs[{i}])"
            if not isinstance(entry, (list, tuple)) or len(entry) < 2:
                raise TeacherError(f"{at}: {excerpt(entry)}, expected [logprob, id, text]")
            returned = token_id(entry[1], at)
            sent = ids[start + i]
            # SGLang reports an id >= its model vocab - 1 as 0 (logprob_result_processor.py clips image hashes).
            if returned != sent and not (returned == 0 and sent == self.config.vocab_size - 1):
                raise TeacherError(f"{at}: for token {returned}, but position {start + i} holds {sent}: the reply "
                                   f"is not aligned with the request")
            sampled.append(logprob_value(entry[0], at))
        scores = RowScores(sampled=sampled)
        if request.topk:
            top_entries = _entries(meta, "input_top_logprobs", expected, where)
            scores.topk_ids, scores.topk_logprobs = [], []
            for i in range(1, expected):
                at = f"{where} column {start + i - 1} (input_top_logprobs[{i}])"
                best_ids, best = top_k(_triples(top_entries[i], at), request.topk, at)
                scores.topk_ids.append(best_ids)
                scores.topk_logprobs.append(best)
        if request.extra_ids is not None:
            scores.extra = _scored_ids(_entries(meta, "input_token_ids_logprobs", expected, where), expected,
                                       where, start)
        return scores


def _entries(meta: dict, key: str, expected: int, where: str) -> list:
    """meta_info[key]: `expected` entries (one per input token from logprob_start_len), entry 0 null."""
    entries = meta.get(key)
    if not isinstance(entries, list):
        raise TeacherError(f"{where}: meta_info.{key} is missing or not a list")
    if len(entries) != expected:
        raise TeacherError(f"{where}: meta_info.{key} has {len(entries)} entries, expected {expected} "
                           f"(row length - logprob_start_len)")
    first = entries[0]
    if first is not None and not (isinstance(first, (list, tuple)) and first and first[0] is None):
        raise TeacherError(f"{where}: meta_info.{key}[0] should be null (the first position has no logprob), "
                           f"got {excerpt(first)}: protocol changed?")
    return entries


def _scored_ids(entries: list, expected: int, where: str, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_token_ids_logprobs[1:]` -> `(ids [n, U], logprobs [n, U])`, n = expected - 1. SGLang scores the one
    id list sent for the row at every position, in the order sent (`logprobs[pos, token_ids]`,
    logits_processor.py), so every position has the same number U of [logprob, id, text] triples; the ids are
    checked per column when they are picked (`http._pick_extra`)."""
    rows = [_triples(entries[i], f"{where} column {start + i - 1} (input_token_ids_logprobs[{i}])")
            for i in range(1, expected)]
    width = len(rows[0]) if rows else 0
    if any(len(row) != width for row in rows):
        raise TeacherError(f"{where} input_token_ids_logprobs: positions hold different numbers of entries "
                           f"({sorted({len(row) for row in rows})}); expected the one id list sent, at every position")
    ids = torch.tensor([[i for i, _ in row] for row in rows], dtype=torch.int64).view(len(rows), width)
    values = torch.tensor([[v for _, v in row] for row in rows], dtype=torch.float64).view(len(rows), width)
    return ids, values


def _triples(value: Any, where: str) -> list[tuple[int, float]]:
    """A list of [logprob, token_id, text] -> [(token_id, logprob)]."""
    if not isinstance(value, list):
        raise TeacherError(f"{where}: expected a list of [logprob, id, text], got {excerpt(value)}")
    out = []
    for entry in value:
        if not isinstance(entry, (list, tuple)) or len(entry) < 2:
            raise TeacherError(f"{where}: entry {excerpt(entry)} is not [logprob, id, text]")
        out.append((token_id(entry[1], where), logprob_value(entry[0], where)))
    return out
