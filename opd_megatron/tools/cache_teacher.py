"""`opd-megatron cache-teacher --config CFG --output DIR`: a teacher's top-k over an indexed corpus, written once into
the sharded cache of `data/teacher_cache.py` for offline KD to read many times.

The config's `data` section names the corpora (data.format indexed, data.path or data.blend, data.seq_length,
data.tokenizer), its `teacher` section the teacher (any single kind: inprocess, colocated at the job's
parallel.tp/pp, vllm, sglang) and teacher.topk the k. Sample i of the cache is the window whose key is i
(`CorpusBlend.window_sample`: every window of every corpus once, whatever the blend's weights), scored as one row
with every real column valid: the label that opens a new document is scored too (the loss masks it, not the cache).

Parallel: under torchrun each data-parallel replica takes the shards s with s % dp == dp_rank; inside a replica
every rank scores (a colocated teacher's forward is collective over TP) and the first TP rank of the last pipeline
stage writes. A rerun resumes: finished shards are skipped, never rewritten; a run for another teacher, tokenizer, k,
temperature or corpus into the same directory is refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from opd_megatron.config import ConfigError, RunConfig
from opd_megatron.data import build_dataset
from opd_megatron.data.indexed import CorpusBlend
from opd_megatron.data.teacher_cache import (BatchScores, CacheIdentity, CacheLayout, TeacherCacheWriter, shard_name,
                                             tokenizer_fingerprint)
from opd_megatron.data.tokenizer import load_tokenizer
from opd_megatron.student.distributed import destroy_parallel, init_parallel
from opd_megatron.student.model import padded_vocab_size
from opd_megatron.teachers.base import Teacher, TeacherRequest
from opd_megatron.teachers.cached import teacher_identity
from opd_megatron.teachers.factory import build_teacher

DEFAULT_SAMPLES_PER_SHARD = 256


@dataclass
class CacheTeacherResult:
    """What one `cache-teacher` run did (on rank 0: over all ranks)."""
    output: Path
    shards: int                 # shards in the cache
    shards_written: int         # written by this run (the others were finished before)
    columns_scored: int         # label columns scored by this run, all ranks together
    wall_s: float
    bytes_per_token: float
    teacher_share: float = 0.0  # of rank 0's time writing shards, the share inside Teacher.score (the rest: reading
    #                             windows, encoding, writing)
    loop_cpu_s: float = 0.0     # CPU seconds of rank 0's process over the shards' loop (all its threads; not the
    #                             teacher's loading): what the loop costs, which other load on the machine hardly moves

    @property
    def tokens_per_s(self) -> float:
        return self.columns_scored / self.wall_s if self.wall_s > 0 else 0.0


def check_cacheable(cfg: RunConfig) -> None:
    """What cache-teacher needs of the config, as ConfigErrors naming the key."""
    if cfg.data.format != "indexed":
        raise ConfigError(f"data.format: cache-teacher reads an indexed corpus (`opd-megatron preprocess`); expected "
                          f"'indexed', got {cfg.data.format!r}")
    if cfg.teacher.topk < 1:
        raise ConfigError(f"teacher.topk: the number of top-k log-probs to cache per token; expected an integer >= 1, "
                          f"got {cfg.teacher.topk}")
    if cfg.teacher.kind in ("multi", "self"):
        raise ConfigError(f"teacher.kind: cache-teacher caches one teacher; expected inprocess, colocated, vllm or "
                          f"sglang, got {cfg.teacher.kind!r}")
    if cfg.data.reset_attention_mask:
        # A TeacherRequest has no attention mask: the teacher would see the earlier documents of a window that the
        # student, with this option, does not.
        raise ConfigError("data.reset_attention_mask: cache-teacher scores a window as one sequence, across its "
                          "documents; expected false (the student then sees the same context)")


def window_rows(blend: CorpusBlend, keys: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows by key -> (tokens `[B, S + 1]` int64, lengths `[B]`): each window's first input followed by its labels
    (label j is token j + 1, so a partial last window's real tokens are its first input and its real labels, where its
    inputs end in padding); the real length counted from the corpus's size."""
    seq_length = blend.seq_length
    offsets = [0]
    for corpus in blend.corpora:
        offsets.append(offsets[-1] + len(corpus))
    rows, lengths = [], []
    for key in keys:
        corpus = next(c for c in range(len(blend.corpora)) if key < offsets[c + 1])
        sample = blend.window_sample(key)
        rows.append(torch.cat([sample.tokens[:1], sample.labels]))
        start = (key - offsets[corpus]) * seq_length
        lengths.append(min(seq_length + 1, blend.corpora[corpus].num_tokens - start))
    return torch.stack(rows).long(), torch.tensor(lengths, dtype=torch.long)


def corpora_identity(blend: CorpusBlend) -> dict:
    """The `dataset` of a cache's identity: what the windows' tokens depend on, the number of windows, the prefixes."""
    described = blend.identity()
    return {"windows_fingerprint": described["windows_fingerprint"], "num_windows": blend.num_windows,
            "seq_length": blend.seq_length, "packing": described["packing"],
            "prefixes": [corpus.prefix for corpus in blend.corpora]}


@dataclass
class TeacherClock:
    """Seconds spent inside `Teacher.score`."""
    seconds: float = 0.0


def scorer(teacher: Teacher, blend: CorpusBlend, topk: int,
           clock: Optional[TeacherClock] = None) -> Callable[[Sequence[int]], BatchScores]:
    """`score_batch` for the writer: the samples as one request, every column of each row scored."""
    def score_batch(indices: Sequence[int]) -> BatchScores:
        tokens, lengths = window_rows(blend, indices)
        if bool((lengths < 2).any()):
            raise ValueError(f"samples {list(indices)}: a sample with no label column (lengths {lengths.tolist()})")
        request = TeacherRequest(tokens=tokens, lengths=lengths, score_start=torch.zeros_like(lengths), topk=topk)
        start = time.perf_counter()
        scores = teacher.score(request)
        if clock is not None:
            clock.seconds += time.perf_counter() - start
        return BatchScores(scores.topk_ids, scores.topk_logprobs, scores.valid, tokens)
    return score_batch


def run_cache_teacher(cfg: RunConfig, output: str | Path, samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
                      batch_size: Optional[int] = None, log: Callable[[str], None] = print) -> CacheTeacherResult:
    """Score the corpus of `cfg.data` with `cfg.teacher` into the cache at `output` (resuming an unfinished one).
    batch_size: samples per teacher request (default parallel.micro_batch_size)."""
    check_cacheable(cfg)
    ctx = init_parallel(cfg)
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        blend = build_dataset(cfg.data, tokenizer, seed=cfg.run.seed)
        # The cache keeps top-k only: an in-process teacher need not copy its whole [B, L-1, V] logits per request.
        teacher, _ = build_teacher(cfg, ctx.device, tokenizer, padded_vocab_size(cfg.model.embedding_rows, ctx.tp),
                                   full_logits=False)
        k = cfg.teacher.topk
        identity = CacheIdentity(teacher=teacher_identity(cfg.teacher.as_member(), teacher),
                                 tokenizer_hash=tokenizer_fingerprint(tokenizer), topk=k,
                                 temperature=float(cfg.teacher.temperature), vocab_size=teacher.vocab_size(),
                                 dataset=corpora_identity(blend), seq_length=cfg.data.seq_length)
        layout = CacheLayout(num_samples=blend.num_windows, seq_length=cfg.data.seq_length, topk=k,
                             vocab_size=teacher.vocab_size(), samples_per_shard=samples_per_shard)
        writer = TeacherCacheWriter(output, identity, layout)
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        if ctx.rank == 0:
            writer.prepare(create=True)
        if distributed:
            dist.barrier()
        if ctx.rank != 0:
            writer.prepare(create=False)
        # Every rank lists its replica's unfinished shards before anyone writes, so that the ranks of one replica
        # (scoring together) agree on the list.
        pending = writer.pending_shards(ctx.dp_rank, ctx.dp)
        if distributed:
            dist.barrier()
        writes = ctx.tp_rank == 0 and ctx.is_last_stage
        clock = TeacherClock()
        score_batch = scorer(teacher, blend, k, clock)
        batch = batch_size or cfg.parallel.micro_batch_size
        if ctx.rank == 0:
            log(f"[cache-teacher] {blend.num_windows} windows x {cfg.data.seq_length} tokens, top-{k}, "
                f"{layout.num_shards} shards of {samples_per_shard} ({layout.bytes_per_token:.1f} B/token) -> "
                f"{output}; this replica: {len(pending)} shards to write")
        start, cpu_start = time.perf_counter(), time.process_time()
        columns = 0
        for shard in pending:
            if writes:
                columns += writer.write_shard(shard, score_batch, batch).columns
                if ctx.dp_rank == 0:
                    log(f"[cache-teacher] wrote {shard_name(shard)} ({columns / (time.perf_counter() - start):.0f} "
                        f"tokens/s on this replica)")
            elif ctx.is_last_stage:
                # The other TP ranks of the scoring stage take part in the teacher's collectives; earlier pipeline
                # stages hold no teacher (a colocated teacher scores on the last stage) and only wait.
                samples = layout.shard_samples(shard)
                for first in range(samples.start, samples.stop, batch):
                    score_batch(list(range(first, min(first + batch, samples.stop))))
        wall, loop_cpu = time.perf_counter() - start, time.process_time() - cpu_start
        totals = torch.tensor([float(columns), float(len(pending) if writes else 0), wall], dtype=torch.float64,
                              device=ctx.device)
        if distributed:
            dist.all_reduce(totals[:2])
            wall_max = totals[2:].clone()
            dist.all_reduce(wall_max, op=dist.ReduceOp.MAX)
            totals[2] = wall_max[0]
            dist.barrier()
        if ctx.rank == 0:
            manifest = writer.finish()
            log(f"[cache-teacher] done: {len(manifest['shards'])} shards in {output}")
        result = CacheTeacherResult(Path(output), layout.num_shards, int(totals[1]), int(totals[0]), float(totals[2]),
                                    layout.bytes_per_token, clock.seconds / wall if wall > 0 else 0.0, loop_cpu)
        teacher.close()
        return result
    finally:
        destroy_parallel()


def result_line(result: CacheTeacherResult) -> str:
    return (f"[opd-megatron] cache-teacher: {result.columns_scored} tokens scored in {result.wall_s:.1f} s = "
            f"{result.tokens_per_s:.0f} tokens/s ({100 * result.teacher_share:.0f}% of it in the teacher); "
            f"{result.shards_written} of {result.shards} shards written by this run ({result.bytes_per_token:.1f} "
            f"B/token) in {result.output}")


__all__ = ["CacheTeacherResult", "TeacherClock", "check_cacheable", "corpora_identity",
           "result_line", "run_cache_teacher", "scorer", "window_rows"]
