"""Student rollouts served by SGLang: the `RolloutEngine` behind `rollout.engine: sglang`, with weight sync from disk
(everywhere) or over NCCL (GPUs).

The SGLang twin of `rollout/served.py` (vLLM); versions, retries, the background requests and the per-replica
broadcast are that engine's. The protocol was read from SGLang 0.5.23's source (`teachers/sglang.py::SGLANG_VERSION`,
the wheel cached under ~/.cache/opd-megatron/sglang-0.5.23/; `S/` = its `sglang/` package) and is checked against it
by tests/rollout/test_sglang_rollout_protocol.py; SGLang does not run on a CPU, so no server of it was started.

Generation (`POST /generate`, `S/srt/entrypoints/http_server.py:928-941`, body `GenerateReqInput`,
`S/srt/managers/io_struct.py:176-330`), one request per prompt holding its `n` rows:
- `input_ids`: the prompt repeated n times, `sampling_params`: one dict per row with `n: 1` and its own
  `sampling_seed`. SGLang's seeded sampler draws from a hash of (seed, position, token)
  (`S/srt/layers/sampler.py:933-965`), so n copies of one seed (`sampling_params.n`, expanded with ONE shared dict,
  io_struct.py:531-557,740-747) would give n identical samples. Row j of prompt p gets the seed
  `hash(run seed, sample key, dp rank, p, j)`. The seed is only read with `--enable-deterministic-inference`
  (`S/srt/sampling/sampling_batch_info.py:157-172`; that mode also forces the pytorch sampling backend,
  `S/srt/arg_groups/overrides.py:1029-1036`, which the seeded top-k/top-p path needs: the flashinfer backend
  refuses seeds, sampler.py:402-406); without it the rollouts are still correct but not repeatable on resume
  (the engine warns, from `GET /server_info`).
- every sampling field is sent: temperature, top_p, top_k (-1 = off; SamplingParams rejects 0, `S/srt/sampling/
  sampling_params.py:263-266`, and its own default is 1 << 30, `:43,159`), min_p 0 and neutral penalties, so a
  checkpoint's preferred sampling defaults cannot enter. Temperature 0 is greedy: SGLang turns it into top_k 1 at
  T = 1 (`sampling_params.py:245-248`); we send exactly that.
- stops: `stop_token_ids` = our stop ids with `ignore_eos: false` (`ignore_eos` would disable every token stop, the
  stop ids included: `S/srt/managers/schedule_batch.py:1856-1878`; the model's eos ids then stop too, so a row that
  stops on an eos id that is not one of ours is refused by the reply check). `output_ids` always end with the stop
  token (`output_ids_through_stop`, schedule_batch.py:1509-1513, sent by `S/srt/managers/scheduler_components/
  output_streamer.py:490-492`): exactly our sampler's rule. `no_stop_trim: true` keeps it in `text` too (the trim
  is on the text only, `S/srt/managers/detokenizer_manager.py:194-226,335-339,420-424`).
- finish (`schedule_batch.py:284-345`): `{"type": "stop", "matched": id}`, `{"type": "length", "length":
  max_new_tokens}` (`:2038-2043`; a stop token beats the length cap, `:2030-2036`), `{"type": "abort", ...}`; an
  out-of-vocabulary / NaN step ends `{"type": "stop", "matched": "NaN happened"}` (`:1977-1993`) and is refused. A
  prompt + max_new_tokens beyond the context is a 400, or a silently shortened `max_new_tokens` with
  `--allow-auto-truncate` (`S/srt/managers/tokenizer_manager.py:1353-1378`): a length finish short of
  rollout.max_new_tokens is refused.
- behaviour log-probs `mu(y_t)`, `return_logprob: true, logprob_start_len: -1` (output tokens only, io_struct.py:
  231-233): `meta_info.output_token_logprobs` holds one `[logprob, id, null]` per output token
  (`tokenizer_manager.py:2859-2870,3098-3108`, the stop token included: output_streamer.py:612-625). Its values are
  `log softmax(z / T)` over the FULL vocabulary, taken before the top-k / top-p / min-p filter (sampler.py:274-316;
  T = 1 under `SGLANG_RETURN_ORIGINAL_LOGPROB=1`, `:82,231-237,322`; bf16 with `--rl-on-policy-target`,
  `:239-248`): our `mu` only without top-k / top-p. With either (and for greedy rows), the engine asks
  `return_sampling_mask: true, sampling_logprobs_mode: "selected"` (io_struct.py:238-247; the mode is refused
  without the mask, tokenizer_manager.py:1431-1435) and reads `meta_info.output_token_sampling_logprobs[t] =
  log(w(y_t) / sum of the kept weights)` (sampler.py:539-631; 0 for greedy, `:506-537`) with
  `output_token_sampling_mask[t]` the kept ids (tokenizer_manager.py:2531-2550, `S/srt/sampling/sampling_mask.py:
  37-51`): the log-prob under the distribution actually sampled from. The mask needs a finite top_k in
  (1, --sampling-mask-max-tokens] or 1 (`S/srt/managers/scheduler.py:3172-3183`, default 4096, `S/srt/arg_groups/
  fields/exec_.py:182-188`; a larger realised support aborts the row, sampler.py:581-591, batch_result_processor.
  py:1326-1354), so top-p alone is sent with top_k = rollout.top_p_candidates, the in-process sampler's own bound on
  a nucleus. SGLang's pytorch top-p keeps an id while the un-renormalised mass before it is <= p, jointly with
  top-k (sampler.py:821-827); the in-process sampler applies top-p to the renormalised top-k distribution: the
  engines sample from slightly different distributions when both are on, and each reports its own `mu`.
- `meta_info.weight_version` (tokenizer_manager.py:2507-2513) and, for a finished row, `weight_versions`: the
  versions that generated its tokens as spans (`:2560-2568`, `S/srt/utils/weight_versions.py:66-107`). Every row
  must report the version its server reported before the batch, as one span: a row that straddles a weight update
  is never trained on.

Weight sync from disk (`SGLangDiskSync`): the student is written in HF layout to `<weights_dir>/v<version>` exactly
as for vLLM (`DiskWeightSync.publish`); world rank 0 then sends every server `POST /update_weights_from_disk
{"model_path": dir, "weight_version": v, "flush_cache": true, "abort_all_requests": false}` (http_server.py:
1300-1326, `UpdateWeightFromDiskReqInput` io_struct.py:1970-1992). The tokenizer manager takes its writer lock: it
waits for running `/generate` requests and holds new ones (tokenizer_manager.py:2288-2322, reader lock `:941-942`);
the scheduler loads, records the version and flushes the radix cache; a flush refused because requests still run
fails the call (`S/srt/managers/scheduler_components/weight_updater.py:120-163`). The reply is `{"success",
"message", "num_paused_requests"}`, HTTP 400 when success is false. A failed load "rolls back" by re-reading
`model_config.model_path`, already set to the NEW directory (`S/srt/model_executor/model_runner_components/
weight_updater.py:193,228-238`): the server's weights are then unknown, so the engine marks its version unknown
(`POST /update_weight_version {"new_version": ..., "abort_all_requests": false}`, http_server.py:1527-1556; its
default aborts every request, io_struct.py:2155-2159) and loads again, up to `load_attempts` times. The version is
read back from `GET /model_info` (`weight_version`, http_server.py:812-830; `model_path` and `served_model_name`
move with a disk update, so they identify nothing). A restarted server answers its `--weight-version`, "default"
(`S/srt/arg_groups/fields/serving.py:172-175`), and is reloaded from the last published directory before a batch.

Weight sync over NCCL (`SGLangNCCLSync`, `rollout.server.sync: nccl`, or `auto` on a GPU with one pipeline stage of
the student). NOT RUN ON A GPU, nor against a real SGLang server: on the CPU its request bodies, their order and
the bucket layout are tested, and `publish` runs end to end over gloo (standing in for NCCL) against a fake server
that joins with SGLang's own `init_custom_process_group` and receives with its `FlattenedTensorBucket`, both
executed from the wheel. NCCL itself, SGLang's `load_weights` of the buckets and the timing need a GPU. Protocol:
1. once: `POST /init_weights_update_group {"master_address", "master_port", "rank_offset", "world_size",
   "group_name", "backend": "nccl"}` to every server (io_struct.py:2126-2138; server rank = rank_offset + its TP
   rank, model_runner_components/weight_updater.py:100-144; its TP size read from `GET /server_info`, `tp_size`,
   http_server.py:863-894), while the trainer joins as rank 0 with the same helper SGLang uses
   (`init_custom_process_group`, `S/srt/utils/common.py:2859-2925`); dp_size must be 1
   (`S/srt/managers/tokenizer_control_mixin.py:445-456`). All servers share one group: one broadcast reaches all.
   No warm-up collective: unlike vLLM's peers, SGLang's first collective after joining is the first bucket.
2. per version: `POST /begin_weight_update {}` (io_struct.py:2197-2200; 0.5.23 refuses a distributed update outside
   a session, scheduler_components/weight_updater.py:187-197,309-335), then per bucket `POST
   /update_weights_from_distributed {"names", "dtypes", "shapes", "group_name", "load_format": "flattened_bucket",
   "flush_cache", "abort_all_requests": false, "weight_version"}` (io_struct.py:2002-2019) while rank 0 broadcasts
   the bucket's uint8 concatenation (the server allocates `FlattenedTensorBucket.empty`, `S/srt/weight_sync/
   tensor_bucket.py:86-112`: byte offsets must be multiples of each dtype's size, so a bucket closes before a tensor
   that would be misaligned; model_runner_components/weight_updater.py:260-310). The version and the cache flush
   ride on the last bucket only. Then `POST /end_weight_update {}` (io_struct.py:2208-2210). Each call holds
   SGLang's writer lock only while it runs (tokenizer_control_mixin.py:471-483,516-524): a request between two
   buckets would see half-replaced weights under the old version. The engine sends none during a sync
   (`sync_weights` waits for its own requests first), so the rollout servers must serve this run alone. The
   tensors are the full HF-named ones (SGLang's `load_weights` shards them for its TP), gathered from the student's
   TP shards one parameter at a time (`student/hf_bridge.py::hf_tensors`), so the trainer holds at most one
   bucket (plus one parameter). A failure on one bucket still draws the rest (the other TP ranks gather in step),
   closes the session with `/end_weight_update`, and stops the run: the weights were partially replaced.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from opd_megatron.rollout.generate import SamplingConfig, _seed
from opd_megatron.rollout.served import (SEED_MASK, VLLM_LOGPROB_FLOOR, DiskWeightSync, RolloutServerError,
                                         ServedRolloutEngine, ServedRow, WeightVersionMismatch,
                                         build_served_engine)
from opd_megatron.student.distributed import broadcast_failure
from opd_megatron.teachers.http import HTTPTeacherConfig
from opd_megatron.teachers.sglang import SGLANG_VERSION

log = logging.getLogger("opd_megatron.rollout.served_sglang")

#: A log-prob at or below this is a token its own sampling distribution gave no mass (the same bound as vLLM's floor;
#: SGLang clamps -inf to the dtype's minimum, sampler.py:200, and JSON carries -inf as null).
LOGPROB_FLOOR = VLLM_LOGPROB_FLOOR
#: The version a server is marked with after a failed load: its weights are then unknown (see the module docstring).
UNKNOWN_VERSION = "unknown: a weight load failed"
#: SGLang's default group name (io_struct.py:2007,2136).
GROUP_NAME = "weight_update_group"



def uses_sampling_mask(config: SamplingConfig) -> bool:
    """Whether `mu` must come from SGLang's sampling mask: the default log-probs are the full softmax at T, which
    is the sampled distribution only without top-k / top-p (and not for greedy rows, whose `mu` is 0)."""
    return config.temperature == 0 or config.top_k > 0 or config.top_p < 1.0


def sent_top_k(config: SamplingConfig) -> int:
    """The top_k SGLang gets: 1 for greedy, -1 (off) without a sampling mask, else a finite bound (the mask needs
    one; top-p alone is bounded by `top_p_candidates`, as in the in-process sampler)."""
    if config.temperature == 0:
        return 1
    if config.top_k > 0:
        return config.top_k
    return config.top_p_candidates if config.top_p < 1.0 else -1


def sglang_sampling_params(config: SamplingConfig, seed: int) -> dict[str, Any]:
    """One row's `sampling_params` (every field sent; see the module docstring)."""
    greedy = config.temperature == 0
    return {"max_new_tokens": config.max_new_tokens, "n": 1, "temperature": 1.0 if greedy else config.temperature,
            "top_p": config.top_p, "top_k": sent_top_k(config), "min_p": 0.0, "min_new_tokens": 0,
            "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "stop_token_ids": sorted(set(config.stop_ids)), "ignore_eos": False, "no_stop_trim": True,
            "skip_special_tokens": False, "sampling_seed": seed}


def sglang_payload(prompt_ids: Sequence[int], config: SamplingConfig, seeds: Sequence[int]) -> dict[str, Any]:
    """The `/generate` body for the `len(seeds)` rows of one prompt, row j seeded `seeds[j]`."""
    body: dict[str, Any] = {
        "input_ids": [[int(t) for t in prompt_ids] for _ in seeds],
        "sampling_params": [sglang_sampling_params(config, seed) for seed in seeds],
        "return_logprob": True, "logprob_start_len": -1, "top_logprobs_num": 0, "return_text_in_logprobs": False,
        "return_sampling_mask": uses_sampling_mask(config), "stream": False,
    }
    if body["return_sampling_mask"]:
        body["sampling_logprobs_mode"] = "selected"
    return body


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_logprob(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
            and LOGPROB_FLOOR < value <= 1e-4)


def parse_sglang_reply(reply: Any, config: SamplingConfig, vocab_size: int, expected_version: Optional[str],
                       where: str) -> list[ServedRow]:
    """`config.n` rows from a `/generate` reply to `sglang_payload` (in the request's order), with every check a
    row must pass before it is trained on; `expected_version` (None: not checked) is the weight version every row
    must report, as its only span. Raises RolloutServerError naming `where` and the first problem found."""
    def bad(message: str) -> RolloutServerError:
        return RolloutServerError(f"{where}: {message}")

    if not isinstance(reply, list):
        raise bad(f"expected a JSON list of {config.n} results (one per row of the batch), got "
                  f"{str(reply)[:200]!r}")
    if len(reply) != config.n:
        raise bad(f"{len(reply)} results for n={config.n} rows")
    masked = uses_sampling_mask(config)
    stops = set(config.stop_ids)
    rows = []
    for j, item in enumerate(reply):
        meta = item.get("meta_info") if isinstance(item, dict) else None
        if not isinstance(meta, dict):
            raise bad(f"sample {j}: no meta_info in {str(item)[:200]!r}")
        ids = item.get("output_ids")
        if not isinstance(ids, list) or not all(_is_int(t) for t in ids):
            raise bad(f"sample {j}: `output_ids` is not a list of integers")
        if not 1 <= len(ids) <= config.max_new_tokens:
            raise bad(f"sample {j}: {len(ids)} tokens, expected 1..max_new_tokens={config.max_new_tokens}")
        if any(not 0 <= t < vocab_size for t in ids):
            raise bad(f"sample {j}: token id {next(t for t in ids if not 0 <= t < vocab_size)} outside the "
                      f"student's vocabulary [0, {vocab_size}) (a padded embedding row sampled?)")
        if _is_int(meta.get("completion_tokens")) and meta["completion_tokens"] != len(ids):
            raise bad(f"sample {j}: meta_info.completion_tokens={meta['completion_tokens']} for {len(ids)} "
                      f"output_ids")
        logprobs = _row_logprobs(meta, ids, masked, f"{where} sample {j}")
        early = [t for t in ids[:-1] if t in stops]
        if early:
            raise bad(f"sample {j}: stop id {early[0]} inside the response, not at its end")
        finish = meta.get("finish_reason")
        kind = finish.get("type") if isinstance(finish, dict) else None
        if kind == "stop":
            matched = finish.get("matched")
            if not _is_int(matched) or matched not in stops or ids[-1] != matched:
                raise bad(f"sample {j}: finish_reason {finish!r} with last token {ids[-1]}: expected a stop on one "
                          f"of the stop ids {sorted(stops)} (the model's own eos ids stop SGLang too: add them to "
                          f"the run's stop ids) and the stop token last")
        elif kind == "length":
            if len(ids) != config.max_new_tokens or finish.get("length") not in (None, config.max_new_tokens):
                raise bad(f"sample {j}: ended by length after {len(ids)} of max_new_tokens={config.max_new_tokens} "
                          f"tokens (finish_reason {finish!r}): the server's context length is too short for the "
                          f"prompt plus rollout.max_new_tokens (--allow-auto-truncate shortens it silently)")
        else:
            raise bad(f"sample {j}: finish_reason {finish!r} (aborted or unknown); expected type stop or length")
        if expected_version is not None:
            _check_version(meta, len(ids), expected_version, f"{where} sample {j}")
        rows.append(ServedRow(ids=list(ids), logprobs=logprobs))
    return rows


def _row_logprobs(meta: dict, ids: list[int], masked: bool, where: str) -> list[float]:
    """One behaviour log-prob per output token: the sampling mask's selected values, else the sampled tokens'
    entries of output_token_logprobs (each `[logprob, id, text]`, its id checked against output_ids)."""
    if masked:
        values, supports = meta.get("output_token_sampling_logprobs"), meta.get("output_token_sampling_mask")
        if not isinstance(values, list) or len(values) != len(ids):
            raise RolloutServerError(f"{where}: {len(values) if isinstance(values, list) else 'no'} "
                                     f"meta_info.output_token_sampling_logprobs for {len(ids)} tokens (the request "
                                     f"asked return_sampling_mask with sampling_logprobs_mode selected)")
        if not isinstance(supports, list) or len(supports) != len(ids):
            raise RolloutServerError(f"{where}: meta_info.output_token_sampling_mask is missing or has "
                                     f"{len(supports) if isinstance(supports, list) else 'no'} entries for "
                                     f"{len(ids)} tokens")
        for t, (token, support) in enumerate(zip(ids, supports)):
            if not isinstance(support, list) or token not in support:
                raise RolloutServerError(f"{where}, token {t}: sampled id {token} is not in its sampling support "
                                         f"(output_token_sampling_mask[{t}])")
    else:
        entries = meta.get("output_token_logprobs")
        if not isinstance(entries, list) or len(entries) != len(ids):
            raise RolloutServerError(f"{where}: {len(entries) if isinstance(entries, list) else 'no'} "
                                     f"meta_info.output_token_logprobs for {len(ids)} tokens")
        values = []
        for t, (token, entry) in enumerate(zip(ids, entries)):
            if not isinstance(entry, (list, tuple)) or len(entry) < 2 or entry[1] != token:
                raise RolloutServerError(f"{where}, token {t}: output_token_logprobs[{t}] = {str(entry)[:100]} is "
                                         f"not [logprob, {token}, text] (misaligned with output_ids)")
            values.append(entry[0])
    for t, value in enumerate(values):
        if not _is_logprob(value):
            raise RolloutServerError(f"{where}, token {t}: log-prob {value!r} is not a finite value <= 0 above "
                                     f"{LOGPROB_FLOOR} (a token its own sampling distribution gave no mass)")
    return [float(v) for v in values]


def _check_version(meta: dict, length: int, expected: str, where: str) -> None:
    version = meta.get("weight_version")
    if version is None or str(version) != expected:
        raise WeightVersionMismatch(f"{where}: generated under weight version {version!r}, expected {expected!r}")
    spans = meta.get("weight_versions")
    if spans is None:
        return
    if not isinstance(spans, list) or not all(isinstance(s, dict) for s in spans):
        raise RolloutServerError(f"{where}: meta_info.weight_versions is not a list of spans: {str(spans)[:200]}")
    if [str(s.get("version")) for s in spans] != [expected] or spans[0].get("start") != 0 \
            or spans[0].get("end") not in (None, length):
        raise WeightVersionMismatch(f"{where}: its tokens come from weight versions {spans}, expected one span "
                                    f"of version {expected!r} over all {length} tokens (weights updated mid-row)")


class SGLangRolloutEngine(ServedRolloutEngine):
    """Samples from SGLang servers holding a copy of the student's weights over `/generate` (see the module
    docstring): versions from `/model_info`, and each row reports the version it was generated under."""

    engine_name = "SGLang"
    generate_path = "/generate"

    def __init__(self, server: HTTPTeacherConfig, vocab_size: int, pad_id: int, seed: int, dp_rank: int,
                 sync: Optional[DiskWeightSync | "SGLangNCCLSync"] = None, version_check: bool = True,
                 model_parallel_group=None):
        super().__init__(server, vocab_size, pad_id, seed, dp_rank, sync=sync, version_check=version_check,
                         model_parallel_group=model_parallel_group)
        #: the smallest --sampling-mask-max-tokens of the servers (None: not read); a finite top_k above it aborts
        self.sampling_mask_max_tokens: Optional[int] = None
        if server.check_on_start and self.requester:
            self.sampling_mask_max_tokens = self._check_servers()

    def _check_servers(self) -> Optional[int]:
        """`GET /server_info` of every server: warn when sampling seeds are ignored (no
        --enable-deterministic-inference), and return the smallest sampling-mask bound."""
        bounds = []
        for url in self.servers:
            info = self._get(url, "/server_info")
            if not isinstance(info, dict):
                raise RolloutServerError(f"{url}/server_info: expected a JSON object, got {str(info)[:200]!r}")
            if info.get("enable_deterministic_inference") is not True:
                log.warning("rollout server %s runs without --enable-deterministic-inference: SGLang ignores the "
                            "per-row sampling seeds, so a resumed run does not repeat its rollouts", url)
            if _is_int(info.get("sampling_mask_max_tokens")):
                bounds.append(int(info["sampling_mask_max_tokens"]))
        return min(bounds) if bounds else None

    def server_versions(self) -> dict[str, str]:
        """`{url: weight version}` as each server reports it (`GET /model_info`)."""
        out = {}
        for url in self.servers:
            reply = self._get(url, "/model_info")
            version = reply.get("weight_version") if isinstance(reply, dict) else None
            if version is None:
                raise RolloutServerError(f"{url}/model_info: no weight_version in {str(reply)[:200]!r} (SGLang >= "
                                         f"{SGLANG_VERSION} expected)")
            out[url] = str(version)
        return out

    def payloads(self, prompts_ids, config, key) -> list[dict]:
        if uses_sampling_mask(config) and self.sampling_mask_max_tokens is not None \
                and sent_top_k(config) > self.sampling_mask_max_tokens:
            raise ValueError(f"rollout.top_k (or top_p_candidates with top-p alone) = {sent_top_k(config)} is above "
                             f"the rollout servers' --sampling-mask-max-tokens={self.sampling_mask_max_tokens}: "
                             f"SGLang would abort the rows; lower it or raise the server's bound")
        return [sglang_payload(ids, config, [_seed(self.seed, key, self.dp_rank, p, j) & SEED_MASK
                                             for j in range(config.n)])
                for p, ids in enumerate(prompts_ids)]

    def parse_rows(self, replies, config, before) -> list[ServedRow]:
        # Every row reports the version it was generated under, checked against its server's before the batch.
        return [row for p, (url, reply) in enumerate(replies)
                for row in parse_sglang_reply(reply, config, self.vocab_size, before.get(url),
                                              f"rollout server {url} (prompt {p})")]


# -- weight sync -------------------------------------------------------------------------------------------------
def _control_call(client, url: str, method: str, path: str, body: Optional[dict]) -> dict:
    """`method url+path` on a weight-control route: its JSON on 200, or on 400 with `success: false` (SGLang's
    failure answer); a transport failure or anything else is a RolloutServerError naming the route."""
    import httpx

    try:
        reply = client.request(method, url + path, json=body)
    except httpx.HTTPError as error:
        raise RolloutServerError(f"{url}{path}: {type(error).__name__}: {error}") from None
    if reply.status_code == 404:
        raise RolloutServerError(f"{url}{path}: HTTP 404: the route is missing (SGLang {SGLANG_VERSION} expected)")
    try:
        answer = reply.json()
    except ValueError:
        answer = None
    if reply.status_code not in (200, 400) or not isinstance(answer, dict):
        raise RolloutServerError(f"{url}{path}: HTTP {reply.status_code}: {reply.text[:300]}")
    if reply.status_code == 400 and answer.get("success") is not False:
        raise RolloutServerError(f"{url}{path}: HTTP 400: {reply.text[:300]}")
    return answer


class SGLangDiskSync(DiskWeightSync):
    """`DiskWeightSync` (the export to `<weights_dir>/v<version>`, publish, keep, prune) with SGLang's reload:
    `/update_weights_from_disk` on every server, its version read back from `/model_info`; a failed load marks the
    server's version unknown and loads again, up to `load_attempts` times (see the module docstring)."""

    def __init__(self, urls: Sequence[str], weights_dir: str | Path, export: Callable[[Path], None],
                 is_driver: bool, keep: int = 2, request_timeout_s: float = 600.0,
                 headers: Optional[dict[str, str]] = None, load_attempts: int = 2):
        super().__init__(urls, weights_dir, export, is_driver, keep=keep, request_timeout_s=request_timeout_s,
                         headers=headers)
        if load_attempts < 1:
            raise ValueError(f"load_attempts must be >= 1, got {load_attempts}")
        self.load_attempts = load_attempts
        self.failed_loads = 0

    def reload(self, urls: Sequence[str]) -> None:
        """Load the last published version on `urls` (driver rank only)."""
        if self.version is None:
            raise RolloutServerError("no weights were published to the rollout servers yet")
        path, version = self.directory(self.version), str(self.version)
        started = time.perf_counter()
        for url in urls:
            messages = []
            for _ in range(self.load_attempts):
                answer = self._post(url, "/update_weights_from_disk", {
                    "model_path": str(path), "weight_version": version, "flush_cache": True,
                    "abort_all_requests": False})
                if answer.get("success") is True:
                    break
                self.failed_loads += 1
                messages.append(str(answer.get("message"))[:300])
                log.warning("rollout server %s failed to load %s: %s", url, path, messages[-1])
                self.mark_unknown(url)
            else:
                raise RolloutServerError(f"{url}/update_weights_from_disk: {self.load_attempts} attempt(s) to load "
                                         f"{path} failed (the server's weights are unknown; its version is now "
                                         f"{UNKNOWN_VERSION!r}): {' | '.join(messages)}")
            reported = self._request(url, "GET", "/model_info", None).get("weight_version")
            if str(reported) != version:
                raise RolloutServerError(f"{url}: after loading {path} the server reports weight version "
                                         f"{reported!r}, expected {version!r}")
        self.reload_seconds.append(time.perf_counter() - started)

    def mark_unknown(self, url: str) -> None:
        """After a failed load: a version no expected one equals, so that nothing trusts the server's weights."""
        self._post(url, "/update_weight_version", {"new_version": UNKNOWN_VERSION, "abort_all_requests": False})

    def _request(self, url: str, method: str, path: str, body: Optional[dict]) -> Any:
        return _control_call(self.client, url, method, path, body)


# -- weight sync over NCCL (GPU only; not run on a GPU yet) --------------------------------------------------------
@dataclass
class Bucket:
    """Tensors broadcast as one flattened uint8 buffer, in order (SGLang's `flattened_bucket`)."""
    names: list[str]
    tensors: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def request(self, group_name: str, weight_version: Optional[str], last: bool) -> dict[str, Any]:
        """The `/update_weights_from_distributed` body of this bucket; the version and the cache flush ride on the
        last bucket of a version only (a row reporting it then saw only complete weights)."""
        return {"names": list(self.names), "dtypes": [str(t.dtype).removeprefix("torch.") for t in self.tensors],
                "shapes": [list(t.shape) for t in self.tensors], "group_name": group_name,
                "load_format": "flattened_bucket", "flush_cache": last, "abort_all_requests": False,
                "weight_version": weight_version if last else None}

    def flattened(self) -> torch.Tensor:
        """The uint8 concatenation SGLang's FlattenedTensorBucket reads back (tensor_bucket.py:49-72,86-135)."""
        return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in self.tensors])


def buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Bucket]:
    """Group tensors, in order, into buckets of at most `bucket_bytes` (a larger tensor goes alone). A bucket also
    closes before a tensor whose byte offset in it would not be a multiple of its element size: the server refuses
    an unaligned offset (tensor_bucket.py:98-101). Lazy: `named_tensors` is read one tensor ahead of the bucket."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    current = Bucket([], [])
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current.names and (size + nbytes > bucket_bytes or size % tensor.element_size()):
            yield current
            current, size = Bucket([], []), 0
        current.names.append(name)
        current.tensors.append(tensor)
        size += nbytes
    if current.names:
        yield current


def join_update_group(master_address: str, master_port: int, world_size: int, group_name: str = GROUP_NAME,
                      backend: str = "nccl", timeout_s: float = 600.0):
    """The trainer's side of `/init_weights_update_group`: rank 0 of a process group outside the trainer's own
    world, built exactly as SGLang builds its side (`init_custom_process_group`, S/srt/utils/common.py:2859-2925:
    a tcp:// rendezvous hosted by rank 0, a PrefixStore named after the group; torch's private group helper, as
    there). Blocks until every server rank has joined."""
    from datetime import timedelta

    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world, rendezvous

    timeout = timedelta(seconds=timeout_s)
    store, rank, size = next(rendezvous(f"tcp://{master_address}:{master_port}", 0, world_size, timeout=timeout))
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(size, rank, [], Backend(backend), PrefixStore(group_name, store),
                                         group_name=group_name, backend_options=None, timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(size)}
    return group


def local_address_towards(url: str) -> str:
    """This host's address on the route to `url`'s host (what the server connects back to)."""
    parts = urlsplit(url)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((parts.hostname or "127.0.0.1", parts.port or 80))   # UDP: no packet is sent
        return probe.getsockname()[0]


def free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


class SGLangNCCLSync:
    """Publishes the student's weights to the SGLang servers over NCCL (see the module docstring; NOT RUN ON A GPU).
    `tensors()` yields the student's full HF-named tensors (collective: every rank iterates it to the end; non-empty
    on the driver only, `student/hf_bridge.py::hf_tensors`); world rank 0 drives the servers and broadcasts. Each
    server's tensor-parallel size comes from its `GET /server_info` (`tp_size`; `dp_size` and `pp_size` must be 1:
    a server rank is rank_offset + its TP rank)."""

    def __init__(self, urls: Sequence[str], tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]],
                 is_driver: bool, bucket_bytes: int = 1 << 30, group_name: str = GROUP_NAME, backend: str = "nccl",
                 request_timeout_s: float = 600.0, headers: Optional[dict[str, str]] = None,
                 device: Optional[torch.device] = None, group_timeout_s: float = 600.0):
        import httpx

        self.urls = list(urls)
        self.tensors = tensors
        self.group_timeout_s = group_timeout_s
        self.is_driver = is_driver
        self.bucket_bytes = bucket_bytes
        self.group_name = group_name
        self.backend = backend
        self.device = device
        self.client = httpx.Client(headers=headers or {}, timeout=request_timeout_s, trust_env=False)
        self.group = None
        self.version: Optional[int] = None
        self.seconds: list[float] = []
        self.reload_seconds: list[float] = []

    def server_tp(self) -> list[int]:
        """Each server's TP size (`GET /server_info`); a server with data or pipeline parallelism is refused."""
        sizes = []
        for url in self.urls:
            info = self._get(url, "/server_info")
            sizes.append(info.get("tp_size"))
            others = {key: info.get(key) for key in ("dp_size", "pp_size") if info.get(key) not in (None, 1)}
            if not _is_int(sizes[-1]) or sizes[-1] < 1 or others:
                raise RolloutServerError(f"{url}/server_info: tp_size={sizes[-1]!r}, {others}: the NCCL weight sync "
                                         f"needs a tensor-parallel size >= 1 and dp_size = pp_size = 1 (SGLang's "
                                         f"update group has one rank per TP rank); use rollout.server.sync=disk")
        return sizes

    def init_requests(self, master_address: str, master_port: int, server_tp: Sequence[int]
                      ) -> list[tuple[str, dict]]:
        """`/init_weights_update_group` bodies: server i's ranks follow rank 0 (the trainer) and the servers
        before it (`server_tp`: their TP sizes)."""
        world = 1 + sum(server_tp)
        offsets = [1 + sum(server_tp[:i]) for i in range(len(self.urls))]
        return [(url, {"master_address": master_address, "master_port": master_port, "rank_offset": offset,
                       "world_size": world, "group_name": self.group_name, "backend": self.backend})
                for url, offset in zip(self.urls, offsets)]

    def publish(self, version: int) -> None:
        """Send version `version` to every server (collective; returns once they all serve it)."""
        started = time.perf_counter()
        failure = None
        try:
            if self.is_driver:
                if self.group is None:
                    self._init_group()
                self._send(version)
            else:
                for _ in self.tensors():   # the TP gathers the driver's tensors need
                    pass
        except RolloutServerError as error:
            failure = str(error)
        failure = broadcast_failure(failure)
        if failure is not None:
            raise RolloutServerError(failure)
        self.version = version
        self.seconds.append(time.perf_counter() - started)

    def reload(self, urls: Sequence[str]) -> None:
        """A server found on another version (restarted) has left the NCCL group: it cannot be sent the weights
        from one rank between steps."""
        raise RolloutServerError(f"rollout servers {list(urls)} report another weight version than "
                                 f"{self.version}: restarted servers leave the NCCL weight-update group; restart "
                                 f"the run (it resumes with weights sent anew) or use the disk sync")

    def _init_group(self) -> None:
        address = local_address_towards(self.urls[0])
        port = free_port(address)
        requests = self.init_requests(address, port, self.server_tp())
        results: dict[str, Any] = {}
        threads = [threading.Thread(target=self._post_into, args=(url, "/init_weights_update_group", body, results),
                                    daemon=True) for url, body in requests]
        for thread in threads:
            thread.start()
        try:
            self.group = join_update_group(address, port, requests[0][1]["world_size"], self.group_name,
                                           self.backend, self.group_timeout_s)
        finally:
            for thread in threads:
                thread.join()
        # No warm-up collective: the servers' next collective is the first bucket's broadcast.
        self._check(results, "/init_weights_update_group")

    def _send(self, version: int) -> None:
        for url in self.urls:
            self._check({url: self._post(url, "/begin_weight_update", {})}, "/begin_weight_update")
        failure: Optional[RolloutServerError] = None
        try:
            pending = None
            # Every bucket is drawn even after a failure: the other TP ranks gather in step with this one.
            for bucket in buckets(self.tensors(), self.bucket_bytes):
                if pending is not None and failure is None:
                    failure = self._try_send(pending, None, last=False)
                pending = bucket
            if pending is None:
                raise RolloutServerError("the student yielded no tensors to send to the rollout servers")
            if failure is None:
                failure = self._try_send(pending, str(version), last=True)
            if failure is not None:
                raise failure
        finally:
            for url in self.urls:
                self._check({url: self._post(url, "/end_weight_update", {})}, "/end_weight_update")

    def _try_send(self, bucket: Bucket, version: Optional[str], last: bool) -> Optional[RolloutServerError]:
        try:
            self._send_bucket(bucket, version, last)
        except RolloutServerError as error:
            return error
        return None

    def _send_bucket(self, bucket: Bucket, version: Optional[str], last: bool) -> None:
        """POST the bucket's metadata to every server in threads while broadcasting its bytes (both block in the
        collective)."""
        body = bucket.request(self.group_name, version, last)
        flat = bucket.flattened()
        if self.device is not None:
            flat = flat.to(self.device)
        results: dict[str, Any] = {}
        threads = [threading.Thread(target=self._post_into, args=(url, "/update_weights_from_distributed", body,
                                                                  results), daemon=True) for url in self.urls]
        for thread in threads:
            thread.start()
        try:
            dist.broadcast(flat, src=0, group=self.group)
        finally:
            for thread in threads:
                thread.join()
        self._check(results, "/update_weights_from_distributed")

    def _post_into(self, url: str, path: str, body: dict, results: dict) -> None:
        try:
            results[url] = self._post(url, path, body)
        except RolloutServerError as error:
            results[url] = error

    def _post(self, url: str, path: str, body: dict) -> Any:
        return self._call(url, "POST", path, body)

    def _get(self, url: str, path: str) -> Any:
        return self._call(url, "GET", path, None)

    def _call(self, url: str, method: str, path: str, body: Optional[dict]) -> Any:
        return _control_call(self.client, url, method, path, body)

    @staticmethod
    def _check(results: dict[str, Any], path: str) -> None:
        for url, answer in results.items():
            if isinstance(answer, RolloutServerError):
                raise answer
            if answer.get("success") is not True:
                raise RolloutServerError(f"{url}{path}: failed: {str(answer.get('message'))[:300]}")

    def close(self) -> None:
        self.client.close()
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None


def build_sglang_engine(cfg, ctx, module, vocab_size: int, pad_id: int, run_path: Path) -> SGLangRolloutEngine:
    """`rollout.engine: sglang` (`served.build_served_engine`), with SGLang's disk reload and, on GPUs, its
    distributed weight update."""
    def nccl_sync(urls, tensors, is_driver, bucket_bytes, device):
        return SGLangNCCLSync(urls, tensors, is_driver=is_driver, bucket_bytes=bucket_bytes, device=device)

    return build_served_engine(cfg, ctx, module, vocab_size, pad_id, run_path, SGLangRolloutEngine, SGLangDiskSync,
                               nccl_sync)
