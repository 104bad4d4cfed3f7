"""`teacher.kind: cache`: a teacher top-k cache written once by `opd-megatron cache-teacher`
(data/teacher_cache.py) read in place of a live teacher: no teacher model or server at train time.

It scores whole corpus windows, which is what the cache holds: a request's rows must carry their window keys
(`TeacherRequest.sample_keys`, set by the OPD loop for rollout.source corpus offline rows) and start at column 0;
column j of a row is the cache's column j (the teacher's view of token j+1 given the window's tokens 0..j). Each
row's tokens are checked against the crc the cache wrote for its window, so a cache of another corpus, seed or
tokenizer is caught on the first batch, not after training on it. The cache holds the teacher's top-k and the
tail mass only, so what the loss reads is the top-k (the teacher_topk support, renormalised or with the tail);
the sampled-token log-prob, which the diagnostics read, is the top-k value when the token is among them and
otherwise the tail mass spread evenly over the ids outside the top-k (an estimate, named as such in the docs)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from opd_megatron.data.teacher_cache import open_cache
from opd_megatron.teachers.base import Teacher, TeacherError, TeacherRequest, TeacherScores


class CachedTeacher(Teacher):
    """`CachedTeacher(path, expect)`: the cache at `path`, checked against `expect` (fields of its identity the run
    needs: the tokenizer's fingerprint, the window length)."""

    reads_sample_keys = True

    def __init__(self, path: str | Path, expect: Optional[dict] = None, name: str = "cache"):
        self.path = Path(path)
        self.name = name
        self.reader = open_cache(self.path, expect=expect)
        self._vocab = int(self.reader.layout.vocab_size)      # the teacher's, as the cache recorded it
        self.max_topk = int(self.reader.layout.topk)
        self.seq_length = int(self.reader.layout.seq_length)

    def vocab_size(self) -> int:
        return self._vocab

    def score(self, request: TeacherRequest) -> TeacherScores:
        keys = request.sample_keys
        if keys is None or bool((keys < 0).any()):
            raise TeacherError(f"{self.name} ({self.path}): scores corpus windows only; this request has rows without "
                               f"a window key (teacher.kind=cache needs rollout.source=corpus and "
                               f"opd.mixtures.on_policy_fraction=0)")
        if bool((request.score_start != 0).any()) or request.columns > self.seq_length:
            raise TeacherError(f"{self.name} ({self.path}): expected whole windows (score_start 0, at most "
                               f"{self.seq_length} columns), got score_start {request.score_start.tolist()} and "
                               f"{request.columns} columns")
        k = request.topk or 1
        if k > self.max_topk:
            raise TeacherError(f"{self.name} ({self.path}): teacher.topk={k} but the cache holds the top "
                               f"{self.max_topk}; write a cache with a larger teacher.topk")
        columns = request.columns
        # Each row against the crc of the tokens the cache scored for its window (its real tokens, padding apart).
        cached = self.reader.scores(keys, tokens=request.tokens)
        ids = cached.topk_ids[:, :columns, :k]
        logprobs = cached.topk_logprobs[:, :columns, :k].float()
        valid = request.valid_mask() & cached.valid[:, :columns]
        labels = request.tokens[:, 1: columns + 1].long()
        full_ids = cached.topk_ids[:, :columns]
        hit = full_ids == labels.unsqueeze(-1)
        in_topk = torch.where(hit, cached.topk_logprobs[:, :columns].float(), torch.zeros(())).sum(-1)
        # Outside the cached top-k: the tail mass spread evenly over the ids there (an estimate; diagnostics only).
        spread = cached.tail_logprob[:, :columns].float() - math.log(max(1, self._vocab - self.max_topk))
        sampled = torch.where(hit.any(-1), in_topk, spread)
        zero = torch.zeros(())
        scores = TeacherScores(sampled_logprobs=torch.where(valid, sampled, zero), valid=valid,
                               topk_ids=torch.where(valid.unsqueeze(-1), ids, torch.zeros((), dtype=ids.dtype)),
                               topk_logprobs=torch.where(valid.unsqueeze(-1), logprobs, zero),
                               teacher_name=self.name)
        return scores.check(request, self._vocab)

