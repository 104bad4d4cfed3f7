import pytest

from opd_megatron.data.tokenizer import ByteTokenizer, HFTokenizer, check_vocab_fits, load_tokenizer


def test_byte_tokenizer_ids_and_round_trip():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
    assert tok.encode("hé") == [104, 195, 169]
    assert tok.decode([tok.bos_id, 104, 195, 169, tok.eos_id, tok.pad_id]) == "hé"
    text = "naïve 😀 text\n"
    assert tok.decode(tok.encode(text)) == text
    assert not tok.has_chat_template
    with pytest.raises(ValueError, match="byte tokenizer has no chat template"):
        tok.apply_chat_template("hi")


def test_bare_tokenizer_json_finds_special_tokens_by_name(bpe_paths):
    tok = load_tokenizer(str(bpe_paths["file"]))
    assert isinstance(tok, HFTokenizer)
    # Special tokens are trained first, in order: <pad>=0, <s>=1, </s>=2.
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 300
    assert not tok.has_chat_template
    text = "the quick brown fox, héllo 😀"
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.eos_id not in ids and tok.bos_id not in ids  # encode adds no special tokens
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == text  # decode drops special tokens


def test_hf_directory_with_chat_template(bpe_paths):
    tok = load_tokenizer(str(bpe_paths["dir"]))
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 300)
    assert tok.has_chat_template
    templated = tok.apply_chat_template("what is two plus two")
    assert templated == "<|user|>what is two plus two<|assistant|>"
    ids = tok.encode(templated)
    assert ids[0] == 3 and ids[-1] == 4  # <|user|>, <|assistant|> are single special ids
    assert tok.decode(ids) == "what is two plus two"
    same_file = load_tokenizer(str(bpe_paths["file"]))
    assert same_file.encode("hello world") == tok.encode("hello world")


def test_missing_paths_are_clear_errors(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match=f"tokenizer '{missing}' not found; expected \"byte\", a directory"):
        load_tokenizer(str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"tokenizer directory {empty} has neither tokenizer.json nor "
                                                "tokenizer_config.json"):
        load_tokenizer(str(empty))
    not_json = tmp_path / "tokenizer.json"
    not_json.write_text("{not a tokenizer")
    with pytest.raises(ValueError, match=f"tokenizer file {not_json} is not a tokenizers-library tokenizer.json"):
        load_tokenizer(str(not_json))


def test_check_vocab_fits(bpe_paths):
    check_vocab_fits(ByteTokenizer(), 259)
    check_vocab_fits(ByteTokenizer(), 512)
    with pytest.raises(ValueError, match="tokenizer vocab_size 259 exceeds model.vocab_size 258"):
        check_vocab_fits(ByteTokenizer(), 258)
    with pytest.raises(ValueError, match="tokenizer vocab_size 300 exceeds model.vocab_size 256: ids up to 299"):
        check_vocab_fits(load_tokenizer(str(bpe_paths["dir"])), 256)
