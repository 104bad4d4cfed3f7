"""A teacher's top-k over a corpus, computed once and read many times: a sharded binary cache keyed by sample index.

Written by `opd-megatron cache-teacher` (`tools/cache_teacher.py`), read by `open_cache(dir, expect=...)`. Sample i
of the cache is the corpus window whose key is i (`CorpusBlend.window_sample(i)`; a blend's sample j reads key
`sample_identity(j).window_key`, so a window drawn twice is scored once), label-aligned like `TeacherScores`
(`teachers/base.py`): column j is the teacher's distribution over token j+1 given tokens[:j+1]; a window of S =
seq_length columns has S + 1 tokens. Per column the cache keeps the teacher's top-k ids, their log-probabilities and
the tail: log(1 - sum of the top-k probabilities), the mass outside the top-k [Gemma-style top-k + tail KD].

Layout. `manifest.json` records what the cache is of (the identity: teacher, tokenizer hash, k, temperature,
vocabulary, the corpora (`CorpusBlend.identity`'s windows fingerprint: each .idx's sha256, seq_length, packing),
seq_length, encoding version) and, once every shard is
written, each shard's size and crc32. Shard s (`shard-%06d.bin`) holds samples [s*n, (s+1)*n) (n =
samples_per_shard) as fixed-size records, so a reader memory-maps it and seeks to a sample by index. A record:

    header    24 B        int64 sample_index, int32 valid_columns, uint32 crc32 of the rest of the record,
                          uint32 crc32 of the sample's tokens (`tokens_crc32`), 4 B reserved
    top       f16 [S]     the top-1 log-prob, rounded up to float16 (so every other entry lies below it)
    span      f16 [S]     top - (the k-th log-prob), rounded up to float16
    tail      f16 [S]     log(1 - sum_k p), floored at TAIL_FLOOR (round to nearest)
    id_low    u16 [S, k]  the low 16 bits of the top-k ids, the ids sorted ascending
    code      u8  [S, k]  each id's log-prob: lp = top - span * (code / 255)^2
    id_high   u8  [S, H-1] (u16 when k > 255) for vocabularies past 2^16 ids (H = ceil(V / 2^16) blocks of 2^16 ids):
                          how many of the sorted ids lie below block h+1. Sorted ids make the high bits a
                          staircase, so a count per block replaces 1 bit per id (Elias-Fano with 16 low bits).

Bytes per token: 6 + 3k + (H-1) (2(H-1) when k > 255; +24/S for the header): 199 B at k = 64 for Llama 3's 128,256
ids, 198 B at k = 64 when V <= 65,536. Entries are stored in id order; the reader sorts them by decoded log-prob,
descending, ties to the lower id (the teacher's own order, except that entries within one quantisation step of each
other may tie).

Error of a decoded top-k log-prob (the code is the nearest point of a square-root grid, so the step is fine near the
top-1, where the mass is, and coarse deep in the top-k): with d = top - lp and R = span,

    |decoded - lp| <= sqrt(d * R) / 255 + R / 260100          (`logprob_error_bound`)

e.g. R = 16 nats: <= 0.016 at d = 1 (p = top/e), <= 0.005 at d = 0.1; the top-1 decodes to `top`, within one
float16 step of it (relative 2^-10). The tail is float16: relative error <= 2^-11 (|tail| * 2^-11 absolute); a tail
mass below e^TAIL_FLOOR is stored as TAIL_FLOOR (the float32 top-k log-probs a teacher returns cannot resolve such
tails anyway).

Writing is atomic per shard: a shard is written to `<name>.partial`, flushed and fsynced, renamed, then its record
(`<name>.json`: samples, bytes, crc32) is written the same way. A shard with its record and the recorded size is
finished; a resumed writer skips it and never rewrites it. Writers on several ranks take shards round-robin (shard s
on rank s % world). A failed write (a full disk) removes the partial file and raises `TeacherCacheWriteError`; the
finished shards stay and the same command resumes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import numpy
import torch

from opd_megatron.data.tokenizer import HFTokenizer, Tokenizer

ENCODING_VERSION = 1
FORMAT_NAME = "opd-megatron teacher top-k cache"
MANIFEST = "manifest.json"
# A tail mass below e^-30 (1e-13) is stored as -30: float32 top-k log-probs sum to 1 only within ~1e-6.
TAIL_FLOOR = -30.0
HEADER_BYTES = 24
CODE_LEVELS = 255
ID_BLOCK_BITS = 16


class TeacherCacheError(ValueError):
    """A teacher cache cannot be used: missing, truncated or corrupt shards, an unfinished cache, bad arguments. The
    message names the directory, the shard and the sample, and what was expected."""


class TeacherCacheMismatchError(TeacherCacheError):
    """The cache was made for another teacher, tokenizer, k, temperature, corpus or sequence length than asked."""


class TeacherCacheWriteError(TeacherCacheError):
    """A shard could not be written (a full disk, a quota, a read-only directory). Finished shards are kept; rerunning
    the same command resumes after them."""


@dataclass(frozen=True)
class CacheIdentity:
    """What a cache is of; a reader's `expect` is compared with it field by field.

    teacher: the teacher's kind, name and source (path or URLs) and a fingerprint of its files where it has local
        ones. tokenizer_hash: `tokenizer_fingerprint` of the tokenizer the corpus was tokenized with.
    dataset: the corpora the windows are cut from: `CorpusBlend.identity()`'s `windows_fingerprint` (the .idx
        hashes, sizes, seq_length and packing: what a window's tokens depend on), the number of windows and, for
        the record, the prefixes (a moved corpus keeps its fingerprint)."""

    teacher: dict
    tokenizer_hash: str
    topk: int
    temperature: float
    vocab_size: int
    dataset: dict
    seq_length: int
    encoding_version: int = ENCODING_VERSION

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CacheLayout:
    """Sizes of a cache: samples, columns per sample, k, vocabulary, samples per shard -> record and shard sizes."""

    num_samples: int
    seq_length: int
    topk: int
    vocab_size: int
    samples_per_shard: int

    def __post_init__(self) -> None:
        for name, low in (("num_samples", 1), ("seq_length", 1), ("topk", 1), ("vocab_size", 1),
                          ("samples_per_shard", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise TeacherCacheError(f"cache layout: {name} must be an integer >= {low}, got {value!r}")
        if self.topk > min(self.vocab_size, 65535):
            raise TeacherCacheError(f"cache layout: topk={self.topk} must be <= the vocabulary ({self.vocab_size}) "
                                    f"and <= 65535")

    @property
    def id_blocks(self) -> int:
        """H: blocks of 2^16 ids the vocabulary spans."""
        return -(-self.vocab_size // (1 << ID_BLOCK_BITS))

    @property
    def record_dtype(self) -> numpy.dtype:
        s, k = self.seq_length, self.topk
        fields = [("sample_index", "<i8"), ("valid_columns", "<i4"), ("crc32", "<u4"), ("tokens_crc32", "<u4"),
                  ("reserved", "<u4"), ("top", "<f2", (s,)),
                  ("span", "<f2", (s,)), ("tail", "<f2", (s,)), ("id_low", "<u2", (s, k)), ("code", "u1", (s, k))]
        if self.id_blocks > 1:
            fields.append(("id_high", "u1" if k <= 255 else "<u2", (s, self.id_blocks - 1)))
        return numpy.dtype(fields)

    @property
    def record_bytes(self) -> int:
        return self.record_dtype.itemsize

    @property
    def bytes_per_token(self) -> float:
        """Bytes per label column, the record header included."""
        return self.record_bytes / self.seq_length

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.samples_per_shard)

    def shard_samples(self, shard: int) -> range:
        """The sample indices shard `shard` holds."""
        start = shard * self.samples_per_shard
        return range(start, min(start + self.samples_per_shard, self.num_samples))

    def shard_bytes(self, shard: int) -> int:
        return len(self.shard_samples(shard)) * self.record_bytes

    def as_dict(self) -> dict:
        return asdict(self)


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}.bin"


# -- encoding --------------------------------------------------------------------------------------------------------

def _float16_up(values: numpy.ndarray) -> numpy.ndarray:
    """float64 -> the smallest float16 >= each value (so that a bound computed from it still holds)."""
    rounded = values.astype(numpy.float16)
    low = rounded.astype(numpy.float64) < values
    rounded[low] = numpy.nextafter(rounded[low], numpy.float16(numpy.inf))
    return rounded


def tail_logprob(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """`[..., k]` log-probs -> `[...]` log(1 - sum exp), in float64, floored at TAIL_FLOOR."""
    mass = torch.exp(topk_logprobs.double()).sum(-1)
    return torch.log((1.0 - mass).clamp_min(0.0)).clamp_min(TAIL_FLOOR)


def logprob_error_bound(top: torch.Tensor, span: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """The largest |decoded - lp| the encoding allows for log-probs `lp [..., k]` of columns whose decoded top and
    span are `top, span [...]` (see the module docstring)."""
    d = (top.double().unsqueeze(-1) - logprobs.double()).clamp_min(0.0)
    r = span.double().unsqueeze(-1)
    return torch.sqrt(d * r) / CODE_LEVELS + r / (2 * CODE_LEVELS) ** 2


def encode_columns(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                   layout: CacheLayout) -> dict[str, numpy.ndarray]:
    """`[N, k]` ids and log-probs of N columns (any order within a column) -> the record fields of those columns
    (`top`, `span`, `tail` [N]; `id_low`, `code` [N, k]; `id_high` [N, H-1] when H > 1)."""
    k = layout.topk
    if tuple(topk_ids.shape) != tuple(topk_logprobs.shape) or topk_ids.dim() != 2 or topk_ids.shape[1] != k:
        raise TeacherCacheError(f"encode_columns: expected ids and log-probs of shape [N, {k}], got "
                                f"{tuple(topk_ids.shape)} and {tuple(topk_logprobs.shape)}")
    ids = topk_ids.long().numpy()
    logprobs = topk_logprobs.double().numpy()
    if ids.size and (ids.min() < 0 or ids.max() >= layout.vocab_size):
        raise TeacherCacheError(f"encode_columns: top-k ids must lie in [0, {layout.vocab_size}), got "
                                f"[{ids.min()}, {ids.max()}]")
    if not numpy.isfinite(logprobs).all():
        raise TeacherCacheError("encode_columns: top-k log-probs must be finite")
    order = numpy.argsort(ids, axis=1, kind="stable")
    ids = numpy.take_along_axis(ids, order, axis=1)
    logprobs = numpy.take_along_axis(logprobs, order, axis=1)
    top = _float16_up(logprobs.max(axis=1))
    span = _float16_up(top.astype(numpy.float64) - logprobs.min(axis=1))
    depth = (top.astype(numpy.float64)[:, None] - logprobs).clip(min=0.0)
    width = span.astype(numpy.float64)[:, None]
    share = numpy.divide(depth, width, out=numpy.zeros_like(depth), where=width > 0).clip(0.0, 1.0)
    code = numpy.rint(numpy.sqrt(share) * CODE_LEVELS).astype(numpy.uint8)
    fields = {"top": top, "span": span,
              "tail": tail_logprob(topk_logprobs).numpy().astype(numpy.float16),
              "id_low": (ids & 0xFFFF).astype(numpy.uint16), "code": code}
    if layout.id_blocks > 1:
        blocks = numpy.arange(1, layout.id_blocks)
        high = ids >> ID_BLOCK_BITS
        fields["id_high"] = (high[:, :, None] < blocks[None, None, :]).sum(axis=1).astype(
            numpy.uint8 if k <= 255 else numpy.uint16)
    return fields


# decoded depth below the top-1, as a share of the span, per code: (code / 255)^2
_DEPTH_OF_CODE = (numpy.arange(CODE_LEVELS + 1, dtype=numpy.float32) / CODE_LEVELS) ** 2


def decode_columns(fields: Mapping[str, numpy.ndarray], layout: CacheLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Record fields of `[...]` columns -> (ids int64 `[..., k]`, log-probs float32 `[..., k]`) in descending
    log-prob, ties to the lower id."""
    ids = numpy.asarray(fields["id_low"]).astype(numpy.int64)
    if layout.id_blocks > 1:
        below = numpy.asarray(fields["id_high"])                                                  # [..., H-1]
        position = numpy.arange(layout.topk)
        # The entry at (id-sorted) position p lies in block h when h of the counts "ids below block b+1" are <= p.
        for block in range(layout.id_blocks - 1):
            ids += (position >= below[..., block: block + 1]).astype(numpy.int64) << ID_BLOCK_BITS
    code = numpy.ascontiguousarray(fields["code"])
    # The log-prob falls as the code rises: an ascending stable sort of the uint8 codes (numpy's radix sort) is the
    # descending log-prob order, equal codes (equal values) kept in ascending id order.
    order = numpy.argsort(code, axis=-1, kind="stable")
    ids = numpy.take_along_axis(ids, order, axis=-1)
    depth = _DEPTH_OF_CODE[numpy.take_along_axis(code, order, axis=-1)]
    top = numpy.asarray(fields["top"]).astype(numpy.float32)[..., None]
    span = numpy.asarray(fields["span"]).astype(numpy.float32)[..., None]
    return torch.from_numpy(ids), torch.from_numpy(top - span * depth)


# -- identity --------------------------------------------------------------------------------------------------------

def tokens_crc32(tokens: torch.Tensor) -> int:
    """crc32 of a sample's real tokens `[n + 1]` (its n label columns and the token before the first), as int64:
    what a sample's record was written for, so a reader can tell the dataset's window i from another window."""
    return zlib.crc32(tokens.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())


PROBES = ("0123456789", "The quick brown fox jumps over the lazy dog.", " \n\t  x", "don't stop, 12 + 34 = 46?")


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 of what fixes a tokenizer's ids: its size, special ids, the ids of probe strings and, for a Hugging
    Face tokenizer, its whole token -> id map."""
    described: dict[str, Any] = {"vocab_size": int(tokenizer.vocab_size), "eos": tokenizer.eos_id,
                                 "bos": tokenizer.bos_id, "pad": tokenizer.pad_id,
                                 "probes": [list(tokenizer.encode(text)) for text in PROBES]}
    if isinstance(tokenizer, HFTokenizer):
        described["vocab"] = sorted(tokenizer.hf.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _differences(manifest: Any, expected: Any, name: str) -> list[str]:
    if isinstance(manifest, Mapping) and isinstance(expected, Mapping):
        found = []
        for key in expected:
            dotted = f"{name}.{key}" if name else str(key)
            if key not in manifest:
                found.append(f"{dotted}: the cache has none, expected {expected[key]!r}")
            else:
                found.extend(_differences(manifest[key], expected[key], dotted))
        return found
    return [] if manifest == expected else [f"{name}: the cache has {manifest!r}, expected {expected!r}"]


def check_identity(directory: str | Path, manifest: Mapping[str, Any],
                   expect: CacheIdentity | Mapping[str, Any]) -> None:
    """Raise `TeacherCacheMismatchError` naming every field of `expect` whose value differs from the manifest's."""
    wanted = expect.as_dict() if isinstance(expect, CacheIdentity) else dict(expect)
    problems = _differences(manifest.get("identity", {}), wanted, "")
    if problems:
        raise TeacherCacheMismatchError(f"teacher cache {directory}: made for something else: {'; '.join(problems)}")


# -- files -----------------------------------------------------------------------------------------------------------

def _write_atomic(path: Path, data: bytes) -> None:
    """`data` into `path` via `<path>.partial`, fsynced and renamed: a reader sees the whole file or none."""
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise TeacherCacheError(f"{path}: not valid JSON ({error}); delete it and rerun cache-teacher") from error


def _shard_record_path(directory: Path, shard: int) -> Path:
    return directory / (shard_name(shard)[: -len(".bin")] + ".json")


def finished_shard(directory: str | Path, layout: CacheLayout, shard: int) -> Optional[dict]:
    """The record of shard `shard` if it is finished (its record exists and its file has the recorded size), else
    None. A finished shard is never written again."""
    directory = Path(directory)
    record_path = _shard_record_path(directory, shard)
    data = directory / shard_name(shard)
    if not record_path.is_file() or not data.is_file():
        return None
    record = _read_json(record_path)
    if record.get("bytes") != layout.shard_bytes(shard) or data.stat().st_size != record["bytes"]:
        return None
    return record


@dataclass
class ShardWriteStats:
    """What one call of `write_shard` did: the shard, its samples and label columns scored, and its record."""
    shard: int
    samples: int
    columns: int
    record: dict = field(default_factory=dict)


class BatchScores(NamedTuple):
    """What `write_shard`'s `score_batch(sample_indices)` returns for B samples of S columns."""
    topk_ids: torch.Tensor       # [B, S, k] the teacher's top-k ids
    topk_logprobs: torch.Tensor  # [B, S, k] and their log-probs
    valid: torch.Tensor          # [B, S] bool, a prefix of each row: the columns holding a label
    tokens: torch.Tensor         # [B, S + 1] int64: the samples' tokens (read up to valid columns + 1)


ScoreBatch = Callable[[Sequence[int]], BatchScores]


class TeacherCacheWriter:
    """Writes the shards of one cache. Every rank makes one; `prepare` (rank 0 first, then the others) writes or
    checks the manifest, `pending_shards(rank, world)` lists the unfinished shards this rank owns, `write_shard`
    writes one, and `finish` (rank 0, after every rank is done) records every shard in the manifest."""

    def __init__(self, directory: str | Path, identity: CacheIdentity, layout: CacheLayout) -> None:
        if layout.topk != identity.topk or layout.seq_length != identity.seq_length or \
                layout.vocab_size != identity.vocab_size:
            raise TeacherCacheError(f"TeacherCacheWriter: layout {layout.as_dict()} disagrees with identity "
                                    f"topk={identity.topk}, seq_length={identity.seq_length}, "
                                    f"vocab_size={identity.vocab_size}")
        self.directory = Path(directory)
        self.identity = identity
        self.layout = layout
        self.records_dtype = layout.record_dtype

    def prepare(self, create: bool = True) -> None:
        """Write the manifest of a new cache (`create`), or check that an existing one is of the same identity and
        layout (a resume); a cache of something else is refused, never overwritten."""
        path = self.directory / MANIFEST
        if path.is_file():
            manifest = _read_json(path)
            check_identity(self.directory, manifest, self.identity)
            if manifest.get("layout") != self.layout.as_dict():
                raise TeacherCacheMismatchError(f"teacher cache {self.directory}: layout {manifest.get('layout')} "
                                                f"differs from this run's {self.layout.as_dict()}; write to a new "
                                                f"directory")
            return
        if not create:
            raise TeacherCacheError(f"teacher cache {self.directory}: no {MANIFEST}; rank 0 writes it first")
        manifest = {"format": FORMAT_NAME, "identity": self.identity.as_dict(), "layout": self.layout.as_dict(),
                    "bytes_per_token": self.layout.bytes_per_token, "complete": False, "shards": {}}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            _write_atomic(path, json.dumps(manifest, indent=1).encode())
        except OSError as error:
            raise TeacherCacheWriteError(f"teacher cache {self.directory}: could not write {MANIFEST}: {error}") \
                from error

    def pending_shards(self, rank: int = 0, world: int = 1) -> list[int]:
        """This rank's shards (s % world == rank) that are not finished."""
        return [shard for shard in range(rank, self.layout.num_shards, world)
                if finished_shard(self.directory, self.layout, shard) is None]

    def write_shard(self, shard: int, score_batch: ScoreBatch, batch_size: int) -> ShardWriteStats:
        """Score shard `shard`'s samples `batch_size` at a time and write them; an OSError (a full disk) removes
        the partial file and raises `TeacherCacheWriteError` naming the shard and the sample being written."""
        if finished_shard(self.directory, self.layout, shard) is not None:
            raise TeacherCacheError(f"teacher cache {self.directory}: {shard_name(shard)} is finished; a finished "
                                    f"shard is never rewritten")
        samples = self.layout.shard_samples(shard)
        path = self.directory / shard_name(shard)
        partial = path.with_name(path.name + ".partial")
        crc = 0
        columns = 0
        sample = samples.start
        try:
            with open(partial, "wb") as handle:
                for start in range(samples.start, samples.stop, batch_size):
                    indices = list(range(start, min(start + batch_size, samples.stop)))
                    records = self._records(indices, score_batch(indices))
                    columns += int(records["valid_columns"].sum())
                    for offset in range(len(indices)):
                        sample = indices[offset]
                        payload = records[offset: offset + 1].tobytes()
                        crc = zlib.crc32(payload, crc)
                        handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)
            record = {"shard": shard_name(shard), "samples": [samples.start, samples.stop],
                      "bytes": self.layout.shard_bytes(shard), "crc32": crc}
            _write_atomic(_shard_record_path(self.directory, shard), json.dumps(record).encode())
        except OSError as error:
            partial.unlink(missing_ok=True)
            reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                      errno.EFBIG: "the file size limit is exceeded"}.get(error.errno, str(error))
            done = sum(finished_shard(self.directory, self.layout, s) is not None
                       for s in range(self.layout.num_shards))
            raise TeacherCacheWriteError(
                f"teacher cache {self.directory}: could not write {shard_name(shard)} (samples {samples.start}-"
                f"{samples.stop - 1}, at sample {sample}): {reason}; {done} of {self.layout.num_shards} shards are "
                f"finished and kept: free space and rerun the same command to resume") from error
        return ShardWriteStats(shard, len(samples), columns, record)

    def _records(self, indices: Sequence[int], scores: BatchScores) -> numpy.ndarray:
        """Scores of samples `indices` -> their records (the crc32 of each filled in)."""
        s, k = self.layout.seq_length, self.layout.topk
        topk_ids, topk_logprobs, valid, tokens = scores
        want = (len(indices), s, k)
        if tuple(topk_ids.shape) != want or tuple(topk_logprobs.shape) != want or tuple(valid.shape) != want[:2] \
                or tuple(tokens.shape) != (len(indices), s + 1):
            raise TeacherCacheError(f"teacher cache: scores of shape {tuple(topk_ids.shape)} / "
                                    f"{tuple(topk_logprobs.shape)} / valid {tuple(valid.shape)} / tokens "
                                    f"{tuple(tokens.shape)}, expected {want}, {want[:2]} and {(len(indices), s + 1)}")
        valid = valid.bool().cpu()
        valid_columns = valid.sum(-1)
        prefix = torch.arange(s).unsqueeze(0) < valid_columns.unsqueeze(1)
        if not torch.equal(prefix, valid):
            raise TeacherCacheError("teacher cache: the valid columns of a sample must be a prefix (columns 0 .. n-1)")
        records = numpy.zeros(len(indices), dtype=self.records_dtype)
        records["sample_index"] = indices
        records["valid_columns"] = valid_columns.numpy()
        records["tokens_crc32"] = [tokens_crc32(tokens[i, : int(valid_columns[i]) + 1]) for i in range(len(indices))]
        if bool(valid.any()):
            fields = encode_columns(topk_ids.cpu()[valid], topk_logprobs.cpu().float()[valid], self.layout)
            rows, cols = valid.nonzero(as_tuple=True)
            for name, values in fields.items():
                records[name][rows.numpy(), cols.numpy()] = values
        raw = records.view(numpy.uint8).reshape(len(indices), -1)
        records["crc32"] = [zlib.crc32(raw[i, HEADER_BYTES:].tobytes()) for i in range(len(indices))]
        return records

    def finish(self) -> dict:
        """Record every shard (all must be finished) in the manifest and mark it complete; returns the manifest."""
        path = self.directory / MANIFEST
        manifest = _read_json(path)
        shards = {}
        missing = []
        for shard in range(self.layout.num_shards):
            record = finished_shard(self.directory, self.layout, shard)
            if record is None:
                missing.append(shard_name(shard))
            else:
                shards[shard_name(shard)] = record
        if missing:
            raise TeacherCacheError(f"teacher cache {self.directory}: {len(missing)} shards unfinished "
                                    f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); rerun "
                                    f"cache-teacher to write them")
        manifest.update(shards=shards, complete=True)
        try:
            _write_atomic(path, json.dumps(manifest, indent=1).encode())
        except OSError as error:
            raise TeacherCacheWriteError(f"teacher cache {self.directory}: every shard is written but {MANIFEST} "
                                         f"could not be updated ({error}); free space and rerun the same command") \
                from error
        return manifest


# -- reading ---------------------------------------------------------------------------------------------------------

class CachedScores(NamedTuple):
    """Teacher top-k of B samples, label-aligned `[B, S, ...]` (S = seq_length = L - 1 columns)."""
    topk_ids: torch.Tensor        # [B, S, k] int64, descending log-prob, ties to the lower id; 0 where not valid
    topk_logprobs: torch.Tensor   # [B, S, k] float32; 0 where not valid
    tail_logprob: torch.Tensor    # [B, S] float32: log(1 - sum_k p), >= TAIL_FLOOR; 0 where not valid
    valid: torch.Tensor           # [B, S] bool: columns holding a label (the corpus's last window is padded)


class TeacherCacheReader:
    """A finished cache, its shards memory-mapped on first use. `scores(sample_indices)` decodes samples;
    with `verify`, each sample's crc32 is checked as it is read."""

    def __init__(self, directory: str | Path, manifest: dict, verify: bool = True) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        self.layout = CacheLayout(**manifest["layout"])
        self.identity = manifest["identity"]
        self.verify = verify
        self._dtype = self.layout.record_dtype
        self._shards: dict[int, numpy.memmap] = {}

    def __len__(self) -> int:
        return self.layout.num_samples

    def _shard(self, shard: int, sample: int) -> numpy.memmap:
        if shard not in self._shards:
            path = self.directory / shard_name(shard)
            expected = self.layout.shard_bytes(shard)
            size = path.stat().st_size if path.is_file() else None
            if size != expected:
                state = "is missing" if size is None else f"has {size} bytes, expected {expected} (truncated?)"
                raise TeacherCacheError(f"teacher cache {self.directory}: {shard_name(shard)} (samples "
                                        f"{self.layout.shard_samples(shard).start}-"
                                        f"{self.layout.shard_samples(shard).stop - 1}) {state}; reading sample "
                                        f"{sample}; rerun cache-teacher to rewrite it")
            self._shards[shard] = numpy.memmap(path, dtype=numpy.uint8, mode="r").reshape(-1, self.layout.record_bytes)
        return self._shards[shard]

    def raw_records(self, sample_indices: Sequence[int], tokens: Optional[torch.Tensor] = None) -> numpy.ndarray:
        """The stored records of `sample_indices`, checked (index; crc32 with `verify`; the samples' tokens `[B, S+1]`
        against those the records were written for, when given)."""
        n = self.layout.num_samples
        rows = numpy.empty((len(sample_indices), self.layout.record_bytes), dtype=numpy.uint8)
        for position, sample in enumerate(sample_indices):
            sample = int(sample)
            if not 0 <= sample < n:
                raise IndexError(f"teacher cache {self.directory}: sample {sample} out of range; it holds {n} samples")
            shard = sample // self.layout.samples_per_shard
            rows[position] = self._shard(shard, sample)[sample - shard * self.layout.samples_per_shard]
        records = rows.view(self._dtype).reshape(len(sample_indices))
        for position, sample in enumerate(sample_indices):
            shard = shard_name(int(sample) // self.layout.samples_per_shard)
            if int(records["sample_index"][position]) != int(sample):
                raise TeacherCacheError(f"teacher cache {self.directory}: {shard} holds sample "
                                        f"{int(records['sample_index'][position])} where sample {sample} should be "
                                        f"(corrupt); rerun cache-teacher into a new directory")
            if self.verify and zlib.crc32(rows[position, HEADER_BYTES:].tobytes()) != int(records["crc32"][position]):
                raise TeacherCacheError(f"teacher cache {self.directory}: {shard}: sample {sample} fails its crc32 "
                                        f"check (corrupt bytes); delete {shard} and its .json and rerun cache-teacher "
                                        f"to rewrite it")
            if tokens is not None:
                real = tokens[position, : int(records["valid_columns"][position]) + 1]
                if tokens_crc32(real) != int(records["tokens_crc32"][position]):
                    raise TeacherCacheMismatchError(
                        f"teacher cache {self.directory}: {shard}: sample {sample} was scored on other tokens than "
                        f"the dataset's sample {sample} (another corpus, tokenizer or window layout)")
        return records

    def scores(self, sample_indices: Sequence[int] | torch.Tensor,
               tokens: Optional[torch.Tensor] = None) -> CachedScores:
        """Samples `sample_indices` ([B]) -> `CachedScores` `[B, S, k]`. `tokens` `[B, S + 1]` (optional): the
        samples as the trainer reads them, checked against the tokens each record was written for."""
        if isinstance(sample_indices, torch.Tensor):
            sample_indices = sample_indices.tolist()
        records = self.raw_records(list(sample_indices), tokens)
        fields = {name: records[name] for name in self._dtype.names}
        ids, logprobs = decode_columns(fields, self.layout)
        columns = torch.arange(self.layout.seq_length).unsqueeze(0)
        valid = columns < torch.from_numpy(records["valid_columns"].astype(numpy.int64)).unsqueeze(1)
        tail = torch.from_numpy(records["tail"].astype(numpy.float32))
        if not bool(valid.all()):
            # Padded columns decode as garbage (zeroed records): zero them, as TeacherScores does.
            invalid = ~valid
            ids[invalid] = 0
            logprobs[invalid] = 0.0
            tail[invalid] = 0.0
        return CachedScores(ids, logprobs, tail, valid)

    def check_shard_sizes(self) -> None:
        """Every shard is there with its size (a stat each, no reading); the error names the shard and samples."""
        for shard in range(self.layout.num_shards):
            self._shard(shard, self.layout.shard_samples(shard).start)

    def verify_shards(self) -> None:
        """Read every shard whole and compare its crc32 with the manifest's (a full check; `scores` checks only
        the samples it reads)."""
        for shard in range(self.layout.num_shards):
            name = shard_name(shard)
            crc = zlib.crc32(self._shard(shard, self.layout.shard_samples(shard).start).tobytes())
            if crc != self.manifest["shards"][name]["crc32"]:
                first = self.layout.shard_samples(shard).start
                bad = next((i for i in self.layout.shard_samples(shard)
                            if not self._sample_ok(i)), None)
                raise TeacherCacheError(f"teacher cache {self.directory}: {name} fails its crc32 check"
                                        f"{'' if bad is None else f' (first bad sample {bad})'} (samples {first}-"
                                        f"{self.layout.shard_samples(shard).stop - 1}); rerun cache-teacher")

    def _sample_ok(self, sample: int) -> bool:
        try:
            self.raw_records([sample])
        except TeacherCacheError:
            return False
        return True


def open_cache(directory: str | Path, expect: CacheIdentity | Mapping[str, Any] | None = None,
               verify: bool = True) -> TeacherCacheReader:
    """A finished cache for reading. `expect`: the identity (or some of its fields, e.g. {"topk": 64,
    "tokenizer_hash": ...}) the caller needs; a differing field is a `TeacherCacheMismatchError` naming it and
    both values. Every shard's size is checked here (a missing or truncated shard names itself and its samples)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"teacher cache {directory}: no {MANIFEST}; expected a directory written by "
                                f"`opd-megatron cache-teacher`")
    manifest = _read_json(path)
    if manifest.get("format") != FORMAT_NAME:
        raise TeacherCacheError(f"teacher cache {directory}: {MANIFEST} is not a {FORMAT_NAME!r} manifest")
    version = manifest.get("identity", {}).get("encoding_version")
    if version != ENCODING_VERSION:
        raise TeacherCacheMismatchError(f"teacher cache {directory}: encoding_version: the cache has {version!r}, "
                                        f"this reader reads {ENCODING_VERSION}")
    if expect is not None:
        check_identity(directory, manifest, expect)
    reader = TeacherCacheReader(directory, manifest, verify=verify)
    if not manifest.get("complete"):
        missing = [shard_name(s) for s in range(reader.layout.num_shards)
                   if finished_shard(directory, reader.layout, s) is None]
        raise TeacherCacheError(f"teacher cache {directory}: unfinished ({len(missing)} of {reader.layout.num_shards} "
                                f"shards missing: {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); "
                                f"rerun cache-teacher to finish it")
    reader.check_shard_sizes()
    return reader


def cache_bytes(num_tokens: int, topk: int, vocab_size: int, seq_length: int) -> int:
    """Bytes on disk of a cache of `num_tokens` label columns (what dry-run can report for a token budget)."""
    samples = max(1, math.ceil(num_tokens / seq_length))
    return samples * CacheLayout(samples, seq_length, topk, vocab_size, 1).record_bytes


__all__ = ["BatchScores", "CacheIdentity", "CacheLayout", "CachedScores", "ENCODING_VERSION", "TAIL_FLOOR",
           "TeacherCacheError", "TeacherCacheMismatchError", "TeacherCacheReader", "TeacherCacheWriteError",
           "TeacherCacheWriter", "cache_bytes", "decode_columns", "encode_columns", "finished_shard",
           "logprob_error_bound", "open_cache", "shard_name", "tail_logprob", "tokenizer_fingerprint", "tokens_crc32"]
