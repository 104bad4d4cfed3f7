"""The shared transport of served teachers (SGLang, vLLM): balancing over several servers, bounded in-flight
requests, batching by a token budget, timeouts, retries with backoff, and one base class that turns per-row
server replies into label-aligned `TeacherScores`.

Fault behaviour (docs/teachers.md): connection errors, timeouts, 429 and 502/503/504 are retried with exponential
backoff and jitter (a Retry-After header is honoured), on another server where there is one, until `max_retries`
or `max_retry_time_s` is spent; then a `TeacherError` names the URL and the failure. Any other HTTP error fails at
once. A failure of any request fails the whole `score()` call: a partial result is never returned.

A reply that arrives but fails the checks (malformed, misaligned, NaN/inf or positive logprobs, ids outside the
vocabulary, another model's) is rejected, counted and the batch asked again, up to `reply_retries` times; a server
that now serves another model than at start stops the run at once (`ServedTeacher`). Nothing rejected is returned.

The API key is read from the environment variable whose *name* is configured (`api_key_env`) or from a file
(`api_key_file`), never from the config itself; it is sent as a Bearer header and kept out of reprs, logs and error
messages, also when a server echoes it back (it is taken out of every reply before anything quotes the reply).
"""

from __future__ import annotations

import abc
import dataclasses
import email.utils
import json
import logging
import math
import os
import random
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import httpx
import torch

from opd_megatron.config.loader import ConfigError, build_dataclass, require
from opd_megatron.config.teacher import ServerSection
from opd_megatron.teachers.base import Teacher, TeacherError, TeacherRequest, TeacherScores

log = logging.getLogger("opd_megatron.teachers.http")

#: HTTP statuses worth retrying: overload (429), a proxy/router without a healthy backend (502, 504), a server
#: that is starting or draining (503). Anything else (400 on a bad id, 401 on a bad key, 500) fails at once.
RETRY_STATUSES = frozenset({429, 502, 503, 504})


@dataclass
class HTTPTeacherConfig(ServerSection):
    """A served teacher's client settings: the run config's `teacher.server` section (where it is, what it serves,
    the transport knobs) plus the teacher's temperature."""
    temperature: float = 1.0         # the teacher's temperature, independent of the rollout temperature

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], prefix: str = "teacher.server.") -> "HTTPTeacherConfig":
        """Build from a mapping of the keys (urls may be one string); an unknown key or a bad value is a
        ConfigError naming it under `prefix`."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{prefix.rstrip('.')}: expected a mapping of keys, got {type(raw).__name__}")
        return build_dataclass(cls, dict(raw), prefix).validate(prefix)

    @classmethod
    def from_section(cls, server: ServerSection, temperature: float,
                     prefix: str = "teacher.server.") -> "HTTPTeacherConfig":
        """The client settings of a run config's `server` section, at the teacher's `temperature`."""
        return cls(**dataclasses.asdict(server), temperature=temperature).validate(prefix)

    def validate(self, prefix: str = "teacher.server.") -> "HTTPTeacherConfig":
        super().validate(prefix)
        self.urls = [u.rstrip("/") for u in self.urls]
        require(math.isfinite(self.temperature) and self.temperature > 0, "teacher.temperature",
                "a positive number", self.temperature)
        return self


def as_config(config: HTTPTeacherConfig | Mapping[str, Any]) -> HTTPTeacherConfig:
    if isinstance(config, HTTPTeacherConfig):
        return dataclasses.replace(config).validate()
    return HTTPTeacherConfig.from_dict(config)


def pack_rows(lengths: Sequence[int], max_tokens: int, max_rows: int) -> list[list[int]]:
    """Group row indices (in order) into requests of at most `max_rows` rows and `max_tokens` tokens; a row longer
    than the budget goes alone (the server decides whether it fits)."""
    groups: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for row, length in enumerate(lengths):
        if current and (tokens + length > max_tokens or len(current) >= max_rows):
            groups.append(current)
            current, tokens = [], 0
        current.append(row)
        tokens += length
    if current:
        groups.append(current)
    return groups


def retry_after_s(value: Optional[str]) -> Optional[float]:
    """Retry-After as seconds: either a number or an HTTP date (RFC 9110 §10.2.3); None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class RejectedReplyError(TeacherError):
    """A served teacher's replies failed the checks on every attempt (malformed, misaligned, non-finite, out of
    range, another model), or its server changed model mid-run; the message names the servers and the evidence."""


class _Retryable(Exception):
    def __init__(self, message: str, wait_s: Optional[float] = None):
        super().__init__(message)
        self.wait_s = wait_s


class HTTPTransport:
    """POSTs JSON to a pool of servers, at most `max_inflight` at a time, with retries; see the module docstring."""

    def __init__(self, config: HTTPTeacherConfig, name: str, section: str = "teacher.server"):
        """`section`: the config section `config` came from (`teacher.server`, `rollout.server`), which messages
        name, and whose part says what the servers are (a teacher, a rollout server)."""
        self.config = config
        self.name = name
        self.section = section
        self._api_key = _read_api_key(config, section)
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        timeout = httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s)
        limits = httpx.Limits(max_connections=config.max_inflight, max_keepalive_connections=config.max_inflight)
        self._client = httpx.Client(headers=headers, timeout=timeout, limits=limits, trust_env=False)
        self._pool = ThreadPoolExecutor(max_workers=config.max_inflight, thread_name_prefix=f"{name}-http")
        self._lock = threading.Lock()
        self._inflight = {url: 0 for url in config.urls}
        self._next = 0
        self._random = random.Random()
        self._closed = False

    def __repr__(self) -> str:
        source = (None if not self._api_key else f"<from ${self.config.api_key_env}>" if self.config.api_key_env
                  else f"<from file {self.config.api_key_file}>")
        return (f"HTTPTransport(name={self.name!r}, urls={self.config.urls}, max_inflight={self.config.max_inflight}, "
                f"api_key={source})")

    # -- one request ------------------------------------------------------------------------------------------

    def get(self, url: str, path: str) -> httpx.Response:
        """One GET (health, identity) on one server, no retries: a refused connection names the URL at once."""
        try:
            return self._client.get(url + path)
        except httpx.HTTPError as exc:
            raise TeacherError(self.scrub(f"{self.name}: GET {url}{path} failed: {_describe(exc)}"
                                           f"{_hint(exc, self.section)}")) from None

    def get_json(self, url: str, path: str) -> Any:
        return self._json(self.get(url, path), f"GET {url}{path}")

    def post(self, path: str, payload: dict, stop: Optional[threading.Event] = None) -> tuple[str, Any]:
        """POST with retries; returns (the URL that answered, its JSON reply) or raises TeacherError."""
        cfg = self.config
        start = time.monotonic()
        tried: list[str] = []
        failure = ""
        for attempt in range(cfg.max_retries + 1):
            url = self._acquire(avoid=tried[-1] if tried else None)
            tried.append(url)
            try:
                return url, self._post_once(url, path, payload)
            except _Retryable as exc:
                failure = f"{url}{path}: {exc}"
                wait_s = exc.wait_s
            finally:
                self._release(url)
            if attempt == cfg.max_retries:
                break
            backoff = min(cfg.backoff_max_s, cfg.backoff_s * 2 ** attempt) * (0.5 + 0.5 * self._random.random())
            wait_s = backoff if wait_s is None else max(wait_s, backoff)
            elapsed = time.monotonic() - start
            if elapsed + wait_s > cfg.max_retry_time_s:
                failure += f" (next retry in {wait_s:.2f}s would pass max_retry_time_s={cfg.max_retry_time_s})"
                break
            if stop is not None and stop.wait(wait_s):
                raise TeacherError(f"{self.name}: POST {url}{path} abandoned: another request of the batch failed")
            if stop is None:
                time.sleep(wait_s)
        raise TeacherError(self.scrub(
            f"{self.name}: POST failed after {len(tried)} attempt(s) over {time.monotonic() - start:.2f}s "
            f"(servers tried: {', '.join(dict.fromkeys(tried))}); last failure: {failure}"))

    def _post_once(self, url: str, path: str, payload: dict) -> Any:
        try:
            reply = self._client.post(url + path, json=payload)
        except httpx.TimeoutException as exc:
            raise _Retryable(f"timed out ({type(exc).__name__}, timeout_s={self.config.timeout_s})") from None
        except httpx.TransportError as exc:
            raise _Retryable(_describe(exc)) from None
        if reply.status_code in RETRY_STATUSES:
            raise _Retryable(f"HTTP {reply.status_code}: {_snippet(reply.text)}",
                             retry_after_s(reply.headers.get("retry-after")))
        return self._json(reply, f"POST {url}{path}")

    def _json(self, reply: httpx.Response, what: str) -> Any:
        """The JSON of a 200 reply; any other status (or a body that is not JSON) is a TeacherError."""
        # The key is taken out of the reply before anything quotes it (a server may echo the request's headers):
        # a message cut to length after it could keep part of the key.
        if reply.status_code != 200:
            raise TeacherError(f"{self.name}: {what} returned HTTP {reply.status_code}: "
                               f"{_snippet(self.scrub(reply.text))}")
        content = reply.content
        if self._api_key and self._api_key.encode() in content:
            content = content.replace(self._api_key.encode(), b"<api key>")
        try:
            return json.loads(content)
        except (ValueError, RecursionError):     # RecursionError: nesting deeper than the JSON parser goes
            raise TeacherError(f"{self.name}: {what} returned a reply that is not JSON: "
                               f"{_snippet(self.scrub(reply.text))}") from None

    # -- many requests ----------------------------------------------------------------------------------------

    def post_all(self, path: str, payloads: Sequence[dict]) -> list[tuple[str, Any]]:
        """POST every payload (at most max_inflight at a time); all replies in order, or the first TeacherError."""
        if self._closed:
            raise TeacherError(f"{self.name}: the client is closed")
        stop = threading.Event()
        futures = [self._pool.submit(self.post, path, payload, stop) for payload in payloads]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f in done and f.exception() is not None]
        if failed:
            stop.set()
            for future in pending:
                future.cancel()
            raise failed[0].exception()
        return [f.result() for f in futures]

    def _acquire(self, avoid: Optional[str]) -> str:
        urls = self.config.urls
        with self._lock:
            candidates = [u for u in urls if u != avoid] or urls
            if self.config.balance == "round_robin":
                url = candidates[self._next % len(candidates)]
                self._next += 1
            else:  # least in-flight; ties rotate so idle servers share the load
                self._next += 1
                rotated = candidates[self._next % len(candidates):] + candidates[:self._next % len(candidates)]
                url = min(rotated, key=lambda u: self._inflight[u])
            self._inflight[url] += 1
        return url

    def _release(self, url: str) -> None:
        with self._lock:
            self._inflight[url] -= 1

    def scrub(self, message: str) -> str:
        """`message` with the API key (if any) replaced: a server may echo the request's headers into a reply."""
        return message.replace(self._api_key, "<api key>") if self._api_key else message

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._client.close()


def _read_api_key(config: ServerSection, section: str) -> Optional[str]:
    """The API key from the environment variable named by api_key_env, or the first line of api_key_file; None when
    neither is set. Errors name the variable or the file, never a key."""
    if config.api_key_env is not None:
        key = os.environ.get(config.api_key_env, "").strip()
        if not key:
            raise ConfigError(f"{section}.api_key_env: the environment variable {config.api_key_env!r} is not "
                              f"set or empty")
        return key
    if config.api_key_file is not None:
        try:
            lines = Path(config.api_key_file).expanduser().read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{section}.api_key_file: cannot read {config.api_key_file} "
                              f"({type(exc).__name__}); expected a UTF-8 file holding the API key") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise ConfigError(f"{section}.api_key_file: {config.api_key_file} is empty; expected the API key "
                              f"on its first line")
        return key
    return None


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _hint(exc: Exception, section: str) -> str:
    if isinstance(exc, httpx.ConnectError):
        return (f" (connection refused or host unreachable: is the {section.split('.')[0]} server running at this "
                f"address?)")
    return ""


def _snippet(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------------------------
# Served teachers: request -> payloads -> replies -> label-aligned TeacherScores.
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class RowScores:
    """One row's scores at its scored columns score_start .. lengths-2 (n of them), parsed from a reply.
    extra: the ids a server scored at every column and their logprobs, `(ids [n, U] int64, logprobs [n, U]
    float64)` in the reply's order (SGLang's token_ids_logprob: the row's id union, the same at every column), or
    None; `_pick_extra` takes each column's requested ids from it."""
    sampled: list[float]
    topk_ids: Optional[list[list[int]]] = None
    topk_logprobs: Optional[list[list[float]]] = None
    extra: Optional[tuple[torch.Tensor, torch.Tensor]] = None


class ServedTeacher(Teacher):
    """A teacher behind HTTP. Subclasses say how a group of rows becomes a request and how a reply becomes
    `RowScores`; packing, transport, alignment into `[B, L-1]` columns and the checks are here.

    A teacher can degrade mid-run (a server restarted on other weights, a broken GPU, a bad deployment): every reply
    is checked (`assemble`), and a rejected one is never trained on. The batch is asked again, up to
    teacher.server.reply_retries times, after re-reading each server's identity (a server that now serves another
    model stops the run at once); `rejected_replies` counts the rejections (the loop logs it as
    teacher/rejected_replies), and the batch's accepted `TeacherScores` carries how many it took. When every
    attempt is rejected, a `RejectedReplyError` names the servers and each rejection's evidence (the check, the row
    and column, the value)."""

    health_path: str = "/health"
    score_path: str = ""
    #: the top-k cap when teacher.server.max_topk is not set (None = any)
    default_max_topk: Optional[int] = None

    def __init__(self, config: HTTPTeacherConfig | Mapping[str, Any]):
        self.config = as_config(config)
        self.name = self.config.model or type(self).__name__
        self.max_topk = self.config.max_topk if self.config.max_topk is not None else self.default_max_topk
        #: url -> the model it served at start (`identities`); empty without check_on_start
        self.served: dict[str, str] = {}
        #: replies rejected since this client was built (each rejected reply of a batch counts once)
        self.rejected_replies = 0
        self.transport = HTTPTransport(self.config, self.name)
        try:
            self._check_temperature()
            if self.config.check_on_start:
                for url in self.config.urls:
                    self.transport.get(url, self.health_path).raise_for_status()
                self.start_checks()
        except httpx.HTTPStatusError as exc:
            self.close()
            raise TeacherError(f"{self.name}: health check {exc.request.url} returned HTTP "
                               f"{exc.response.status_code}") from None
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"{type(self).__name__}(urls={self.config.urls}, model={self.config.model!r}, " \
               f"vocab_size={self.config.vocab_size})"

    def vocab_size(self) -> int:
        return self.config.vocab_size

    def close(self) -> None:
        self.transport.close()

    # -- what a subclass provides -----------------------------------------------------------------------------

    def start_checks(self) -> None:
        """Identity checks on every server at start (model name, consistent servers); keeps what each serves."""
        self.served = self.identities()

    def identities(self) -> dict[str, str]:
        """url -> what the server says it serves (a model path or name); a server that does not serve
        teacher.server.model is a TeacherError. Empty for a server type that cannot say."""
        return {}

    @abc.abstractmethod
    def payload(self, request: TeacherRequest, rows: list[int]) -> dict:
        """The JSON body scoring `rows` of `request`."""

    @abc.abstractmethod
    def parse(self, request: TeacherRequest, rows: list[int], reply: Any, where: str) -> list[RowScores]:
        """One RowScores per row of `rows`; a malformed reply raises TeacherError mentioning `where`."""

    def _check_temperature(self) -> None:
        # Both SGLang 0.5.23 and vLLM compute prompt logprobs from the raw logits (docs/teachers.md): a teacher
        # temperature other than 1 would silently be ignored, so it is refused.
        if self.config.temperature != 1.0:
            raise ConfigError(f"teacher.temperature: {type(self).__name__} scores prompt tokens from the raw logits "
                              f"(the server ignores sampling temperature there); expected 1.0, got "
                              f"{self.config.temperature}. Use an in-process or colocated teacher for T != 1.")

    # -- the shared path --------------------------------------------------------------------------------------

    def score(self, request: TeacherRequest) -> TeacherScores:
        vocab = self.vocab_size()
        request.validate(vocab)
        if self.max_topk is not None and request.topk > self.max_topk:
            raise TeacherError(f"{self.name}: top-{request.topk} asked, but this server returns at most "
                               f"top-{self.max_topk} (teacher.server.max_topk)")
        if request.extra_ids is not None:
            if not self.scores_extra_ids:
                raise TeacherError(f"{self.name}: {type(self).__name__} cannot score extra ids (the student's "
                                   f"top-k); use a teacher with scores_extra_ids=True (e.g. SGLang) or drop them")
            used = request.extra_ids[request.extra_ids >= 0]
            if used.numel() and int(used.max()) >= vocab:
                raise ValueError(f"TeacherRequest.extra_ids: ids must lie in [-1, {vocab}), got max {int(used.max())}")
        lengths = [int(n) for n in request.lengths.tolist()]
        groups = pack_rows(lengths, self.config.max_tokens_per_request, self.config.max_rows_per_request)
        payloads = [self.payload(request, rows) for rows in groups]
        rejections: list[str] = []
        for _ in range(self.config.reply_retries + 1):
            # Transport failures (down, slow, 5xx) were retried inside post_all and end the run when they persist.
            replies = self.transport.post_all(self.score_path, payloads)
            try:
                scores = self.assemble(request, groups, replies)
            except TeacherError as exc:
                evidence = self.transport.scrub(str(exc))
            else:
                scores.rejected_replies = len(rejections)
                return scores
            self.rejected_replies += 1
            rejections.append(evidence)
            log.warning("%s: reply rejected (attempt %d of at most %d at this batch%s): %s", self.name,
                        len(rejections), self.config.reply_retries + 1,
                        "; asking again" if len(rejections) <= self.config.reply_retries else "", evidence)
            self._recheck_identities(evidence)
        listed = "; ".join(f"({i}) {text}" for i, text in enumerate(rejections, start=1))
        raise RejectedReplyError(f"{self.name}: every reply to this batch was rejected, {len(rejections)} in a row "
                                 f"(1 + teacher.server.reply_retries={self.config.reply_retries}); the teacher at "
                                 f"{', '.join(self.config.urls)} is giving unusable scores and none was trained on. "
                                 f"Evidence: {listed}")

    def _recheck_identities(self, evidence: str) -> None:
        """After a rejected reply: a server that now serves another model than at start stops the run at once
        (asking it again cannot help); an unreachable one fails as a down teacher does."""
        if not self.served:
            return
        try:
            now = self.identities()
        except TeacherError as exc:
            raise TeacherError(f"{exc} (after a rejected reply: {evidence})") from None
        changed = {url: (self.served[url], now.get(url)) for url in self.served if now.get(url) != self.served[url]}
        if changed:
            url, (before, after) = next(iter(changed.items()))
            raise RejectedReplyError(f"{self.name}: {url} now serves {after!r}, not {before!r} as at the start of "
                                     f"the run: the teacher changed under the run, whose scores are never trained on "
                                     f"(rejected reply: {evidence})")

    def assemble(self, request: TeacherRequest, groups: list[list[int]],
                 replies: Sequence[tuple[str, Any]]) -> TeacherScores:
        """The checked, label-aligned `TeacherScores` of `request` from the servers' replies, `(url, JSON)` per group
        of rows (`pack_rows`); any reply that is malformed, misaligned or out of range is a `TeacherError` naming
        the server, the row and the position."""
        vocab = self.vocab_size()
        lengths = [int(n) for n in request.lengths.tolist()]
        b, columns, k = request.batch_size, request.columns, request.topk
        sampled = torch.zeros(b, columns, dtype=torch.float32)
        topk_ids = torch.zeros(b, columns, k, dtype=torch.int64) if k else None
        topk_logprobs = torch.zeros(b, columns, k, dtype=torch.float32) if k else None
        extra = None if request.extra_ids is None else torch.zeros(request.extra_ids.shape, dtype=torch.float32)
        for rows, (url, reply) in zip(groups, replies):
            where = f"{self.name} ({url}{self.score_path})"
            parsed = self.parse(request, rows, reply, where)
            if len(parsed) != len(rows):
                raise TeacherError(f"{where}: {len(parsed)} rows in the reply, expected {len(rows)}")
            for row, scores in zip(rows, parsed):
                start, stop = int(request.score_start[row]), lengths[row] - 1
                self._check_row(scores, stop - start, k, f"{where} row {row}")
                sampled[row, start:stop] = torch.tensor(scores.sampled, dtype=torch.float32)
                if k:
                    topk_ids[row, start:stop] = torch.tensor(scores.topk_ids, dtype=torch.int64).view(-1, k)
                    topk_logprobs[row, start:stop] = torch.tensor(scores.topk_logprobs,
                                                                  dtype=torch.float32).view(-1, k)
                _check_values(f"{where} row {row}", vocab, start, sampled[row, start:stop],
                              None if not k else topk_logprobs[row, start:stop],
                              None if not k else topk_ids[row, start:stop])
                if extra is not None:
                    extra[row, start:stop] = _pick_extra(request.extra_ids[row, start:stop], scores.extra,
                                                         f"{where} row {row}", start)
        result = TeacherScores(sampled_logprobs=sampled, valid=request.valid_mask(), topk_ids=topk_ids,
                               topk_logprobs=topk_logprobs, extra_logprobs=extra, extra_ids=request.extra_ids,
                               teacher_name=self.name)
        return result.check(request, vocab)

    @staticmethod
    def _check_row(scores: RowScores, n: int, k: int, where: str) -> None:
        """Lengths, with the server named; values and ids are checked on the row's tensors (`_check_values`)."""
        if len(scores.sampled) != n:
            raise TeacherError(f"{where}: {len(scores.sampled)} scored positions in the reply, expected {n}")
        if k and (len(scores.topk_ids) != n or any(len(ids) != k for ids in scores.topk_ids)):
            raise TeacherError(f"{where}: top-k reply is not {n} positions x {k} entries")


def _check_values(where: str, vocab: int, start: int, sampled: torch.Tensor, topk_logprobs: Optional[torch.Tensor],
                  topk_ids: Optional[torch.Tensor]) -> None:
    """A row's logprobs finite and <= 0 and its top-k ids in [0, vocab), as tensor reductions; the error names the
    server and row (`where`), the first bad column (the row's scores start at column `start`) and its value
    (TeacherScores.check repeats the value checks on the whole batch)."""
    if topk_ids is not None and topk_ids.numel() and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= vocab):
        outside = (topk_ids < 0) | (topk_ids >= vocab)
        column = int(outside.any(dim=-1).nonzero()[0, 0])
        raise TeacherError(f"{where} column {start + column}: top-k ids {topk_ids[outside][:5].tolist()} outside "
                           f"[0, {vocab}) ({int(outside.sum())} in the row; teacher.server.vocab_size: is the "
                           f"server's tokenizer the student's?)")
    for name, values in (("sampled-token logprob", sampled), ("top-k logprob", topk_logprobs)):
        if values is None or not values.numel():
            continue
        bad = ~torch.isfinite(values) | (values > 1e-4)
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise TeacherError(f"{where} column {start + first[0]}: {name} {float(values[first])!r} is NaN/inf or "
                               f"positive ({int(bad.sum())} such values in the row); expected finite values <= 0")


def _pick_extra(extra_ids: torch.Tensor, scored: Optional[tuple[torch.Tensor, torch.Tensor]], where: str,
                start: int) -> torch.Tensor:
    """`[n, E]` logprobs of the requested `extra_ids [n, E]` (-1 = unused, gives 0) from what the server scored at
    each column, `scored = (ids [n, U], logprobs [n, U])` (any order). Vectorised: each column's scored ids are
    sorted once and the requested ones found by binary search; a requested id the server did not score, or a
    value that is NaN/inf or positive, is a TeacherError naming the column."""
    if scored is None:
        raise TeacherError(f"{where}: extra-id logprobs missing from the reply")
    ids, values = scored
    n = extra_ids.shape[0]
    if ids.dim() != 2 or ids.shape != values.shape or ids.shape[0] != n or ids.shape[1] < 1:
        raise TeacherError(f"{where}: extra-id logprobs of shape {tuple(ids.shape)}, expected {n} columns x >= 1 id")
    order = torch.sort(ids, dim=-1, stable=True)
    wanted = extra_ids.long()
    used = wanted >= 0
    slot = torch.searchsorted(order.values, wanted.clamp_min(0)).clamp_max(ids.shape[1] - 1)
    found = order.values.gather(-1, slot) == wanted
    missing = used & ~found
    if bool(missing.any()):
        column, entry = (int(i) for i in missing.nonzero()[0])
        raise TeacherError(f"{where}: no logprob for extra id {int(wanted[column, entry])} at column "
                           f"{start + column}")
    picked = values.gather(-1, order.indices.gather(-1, slot))
    bad = used & (~torch.isfinite(picked) | (picked > 1e-4))
    if bool(bad.any()):
        column, entry = (int(i) for i in bad.nonzero()[0])
        raise TeacherError(f"{where}: extra-id logprob {float(picked[column, entry])!r} at column {start + column} "
                           f"is NaN/inf or positive")
    return torch.where(used, picked, 0.0).to(torch.float32)


#: Token ids a reply may hold before the vocabulary check: what an int64 tensor can store (a larger one is garbage).
_ID_LIMIT = 2 ** 63


def logprob_value(value: Any, where: str) -> float:
    """A logprob from a reply: a number (NaN/inf allowed here, rejected by the row check), never null/text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TeacherError(f"{where}: expected a logprob number, got {excerpt(value)}")
    try:
        return float(value)
    except OverflowError:       # a JSON integer beyond float range
        raise TeacherError(f"{where}: logprob {excerpt(value)} is not a finite number; expected a log-probability "
                           f"<= 0") from None


def token_id(value: Any, where: str) -> int:
    """A token id from a reply: an integer, or (vLLM's dict keys) its ASCII decimal string, within int64 (the range
    against the vocabulary is checked on the row's tensors)."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if -_ID_LIMIT <= value < _ID_LIMIT:
            return value
        raise TeacherError(f"{where}: token id {excerpt(value)} is out of any vocabulary's range")
    raise TeacherError(f"{where}: expected a token id, got {excerpt(value)}")


def excerpt(value: Any, limit: int = 120) -> str:
    """A reply's value for an error message, cut to `limit` characters (a reply can be megabytes, or a number of
    thousands of digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** limit:
        return f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"
    try:
        text = repr(value)
    except RecursionError:
        return "<a value nested too deep to show>"
    return text if len(text) <= limit else text[:limit] + "..."


def top_k(entries: list[tuple[int, float]], k: int, where: str) -> tuple[list[int], list[float]]:
    """The k best (id, logprob) by descending logprob, ties to the lower id. Every entry must be a finite logprob
    <= 0: garbage anywhere in a position's reply rejects it, even where it would not be picked."""
    if len(entries) < k:
        raise TeacherError(f"{where}: {len(entries)} top-logprob entries, expected at least {k}")
    bad = [v for _, v in entries if not math.isfinite(v) or v > 1e-4]
    if bad:
        raise TeacherError(f"{where}: logprob {excerpt(bad[0])} is NaN/inf or positive; expected finite values <= 0")
    best = sorted(entries, key=lambda e: (-e[1], e[0]))[:k]
    return [i for i, _ in best], [v for _, v in best]
