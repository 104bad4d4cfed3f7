import json
import os
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opd_megatron.config import ConfigError, DataSection
from opd_megatron.data import build_dataset
from opd_megatron.data.jsonl import DataError, JsonlDataset, SftBatch, collate
from opd_megatron.data.tokenizer import ByteTokenizer, load_tokenizer

BYTE = ByteTokenizer()
BOS, EOS, PAD = BYTE.bos_id, BYTE.eos_id, BYTE.pad_id


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prompt_response_trains_only_on_response_and_eos(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": "ab", "response": "cd"})])
    sample = JsonlDataset(path, BYTE, seq_length=8)[0]
    # full sequence: bos a b c d eos (6 ids) -> 5 shifted positions, then 3 of padding
    assert sample.tokens.tolist() == [BOS, 97, 98, 99, 100, PAD, PAD, PAD]
    assert sample.labels.tolist() == [97, 98, 99, 100, EOS, PAD, PAD, PAD]
    assert sample.loss_mask.tolist() == [0, 0, 1, 1, 1, 0, 0, 0]  # labels c, d, eos train
    assert sample.tokens.dtype == torch.long and sample.loss_mask.dtype == torch.float32


def test_text_trains_on_every_token(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "xyz"})])
    sample = JsonlDataset(path, BYTE, seq_length=5)[0]
    assert sample.tokens.tolist() == [BOS, 120, 121, 122, PAD]
    assert sample.labels.tolist() == [120, 121, 122, EOS, PAD]
    assert sample.loss_mask.tolist() == [1, 1, 1, 1, 0]


def test_truncation_to_seq_length_plus_one(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": "ab", "response": "cdefgh"}),
                                              json.dumps({"prompt": "abcdefgh", "response": "z"})])
    dataset = JsonlDataset(path, BYTE, seq_length=4)
    assert dataset.num_truncated == 2
    first = dataset[0]  # bos a b c d | e f g h eos cut
    assert first.tokens.tolist() == [BOS, 97, 98, 99]
    assert first.labels.tolist() == [97, 98, 99, 100]
    assert first.loss_mask.tolist() == [0, 0, 1, 1]
    assert dataset[1].loss_mask.sum().item() == 0  # the prompt fills the window: nothing trains


def test_custom_keys_blank_lines_and_collate(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ["", json.dumps({"q": "a", "a": "b"}), "   ",
                                              json.dumps({"body": "cc"}), ""])
    dataset = JsonlDataset(path, BYTE, seq_length=4, prompt_key="q", response_key="a", text_key="body")
    assert len(dataset) == 2 and dataset.num_skipped == 0
    batch = collate([dataset[0], dataset[1]])
    assert isinstance(batch, SftBatch)
    assert batch.tokens.tolist() == [[BOS, 97, 98, PAD], [BOS, 99, 99, PAD]]
    assert batch.labels.tolist() == [[97, 98, EOS, PAD], [99, 99, EOS, PAD]]
    assert batch.loss_mask.tolist() == [[0, 1, 1, 0], [1, 1, 1, 0]]


def test_chat_template_wraps_the_prompt(tmp_path, bpe_paths):
    tok = load_tokenizer(str(bpe_paths["dir"]))
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": "what is two plus two", "response": "four"})])
    sample = JsonlDataset(path, tok, seq_length=32, apply_chat_template=True)[0]
    prompt_ids = tok.encode("<|user|>what is two plus two<|assistant|>")
    response_ids = tok.encode("four")
    full = [tok.bos_id] + prompt_ids + response_ids + [tok.eos_id]
    n = len(full) - 1
    assert sample.tokens[:n].tolist() == full[:-1]
    assert sample.labels[:n].tolist() == full[1:]
    trained = sample.labels[sample.loss_mask == 1].tolist()
    assert trained == response_ids + [tok.eos_id]
    assert tok.decode(trained) == "four"
    with pytest.raises(ValueError, match="data.apply_chat_template is true but the tokenizer has no chat template"):
        JsonlDataset(path, BYTE, seq_length=32, apply_chat_template=True)


BAD_LINES = [
    ('{"prompt": "a", "response": ', "not valid JSON"),
    ('["prompt", "response"]', "expected a JSON object, got list"),
    ('{"prompt": "a"}', "missing key 'response'; expected keys 'prompt' and 'response', or 'text'"),
    ('{"response": "a"}', "missing key 'prompt'"),
    ('{"prompt": 3, "response": "a"}', "'prompt' must be a string, got int"),
    ('{"text": ""}', "'text' is empty; expected non-empty text"),
    ('{"prompt": "a", "response": "  "}', "'response' is empty"),
    ('{"text": "a", "prompt": "b", "response": "c"}', "has both 'text' and 'prompt'/'response'"),
    ('{"content": "a"}', "expected keys 'prompt' and 'response', or 'text'; got keys ['content']"),
    ('{"text": null}', "'text' must be a string, got NoneType"),
]


@pytest.mark.parametrize("bad_line,expected", BAD_LINES)
def test_malformed_line_names_file_and_line(tmp_path, bad_line, expected):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"text": "ok"}), "", bad_line, json.dumps({"text": "ok"})])
    with pytest.raises(DataError, match=re.escape(f"{path}, line 3: ") + ".*" + re.escape(expected)):
        JsonlDataset(path, BYTE, seq_length=8)


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}, line 2: expected UTF-8 text")):
        JsonlDataset(path, BYTE, seq_length=8)


def test_skip_malformed_counts_and_records_lines(tmp_path):
    lines = [json.dumps({"text": "a"}), "not json", json.dumps({"text": "b"}), "", "[1]", '{"prompt": "x"}']
    path = write_lines(tmp_path / "d.jsonl", lines)
    dataset = JsonlDataset(path, BYTE, seq_length=4, skip_malformed=True)
    assert len(dataset) == 2
    assert dataset.num_skipped == 3
    assert dataset.skipped_lines == [2, 5, 6]
    assert dataset[1].tokens.tolist() == [BOS, 98, PAD, PAD]


def test_empty_dataset_is_an_error(tmp_path):
    blank = write_lines(tmp_path / "blank.jsonl", ["", "  "])
    with pytest.raises(DataError, match=re.escape(f"{blank}: no valid lines; expected JSON objects")):
        JsonlDataset(blank, BYTE, seq_length=4)
    all_bad = write_lines(tmp_path / "bad.jsonl", ["x", "{}"])
    with pytest.raises(DataError, match=re.escape(f"{all_bad}: no valid lines (2 malformed lines skipped)")):
        JsonlDataset(all_bad, BYTE, seq_length=4, skip_malformed=True)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"data file {tmp_path / 'nope.jsonl'} not found")):
        JsonlDataset(tmp_path / "nope.jsonl", BYTE, seq_length=4)


def test_build_dataset_jsonl_and_empty_path(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "abc"})] * 3)
    dataset = build_dataset(DataSection(format="jsonl", path=str(path), seq_length=6), BYTE)
    assert isinstance(dataset, JsonlDataset) and len(dataset) == 3
    assert dataset[2].tokens.shape == (6,)
    with pytest.raises(ConfigError, match=r"data.path: expected a .jsonl file, got an empty path"):
        build_dataset(DataSection(format="jsonl", path=""), BYTE)
    with pytest.raises(ConfigError, match=r"data.path: expected the prefix of an indexed dataset"):
        build_dataset(DataSection(format="indexed", path=""), BYTE)


# -- fuzzing: any bytes, any JSON lines -> a dataset or a DataError naming the file and line -----------------------
# OPD_FUZZ_EXAMPLES raises the example count for a longer hunt; CI runs 200.
FUZZ = settings(deadline=None, max_examples=int(os.environ.get("OPD_FUZZ_EXAMPLES", "200")),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
    | st.sampled_from(["\ud800", "a\udfffb", "\x00", " ", "²", "1" * 5000]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["prompt", "response", "text", "q", "x"]) | st.text(max_size=4), inner, max_size=4),
    max_leaves=12)
LINES = st.lists(JSON_VALUES.map(json.dumps) | st.text(max_size=30) | st.sampled_from(["", "[" * 5000, "1" * 5000]),
                 max_size=6).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass"))


def _dataset_or_data_error(path, content: bytes, tokenizer, **kwargs):
    path.write_bytes(content)
    try:
        return JsonlDataset(path, tokenizer, seq_length=8, **kwargs)
    except DataError as exc:
        assert str(path) in str(exc), f"the error does not name the file: {exc}"
        return None


@FUZZ
@given(content=st.binary(max_size=120) | LINES, skip=st.booleans())
def test_any_file_gives_a_dataset_or_a_data_error(tmp_path, content, skip):
    dataset = _dataset_or_data_error(tmp_path / "fuzz.jsonl", content, BYTE, skip_malformed=skip)
    if dataset is not None:
        assert len(dataset) >= 1 and dataset[0].tokens.shape == (8,)


@pytest.mark.parametrize("line,expected", [
    # Each escaped json.loads or the tokenizer as another exception, with no file or line (the fuzzer above found the
    # RecursionError and the digit-limit ValueError; the surrogate was seen to crash while fixing them).
    ('{"text": "\\ud800"}', "'text' is not valid Unicode"),                      # UnicodeEncodeError in encode
    ("[" * 5000, "not valid JSON (nested deeper than"),                           # RecursionError
    ('{"text": ' + "1" * 5000 + "}", "not valid JSON (Exceeds the limit"),        # ValueError: int digits limit
])
def test_reader_crashes_are_data_errors(tmp_path, line, expected):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"text": "ok"}), line])
    with pytest.raises(DataError, match=re.escape(f"{path}, line 2: ") + ".*" + re.escape(expected)):
        JsonlDataset(path, BYTE, seq_length=8)


def test_text_outside_a_character_tokenizer_names_the_line(tmp_path):
    from opd_megatron.tasks import get_task
    path = write_lines(tmp_path / "digits.jsonl", [json.dumps({"text": "123"}), json.dumps({"text": "12a"})])
    with pytest.raises(DataError, match=re.escape(f"{path}, line 2: ") + ".*outside the task alphabet"):
        JsonlDataset(path, get_task("sort_digits").tokenizer(), seq_length=8)
