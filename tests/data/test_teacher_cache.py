"""The teacher top-k cache (data/teacher_cache.py): what is read equals what was written within the encoding's stated
error, ids exactly, in the teacher's order; a cache made for something else is refused naming the field; missing,
truncated and corrupt shards name the shard and the sample; a resumed writer skips finished shards and never rewrites
them; a full disk leaves a resumable cache; ranks split the shards round-robin."""

import errno
import json
import os
import resource
import signal

import pytest
import torch

from opd_megatron.data import teacher_cache
from opd_megatron.data.teacher_cache import (TAIL_FLOOR, BatchScores, CacheIdentity, CacheLayout, TeacherCacheError,
                                             TeacherCacheMismatchError, TeacherCacheWriteError, TeacherCacheWriter,
                                             logprob_error_bound, open_cache, shard_name, tail_logprob)

LLAMA_VOCAB = 128256


def teacher_scores(samples, seq_length, vocab, k, seed=0, padded_last=3):
    """Random teacher distributions -> (ids, logprobs, valid, tokens): the exact top-k of a softmax, sharp enough
    that the top-k holds most of the mass on some columns and little on others; the last sample's last
    `padded_last` columns invalid, as the corpus's last window is padded."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 6.0, samples * seq_length).view(samples, seq_length, 1)
    logprobs = torch.log_softmax(torch.randn(samples, seq_length, vocab, generator=gen) * scale, dim=-1)
    values, ids = torch.topk(logprobs, k, dim=-1)
    valid = torch.ones(samples, seq_length, dtype=torch.bool)
    valid[-1, seq_length - padded_last:] = False
    tokens = torch.randint(0, vocab, (samples, seq_length + 1), generator=gen)
    return ids * valid.unsqueeze(-1), values * valid.unsqueeze(-1), valid, tokens


def identity(k, vocab, seq_length, **changes):
    fields = dict(teacher={"kind": "inprocess", "name": "tiny", "path": "/ckpt"}, tokenizer_hash="abc", topk=k,
                  temperature=1.0, vocab_size=vocab, dataset={"prefix": "/data/c", "num_samples": 7,
                                                               "idx_sha256": "0f"}, seq_length=seq_length)
    fields.update(changes)
    return CacheIdentity(**fields)


def write_cache(directory, scores, k, vocab, per_shard=2, batch=2, calls=None):
    ids, logprobs, valid, tokens = scores
    samples, seq_length = valid.shape
    layout = CacheLayout(samples, seq_length, k, vocab, per_shard)
    writer = TeacherCacheWriter(directory, identity(k, vocab, seq_length), layout)
    writer.prepare()

    def score_batch(indices):
        if calls is not None:
            calls.extend(indices)
        return BatchScores(ids[indices], logprobs[indices], valid[indices], tokens[indices])

    for shard in writer.pending_shards():
        writer.write_shard(shard, score_batch, batch)
    writer.finish()
    return writer


def by_id(ids, values):
    order = torch.sort(ids, dim=-1).indices
    return ids.gather(-1, order), values.gather(-1, order)


@pytest.mark.parametrize("vocab,k", [(LLAMA_VOCAB, 64), (512, 16), (70000, 300)])
def test_round_trip_within_the_stated_error(tmp_path, vocab, k):
    seq_length = 6
    scores = teacher_scores(5, seq_length, vocab, k)
    write_cache(tmp_path, scores, k, vocab)
    reader = open_cache(tmp_path, expect={"topk": k, "vocab_size": vocab})
    order = [4, 0, 3, 1, 2]
    got = reader.scores(torch.tensor(order), tokens=scores[3][order])
    ids, logprobs, valid, _ = (t[order] for t in scores)
    assert torch.equal(got.valid, valid)
    assert got.topk_ids.shape == (5, seq_length, k) and got.topk_ids.dtype == torch.int64
    # The ids exactly, each with its log-prob within the bound (computed from the stored top and span).
    got_ids, got_values = by_id(got.topk_ids, got.topk_logprobs)
    want_ids, want_values = by_id(ids, logprobs)
    assert torch.equal(got_ids[valid], want_ids[valid])
    records = reader.raw_records(order)
    top, span = (torch.from_numpy(records[name].astype("float64")) for name in ("top", "span"))
    bound = logprob_error_bound(top, span, want_values)
    error = (got_values.double() - want_values.double()).abs()
    assert bool((error[valid] <= bound[valid] * (1 + 1e-6) + 1e-7).all()), float((error - bound)[valid].max())
    # The bound is tight enough to matter: the top-1 is exact to float16, deep entries within span / 255.
    assert float(error[valid].max()) <= float(span.max()) / 255 + 1e-6
    torch.testing.assert_close(got.topk_logprobs[..., 0][valid], logprobs[..., 0][valid], atol=2e-3, rtol=2 ** -10)
    # Descending log-prob, ties to the lower id.
    values, ids_read = got.topk_logprobs, got.topk_ids
    assert bool((values[..., :-1] >= values[..., 1:]).all())
    tie = values[..., :-1] == values[..., 1:]
    assert bool((ids_read[..., :-1][tie & valid.unsqueeze(-1)] < ids_read[..., 1:][tie & valid.unsqueeze(-1)]).all())
    # The tail: float16 of log(1 - sum p), floored.
    tail = tail_logprob(logprobs).float()
    assert bool((got.tail_logprob >= TAIL_FLOOR).all())
    torch.testing.assert_close(got.tail_logprob[valid], tail[valid], rtol=2 ** -11, atol=1e-6)
    # Padded columns read as zeros.
    assert not bool(got.topk_ids[~valid].any()) and not bool(got.topk_logprobs[~valid].any())
    assert not bool(got.tail_logprob[~valid].any())


def test_bytes_per_token_at_k64():
    # Llama 3's 128,256 ids: 17-bit ids as 16 low bits + one count per 2^16 block; 199 B + the 24 B header per sample.
    layout = CacheLayout(1, 4096, 64, LLAMA_VOCAB, 1)
    assert layout.record_bytes == 4096 * 199 + 24
    assert layout.bytes_per_token < 200
    assert CacheLayout(1, 4096, 64, 65536, 1).record_bytes == 4096 * 198 + 24
    # What a token budget costs on disk (for dry-run): 1e9 tokens at k = 64 are 199 GB.
    assert teacher_cache.cache_bytes(10 ** 9, 64, LLAMA_VOCAB, 4096) == -(-10 ** 9 // 4096) * (4096 * 199 + 24)


def test_a_cache_of_something_else_is_refused(tmp_path):
    k, vocab, seq_length = 8, 512, 6
    write_cache(tmp_path, teacher_scores(3, seq_length, vocab, k), k, vocab)
    with pytest.raises(TeacherCacheMismatchError, match=r"topk: the cache has 8, expected 16"):
        open_cache(tmp_path, expect={"topk": 16})
    other = identity(k, vocab, seq_length, tokenizer_hash="def", temperature=0.7)
    with pytest.raises(TeacherCacheMismatchError, match=r"tokenizer_hash: the cache has 'abc', expected 'def'.*"
                                                        r"temperature: the cache has 1.0, expected 0.7"):
        open_cache(tmp_path, expect=other)
    with pytest.raises(TeacherCacheMismatchError, match=r"dataset.idx_sha256: the cache has '0f', expected '1e'"):
        open_cache(tmp_path, expect={"dataset": {"idx_sha256": "1e"}})
    # A writer for another teacher does not touch the cache.
    layout = CacheLayout(3, seq_length, k, vocab, 2)
    changed = identity(k, vocab, seq_length, teacher={"kind": "inprocess", "name": "other", "path": "/ckpt"})
    with pytest.raises(TeacherCacheMismatchError, match=r"teacher.name: the cache has 'tiny', expected 'other'"):
        TeacherCacheWriter(tmp_path, changed, layout).prepare()
    assert open_cache(tmp_path, expect=identity(k, vocab, seq_length)).scores([0]).valid.all()


def test_missing_truncated_and_corrupt_shards_name_shard_and_sample(tmp_path):
    k, vocab, seq_length = 8, 512, 6
    scores = teacher_scores(7, seq_length, vocab, k)
    write_cache(tmp_path, scores, k, vocab, per_shard=3)
    reader = open_cache(tmp_path)
    # Another sample's tokens: the record was written for other tokens.
    with pytest.raises(TeacherCacheMismatchError, match=r"shard-000000.bin: sample 2 was scored on other tokens"):
        reader.scores([2], tokens=scores[3][[1]])
    shard = tmp_path / shard_name(1)
    data = bytearray(shard.read_bytes())
    record = reader.layout.record_bytes
    flipped = bytearray(data)
    flipped[record + record // 2] ^= 0x10           # a byte inside sample 4 (the second of shard 1)
    shard.write_bytes(bytes(flipped))
    reader = open_cache(tmp_path)                    # sizes are right: opening passes
    assert reader.scores([3]).valid.all()
    with pytest.raises(TeacherCacheError, match=r"shard-000001.bin: sample 4 fails its crc32 check"):
        reader.scores([3, 4])
    with pytest.raises(TeacherCacheError, match=r"shard-000001.bin fails its crc32 check \(first bad sample 4\)"):
        reader.verify_shards()
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(TeacherCacheError, match=r"shard-000001.bin \(samples 3-5\) has \d+ bytes, expected \d+ "
                                                r"\(truncated\?\); reading sample 3"):
        open_cache(tmp_path)
    shard.unlink()
    with pytest.raises(TeacherCacheError, match=r"shard-000001.bin \(samples 3-5\) is missing"):
        open_cache(tmp_path)
    reader = teacher_cache.TeacherCacheReader(tmp_path, json.loads((tmp_path / "manifest.json").read_text()))
    with pytest.raises(TeacherCacheError, match=r"shard-000001.bin \(samples 3-5\) is missing; reading sample 5"):
        reader.scores([0, 5])
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        open_cache(tmp_path / "elsewhere")


class FullDisk:
    """`open` for teacher_cache whose files named `failing` raise ENOSPC on their second write."""

    def __init__(self, failing):
        self.failing = failing

    def __call__(self, path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)
        if os.path.basename(str(path)) != self.failing:
            return handle
        writes = []
        real_write = handle.write

        def write(data):
            writes.append(len(data))
            if len(writes) > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(data)

        handle.write = write
        return handle


def test_full_disk_then_resume_skips_finished_shards(tmp_path, monkeypatch):
    k, vocab, seq_length = 8, LLAMA_VOCAB, 5
    scores = teacher_scores(7, seq_length, vocab, k)
    whole = tmp_path / "whole"
    write_cache(whole, scores, k, vocab)
    cache = tmp_path / "cache"
    monkeypatch.setattr(teacher_cache, "open", FullDisk(shard_name(2) + ".partial"), raising=False)
    calls = []
    with pytest.raises(TeacherCacheWriteError, match=r"could not write shard-000002.bin \(samples 4-5, at sample 5\): "
                                                     r"the disk is full; 2 of 4 shards are finished and kept"):
        write_cache(cache, scores, k, vocab, batch=1, calls=calls)
    monkeypatch.undo()
    assert calls == [0, 1, 2, 3, 4, 5]
    assert sorted(p.name for p in cache.iterdir()) == ["manifest.json", "shard-000000.bin", "shard-000000.json",
                                                       "shard-000001.bin", "shard-000001.json"]
    with pytest.raises(TeacherCacheError, match=r"unfinished \(2 of 4 shards missing: shard-000002.bin, "
                                                r"shard-000003.bin\); rerun cache-teacher"):
        open_cache(cache)
    before = {name: os.stat(cache / name).st_mtime_ns for name in ("shard-000000.bin", "shard-000001.bin")}
    # What a killed writer leaves: a partial file, and a shard renamed before its record was written. Neither is
    # finished; both are written again.
    (cache / (shard_name(2) + ".partial")).write_bytes(b"half a shard")
    (cache / shard_name(3)).write_bytes(b"x" * 10)
    calls.clear()
    writer = write_cache(cache, scores, k, vocab, batch=1, calls=calls)
    assert calls == [4, 5, 6]                        # only the unfinished shards were scored
    assert not list(cache.glob("*.partial"))
    assert before == {name: os.stat(cache / name).st_mtime_ns for name in before}
    for shard in range(4):
        assert (cache / shard_name(shard)).read_bytes() == (whole / shard_name(shard)).read_bytes()
    open_cache(cache).verify_shards()
    with pytest.raises(TeacherCacheError, match="shard-000000.bin is finished; a finished shard is never rewritten"):
        writer.write_shard(0, lambda indices: None, 1)


def test_ranks_take_shards_round_robin(tmp_path):
    k, vocab, seq_length = 4, 512, 4
    ids, logprobs, valid, tokens = teacher_scores(9, seq_length, vocab, k)
    layout = CacheLayout(9, seq_length, k, vocab, 2)
    writers = [TeacherCacheWriter(tmp_path, identity(k, vocab, seq_length), layout) for _ in range(2)]
    writers[0].prepare(create=True)
    writers[1].prepare(create=False)
    pending = [writers[rank].pending_shards(rank, 2) for rank in range(2)]
    assert pending == [[0, 2, 4], [1, 3]]
    for rank in (1, 0):
        for shard in pending[rank]:
            writers[rank].write_shard(shard, lambda i: BatchScores(ids[i], logprobs[i], valid[i], tokens[i]), 2)
    assert writers[0].pending_shards(0, 2) == [] and writers[1].pending_shards(1, 2) == []
    manifest = writers[0].finish()
    assert manifest["complete"] and sorted(manifest["shards"]) == [shard_name(s) for s in range(5)]
    got = open_cache(tmp_path).scores(list(range(9)))
    assert torch.equal(by_id(got.topk_ids, got.topk_ids)[0][valid], by_id(ids, ids)[0][valid])


def test_a_file_size_limit_leaves_a_resumable_cache(tmp_path):
    """A real failing write (RLIMIT_FSIZE, lowered for this process for the length of the write: EFBIG once SIGXFSZ,
    which would kill the process, is ignored), not a patched one."""
    k, vocab, seq_length = 8, 512, 64
    layout = CacheLayout(7, seq_length, k, vocab, 3)
    # Shards 0 and 1 hold 3 samples, shard 2 one: a limit between their sizes fails shard 0 and would pass shard 2
    # (and the manifest, about 1 kB).
    limit = layout.shard_bytes(2) + layout.record_bytes
    assert layout.shard_bytes(2) < limit < layout.shard_bytes(0)
    scores = teacher_scores(7, seq_length, vocab, k)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        with pytest.raises(TeacherCacheWriteError) as failure:
            write_cache(tmp_path, scores, k, vocab, per_shard=3)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert failure.value.__cause__.errno == errno.EFBIG
    assert "could not write shard-000000.bin (samples 0-2" in str(failure.value)
    assert "the file size limit is exceeded; 0 of 3 shards are finished and kept" in str(failure.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]      # no partial file left behind
    calls = []
    write_cache(tmp_path, scores, k, vocab, per_shard=3, calls=calls)
    assert calls == list(range(7))
    open_cache(tmp_path).verify_shards()
