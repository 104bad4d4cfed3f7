"""`rollout.engine: sglang` (rollout/served_sglang.py): its protocol verified against the source of the pinned SGLang,
its reply checks on rows built as that source builds them, and the engine and weight syncs against a local fake
SGLang server.

SGLang does not run on a CPU: its wheel (cached under ~/.cache/opd-megatron/, as for the SGLang teacher's test) is
read with `ast`; only `weight_sync/tensor_bucket.py` (torch-only) is executed, to hold the NCCL sync's bucket
layout against SGLang's own receiving code. A protocol change in a new pin (a field renamed, a default changed, the
stop token trimmed from output_ids, the selected log-prob's formula) fails here before it reaches a run."""

from __future__ import annotations

import ast
import json
import random
import threading
from pathlib import Path

import pytest
import torch

from opd_megatron.rollout.generate import SamplingConfig
from opd_megatron.rollout.served import RolloutServerError
from opd_megatron.rollout.served_sglang import (UNKNOWN_VERSION, Bucket, SGLangDiskSync, SGLangNCCLSync,
                                                SGLangRolloutEngine, WeightVersionMismatch, buckets,
                                                join_update_group, free_port, parse_sglang_reply,
                                                sglang_payload, uses_sampling_mask)
from opd_megatron.teachers.http import HTTPTeacherConfig
from opd_megatron.teachers.sglang import SGLANG_VERSION
from tests.sglang_source import CACHE, annotated_fields as _fields, class_node as _class, function_node as _function, \
    sglang_wheel_files
from tests.teachers.fake_server import FakeServer, Reply

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "sglang").glob("*.json"))
VOCAB, STOP = 64, 2
SOURCES = ("sglang/srt/managers/io_struct.py", "sglang/api/v1/api_types.py", "sglang/srt/sampling/sampling_params.py",
           "sglang/srt/managers/schedule_batch.py", "sglang/srt/managers/detokenizer_manager.py",
           "sglang/srt/managers/scheduler_components/output_streamer.py", "sglang/srt/managers/tokenizer_manager.py",
           "sglang/srt/layers/sampler.py", "sglang/srt/managers/scheduler.py",
           "sglang/srt/sampling/sampling_batch_info.py", "sglang/srt/arg_groups/overrides.py",
           "sglang/srt/entrypoints/http_server.py", "sglang/srt/managers/scheduler_components/weight_updater.py",
           "sglang/srt/model_executor/model_runner_components/weight_updater.py",
           "sglang/srt/managers/tokenizer_control_mixin.py", "sglang/srt/utils/weight_versions.py",
           "sglang/srt/arg_groups/fields/exec_.py", "sglang/srt/arg_groups/fields/serving.py",
           "sglang/srt/utils/common.py")
SAMPLED = SamplingConfig(max_new_tokens=6, temperature=0.7, top_k=20, n=2, stop_ids=(STOP,))   # the mask path
PLAIN = SamplingConfig(max_new_tokens=6, temperature=0.9, n=2, stop_ids=(STOP,))               # the default log-probs


@pytest.fixture(scope="module")
def wheel():
    return sglang_wheel_files(SOURCES + ("sglang/srt/weight_sync/tensor_bucket.py",))


@pytest.fixture(scope="module")
def source(wheel):
    return {path: ast.parse(wheel[path], filename=path) for path in SOURCES}


def _flat(node) -> str:
    """Source text of `node` on one line, whitespace collapsed: what the snippets below are compared with."""
    return " ".join(ast.unparse(node).split())


def _text(tree, name, within=None) -> str:
    return _flat(_function(tree, name, within))


def _routes(tree) -> dict[str, tuple[str, list[str]]]:
    routes = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.args and \
                        isinstance(dec.args[0], ast.Constant):
                    methods = [dec.func.attr.upper()] if dec.func.attr in ("get", "post") else \
                        [e.value for kw in dec.keywords if kw.arg == "methods" for e in kw.value.elts]
                    routes[dec.args[0].value] = (node.name, methods)
    return routes


# -- the protocol, against the pinned source ----------------------------------------------------------------------

def test_generate_request_fields_against_the_source(source):
    io = source["sglang/srt/managers/io_struct.py"]
    request_fields = _fields(_class(io, "GenerateReqInput"))
    api = source["sglang/api/v1/api_types.py"]
    contract = _class(api, "GenerateRequest")
    contract_sampling = _class(api, "SamplingParams")
    sampling = _fields(_class(source["sglang/srt/sampling/sampling_params.py"], "SamplingParams"))
    for config in (SAMPLED, PLAIN, SamplingConfig(max_new_tokens=3, temperature=0.0, stop_ids=(STOP,)),
                   SamplingConfig(max_new_tokens=3, top_p=0.9, stop_ids=(STOP,))):
        body = sglang_payload([1, 5, 9], config, [11, 12])
        assert set(body) <= set(request_fields), set(body) - set(request_fields)
        # The /generate contract gate ignores unknown top-level keys (sampling_logprobs_mode is not among its
        # fields) but rejects unknown sampling keys.
        assert "unknown keys ignored" in ast.get_docstring(contract)
        assert "unknown keys rejected" in ast.get_docstring(contract_sampling)
        for params in body["sampling_params"]:
            assert set(params) <= set(_fields(contract_sampling)) and set(params) <= set(sampling)
            assert params["n"] == 1 and params["top_k"] != 0
        assert body["logprob_start_len"] == -1 and body["return_logprob"] is True
        # The mode may only be set with the mask (tokenizer_manager.py rejects it otherwise).
        assert ("sampling_logprobs_mode" in body) == body["return_sampling_mask"] == uses_sampling_mask(config)
    assert request_fields["return_sampling_mask"] == "None" and request_fields["sampling_logprobs_mode"] == "None"
    literal = ast.unparse(next(n for n in ast.walk(source["sglang/srt/managers/schedule_batch.py"])
                               if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "SamplingLogprobsMode"))
    assert "'selected'" in literal
    manager = _flat(source["sglang/srt/managers/tokenizer_manager.py"])
    assert "if obj.sampling_logprobs_mode is not None and (not obj.return_sampling_mask):" in manager
    # What the server does with fields we would leave out: why every one is sent.
    assert sampling["top_k"] == "TOP_K_ALL" and sampling["no_stop_trim"] == "False"
    assert sampling["skip_special_tokens"] == "True" and sampling["sampling_seed"] == "None"
    assert _fields(contract_sampling)["top_k"] == "1073741824"


def test_sampling_params_validation_and_greedy(source):
    tree = source["sglang/srt/sampling/sampling_params.py"]
    post_init, verify = _text(tree, "__post_init__", "SamplingParams"), _text(tree, "verify", "SamplingParams")
    assert "if self.top_k < 1 or self.top_k == -1:" in verify          # 0 is refused; -1 was mapped before
    assert "if self.top_k == -1: self.top_k = TOP_K_ALL" in post_init
    # Greedy is top_k 1 at T 1: what the engine sends for temperature 0.
    assert "if 0 <= self.temperature < _SAMPLING_EPS: self.temperature = 1.0 self.top_k = 1" in post_init
    assert "not -2 ** 63 <= self.sampling_seed <= 2 ** 63 - 1" in verify
    body = sglang_payload([1], SamplingConfig(max_new_tokens=2, temperature=0.0, stop_ids=(STOP,)), [3])
    assert body["sampling_params"][0]["top_k"] == 1 and body["sampling_params"][0]["temperature"] == 1.0


def test_seeds_are_per_row_and_need_deterministic_inference(source):
    io = _flat(_class(source["sglang/srt/managers/io_struct.py"], "GenerateReqInput"))
    # n > 1 repeats ONE dict per prompt: one seed for n copies, hence one row per seed.
    assert "self.sampling_params = [self.sampling_params] * num" in io
    assert "self.parallel_sample_num = self.sampling_params.get('n', 1)" in io
    info = _flat(source["sglang/srt/sampling/sampling_batch_info.py"])
    assert "if r.sampling_params.sampling_seed is not None else 42 for r in reqs" in info
    assert "if enable_deterministic else None" in info
    overrides = _text(source["sglang/srt/arg_groups/overrides.py"], "_deterministic_sampling_backend")
    assert "{'sampling_backend': 'pytorch'}" in overrides
    exec_fields = {k: v for cls in ast.walk(source["sglang/srt/arg_groups/fields/exec_.py"])
                   if isinstance(cls, ast.ClassDef) for k, v in _fields(cls).items()}
    assert exec_fields["enable_deterministic_inference"] == "False"
    assert exec_fields["sampling_mask_max_tokens"] == "4096"
    serving = {k: v for cls in ast.walk(source["sglang/srt/arg_groups/fields/serving.py"])
               if isinstance(cls, ast.ClassDef) for k, v in _fields(cls).items()}
    assert serving["weight_version"] == "'default'"      # what a restarted server answers
    body = sglang_payload([1, 2], SAMPLED, [7, 8])
    assert [p["sampling_seed"] for p in body["sampling_params"]] == [7, 8]


def test_behaviour_logprob_semantics(source):
    sampler = source["sglang/srt/layers/sampler.py"]
    forward = _text(sampler, "forward", "Sampler")
    # Default output log-probs: log softmax(z / T) over the full vocabulary, before any top-k / top-p filter.
    assert "logits.div_(sampling_info.temperatures)" in forward
    assert "logprobs_via_logsoftmax_kernel if logprobs_via_logsoftmax_kernel is not None else torch.log(probs)" \
        in forward
    assert forward.index("logits.div_(sampling_info.temperatures)") < forward.index("self._sample_from_probs(")
    # The mask's selected log-prob: the sampled weight over the kept mass; 0 for greedy rows.
    mask = _text(sampler, "_build_sampling_mask_output", "Sampler")
    assert "selected_logprobs = torch.log(selected_weight / support_mass)" in mask
    assert "support = weights > 0" in mask
    assert "selected_logprobs=torch.zeros(" in _text(sampler, "_build_greedy_sampling_mask_output", "Sampler")
    # The mask needs a finite top_k (why top-p alone is sent with top_p_candidates).
    scheduler = _flat(source["sglang/srt/managers/scheduler.py"])
    assert "if top_k != 1 and (not 1 < top_k <= sampling_mask_cap):" in scheduler
    top_p_alone = sglang_payload([1], SamplingConfig(max_new_tokens=2, top_p=0.9, stop_ids=(STOP,)), [3])
    assert top_p_alone["sampling_params"][0]["top_k"] == 64 and top_p_alone["return_sampling_mask"]


def test_meta_info_keys_and_layout(source):
    manager = source["sglang/srt/managers/tokenizer_manager.py"]
    batch = _text(manager, "_handle_batch_output")
    for key in ("'finish_reason': recv_obj.finished_reasons[i]",
                "'weight_version': self.config_value('weight_version')",
                "meta_info['output_token_sampling_logprobs'] = state.output_token_sampling_logprobs",
                "meta_info['output_token_sampling_mask'] = state.output_token_sampling_mask",
                "'completion_tokens': recv_obj.completion_tokens[i]", "'output_ids': state.output_ids.copy()",
                "support_logprobs=state.obj.sampling_logprobs_mode == 'support'"):
        assert key in batch, key
    assert "meta_info['output_token_logprobs'] = state.output_token_logprobs" in \
        _text(manager, "add_logprob_to_meta_info")
    assert "(logprob, token_id, None) for logprob, token_id in zip(token_logprobs_val, token_logprobs_idx)" in \
        _text(manager, "detokenize_logprob_tokens")
    spans = _text(source["sglang/srt/utils/weight_versions.py"], "add_weight_versions_to_meta_info")
    assert "meta_info['weight_versions'] = [{'version': span.version, 'start': span.start, 'end': " \
           "min(span.end, num_output_tokens)} for span in visible]" in spans
    assert "meta_info['weight_version'] = visible[-1].version" in spans


def test_stops_keep_the_stop_token_in_output_ids(source):
    batch = source["sglang/srt/managers/schedule_batch.py"]
    finish = {name: _text(batch, "to_json", name) for name in ("FINISH_MATCHED_TOKEN", "FINISH_LENGTH",
                                                                  "FINISH_ABORT")}
    assert "'type': 'stop'" in finish["FINISH_MATCHED_TOKEN"] and "'matched': self.matched" in \
        finish["FINISH_MATCHED_TOKEN"]
    assert "'type': 'length'" in finish["FINISH_LENGTH"] and "'length': self.length" in finish["FINISH_LENGTH"]
    assert "'type': 'abort'" in finish["FINISH_ABORT"]
    token = _text(batch, "_check_token_based_finish")
    assert token.index("if self.sampling_params.ignore_eos: return False") < token.index("stop_token_ids")
    assert "self.finished_len = matched_pos + 1" in token     # the stop token counts in the output
    assert "return self.output_ids[:self.finished_len]" in _text(batch, "output_ids_through_stop")
    assert "FINISH_MATCHED_STR(matched='NaN happened')" in _text(batch, "_check_vocab_boundary_finish")
    update = _text(batch, "update_finish_state")
    assert update.index("_check_token_based_finish") < update.index("FINISH_LENGTH(")
    streamer = _flat(source["sglang/srt/managers/scheduler_components/output_streamer.py"])
    assert "output_ids_ = req.output_ids_through_stop" in streamer
    assert "self.output_ids.append(output_ids_[send_token_offset:])" in streamer
    # no_stop_trim concerns the text only: the ids are never trimmed.
    trim = _text(source["sglang/srt/managers/detokenizer_manager.py"], "trim_matched_stop")
    assert "if isinstance(matched, int) and isinstance(output, list): if no_stop_trim: return output" in trim
    assert "output_ids=recv_obj.output_ids" in _flat(source["sglang/srt/managers/detokenizer_manager.py"])
    params = sglang_payload([1], PLAIN, [1])["sampling_params"][0]
    assert params["ignore_eos"] is False and params["no_stop_trim"] is True and params["stop_token_ids"] == [STOP]


def test_weight_sync_routes_and_bodies(source):
    routes = _routes(source["sglang/srt/entrypoints/http_server.py"])
    for path in ("/generate", "/update_weights_from_disk", "/update_weight_version", "/init_weights_update_group",
                 "/begin_weight_update", "/end_weight_update", "/update_weights_from_distributed"):
        assert "POST" in routes[path][1], path
    for path in ("/model_info", "/server_info"):
        assert routes[path][1] == ["GET"], path
    http = source["sglang/srt/entrypoints/http_server.py"]
    assert "'weight_version': _global_state.tokenizer_manager.config_value('weight_version')" in \
        _text(http, "model_info")
    disk = _text(http, "update_weights_from_disk")
    assert "'success': success" in disk and "'message': message" in disk and "HTTPStatus.BAD_REQUEST" in disk
    io = source["sglang/srt/managers/io_struct.py"]
    ours = {"UpdateWeightFromDiskReqInput": {"model_path": "/w/v0000007", "weight_version": "7", "flush_cache": True,
                                             "abort_all_requests": False},
            "UpdateWeightVersionReqInput": {"new_version": UNKNOWN_VERSION, "abort_all_requests": False},
            "UpdateWeightsFromDistributedReqInput": Bucket(["a"], [torch.zeros(2)]).request("g", "7", True),
            "InitWeightsUpdateGroupReqInput": _nccl_sync(["http://a:1"]).init_requests("10.0.0.1", 29600, [2])[0][1],
            "BeginWeightUpdateReqInput": {}, "EndWeightUpdateReqInput": {}}
    for name, body in ours.items():
        fields = _fields(_class(io, name))
        assert set(body) <= set(fields), (name, set(body) - set(fields))
        required = {field for field, default in fields.items() if default == ""}
        assert required <= set(body), (name, required - set(body))
    # abort_all_requests defaults to True on /update_weight_version: the engine always sends False.
    assert _fields(_class(io, "UpdateWeightVersionReqInput"))["abort_all_requests"] == "True"
    assert _fields(_class(io, "UpdateWeightsFromDistributedReqInput"))["group_name"] == "'weight_update_group'"
    # The manager sets the version only on success; a failed load re-reads the NEW path ("rollback").
    manager = _text(source["sglang/srt/managers/tokenizer_manager.py"], "update_weights_from_disk")
    assert "if success and obj.weight_version is not None:" in manager
    runner = _text(source["sglang/srt/model_executor/model_runner_components/weight_updater.py"],
                   "update_weights_from_disk")
    assert runner.index("self.model_config.model_path = model_path") < runner.index("Rolling back")
    flush = _text(source["sglang/srt/managers/scheduler_components/weight_updater.py"],
                  "flush_cache_after_weight_update")
    assert "requests are still running or queued" in flush
    # 0.5.23: a distributed update only inside a begin/end session; server rank = rank_offset + tp_rank.
    session = _text(source["sglang/srt/managers/scheduler_components/weight_updater.py"],
                    "update_weights_from_distributed")
    assert "if self._session is None:" in session
    group = _text(source["sglang/srt/model_executor/model_runner_components/weight_updater.py"],
                  "init_weights_update_group")
    assert "rank = rank_offset + self.tp_rank" in group
    receive = _text(source["sglang/srt/model_executor/model_runner_components/weight_updater.py"],
                    "_receive_bucketed_weights_from_distributed")
    assert "torch.distributed.broadcast(flattened_tensor, src=0" in receive
    helper = _text(source["sglang/srt/utils/common.py"], "init_custom_process_group")
    for step in ("rendezvous(init_method, rank, world_size, timeout=timeout)", "store = PrefixStore(group_name, store)",
                 "_world.pg_group_ranks[pg] = {i: i for i in range(world_size)}"):
        assert step in helper, step   # what join_update_group does as rank 0
    assert "get_parallel().dp_size == 1" in _text(source["sglang/srt/managers/tokenizer_control_mixin.py"],
                                                  "update_weights_from_distributed")


def test_buckets_load_with_sglangs_own_flattened_bucket(wheel):
    """The NCCL sync's buckets, read back by SGLang's FlattenedTensorBucket (executed from the wheel: torch only):
    every tensor comes back equal, in order, and no bucket has an unaligned offset."""
    namespace: dict = {}
    exec(compile(wheel["sglang/srt/weight_sync/tensor_bucket.py"], "tensor_bucket.py", "exec"), namespace)
    receiving = namespace["FlattenedTensorBucket"]
    gen = torch.Generator().manual_seed(0)
    tensors = [(f"w{i}", torch.randn(shape, generator=gen).to(dtype)) for i, (shape, dtype) in enumerate([
        ((3,), torch.bfloat16), ((5, 2), torch.float32), ((7,), torch.bfloat16), ((1,), torch.bfloat16),
        ((4, 4), torch.float32), ((300,), torch.float32), ((3, 3), torch.bfloat16), ((2,), torch.float32)])]
    drawn = []

    def lazily():
        for item in tensors:
            drawn.append(item[0])
            yield item
    got = []
    for bucket in buckets(lazily(), bucket_bytes=64):
        assert len(drawn) <= len(got) + len(bucket.names) + 1      # read at most one tensor ahead
        assert bucket.nbytes <= 64 or len(bucket.names) == 1
        body = bucket.request("weight_update_group", None, last=False)
        received = receiving.empty(body["names"], body["dtypes"], body["shapes"], "cpu")   # raises if unaligned
        received.get_flattened_tensor().copy_(bucket.flattened())
        got.extend(received.reconstruct_tensors())
    assert [name for name, _ in got] == [name for name, _ in tensors]
    for (_, sent), (_, back) in zip(tensors, got):
        assert back.dtype == sent.dtype and torch.equal(back, sent)
    with pytest.raises(ValueError, match="bucket_bytes"):
        next(buckets(iter(tensors), 0))


# -- reply checks -------------------------------------------------------------------------------------------------

def sglang_row(prompt: list[int], ids: list[int], logprobs: list[float], version: str = "7", masked: bool = True,
               finish=None) -> dict:
    """One /generate result as tokenizer_manager.py builds it (non-streaming, finished; the keys checked above)."""
    finish = finish or ({"type": "stop", "matched": ids[-1]} if ids[-1] == STOP else
                        {"type": "length", "length": len(ids)})
    meta = {"id": "rid", "finish_reason": finish, "prompt_tokens": len(prompt), "weight_version": version,
            "num_retractions": 0, "input_token_logprobs": [],
            "output_token_logprobs": [[round(v - 0.25, 6), t, None] for t, v in zip(ids, logprobs)],
            "output_token_logprobs_length": len(ids), "reasoning_tokens": 0, "completion_tokens": len(ids),
            "cached_tokens": 0, "weight_versions": [{"version": version, "start": 0, "end": len(ids)}]}
    if masked:
        meta["output_token_sampling_logprobs"] = list(logprobs)
        meta["output_token_sampling_mask"] = [sorted({t, (t + 1) % VOCAB, (t + 5) % VOCAB}) for t in ids]
        meta["output_token_sampling_mask_length"] = len(ids)
    return {"text": "", "output_ids": list(ids), "meta_info": meta}


def _good_reply(masked: bool = True) -> list[dict]:
    return [sglang_row([1, 5], [7, 9, STOP], [-0.5, -1.25, -0.125], masked=masked),
            sglang_row([1, 5], [4, 4, 8, 11, 12, 13], [-2.0, -0.25, -0.5, -1.0, -3.0, -0.75], masked=masked)]


def test_good_replies_parse_to_rows():
    rows = parse_sglang_reply(_good_reply(), SAMPLED, VOCAB, "7", "server X")
    assert [r.ids for r in rows] == [[7, 9, STOP], [4, 4, 8, 11, 12, 13]]
    assert rows[0].logprobs == [-0.5, -1.25, -0.125]
    # Without top-k / top-p the default output_token_logprobs are the behaviour log-probs.
    plain = parse_sglang_reply(_good_reply(masked=False), PLAIN, VOCAB, "7", "server X")
    assert plain[0].logprobs == [-0.75, -1.5, -0.375]


def _break(case: str) -> tuple[list, SamplingConfig]:
    reply = json.loads(json.dumps(_good_reply()))
    first = reply[0]
    meta = first["meta_info"]
    if case == "count":
        reply = reply[:1]
    elif case == "not_a_list":
        reply = {"error": "x"}
    elif case == "no_meta":
        del first["meta_info"]
    elif case == "ids_not_ints":
        first["output_ids"] = [7, "9", STOP]
    elif case == "out_of_vocabulary":
        first["output_ids"][0] = VOCAB
        meta["output_token_sampling_mask"][0].append(VOCAB)
    elif case == "too_long":
        reply[1] = sglang_row([1], [3] * 7, [-1.0] * 7)
    elif case == "positive_logprob":
        meta["output_token_sampling_logprobs"][1] = 0.5
    elif case == "null_logprob":
        meta["output_token_sampling_logprobs"][1] = None
    elif case == "short_logprobs":
        meta["output_token_sampling_logprobs"].pop()
    elif case == "outside_support":
        meta["output_token_sampling_mask"][1] = [1, 3]
    elif case == "abort":
        meta["finish_reason"] = {"type": "abort", "message": "Sampling support exceeds --sampling-mask-max-tokens"}
    elif case == "other_stop":
        first["output_ids"][-1] = 3
        meta["finish_reason"] = {"type": "stop", "matched": 3}
    elif case == "nan_stop":
        meta["finish_reason"] = {"type": "stop", "matched": "NaN happened"}
    elif case == "stop_inside":
        first["output_ids"] = [STOP, 9, STOP]
        meta["output_token_sampling_mask"][0].append(STOP)
    elif case == "length_short":
        reply[1] = sglang_row([1], [4, 5], [-1.0, -1.0], finish={"type": "length", "length": 2})
    elif case == "version":
        meta["weight_version"] = "6"
    elif case == "straddle":
        meta["weight_versions"] = [{"version": "6", "start": 0, "end": 1}, {"version": "7", "start": 1, "end": 3}]
    elif case == "misaligned_plain":
        reply = json.loads(json.dumps(_good_reply(masked=False)))
        reply[0]["meta_info"]["output_token_logprobs"][1][1] = 10
        return reply, PLAIN
    return reply, SAMPLED


MALFORMED = {"count": "1 results for n=2", "not_a_list": "expected a JSON list", "no_meta": "no meta_info",
             "ids_not_ints": "not a list of integers", "out_of_vocabulary": "outside the student's vocabulary",
             "too_long": "7 tokens, expected 1..max_new_tokens=6", "positive_logprob": "log-prob 0.5",
             "null_logprob": "log-prob None", "short_logprobs": "2 meta_info.output_token_sampling_logprobs for 3",
             "outside_support": "not in its sampling support", "abort": "aborted or unknown",
             "other_stop": "expected a stop on one of the stop ids", "nan_stop": "NaN happened",
             "stop_inside": "stop id 2 inside the response", "length_short": "ended by length after 2",
             "version": "generated under weight version '6', expected '7'", "straddle": "weights updated mid-row",
             "misaligned_plain": "misaligned with output_ids"}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_replies_are_refused_naming_the_server(case):
    reply, config = _break(case)
    error = WeightVersionMismatch if case in ("version", "straddle") else RolloutServerError
    with pytest.raises(error) as caught:
        parse_sglang_reply(reply, config, VOCAB, "7", "rollout server http://10.0.0.9:30000 (prompt 3)")
    assert "rollout server http://10.0.0.9:30000 (prompt 3)" in str(caught.value)
    assert MALFORMED[case] in str(caught.value), str(caught.value)


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_fixture_request_and_reply(path):
    """A constructed exchange: the engine's body for the fixture's prompt and seeds must be the fixture's request
    exactly, and its reply must parse to the fixture's rows."""
    fixture = json.loads(path.read_text())
    assert fixture["sglang_version"] == SGLANG_VERSION and "CONSTRUCTED" in fixture["_provenance"]
    config = SamplingConfig(**{k: tuple(v) if k == "stop_ids" else v for k, v in fixture["config"].items()})
    assert sglang_payload(fixture["prompt"], config, fixture["seeds"]) == fixture["request"]
    rows = parse_sglang_reply(fixture["reply"], config, fixture["vocab_size"], fixture["weight_version"], "fixture")
    assert [[r.ids, r.logprobs] for r in rows] == fixture["expected_rows"]


# -- the engine and the syncs against a fake SGLang server ---------------------------------------------------------

class FakeSGLang:
    """A fake SGLang server's state and routes: rows drawn from each row's seed (so a seed repeats its row), a
    weight version, disk loads that fail `fail_loads` times."""

    def __init__(self, version: str = "default", deterministic: bool = True):
        self.version = version
        self.deterministic = deterministic
        self.fail_loads = 0
        self.stale_rows = 0          # the next replies report another version than the server's (mid-batch update)
        self.lock = threading.Lock()

    def generate(self, body, headers):
        out = []
        for prompt, params in zip(body["input_ids"], body["sampling_params"]):
            rng = random.Random(params["sampling_seed"])
            length = rng.randint(1, params["max_new_tokens"])
            ids = [rng.randrange(3, VOCAB) for _ in range(length)]
            if length < params["max_new_tokens"]:
                ids[-1] = params["stop_token_ids"][0]
            logprobs = [-round(0.05 + 3 * rng.random(), 4) for _ in ids]
            with self.lock:
                version = self.version
                if self.stale_rows:
                    self.stale_rows -= 1
                    version = "stale"
            out.append(sglang_row(prompt, ids, logprobs, version=version, masked=body["return_sampling_mask"]))
        return out

    def load(self, body, headers):
        if self.fail_loads:
            self.fail_loads -= 1
            return Reply({"success": False, "message": "Failed to update weights: boom. Rolling back",
                          "num_paused_requests": 0}, 400)
        self.version = body["weight_version"]
        return {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}

    def set_version(self, body, headers):
        self.version = body["new_version"]
        return {"success": True, "message": "ok", "new_version": body["new_version"]}

    def routes(self) -> dict:
        return {("GET", "/server_info"): lambda b, h: {"enable_deterministic_inference": self.deterministic,
                                                       "sampling_mask_max_tokens": 4096, "version": SGLANG_VERSION},
                ("GET", "/model_info"): lambda b, h: {"model_path": "/w", "weight_version": self.version},
                ("POST", "/generate"): self.generate, ("POST", "/update_weights_from_disk"): self.load,
                ("POST", "/update_weight_version"): self.set_version}


def _client(url: str, retries: int = 2) -> HTTPTeacherConfig:
    return HTTPTeacherConfig.from_dict({"urls": [url], "vocab_size": VOCAB, "reply_retries": retries,
                                        "max_retries": 0})


def _disk_sync(url: str, tmp_path: Path, **kwargs) -> SGLangDiskSync:
    def export(directory: Path) -> None:
        directory.mkdir(parents=True)
        (directory / "model.safetensors").write_bytes(b"weights")
    return SGLangDiskSync([url], tmp_path / "weights", export, is_driver=True, **kwargs)


def test_engine_generates_seeded_rows_and_checks_versions(tmp_path, caplog):
    fake = FakeSGLang(deterministic=False)
    prompts = [[1, 5, 9], [1, 7]]
    with FakeServer(fake.routes()) as server:
        sync = _disk_sync(server.url, tmp_path)
        engine = SGLangRolloutEngine(_client(server.url), VOCAB, pad_id=0, seed=5, dp_rank=0, sync=sync)
        assert engine.sampling_mask_max_tokens == 4096
        assert "without --enable-deterministic-inference" in caplog.text
        batch = engine.generate(prompts, SAMPLED, sample_key=("rollout", 0))
        first = server.posts("/generate")
        assert len(first) == 2 and [len(body["input_ids"]) for body in first] == [2, 2]
        first = sorted(first, key=lambda body: prompts.index(body["input_ids"][0]))   # requests arrive in any order
        seeds = [p["sampling_seed"] for body in first for p in body["sampling_params"]]
        assert len(set(seeds)) == 4                                   # one seed per row
        assert first[0]["input_ids"] == [prompts[0], prompts[0]] and first[0]["sampling_logprobs_mode"] == "selected"
        assert batch.size == 4 and batch.group_ids.tolist() == [0, 0, 1, 1] and batch.policy_version == 0
        again = engine.generate(prompts, SAMPLED, sample_key=("rollout", 0))
        assert torch.equal(again.tokens, batch.tokens) and torch.equal(again.behaviour_logprobs,
                                                                       batch.behaviour_logprobs)
        other_rank = SGLangRolloutEngine(_client(server.url), VOCAB, pad_id=0, seed=5, dp_rank=1)
        other_rank.generate(prompts, SAMPLED, sample_key=("rollout", 0))
        assert not set(p["sampling_seed"] for body in server.posts("/generate")[-2:]
                       for p in body["sampling_params"]) & set(seeds)
        # The behaviour log-probs are the reply's, on the response columns.
        row = fake.generate(first[0], {})[0]
        start = len(prompts[0]) - 1
        values = batch.behaviour_logprobs[0, start:start + len(row["output_ids"])]
        assert values.tolist() == pytest.approx(row["meta_info"]["output_token_sampling_logprobs"])
        # Published version 3; the server answers "default" (restarted): reloaded from disk before the batch.
        sync.publish(3)
        fake.version = "default"
        batch = engine.generate(prompts, SAMPLED, policy_version=3, sample_key=("rollout", 1))
        assert engine.resynced == 1 and fake.version == "3" and batch.policy_version == 3
        assert server.posts("/update_weights_from_disk")[-1]["weight_version"] == "3"
        # A row generated under another version (an update mid-batch): the batch is asked again.
        fake.stale_rows = 1
        engine.generate(prompts, SAMPLED, policy_version=3, sample_key=("rollout", 2))
        assert engine.regenerated == 1
        fake.stale_rows = 10**6
        with pytest.raises(RolloutServerError, match="after 3 attempt"):
            engine.generate(prompts, SAMPLED, policy_version=3, sample_key=("rollout", 3))
        engine.close()
        other_rank.close()


def test_disk_sync_calls_in_order_and_retries_a_failed_load(tmp_path):
    fake = FakeSGLang()
    with FakeServer(fake.routes()) as server:
        sync = _disk_sync(server.url, tmp_path, load_attempts=2)
        sync.publish(1)
        calls = [(method, path, body) for method, path, _, body in server.requests]
        assert calls == [("POST", "/update_weights_from_disk", {"model_path": str(tmp_path / "weights" / "v0000001"),
                                                                "weight_version": "1", "flush_cache": True,
                                                                "abort_all_requests": False}),
                         ("GET", "/model_info", {})]
        # One failed load: the version is marked unknown, then loaded again.
        server.requests.clear()
        fake.fail_loads = 1
        sync.publish(2)
        assert [(m, p) for m, p, _, _ in server.requests] == [
            ("POST", "/update_weights_from_disk"), ("POST", "/update_weight_version"),
            ("POST", "/update_weights_from_disk"), ("GET", "/model_info")]
        assert server.posts("/update_weight_version") == [{"new_version": UNKNOWN_VERSION,
                                                           "abort_all_requests": False}]
        assert fake.version == "2" and sync.failed_loads == 1
        # Failing on every attempt: an error naming the server and the message; the server stays marked unknown.
        fake.fail_loads = 10
        with pytest.raises(RolloutServerError) as caught:
            sync.publish(3)
        assert server.url in str(caught.value) and "boom" in str(caught.value) and "2 attempt(s)" in str(caught.value)
        assert fake.version == UNKNOWN_VERSION
        # keep_versions=2 after a good publish; a failed one prunes nothing.
        assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["v0000001", "v0000002", "v0000003"]
        sync.close()


def _nccl_sync(urls, **kwargs) -> SGLangNCCLSync:
    tensors = [("model.embed_tokens.weight", torch.ones(4, 2)), ("model.norm.weight", torch.ones(2)),
               ("lm_head.weight", torch.ones(4, 2, dtype=torch.bfloat16))]
    return SGLangNCCLSync(urls, lambda: iter(tensors), is_driver=True, **kwargs)


def test_nccl_sync_request_bodies_and_order_on_the_cpu(tmp_path):
    """The NCCL sync's client side with a one-rank gloo group standing in for NCCL (the servers' side of the
    broadcasts needs a GPU and a real server): bodies, their order, the version on the last bucket only, the
    session closed on a failure."""
    init = _nccl_sync(["http://a:1", "http://b:2"]).init_requests("10.0.0.1", 29600, [2, 1])
    assert init == [("http://a:1", {"master_address": "10.0.0.1", "master_port": 29600, "rank_offset": 1,
                                    "world_size": 4, "group_name": "weight_update_group", "backend": "nccl"}),
                    ("http://b:2", {"master_address": "10.0.0.1", "master_port": 29600, "rank_offset": 3,
                                    "world_size": 4, "group_name": "weight_update_group", "backend": "nccl"})]
    answers = {"fail": False}

    def update(body, headers):
        if answers["fail"]:
            return Reply({"success": False, "message": "Failed to receive weights: x"}, 400)
        return {"success": True, "message": "Succeeded to update parameter online."}
    ok = lambda b, h: {"success": True, "message": "Success"}   # noqa: E731
    info = {"tp_size": 2, "dp_size": 1, "pp_size": 1}
    with FakeServer({("POST", "/begin_weight_update"): ok, ("POST", "/end_weight_update"): ok,
                     ("POST", "/update_weights_from_distributed"): update,
                     ("GET", "/server_info"): lambda b, h: info}) as server:
        sync = _nccl_sync([server.url], bucket_bytes=32, group_name="opd_test_group", backend="gloo")
        assert sync.server_tp() == [2]
        info["dp_size"] = 2
        with pytest.raises(RolloutServerError, match="dp_size = pp_size = 1"):
            sync.server_tp()
        server.requests.clear()
        sync.group = join_update_group("127.0.0.1", free_port("127.0.0.1"), 1, "opd_test_group", "gloo", 30)
        try:
            sync.publish(7)
            paths = [path for _, path, _, _ in server.requests]
            assert paths == ["/begin_weight_update"] + ["/update_weights_from_distributed"] * 2 + ["/end_weight_update"]
            bodies = server.posts("/update_weights_from_distributed")
            # 32 + 8 bytes > 32: the embedding alone; the norm (8 bytes) and the bf16 head (16) share a bucket.
            assert [b["names"] for b in bodies] == [["model.embed_tokens.weight"],
                                                    ["model.norm.weight", "lm_head.weight"]]
            assert [b["weight_version"] for b in bodies] == [None, "7"]
            assert [b["flush_cache"] for b in bodies] == [False, True]
            assert bodies[1]["dtypes"] == ["float32", "bfloat16"] and bodies[1]["shapes"] == [[2], [4, 2]]
            assert all(b["load_format"] == "flattened_bucket" and b["abort_all_requests"] is False for b in bodies)
            assert sync.version == 7
            server.requests.clear()
            answers["fail"] = True
            with pytest.raises(RolloutServerError, match="Failed to receive weights"):
                sync.publish(8)
            assert [path for _, path, _, _ in server.requests][-1] == "/end_weight_update"
            assert sync.version == 7
            with pytest.raises(RolloutServerError, match="NCCL weight-update group"):
                sync.reload([server.url])
        finally:
            sync.close()


SGLANG_RECEIVER = """
import ast, json, sys, zipfile
import torch, torch.distributed as dist
from tests.sglang_source import CACHE, annotated_fields as _fields, class_node as _class, function_node as _function, \
    sglang_wheel_files
from tests.teachers.fake_server import FakeServer, Reply
wheel, out = sys.argv[1:]
archive = zipfile.ZipFile(wheel)
tree = ast.parse(archive.read("sglang/srt/utils/common.py").decode())
helper = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "init_custom_process_group")
sglang = {"torch": torch, "torch_release": tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])}
exec(compile(ast.Module([helper], []), "common.py", "exec"), sglang)
exec(compile(archive.read("sglang/srt/weight_sync/tensor_bucket.py").decode(), "tensor_bucket.py", "exec"), sglang)
state = {"group": None, "session": False, "received": {}, "calls": [], "version": "default"}

def init(body, headers):   # model_runner_components/weight_updater.py init_weights_update_group, TP rank 0
    state["calls"].append("init")
    state["group"] = sglang["init_custom_process_group"](
        backend=body["backend"], init_method=f"tcp://{body['master_address']}:{body['master_port']}",
        world_size=body["world_size"], rank=body["rank_offset"], group_name=body["group_name"])
    return {"success": True, "message": "Succeeded to initialize custom process group."}

def begin(body, headers):
    state["calls"].append("begin")
    state["session"] = True
    return {"success": True, "message": "Success"}

def update(body, headers):   # scheduler_components/weight_updater.py + _receive_bucketed_weights_from_distributed
    state["calls"].append("update")
    if not state["session"]:
        return Reply({"success": False, "message": "outside a session"}, 400)
    assert body["load_format"] == "flattened_bucket"
    bucket = sglang["FlattenedTensorBucket"].empty(body["names"], body["dtypes"], body["shapes"], "cpu")
    dist.broadcast(bucket.get_flattened_tensor(), src=0, group=state["group"])
    state["received"].update({name: tensor.clone() for name, tensor in bucket.reconstruct_tensors()})
    if body["weight_version"] is not None:
        state["version"] = body["weight_version"]
    return {"success": True, "message": "Succeeded to update parameter online."}

def end(body, headers):
    state["calls"].append("end")
    state["session"] = False
    torch.save({"received": state["received"], "calls": state["calls"], "version": state["version"]}, out)
    return {"success": True, "message": "Success"}

server = FakeServer({("GET", "/server_info"): lambda b, h: {"tp_size": 1, "dp_size": 1, "pp_size": 1},
                     ("POST", "/init_weights_update_group"): init, ("POST", "/begin_weight_update"): begin,
                     ("POST", "/update_weights_from_distributed"): update, ("POST", "/end_weight_update"): end})
print(server.url, flush=True)
sys.stdin.read()   # until the test closes it
"""


def test_nccl_sync_publishes_to_sglangs_own_receiving_code_over_gloo(wheel, tmp_path):
    """`SGLangNCCLSync.publish` end to end, with gloo standing in for NCCL: a fake server in another process joins
    the update group with SGLang's own `init_custom_process_group` and receives each bucket with its
    `FlattenedTensorBucket` (both executed from the wheel), inside a begin/end session. The rendezvous keys match,
    every tensor arrives equal, the version rides on the last bucket."""
    import subprocess
    import sys

    gen = torch.Generator().manual_seed(1)
    tensors = [("model.embed_tokens.weight", torch.randn(8, 4, generator=gen).to(torch.bfloat16)),
               ("model.norm.weight", torch.randn(3, generator=gen)),
               ("lm_head.weight", torch.randn(8, 4, generator=gen))]
    wheel_path = sorted(CACHE.glob(f"sglang-{SGLANG_VERSION}-*.whl"))[0]
    out = tmp_path / "received.pt"
    receiver = subprocess.Popen([sys.executable, "-c", SGLANG_RECEIVER, str(wheel_path), str(out)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=Path(__file__).resolve().parents[2])
    sync = None
    try:
        url = receiver.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url + receiver.stdout.read()[-3000:]
        sync = SGLangNCCLSync([url], lambda: iter(tensors), is_driver=True, bucket_bytes=80,
                              group_name="weight_update_group", backend="gloo", request_timeout_s=60,
                              group_timeout_s=60)
        sync.publish(5)
    finally:
        if sync is not None:
            sync.close()
        try:
            output, _ = receiver.communicate(input="", timeout=60)
        finally:
            receiver.kill()
    assert receiver.returncode == 0, output[-3000:]
    state = torch.load(out)
    assert state["calls"] == ["init", "begin", "update", "update", "end"] and state["version"] == "5"
    assert list(state["received"]) == [name for name, _ in tensors]
    for name, sent in tensors:
        assert state["received"][name].dtype == sent.dtype and torch.equal(state["received"][name], sent), name
