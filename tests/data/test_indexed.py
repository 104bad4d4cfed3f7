import json
import re

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset

from opd_megatron.config import DataSection
from opd_megatron.data import build_dataset
from opd_megatron.data.indexed import CorpusBlend, DocumentPacking, IndexedTextDataset, preprocess_jsonl
from opd_megatron.data.jsonl import DataError
from opd_megatron.data.tokenizer import ByteTokenizer, load_tokenizer

BYTE = ByteTokenizer()
BOS, EOS, PAD = BYTE.bos_id, BYTE.eos_id, BYTE.pad_id
UNMASKED = DocumentPacking(eod_mask_loss=False)


def write_jsonl(path, objects):
    path.write_text("".join(json.dumps(o) + "\n" for o in objects))
    return path


def expected_stream(texts):
    return [t for text in texts for t in [BOS, *text.encode(), EOS]]


def test_preprocess_writes_one_document_per_line(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": "hello"}, {"prompt": "ab", "response": "cd"}, {"text": "z"}])
    stats = preprocess_jsonl(src, tmp_path / "out" / "corpus", BYTE)
    assert stats == {"documents": 3, "tokens": 7 + 6 + 3, "skipped": 0, "skipped_lines": [], "dtype": "uint16",
                     "bin_path": str(tmp_path / "out" / "corpus.bin"), "idx_path": str(tmp_path / "out" / "corpus.idx")}
    raw = IndexedDataset(str(tmp_path / "out" / "corpus"))
    assert raw.sequence_lengths.tolist() == [7, 6, 3]
    assert raw.index.dtype == numpy.uint16
    # prompt/response lines are stored as the plain concatenation: no loss mask in this format
    assert raw[1].tolist() == [BOS, 97, 98, 99, 100, EOS]
    assert not (tmp_path / "out" / "corpus.partial.bin").exists()


def test_windows_reconstruct_the_stream(tmp_path):
    texts = ["the quick brown fox", "jumps", "over the lazy dog, again and again"]
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    preprocess_jsonl(src, tmp_path / "corpus", BYTE)
    stream = expected_stream(texts)
    assert len(stream) == 64
    seq_length = 8
    dataset = IndexedTextDataset(tmp_path / "corpus", seq_length, pad_id=PAD, packing=UNMASKED)
    assert dataset.num_tokens == 64 and dataset.num_documents == 3
    assert len(dataset) == 8  # ceil((64 - 1) / 8): every token after the first is a label exactly once
    rebuilt, labels = [stream[0]], []
    for i in range(len(dataset)):
        sample = dataset[i]
        valid = int(sample.loss_mask.sum())
        assert sample.tokens[:valid].tolist() == stream[i * seq_length:i * seq_length + valid]
        assert sample.labels[:valid].tolist() == stream[i * seq_length + 1:i * seq_length + 1 + valid]
        labels += sample.labels[:valid].tolist()
    rebuilt += labels
    assert rebuilt == stream
    last = dataset[7]  # stream tokens 56..63: 7 positions, then padding
    assert last.loss_mask.tolist() == [1, 1, 1, 1, 1, 1, 1, 0]
    assert last.tokens[7] == PAD and last.labels[7] == PAD and last.labels[6] == EOS
    with pytest.raises(IndexError):
        dataset[8]


def test_exact_fit_has_no_padded_window(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": "abcdefg"}])  # bos + 7 + eos = 9 tokens = 2 x 4 + 1
    preprocess_jsonl(src, tmp_path / "corpus", BYTE)
    dataset = IndexedTextDataset(tmp_path / "corpus", 4, pad_id=PAD)
    assert len(dataset) == 2
    assert dataset[1].tokens.tolist() == [100, 101, 102, 103]
    assert dataset[1].labels.tolist() == [101, 102, 103, EOS]
    assert dataset[1].loss_mask.tolist() == [1, 1, 1, 1]


def test_dtype_follows_vocab_size(tmp_path, bpe_paths):
    assert DType.optimal_dtype(BYTE.vocab_size) == numpy.uint16
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": "hello world"}])

    class WideVocab(ByteTokenizer):
        vocab_size = 151936  # Qwen3-sized: above uint16's range by megatron's rule (< 65500)

    stats = preprocess_jsonl(src, tmp_path / "wide", WideVocab())
    assert stats["dtype"] == "int32"
    assert IndexedDataset(str(tmp_path / "wide")).index.dtype == numpy.int32
    assert IndexedTextDataset(tmp_path / "wide", 4, PAD)[0].tokens.tolist() == [BOS, *b"hel"]
    bpe = load_tokenizer(str(bpe_paths["dir"]))
    stats = preprocess_jsonl(src, tmp_path / "bpe", bpe)
    assert stats["dtype"] == "uint16"
    assert stats["tokens"] == len(bpe.encode("hello world")) + 2


def test_append_eod_false_and_skip_malformed(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "ab"}\nnot json\n\n{"text": 5}\n{"text": "cd"}\n')
    stats = preprocess_jsonl(src, tmp_path / "corpus", BYTE, append_eod=False, skip_malformed=True)
    assert (stats["documents"], stats["tokens"], stats["skipped"], stats["skipped_lines"]) == (2, 6, 2, [2, 4])
    window = IndexedTextDataset(tmp_path / "corpus", 5, PAD)[0]
    assert window.tokens.tolist() == [BOS, 97, 98, BOS, 99]
    # No eod between the documents: the boundary still comes from the index, and its label (the second BOS) is masked.
    assert window.loss_mask.tolist() == [1, 1, 0, 1, 1]


def test_malformed_line_is_an_error_and_leaves_no_files(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "ab"}\n{"body": "cd"}\n')
    with pytest.raises(DataError, match=re.escape(f"{src}, line 2: expected keys 'prompt' and 'response', or "
                                                  f"'text'; got keys ['body']")):
        preprocess_jsonl(src, tmp_path / "corpus", BYTE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]
    with pytest.raises(DataError, match=re.escape(f"{src}: no valid lines (2 malformed lines skipped)")):
        preprocess_jsonl(src, tmp_path / "corpus", BYTE, text_key="none", skip_malformed=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


def test_missing_files_name_the_prefix(tmp_path):
    prefix = tmp_path / "absent"
    with pytest.raises(FileNotFoundError, match=re.escape(f"indexed dataset {str(prefix)!r}: missing {prefix}.bin "
                                                          f"and {prefix}.idx")):
        IndexedTextDataset(prefix, 8, PAD)
    (tmp_path / "half.bin").write_bytes(b"\x00\x01")
    with pytest.raises(FileNotFoundError, match=re.escape(f"missing {tmp_path / 'half.idx'}; expected the prefix")):
        IndexedTextDataset(tmp_path / "half", 8, PAD)


def test_build_dataset_indexed(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": "abcdef"}] * 4)
    preprocess_jsonl(src, tmp_path / "corpus", BYTE)
    dataset = build_dataset(DataSection(format="indexed", path=str(tmp_path / "corpus"), seq_length=4), BYTE, seed=3)
    assert isinstance(dataset, CorpusBlend)   # data.path: a blend of one corpus
    (corpus,) = dataset.corpora
    assert len(corpus) == 8  # 32 tokens -> ceil(31 / 4)
    assert corpus[1].tokens.tolist() == [100, 101, 102, EOS]
    # One pass draws every window once, in an order drawn from the seed.
    assert sorted(dataset.sample_identity(i).window for i in range(8)) == list(range(8))
    assert dataset.samples_per_pass == 8
