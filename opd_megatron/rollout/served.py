"""Student rollouts served by vLLM: the `RolloutEngine` behind `rollout.engine: vllm`, with weight sync from disk.

Why a served engine: at the recipes' scale the in-process sampler (a static KV cache over every row at once) is the
bottleneck in memory and speed; every framework a post-training team compares us with generates with an inference
engine that holds a copy of the student's weights. The protocol below was read from vLLM 0.32's source (pinned as
the teacher tests' server, `tests/teachers/vllm_server.py`); docs/teacher-servers.md, "vLLM as a rollout server".

Generation (`POST /v1/completions`, one request per prompt):
- `n` samples per prompt; vLLM gives child j of a request the seed `seed + j` and the same sampling parameters to
  every prompt of a request, so prompts are never batched into one request (their noise would be shared). The
  prompt's seed is a pure function of (run seed, sample key, data-parallel rank, prompt index), as for the
  in-process sampler: an exact resume repeats the requests and no two DP ranks share noise.
- every sampling field is sent (temperature, top_p, top_k, min_p, penalties): the server must be started with
  `--generation-config vllm`, or a checkpoint's generation_config.json fills the fields a request leaves out.
- stops: `ignore_eos: true` plus `stop_token_ids` = our stop ids: exactly the in-process sampler's rule (the stop
  token is kept and ends the row). `max_tokens` is clipped by the server's max_model_len: a row that ends by
  `length` short of max_new_tokens is refused (the server's context is too short for the run's rollouts).
- behaviour log-probs `mu(y_t)`: `logprobs: 0` returns the sampled token's log-prob; with the server started with
  `--logprobs-mode processed_logprobs` it is the log-prob under the distribution actually sampled from (after
  temperature and the top-k / top-p mask), our `mu` (docs/opd-math.md, Route B). In the default `raw_logprobs` mode
  it would be the T = 1 full softmax: the engine-agreement check at the first step catches that when T != 1.
- `return_token_ids` and `return_tokens_as_token_ids`: integer ids, never decoded strings.

Weight sync from disk (`DiskWeightSync`), after every `rollout.sync_interval` updates:
1. every rank writes its slices of the student in HF layout (`student/hf_export.export_module`, collective) to
   `<weights_dir>/v<version>`, published by a rename once complete;
2. world rank 0, on every server: `POST /pause?mode=wait` (in-flight requests finish; new ones queue), `POST
   /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": dir}}`, `POST /reset_prefix_cache`
   (KV blocks computed with the old weights must not be reused), `POST /update_weight_version`, `POST /resume`,
   then `GET /weight_info` must answer the new version. These routes exist only with `VLLM_SERVER_DEV_MODE=1`.
3. versions older than the last two are deleted.
Every generate() first asks each server for its weight version: a server that answers another version (restarted:
vLLM answers "default") is re-synced from the last published directory before any row is requested, and a version
that changes while a batch is generated discards the batch: no batch is trained on mis-versioned rows.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch.distributed as dist

from opd_megatron.errors import RolloutServerError
from opd_megatron.rollout.batch import RolloutBatch
from opd_megatron.rollout.control import check_reported_version, control_call
from opd_megatron.rollout.engine import RolloutEngine, RolloutTicket
from opd_megatron.rollout.generate import SamplingConfig, _call_key, _seed
from opd_megatron.rollout.nccl_sync import VLLMNcclWeightSync
from opd_megatron.student.distributed import broadcast_failure
from opd_megatron.teachers.base import TeacherError
from opd_megatron.teachers.http import HTTPTeacherConfig, HTTPTransport

log = logging.getLogger("opd_megatron.rollout.served")

#: vLLM clamps a -inf log-prob to this value in its replies (`serving.py`): a token the sampled distribution gave no
#: mass, i.e. a reply that cannot be trusted as `mu`.
VLLM_LOGPROB_FLOOR = -9999.0
#: vLLM's seeds are int64 and child j of a request gets seed + j: keep the prompt's seed well below the limit.
SEED_MASK = 2**62 - 1


@dataclass(frozen=True)
class ServedRow:
    """One sampled response: its ids (stop token included when one ended it) and their behaviour log-probs."""
    ids: list[int]
    logprobs: list[float]


def vllm_payload(model: str, prompt_ids: Sequence[int], config: SamplingConfig, seed: int) -> dict[str, Any]:
    """The `/v1/completions` body for `config.n` samples of one prompt (see the module docstring)."""
    return {"model": model, "prompt": [int(t) for t in prompt_ids], "n": config.n,
            "max_tokens": config.max_new_tokens, "seed": seed,
            "temperature": config.temperature, "top_p": config.top_p,
            "top_k": config.top_k if config.top_k > 0 else -1, "min_p": 0.0,
            "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "ignore_eos": True, "stop_token_ids": sorted(set(config.stop_ids)),
            "logprobs": 0, "return_token_ids": True, "return_tokens_as_token_ids": True,
            "skip_special_tokens": False}


def parse_vllm_reply(reply: Any, config: SamplingConfig, vocab_size: int, where: str) -> list[ServedRow]:
    """`config.n` rows from a `/v1/completions` reply, in the order of their `index`; every check a row must pass
    before it is trained on. Raises RolloutServerError naming `where` and the first problem found."""
    def bad(message: str) -> RolloutServerError:
        return RolloutServerError(f"{where}: {message}")

    if not isinstance(reply, dict) or not isinstance(reply.get("choices"), list):
        raise bad(f"expected a JSON object with a `choices` list, got {str(reply)[:200]!r}")
    choices = reply["choices"]
    if len(choices) != config.n:
        raise bad(f"{len(choices)} choices for n={config.n} samples")
    # A JSON integer only: int() would also read 0.5, true or "0" as an index (and overflow on inf).
    if not all(isinstance(c, dict) and type(c.get("index")) is int for c in choices):
        raise bad(f"a choice without an integer `index` in {str(choices)[:200]!r}")
    choices = sorted(choices, key=lambda choice: choice["index"])
    if [c["index"] for c in choices] != list(range(config.n)):
        raise bad(f"choice indices {[c['index'] for c in choices]} are not 0..{config.n - 1}")
    stops = set(config.stop_ids)
    rows = []
    for choice in choices:
        j = choice["index"]
        logprobs = choice.get("logprobs")
        ids, logprobs = choice.get("token_ids"), logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise bad(f"sample {j}: `token_ids` is not a list of integers (was the request's return_token_ids "
                      f"ignored? vLLM >= 0.10 is needed)")
        if not isinstance(logprobs, list) or len(logprobs) != len(ids):
            raise bad(f"sample {j}: {len(logprobs) if isinstance(logprobs, list) else 'no'} token log-probs for "
                      f"{len(ids)} tokens")
        if not 1 <= len(ids) <= config.max_new_tokens:
            raise bad(f"sample {j}: {len(ids)} tokens, expected 1..max_new_tokens={config.max_new_tokens}")
        if any(not 0 <= t < vocab_size for t in ids):
            raise bad(f"sample {j}: token id {next(t for t in ids if not 0 <= t < vocab_size)} outside the "
                      f"student's vocabulary [0, {vocab_size}) (a padded embedding row sampled?)")
        for t, value in enumerate(logprobs):
            if (not isinstance(value, (int, float)) or isinstance(value, bool) or value != value
                    or value <= VLLM_LOGPROB_FLOOR or value > 1e-4):
                raise bad(f"sample {j}, token {t}: log-prob {value!r} is not a finite value <= 0 above vLLM's "
                          f"floor {VLLM_LOGPROB_FLOOR} (a token its own sampling distribution gave no mass)")
        early = [t for t in ids[:-1] if t in stops]
        if early:
            raise bad(f"sample {j}: stop id {early[0]} inside the response, not at its end")
        finish = choice.get("finish_reason")
        if finish == "stop":
            if ids[-1] not in stops:
                raise bad(f"sample {j}: finish_reason stop but the last token {ids[-1]} is not a stop id "
                          f"{sorted(stops)} (a text stop string or the model's own eos? the request sends "
                          f"ignore_eos and stop_token_ids only)")
        elif finish == "length":
            if len(ids) != config.max_new_tokens and ids[-1] not in stops:
                raise bad(f"sample {j}: ended by length after {len(ids)} of max_new_tokens="
                          f"{config.max_new_tokens} tokens: the server's max_model_len is too short for the "
                          f"prompt plus rollout.max_new_tokens")
        else:
            raise bad(f"sample {j}: finish_reason {finish!r} (aborted or unknown); expected stop or length")
        rows.append(ServedRow(ids=list(ids), logprobs=[float(v) for v in logprobs]))
    return rows


class WeightVersionMismatch(RolloutServerError):
    """Rows that did not come from the expected weight version (a sync or a restart under the batch): the batch is
    asked again, counted as regenerated."""


class ServedRolloutEngine(RolloutEngine):
    """What every served engine shares (see the module docstring): one request per prompt from the replica's first
    model-parallel rank, in a background thread (`submit` / `collect`), the batch broadcast to the rest of the
    replica (`model_parallel_group`; None: this process is the whole replica); servers brought to the expected
    weight version before each batch; rejected or mis-versioned replies asked again up to reply_retries. A server
    protocol supplies `generate_path`, `server_versions`, `payloads` and `parse_rows`."""

    engine_name = "served"
    generate_path = ""

    def __init__(self, server: HTTPTeacherConfig, vocab_size: int, pad_id: int, seed: int, dp_rank: int,
                 sync=None, version_check: bool = True, model_parallel_group=None):
        self.config = server
        self.transport = HTTPTransport(server, f"rollout engine ({self.engine_name})", section="rollout.server")
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.seed = seed
        self.dp_rank = dp_rank
        self.sync = sync
        self.version_check = version_check
        self.group = model_parallel_group
        ranks = dist.get_process_group_ranks(model_parallel_group) if model_parallel_group is not None else None
        self.requester = ranks is None or len(ranks) == 1 or dist.get_rank() == ranks[0]
        self.source_rank = ranks[0] if ranks else 0
        self.calls = 0
        # One worker: the batches of a run are requested one after another, in the order they were submitted.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-requests")
        self._inflight: list[Future] = []
        self.regenerated = 0          # batches discarded because a server's weight version moved under them
        self.resynced = 0             # servers found on another version (restarted) and re-synced
        self.rejected = 0             # batches whose reply failed the row checks and was asked again

    @property
    def servers(self) -> list[str]:
        return list(self.config.urls)

    # -- the protocol ----------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def server_versions(self) -> dict[str, str]:
        """`{url: weight version}` as each server reports it."""

    @abc.abstractmethod
    def payloads(self, prompts_ids: list[list[int]], config: SamplingConfig, key: tuple) -> list[dict]:
        """One request body per prompt (`config.n` samples each, seeds from (run seed, key, dp rank, prompt))."""

    @abc.abstractmethod
    def parse_rows(self, replies: list[tuple[str, Any]], config: SamplingConfig, before: dict[str, str]
                   ) -> list[ServedRow]:
        """The rows of `replies` (prompt-major) after every check; RolloutServerError for a reply that fails one,
        WeightVersionMismatch for rows not from the versions `before` (what each server reported first)."""

    # -- versions ------------------------------------------------------------------------------------------------
    def _expected_version(self) -> Optional[str]:
        return None if self.sync is None or self.sync.version is None else str(self.sync.version)

    def _ensure_versions(self) -> dict[str, str]:
        """Every server on the last synced version: a server on another one (restarted: vLLM answers "default")
        is reloaded from the last published weights first. Returns the versions after that."""
        versions = self.server_versions()
        expected = self._expected_version()
        if expected is None:
            return versions
        stale = [url for url, version in versions.items() if version != expected]
        if stale:
            log.warning("rollout servers %s report weight versions %s, expected %s: reloading the last published "
                        "weights", stale, [versions[u] for u in stale], expected)
            self.sync.reload(stale)
            self.resynced += len(stale)
            versions = self.server_versions()
            still = {u: versions[u] for u in stale if versions[u] != expected}
            if still:
                raise RolloutServerError(f"rollout servers {still} still report another weight version than "
                                         f"{expected} after a reload")
        return versions

    # -- generation ----------------------------------------------------------------------------------------------
    def generate(self, prompts_ids, config, prompts=None, policy_version=0, sample_key=None) -> RolloutBatch:
        return self.collect(self.submit(prompts_ids, config, prompts, policy_version, sample_key))

    def submit(self, prompts_ids, config, prompts=None, policy_version=0, sample_key=None) -> RolloutTicket:
        """The requests go out from a background thread of the replica's requesting rank (HTTP only: no
        collective runs off the main thread); `collect` waits for them and shares the batch with the replica."""
        config.validate()
        if not prompts_ids:
            raise ValueError("generate needs at least one prompt")
        key = _call_key(sample_key, self.calls)
        self.calls += 1
        if not self.requester:
            return RolloutTicket()
        future = self._pool.submit(self._request, [list(p) for p in prompts_ids], config, list(prompts or []),
                                   policy_version, key)
        self._inflight.append(future)
        return RolloutTicket(future=future)

    def collect(self, ticket: RolloutTicket) -> RolloutBatch:
        batch, failure = ticket.batch, None
        if ticket.future is not None:
            try:
                batch = ticket.future.result()
            except (RolloutServerError, ValueError) as error:
                failure = error
            self._inflight = [f for f in self._inflight if f is not ticket.future]
        if self.group is not None and dist.get_world_size(self.group) > 1:
            # The replica's other ranks get the rows (or the failure, so that they all raise together).
            holder = [batch if failure is None else failure]
            dist.broadcast_object_list(holder, src=self.source_rank, group=self.group)
            batch, failure = (holder[0], None) if isinstance(holder[0], RolloutBatch) else (None, holder[0])
        if failure is not None:
            raise failure
        return batch

    def _request(self, prompts_ids: list[list[int]], config: SamplingConfig, prompts: list[str],
                 policy_version: int, key: tuple) -> RolloutBatch:
        payloads = self.payloads(prompts_ids, config, key)
        attempts = 1 + max(0, self.config.reply_retries)
        problems: list[str] = []
        rows: Optional[list[ServedRow]] = None
        for _ in range(attempts):
            # A reply is never trained on unless its rows came from the expected weights and passed every check; a
            # rejected batch is asked again (the seeds repeat it exactly).
            before = self._ensure_versions() if self.version_check else {}
            replies = self._post_all(payloads)
            try:
                rows = self.parse_rows(replies, config, before)
                break
            except WeightVersionMismatch as error:
                self.regenerated += 1
                problems.append(str(error))
            except RolloutServerError as error:
                self.rejected += 1
                problems.append(str(error))
            log.warning("rollout batch rejected: %s", problems[-1])
        if rows is None:
            raise RolloutServerError(f"no acceptable rollout batch after {attempts} attempt(s) (rollout.server."
                                     f"reply_retries={self.config.reply_retries}); last problem: {problems[-1]}")
        group_ids = [i for i in range(len(prompts_ids)) for _ in range(config.n)]
        row_prompts = [p for p in (prompts or []) for _ in range(config.n)]
        prompt_rows = [list(p) for p in prompts_ids for _ in range(config.n)]
        # old_logprobs stay None: at staleness 0 the loss's pi_theta_old is the training forward's own log-prob
        # (loop/objective.py::old_logprobs), and the sampler-mismatch weight compares it with these `mu` values.
        return RolloutBatch.from_sequences(prompt_rows, [r.ids for r in rows], self.pad_id,
                                           behaviour_logprobs=[r.logprobs for r in rows], group_ids=group_ids,
                                           prompts=row_prompts, policy_version=policy_version)

    def _post_all(self, payloads: list[dict]) -> list[tuple[str, Any]]:
        try:
            return self.transport.post_all(self.generate_path, payloads)
        except TeacherError as error:
            raise RolloutServerError(str(error).replace(f"rollout engine ({self.engine_name}): ",
                                                        "rollout server: ")) from None

    def _get(self, url: str, path: str) -> Any:
        try:
            return self.transport.get_json(url, path)
        except TeacherError as error:
            raise RolloutServerError(str(error)) from None

    def sync_weights(self, policy_version: int) -> None:
        if self.sync is not None:
            # Batches in flight finish on the weights they started with (each batch is of one version; the
            # publish below is collective, so every replica has drained before a server reloads).
            wait(self._inflight)
            self.sync.publish(policy_version)

    def policy_version(self, step: int) -> int:
        return step if self.sync is None or self.sync.version is None else self.sync.version

    @property
    def holds_copy(self) -> bool:
        return True

    def stats(self) -> dict[str, float]:
        out = {"rollout/regenerated_batches": float(self.regenerated), "rollout/rejected_batches":
               float(self.rejected), "rollout/resynced_servers": float(self.resynced)}
        if self.sync is not None and self.sync.seconds:
            out["rollout/weight_sync_s"] = self.sync.seconds[-1]
        return out

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state.get("calls", 0))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.transport.close()
        if self.sync is not None:
            self.sync.close()


class VLLMRolloutEngine(ServedRolloutEngine):
    """Samples from vLLM servers holding a copy of the student's weights over `/v1/completions` (see the module
    docstring): versions from `/weight_info` (dev mode), read before and after each batch (vLLM's completions do
    not report the version of a row)."""

    engine_name = "vLLM"
    generate_path = "/v1/completions"

    def server_versions(self) -> dict[str, str]:
        out = {}
        for url in self.servers:
            reply = self._get(url, "/weight_info")
            version = reply.get("weight_version") if isinstance(reply, dict) else None
            if version is None:
                raise RolloutServerError(f"{url}/weight_info: no weight_version in {str(reply)[:200]!r} (start the "
                                         f"server with VLLM_SERVER_DEV_MODE=1)")
            out[url] = str(version)
        return out

    def payloads(self, prompts_ids, config, key) -> list[dict]:
        return [vllm_payload(self.config.model, ids, config, _seed(self.seed, key, self.dp_rank, i) & SEED_MASK)
                for i, ids in enumerate(prompts_ids)]

    def parse_rows(self, replies, config, before) -> list[ServedRow]:
        if self.version_check:
            after = self.server_versions()
            if after != before:
                raise WeightVersionMismatch(f"weight versions moved during the batch ({before} -> {after})")
        return [row for p, (url, reply) in enumerate(replies)
                for row in parse_vllm_reply(reply, config, self.vocab_size, f"rollout server {url} (prompt {p})")]


class DiskWeightSync:
    """Publishes the student's weights to the rollout servers through a shared directory (see the module
    docstring). `export(directory)` writes the student there in HF layout (collective over every rank); world
    rank 0 drives the servers. `keep` published versions stay on disk (the newest is what a restarted server is
    reloaded from)."""

    def __init__(self, urls: Sequence[str], weights_dir: str | Path, export: Callable[[Path], None],
                 is_driver: bool, keep: int = 2, request_timeout_s: float = 600.0,
                 headers: Optional[dict[str, str]] = None):
        import httpx

        self.urls = list(urls)
        self.weights_dir = Path(weights_dir)
        self.export = export
        self.is_driver = is_driver
        # Its own client: a reload may take minutes for a large model, far beyond a generation request's timeout.
        self.client = httpx.Client(headers=headers or {}, timeout=request_timeout_s, trust_env=False)
        self.keep = max(1, keep)
        self.version: Optional[int] = None
        self.seconds: list[float] = []          # wall seconds of each publish (export + reload on every server)
        self.reload_seconds: list[float] = []   # of the server side alone (pause .. resume)

    def directory(self, version: int) -> Path:
        return self.weights_dir / f"v{version:07d}"

    def publish(self, version: int) -> None:
        """Write version `version` and make every server load it (collective; returns once they all serve it)."""
        started = time.perf_counter()
        target = self.directory(version)
        self.export(target)
        self.version = version
        failure = None
        if self.is_driver:
            try:
                self.reload(self.urls)
                self._prune()
            except RolloutServerError as error:
                failure = str(error)
        failure = broadcast_failure(failure)
        if failure is not None:
            raise RolloutServerError(failure)
        self.seconds.append(time.perf_counter() - started)

    def reload(self, urls: Sequence[str]) -> None:
        """Load the last published version on `urls` (driver rank only)."""
        if self.version is None:
            raise RolloutServerError("no weights were published to the rollout servers yet")
        path, version = self.directory(self.version), str(self.version)
        started = time.perf_counter()
        for url in urls:
            self._post(url, "/pause?mode=wait", None)
            try:
                reply = self._post(url, "/collective_rpc", {"method": "reload_weights",
                                                            "kwargs": {"weights_path": str(path)}})
                if not isinstance(reply, dict) or "results" not in reply:
                    raise RolloutServerError(f"{url}/collective_rpc reload_weights: unexpected reply "
                                             f"{str(reply)[:200]!r}")
                self._post(url, "/reset_prefix_cache", None)
                self._post(url, "/update_weight_version", {"new_version": version})
            finally:
                self._post(url, "/resume", None)
            answer = self._request(url, "GET", "/weight_info", None)
            check_reported_version(answer, url, version, f"reloading {path}")
        self.reload_seconds.append(time.perf_counter() - started)

    def _post(self, url: str, path: str, body: Optional[dict]) -> Any:
        return self._request(url, "POST", path, body)

    def _request(self, url: str, method: str, path: str, body: Optional[dict]) -> Any:
        return control_call(self.client, url, method, path, body,
                            "the route is missing; start the rollout server with VLLM_SERVER_DEV_MODE=1 (the "
                            "pause/resume, collective_rpc and weight-version routes are dev-mode only)")

    def close(self) -> None:
        self.client.close()

    def _prune(self) -> None:
        versions = sorted(p for p in self.weights_dir.glob("v*") if p.is_dir() and p.name[1:].isdigit())
        for old in versions[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def build_served_engine(cfg, ctx, module, vocab_size: int, pad_id: int, run_path: Path, engine_cls,
                        disk_sync_cls, nccl_sync: Callable[..., Any]) -> ServedRolloutEngine:
    """A served engine (`engine_cls`) for the run `cfg` on this rank: the client of `rollout.server.urls` and the
    weight sync of the student `module` (this rank's stage) to them, by `rollout.server.sync`: `disk_sync_cls`
    (a `DiskWeightSync`: an HF export each server reloads), or `nccl_sync(urls, tensors, is_driver, bucket_bytes,
    device)` on a GPU at PP = 1 (`auto` picks it there; untested on a GPU). Checks what the server needs to load
    the student: an HF-exportable architecture (the family from model.from_hf, else llama) and an HF tokenizer
    (data.tokenizer a directory)."""
    import torch
    from megatron.core import parallel_state

    from opd_megatron.config import ConfigError
    from opd_megatron.config.hf import CONFIG_FILE, hf_family, read_hf_config
    from opd_megatron.config.sections import ServerSection
    from opd_megatron.student.hf_bridge import check_exportable, hf_tensors
    from opd_megatron.student.hf_export import export_module

    server, engine = cfg.rollout.server, cfg.rollout.engine
    if server.vocab_size not in (0, vocab_size):
        raise ConfigError(f"rollout.server.vocab_size={server.vocab_size} is not the student's vocabulary "
                          f"({vocab_size}); leave it 0")
    check_exportable(cfg.model)
    base = read_hf_config(cfg.model.from_hf) if cfg.model.from_hf else None
    family = hf_family(base, str(Path(cfg.model.from_hf) / CONFIG_FILE)) if base is not None else "llama"
    tokenizer = Path(cfg.data.tokenizer) if cfg.data.tokenizer not in ("", "byte") else None
    if tokenizer is not None and tokenizer.is_file():
        tokenizer = tokenizer.parent
    if tokenizer is None or not (tokenizer / "tokenizer.json").is_file():
        raise ConfigError(f"rollout.engine={engine}: {engine_cls.engine_name} loads the student with its tokenizer; "
                          f"data.tokenizer={cfg.data.tokenizer!r} is not a directory holding an HF tokenizer.json")
    shared = {f.name: getattr(server, f.name) for f in dataclasses.fields(ServerSection)}
    client = HTTPTeacherConfig(**{**shared, "vocab_size": vocab_size}).validate("rollout.server.")
    gpu = torch.cuda.is_available()
    if server.sync == "nccl" and not (gpu and cfg.parallel.pp == 1):
        raise ConfigError(f"rollout.server.sync=nccl needs CUDA and parallel.pp=1 (got "
                          f"{'a GPU' if gpu else 'no GPU'}, pp={cfg.parallel.pp}); use sync=disk or auto")
    if server.sync == "nccl" or (server.sync == "auto" and gpu and cfg.parallel.pp == 1):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.model.dtype)
        sync = nccl_sync(client.urls, lambda: hf_tensors(module, cfg.model, dtype), ctx.rank == 0,
                         server.bucket_mb << 20, ctx.device)
    else:
        def export(directory: Path) -> None:
            export_module(module, cfg.model, directory, ctx, family=family, hf_config=base, dtype=None,
                          tokenizer_dir=tokenizer)

        weights_dir = Path(server.weights_dir) if server.weights_dir else run_path / "rollout-weights"
        sync = disk_sync_cls(client.urls, weights_dir, export, is_driver=ctx.rank == 0, keep=server.keep_versions)
    return engine_cls(client, vocab_size, pad_id, cfg.run.seed, parallel_state.get_data_parallel_rank(),
                      sync=sync, model_parallel_group=parallel_state.get_model_parallel_group())


def build_vllm_engine(cfg, ctx, module, vocab_size: int, pad_id: int, run_path: Path) -> VLLMRolloutEngine:
    """`rollout.engine: vllm` (`build_served_engine`), with vLLM's NCCL weight transfer on GPUs."""
    def nccl_sync(urls, tensors, is_driver, bucket_bytes, device):
        return VLLMNcclWeightSync(urls, tensors, is_driver=is_driver, bucket_bytes=bucket_bytes)

    return build_served_engine(cfg, ctx, module, vocab_size, pad_id, run_path, VLLMRolloutEngine, DiskWeightSync,
                               nccl_sync)
