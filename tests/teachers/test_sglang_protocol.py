"""SGLang's /generate protocol, verified against the source of the pinned version, and the client against
fixtures whose structure follows that source.

SGLang does not run on CPU, so its wheel is fetched once (`pip download --no-deps`, cached under
~/.cache/opd-megatron/) and its Python sources are read statically with `ast` (they do not import without CUDA).
A protocol change in a new pin (a field renamed, a default changed, the first-position null or the
logprob_start_len slice moved) fails here before it reaches a run."""

import ast
import json
from pathlib import Path

import pytest
import torch

from opd_megatron.teachers.base import TeacherRequest
from opd_megatron.teachers.sglang import SGLANG_VERSION, SGLangTeacher
from tests.sglang_source import annotated_fields as _fields, class_node as _class, function_node as _function, \
    sglang_wheel_files
from tests.teachers.fake_server import VOCAB, FakeServer, Reply, make_request, sglang_routes

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "sglang").glob("*.json"))


@pytest.fixture(scope="module")
def source():
    """path inside the wheel -> parsed module."""
    paths = ("sglang/srt/managers/io_struct.py", "sglang/api/v1/api_types.py",
             "sglang/srt/managers/tokenizer_manager.py", "sglang/srt/entrypoints/http_server.py",
             "sglang/srt/managers/scheduler_components/logprob_result_processor.py",
             "sglang/srt/managers/scheduler.py", "sglang/srt/layers/logprob_processor.py")
    return {path: ast.parse(text, filename=path) for path, text in sglang_wheel_files(paths).items()}


def _our_payload(topk=2, extra=2):
    teacher = SGLangTeacher({"urls": ["http://127.0.0.1:9"], "vocab_size": VOCAB, "check_on_start": False})
    request = make_request(topk=topk, extra=extra)
    return teacher.payload(request, list(range(request.batch_size)))


def test_generate_request_fields_and_defaults(source):
    fields = _fields(_class(source["sglang/srt/managers/io_struct.py"], "GenerateReqInput"))
    body = _our_payload()
    for key in body:
        assert key in fields, f"GenerateReqInput has no field {key!r} (SGLang {SGLANG_VERSION})"
    for key in ("sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num", "token_ids_logprob"):
        assert fields[key] == "None", (key, fields[key])
    assert fields["return_text_in_logprobs"] == "False"
    # None is normalised to -1 (output tokens only) and 0: we always send both explicitly.
    normalise = ast.unparse(_class(source["sglang/srt/managers/io_struct.py"], "GenerateReqInput"))
    assert "normalize_param(self.logprob_start_len, -1, 'logprob_start_len')" in normalise
    assert "normalize_param(self.top_logprobs_num, 0, 'top_logprobs_num')" in normalise


def test_generate_contract_admits_our_body(source):
    """The /generate JSON contract gate (api_contract.py -> api_types.GenerateRequest) must admit every key we send,
    and SamplingParams rejects unknown keys, so ours must be among its fields."""
    tree = source["sglang/api/v1/api_types.py"]
    request_fields = _fields(_class(tree, "GenerateRequest"))
    sampling = _class(tree, "SamplingParams")
    assert "unknown keys rejected" in ast.get_docstring(sampling)
    body = _our_payload()
    assert set(body) <= set(request_fields), set(body) - set(request_fields)
    assert set(body["sampling_params"]) <= set(_fields(sampling))


def test_http_routes(source):
    routes = {}
    for node in ast.walk(source["sglang/srt/entrypoints/http_server.py"]):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.args and \
                        isinstance(dec.args[0], ast.Constant):
                    methods = [dec.func.attr.upper()] if dec.func.attr in ("get", "post") else \
                        [e.value for kw in dec.keywords if kw.arg == "methods" for e in kw.value.elts]
                    routes[dec.args[0].value] = (node.name, methods)
    assert "POST" in routes[SGLangTeacher.score_path][1]
    assert routes[SGLangTeacher.health_path][1] == ["GET"]
    assert routes[SGLangTeacher.model_info_path][1] == ["GET"]
    info = ast.unparse(_function(source["sglang/srt/entrypoints/http_server.py"], "model_info"))
    assert "'model_path':" in info and "'served_model_name':" in info  # what start_checks reads


def test_meta_info_keys_and_triples(source):
    tree = source["sglang/srt/managers/tokenizer_manager.py"]
    keys = {n.slice.value for n in ast.walk(_function(tree, "add_logprob_to_meta_info"))
            if isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name) and n.value.id == "meta_info"
            and isinstance(n.slice, ast.Constant)}
    assert {"input_token_logprobs", "input_top_logprobs", "input_token_ids_logprobs"} <= keys
    detok = ast.unparse(_function(tree, "detokenize_logprob_tokens"))
    assert "(logprob, token_id, None) for logprob, token_id in zip(token_logprobs_val, token_logprobs_idx)" in detok
    top = ast.unparse(_function(tree, "detokenize_top_logprobs_tokens"))
    assert "ret.append(None)" in top  # an empty position (entry 0) is null


def test_logprob_start_len_semantics(source):
    """Entry i of input_token_logprobs is token origin_input_ids[s + i], its logprob null at i = 0: with
    s = score_start the entries 1.. are label columns score_start.. (see sglang.py's docstring)."""
    tree = source["sglang/srt/managers/scheduler_components/logprob_result_processor.py"]
    tokens = ast.unparse(_function(tree, "_process_input_token_logprobs"))
    assert "req.logprob.input_token_logprobs_val = [None] + input_token_logprobs[:-1]" in tokens
    assert "input_token_logprobs_idx = req.origin_input_ids[req.logprob_start_len:]" in tokens
    assert "x if x < self.model_config.vocab_size - 1 else 0" in tokens  # the id clip sglang.py tolerates
    for name in ("_process_input_top_logprobs", "_process_input_token_ids_logprobs"):
        text = ast.unparse(_function(tree, name))
        assert "[] if uses_scoring_positions else [None]" in text and ".pop()" in text, name
    scheduler = ast.unparse(source["sglang/srt/managers/scheduler.py"])
    assert "req.logprob_start_len = recv_req.logprob_start_len" in scheduler
    assert "if req.logprob_start_len > len(req.origin_input_ids):" in scheduler


def test_input_logprobs_ignore_temperature(source):
    """Why SGLangTeacher refuses teacher.temperature != 1: prompt logprobs are a plain log_softmax of the logits."""
    text = ast.unparse(_class(source["sglang/srt/layers/logprob_processor.py"], "InputLogprobProcessor"))
    assert "log_softmax(chunk_logprobs, dim=-1)" in text
    assert "temperature" not in text


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_client_against_fixture(path):
    """Replay: the server answers the fixture's reply only to exactly the fixture's request."""
    fixture = json.loads(path.read_text())
    assert fixture["sglang_version"] == SGLANG_VERSION and "CONSTRUCTED" in fixture["_provenance"]
    student = fixture["student"]
    extra = student["extra_ids"]
    request = TeacherRequest(tokens=torch.tensor(student["tokens"]), lengths=torch.tensor(student["lengths"]),
                             score_start=torch.tensor(student["score_start"]), topk=student["topk"],
                             extra_ids=None if extra is None else torch.tensor(extra))

    def generate(body, headers):
        if body != fixture["request"]:
            return Reply({"error": f"request differs from the fixture: {body}"}, 400)
        return fixture["reply"]
    with FakeServer(sglang_routes(generate)) as server, \
            SGLangTeacher({"urls": [server.url], "vocab_size": student["vocab_size"]}) as teacher:
        scores = teacher.score(request)
    expected = fixture["expected"]
    assert scores.valid.tolist() == expected["valid"]
    torch.testing.assert_close(scores.sampled_logprobs, torch.tensor(expected["sampled_logprobs"]))
    if expected["topk_ids"] is not None:
        assert scores.topk_ids.tolist() == expected["topk_ids"]
        torch.testing.assert_close(scores.topk_logprobs, torch.tensor(expected["topk_logprobs"]))
    if expected["extra_logprobs"] is not None:
        torch.testing.assert_close(scores.extra_logprobs, torch.tensor(expected["extra_logprobs"]))
