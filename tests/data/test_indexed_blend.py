"""Weighted blends of indexed corpora: the config's shape, the draw (weights, seed, passes), sample identities, the
exact resume of the order, and every bad input named at open time."""

import collections
import json
import math
import re
import shutil

import numpy
import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from opd_megatron.config import ConfigError, DataSection, load_config
from opd_megatron.data import build_batch_sampler, build_dataset
from opd_megatron.data import indexed
from opd_megatron.data.batch_indices import GlobalBatchSampler, StreamBatchSampler
from opd_megatron.data.indexed import CorpusBlend, IndexedTextDataset, preprocess_jsonl
from opd_megatron.data.jsonl import DataError
from opd_megatron.data.tokenizer import ByteTokenizer

BYTE = ByteTokenizer()
PAD = BYTE.pad_id


def write_corpus(root, name, texts):
    src = root / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    preprocess_jsonl(src, root / name, BYTE)
    return root / name


@pytest.fixture
def corpora(tmp_path):
    """Three corpora of 46, 13 and 5 windows at seq_length 8."""
    web = write_corpus(tmp_path, "web", [f"web page {i:03d} " + "w" * (i % 11) for i in range(19)])
    code = write_corpus(tmp_path, "code", [f"def f{i}(): return {i}" for i in range(5)])
    math_ = write_corpus(tmp_path, "math", [f"{i}+{i}={2 * i}" for i in range(5)])
    return [web, code, math_]


def open_blend(prefixes, weights, seed=7, shuffle=True, seq_length=8):
    return CorpusBlend([IndexedTextDataset(p, seq_length, PAD, vocab_size=BYTE.vocab_size) for p in prefixes],
                       weights, seed, shuffle)


def test_blend_config_is_a_typed_list_that_names_bad_entries(tmp_path):
    path = tmp_path / "blend.yaml"
    path.write_text("data:\n  format: indexed\n  blend:\n    - {path: /data/web, weight: 0.7}\n"
                    "    - {path: /data/code, weight: 0.3}\n")
    cfg = load_config(path)
    assert [(c.path, c.weight) for c in cfg.data.blend] == [("/data/web", 0.7), ("/data/code", 0.3)]
    assert (cfg.data.eod_mask_loss, cfg.data.reset_position_ids, cfg.data.reset_attention_mask) == (True, False, False)
    cases = {
        "data.blend=[{path: a, wieght: 0.5}]": "unknown config key 'data.blend[0].wieght' (did you mean 'data.blend[0].weight'?)",
        "data.blend=[[0.7, a]]": "data.blend[0]: expected a mapping of keys",
        "data.blend=[{path: a, weight: 0}]": "data.blend[0].weight: expected a positive finite number, got 0.0",
        "data.blend=[{path: a, weight: 1}, {path: b, weight: -2}]": "data.blend[1].weight: expected a positive",
        "data.blend=[{path: a, weight: .nan}]": "data.blend[0].weight: expected a positive finite number, got nan",
        "data.blend=[{path: a, weight: .inf}]": "data.blend[0].weight: expected a positive finite number, got inf",
        "data.blend=[{weight: 1}]": "data.blend[0].path: expected the prefix of an indexed dataset",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, ["data.format=indexed", override])
    with pytest.raises(ConfigError, match=re.escape("data.blend: expected empty unless data.format is indexed")):
        load_config(None, ["data.blend=[{path: a}]"])
    with pytest.raises(ConfigError, match=re.escape("data.path: expected empty when data.blend is set")):
        load_config(None, ["data.format=indexed", "data.path=c", "data.blend=[{path: a}]"])


def test_blend_draws_by_weight_from_every_window_in_seeded_passes(corpora, monkeypatch):
    monkeypatch.setattr(indexed, "BLEND_BLOCK", 50)   # several periods of the pattern in a few hundred samples
    weights = [0.6, 0.3, 0.1]
    blend = open_blend(corpora, weights)
    sizes = [len(c) for c in blend.corpora]
    assert sizes == [46, 13, 5]
    samples = 600
    identities = [blend.sample_identity(i) for i in range(samples)]
    # Every prefix has the weights' proportions to within one sample per corpus per block.
    for end in (50, 137, 600):
        counts = collections.Counter(identity.corpus for identity in identities[:end])
        for corpus, weight in enumerate(weights):
            assert abs(counts[corpus] - weight * end) <= math.ceil(end / 50), (end, counts)
    # The k-th draw of a corpus is in its pass k // n: each pass visits every window once, in a new order.
    for corpus, size in enumerate(sizes):
        windows = [identity.window for identity in identities if identity.corpus == corpus]
        passes = [windows[i:i + size] for i in range(0, len(windows) - size + 1, size)]
        assert len(passes) >= 5
        assert all(sorted(p) == list(range(size)) for p in passes)
        assert len({tuple(p) for p in passes}) == len(passes)
    # A sample is its corpus's window, and its key indexes the windows of all corpora.
    offsets = [0, 46, 59]
    for index in (0, 1, 2, 3, 77, 599):
        identity = identities[index]
        assert identity.window_key == offsets[identity.corpus] + identity.window
        expected = blend.corpora[identity.corpus][identity.window]
        for got in (blend[index], blend.window_sample(identity.window_key)):
            assert torch.equal(got.tokens, expected.tokens) and torch.equal(got.loss_mask, expected.loss_mask)
    assert blend.num_windows == 64
    # The corpus that takes longest to cover: web (46 windows at 0.6) needs about 77 samples.
    assert 75 <= blend.samples_per_pass <= 79
    assert len({(i.corpus, i.window) for i in identities[:blend.samples_per_pass]}) == 64
    assert len({(i.corpus, i.window) for i in identities[:blend.samples_per_pass - 1]}) == 63
    # The same seed gives the same order from a fresh open, another seed another; shuffle=false reads file order.
    assert [open_blend(corpora, weights).sample_identity(i) for i in range(samples)] == identities
    assert [open_blend(corpora, weights, seed=8).sample_identity(i) for i in range(samples)] != identities
    in_order = open_blend(corpora, weights, shuffle=False)
    assert [i.window for i in (in_order.sample_identity(j) for j in range(200)) if i.corpus == 1][:14] == \
        [*range(13), 0]


def test_identity_describes_the_blend_for_a_cache_manifest(corpora, tmp_path):
    blend = open_blend(corpora, [0.5, 0.3, 0.2])
    identity = blend.identity()
    assert identity["seq_length"] == 8 and identity["seed"] == 7 and identity["weights"] == [0.5, 0.3, 0.2]
    web = identity["corpora"][0]
    assert web["prefix"] == str(corpora[0]) and web["windows"] == 46 and web["weight"] == 0.5
    assert re.fullmatch(r"[0-9a-f]{64}", web["idx_sha256"])
    # A moved corpus keeps its identity; other weights or another seed change the order's fingerprint but not the
    # windows' (a cached window's contents depend on the corpora, seq_length and packing only).
    moved = tmp_path / "moved"
    moved.mkdir()
    for prefix in corpora:
        for suffix in (".bin", ".idx"):
            shutil.copy(str(prefix) + suffix, moved / (prefix.name + suffix))
    moved_identity = open_blend([moved / p.name for p in corpora], [0.5, 0.3, 0.2]).identity()
    assert moved_identity["fingerprint"] == identity["fingerprint"]
    reweighted = open_blend(corpora, [0.2, 0.3, 0.5], seed=9).identity()
    assert reweighted["fingerprint"] != identity["fingerprint"]
    assert reweighted["windows_fingerprint"] == identity["windows_fingerprint"]
    longer = open_blend(corpora, [0.5, 0.3, 0.2], seq_length=6).identity()
    assert longer["windows_fingerprint"] != identity["windows_fingerprint"]


def test_a_resumed_stream_continues_the_uninterrupted_order(corpora):
    cfg = DataSection(format="indexed", seq_length=8, blend=[])
    cfg.blend = load_config(None, ["data.format=indexed",
                                   f"data.blend=[{{path: {corpora[0]}, weight: 2}}, {{path: {corpora[1]}, weight: 1}}]"]
                            ).data.blend
    blend = build_dataset(cfg, BYTE, seed=11)
    sampler = build_batch_sampler(blend, global_batch_size=6, seed=11, shuffle=True)
    assert isinstance(sampler, StreamBatchSampler)
    uninterrupted = [next(sampler) for _ in range(10)]
    assert uninterrupted[3] == list(range(18, 24))

    stopped = build_batch_sampler(build_dataset(cfg, BYTE, seed=11), 6, 11, True)
    for _ in range(4):
        next(stopped)
    state = json.loads(json.dumps(stopped.state_dict()))   # as a checkpoint stores it
    resumed_blend = build_dataset(cfg, BYTE, seed=11)
    resumed = build_batch_sampler(resumed_blend, 6, 11, True)
    resumed.load_state_dict(state)
    for step in range(4, 10):
        indices = next(resumed)
        assert indices == uninterrupted[step]
        for index in indices:
            assert torch.equal(resumed_blend[index].tokens, blend[index].tokens)
    # Other weights, seed or corpora: refused, naming what changed.
    for other_cfg, seed, changed in [(cfg, 12, "seed"), (DataSection(format="indexed", seq_length=8,
                                                                      path=str(corpora[0])), 11, "corpora, weights")]:
        other = build_batch_sampler(build_dataset(other_cfg, BYTE, seed=seed), 6, seed, True)
        with pytest.raises(ValueError, match=re.escape(f"the indexed data changed since the checkpoint ({changed} "
                                                       f"differ")):
            other.load_state_dict(state)
    # A JSONL run's state and an indexed run's do not load into each other's sampler.
    epoch_sampler = GlobalBatchSampler(10, 2, 0)
    with pytest.raises(ValueError, match="is not an epoch sampler's"):
        epoch_sampler.load_state_dict(state)
    with pytest.raises(ValueError, match="is not a stream sampler's"):
        resumed.load_state_dict(epoch_sampler.state_dict())


def test_missing_or_truncated_files_name_the_prefix_and_file(corpora, tmp_path):
    prefix = corpora[1]
    for missing in (".bin", ".idx"):
        lonely = tmp_path / f"lonely{missing.replace('.', '_')}"
        other = ".idx" if missing == ".bin" else ".bin"
        shutil.copy(str(prefix) + other, str(lonely) + other)
        with pytest.raises(FileNotFoundError, match=re.escape(f"indexed dataset {str(lonely)!r}: missing "
                                                              f"{lonely}{missing}; expected the prefix")):
            IndexedTextDataset(lonely, 8, PAD)
    cfg = DataSection(format="indexed", seq_length=8, blend=[])
    cfg.blend = load_config(None, ["data.format=indexed", f"data.blend=[{{path: {prefix}}}, {{path: {tmp_path}/no}}]"]
                            ).data.blend
    with pytest.raises(FileNotFoundError, match=re.escape(f"missing {tmp_path}/no.bin and {tmp_path}/no.idx")):
        build_dataset(cfg, BYTE, seed=0)
    truncated = tmp_path / "truncated"
    shutil.copy(str(prefix) + ".idx", str(truncated) + ".idx")
    with open(str(prefix) + ".bin", "rb") as source, open(str(truncated) + ".bin", "wb") as target:
        target.write(source.read()[:-4])
    with pytest.raises(DataError, match=re.escape(f"{truncated}.bin holds 196 bytes, but its .idx describes 100 "
                                                  f"uint16 tokens (200 bytes); the .bin is truncated")):
        IndexedTextDataset(truncated, 8, PAD)


def test_a_corpus_shorter_than_one_sample_is_named(tmp_path):
    short = write_corpus(tmp_path, "short", ["abc"])   # bos a b c eos: 5 tokens
    assert len(IndexedTextDataset(short, 4, PAD)) == 1
    with pytest.raises(DataError, match=re.escape(f"indexed dataset {str(short)!r}: 5 tokens, shorter than one sample "
                                                  f"(data.seq_length + 1 = 6 tokens)")):
        IndexedTextDataset(short, 5, PAD)


def test_blend_weights_are_checked_where_the_blend_is_built(corpora, monkeypatch):
    datasets = [IndexedTextDataset(p, 8, PAD) for p in corpora[:2]]
    for weight in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=re.escape(f"corpus 1 ({str(corpora[1])!r}) has weight {weight}; "
                                                       f"expected a positive finite number")):
            CorpusBlend(datasets, [1.0, weight], seed=0)
    # A share too small for the pattern to honour (the greedy interleave draws it at least once a block).
    monkeypatch.setattr(indexed, "BLEND_BLOCK", 1000)
    CorpusBlend(datasets, [1.0, 0.1], seed=0)
    with pytest.raises(ValueError, match=re.escape("has weight 0.0004, a share of 0.0004 of the blend: its pattern "
                                                   "of 1000 samples draws it 1 times, not 0.4 (more than 1% off)")):
        CorpusBlend(datasets, [1.0, 0.0004], seed=0)


def write_ids(prefix, documents, dtype):
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for ids in documents:
        builder.add_item(torch.tensor(ids, dtype=torch.int64))
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")


def test_token_ids_beyond_the_vocabulary_are_found_at_open_time_or_when_read(tmp_path, monkeypatch):
    vocab = BYTE.vocab_size
    foreign = tmp_path / "foreign"
    write_ids(foreign, [[1, 2, 3, 4, 5], [6, vocab + 40, 8, 9]], numpy.int32)
    with pytest.raises(DataError, match=re.escape(f"token id {vocab + 40} at stream position 6 >= the tokenizer's "
                                                  f"vocab_size {vocab}; the corpus was written with another tokenizer")):
        IndexedTextDataset(foreign, 4, PAD, vocab_size=vocab)
    assert len(IndexedTextDataset(foreign, 4, PAD)) == 2   # no vocabulary given: no check
    # The open-time scan is sampled; a stray id it misses stops the read of its window, naming it.
    monkeypatch.setattr(indexed, "VOCAB_CHECK_TOKENS", 4)
    monkeypatch.setattr(indexed, "VOCAB_CHECK_CHUNKS", 1)
    dataset = IndexedTextDataset(foreign, 4, PAD, vocab_size=vocab)
    assert dataset[0].tokens.tolist() == [1, 2, 3, 4]
    with pytest.raises(DataError, match=re.escape(f"window 1 (stream tokens 4..8): token id {vocab + 40} >= the "
                                                  f"tokenizer's vocab_size {vocab}")):
        dataset[1]
    # uint16 cannot hold a vocabulary over 65,536 ids: written for another tokenizer.
    narrow = tmp_path / "narrow"
    write_ids(narrow, [[1, 2, 3, 4, 5, 6]], DType.optimal_dtype(1000))
    with pytest.raises(DataError, match=re.escape("token ids stored as uint16 (at most 65535), but the tokenizer's "
                                                  "vocab_size is 151936")):
        IndexedTextDataset(narrow, 4, PAD, vocab_size=151936)
