"""`teacher.kind: cache`: a teacher top-k cache written once by `opd-megatron cache-teacher`
(data/teacher_cache.py) read in place of a live teacher: no teacher model or server at train time.

It scores whole corpus windows, which is what the cache holds: a request's rows must carry their window keys
(`TeacherRequest.sample_keys`, set by the OPD loop for rollout.source corpus offline rows) and start at column 0;
column j of a row is the cache's column j (the teacher's view of token j+1 given the window's tokens 0..j). Each
row's tokens are checked against the crc the cache wrote for its window, so a cache of another corpus, seed or
tokenizer is caught on the first batch, not after training on it. The cache holds the teacher's top-k and the
tail mass only, so what the loss reads is the top-k (the teacher_topk support, renormalised or with the tail);
the sampled-token log-prob, which the diagnostics read, is the top-k value when the token is among them and
otherwise the tail mass spread evenly over the ids outside the top-k (an estimate, named as such in the docs).

`CacheOrLiveTeacher` mixes cached offline KD with on-policy continuations of corpus prefixes in one run
(`teacher.cache.live`, GKD's per-step coin `opd.mixtures.on_policy_fraction`): rows with window keys (an offline
step's whole windows) are read from the cache and call no teacher; rows without (an on-policy step's continuations)
go to the live teacher. Both train on the same top-k + tail support (the cache's top-k, the live teacher's top-k at
teacher.topk), so the losses of the two kinds of step are comparable. When it is built, the live teacher is checked
against the cache's manifest: its vocabulary, and the teacher itself (`check_live_teacher`); the tokenizer and the
temperature are checked by the cache's `expect`, and the live teacher shares the student's tokenizer
(teachers/compat.py)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Optional

import torch

from opd_megatron.config import TeacherMemberSection
from opd_megatron.data.teacher_cache import TeacherCacheMismatchError, open_cache
from opd_megatron.teachers.base import GenerationModel, Teacher, TeacherError, TeacherRequest, TeacherScores


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
                               f"a window key (teacher.kind=cache needs rollout.source=corpus, and a live teacher "
                               f"for the on-policy rows of opd.mixtures.on_policy_fraction > 0: teacher.cache.live)")
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



def files_fingerprint(path: str | Path) -> str:
    """sha256 over a checkpoint's files (relative path and size, and the content of its config.json files): cheap to
    compute on a multi-GB checkpoint, and different for another model or another save of it. The teacher identity a
    cache records (`teacher_identity`) holds it, so a moved checkpoint is still the same teacher."""
    root = Path(path)
    digest = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        digest.update(f"{file.relative_to(root) if file != root else file.name}:{file.stat().st_size}\n".encode())
        if file.name == "config.json":
            digest.update(file.read_bytes())
    return digest.hexdigest()


def teacher_identity(member: TeacherMemberSection, teacher: Teacher) -> dict:
    """The teacher a cache is of (its manifest's `identity.teacher`): kind, name, where it comes from (a served
    teacher's URLs and model name, a local one's path) and its files' fingerprint when it has local ones."""
    identity = {"kind": member.kind, "name": teacher.name}
    if member.kind in ("sglang", "vllm"):
        identity.update(urls=list(member.server.urls), model=member.server.model)
    else:
        path = member.checkpoint_path
        identity.update(path=str(path), files_sha256=files_fingerprint(path))
    return identity


def check_live_teacher(cache: "CachedTeacher", live: Teacher, live_identity: Optional[dict], topk: int) -> None:
    """The live teacher of on-policy rows against the cache of the offline rows, each difference a
    `TeacherCacheMismatchError` naming the field, both values and the key to change: its vocabulary, teacher.topk
    within the cache's k, and (`live_identity` given: teacher.cache.check_live_identity) the teacher itself: a
    local checkpoint's files fingerprint (its path and kind colocated / inprocess may differ), a served teacher's
    model name (its URLs may differ). One local and one served cannot be compared and are refused."""
    where = f"teacher cache {cache.path}"
    if live.vocab_size() != cache.vocab_size():
        raise TeacherCacheMismatchError(f"{where}: vocab_size: the cache's teacher has {cache.vocab_size()} ids, the "
                                        f"live teacher of the on-policy rows ({live.name}) {live.vocab_size()}")
    if topk > cache.max_topk:
        raise TeacherCacheMismatchError(f"{where}: teacher.topk={topk} but the cache holds the top {cache.max_topk}; "
                                        f"set teacher.topk <= {cache.max_topk} (offline and on-policy steps train on "
                                        f"the same top-k) or write a cache with a larger k")
    if live.max_topk is not None and topk > live.max_topk:
        raise TeacherCacheMismatchError(f"{where}: teacher.topk={topk} but the live teacher {live.name} returns at "
                                        f"most the top {live.max_topk}")
    if live_identity is None:
        return
    cached = cache.reader.identity.get("teacher", {})
    for field in ("files_sha256", "model"):
        if field in cached and field in live_identity:
            if cached[field] != live_identity[field]:
                cached_source = cached.get("path") or cached.get("model")
                live_source = live_identity.get("path") or live_identity.get("model")
                raise TeacherCacheMismatchError(
                    f"{where}: teacher.{field}: the cache was written with teacher {cached_source!r} (kind "
                    f"{cached.get('kind')}, {field} {cached[field]!r}); the live teacher of the on-policy rows "
                    f"(teacher.cache.live) is {live_source!r} ({field} {live_identity[field]!r}): another teacher "
                    f"would score the two kinds of step")
            return
    raise TeacherCacheMismatchError(
        f"{where}: teacher: the cache was written with teacher {cached.get('path') or cached.get('model')!r} (kind "
        f"{cached.get('kind')}), the live teacher of the on-policy rows is "
        f"{live_identity.get('path') or live_identity.get('model')!r} (kind {live_identity.get('kind')}): a "
        f"checkpoint's files and a served model's name cannot be compared; if both are the same model, set "
        f"teacher.cache.check_live_identity=false")


class CacheOrLiveTeacher(Teacher):
    """`CacheOrLiveTeacher(cache, live)`: a request whose rows all carry window keys (an offline step's corpus
    windows) is read from `cache`; one whose rows carry none (an on-policy step's continuations, or a dense live
    teacher's micro-batch) goes to `live`. A request mixing both is refused: the loop's coin picks whole batches.

    It gives full logits when the live teacher does (a colocated or in-process teacher scores the on-policy
    micro-batches inside the loss; the loop reads the cache's rows by their keys, `reads_sample_keys`).
    `requests`: how many requests went to each ("cache", "live"), for the run's accounting and the tests."""

    reads_sample_keys = True

    def __init__(self, cache: CachedTeacher, live: Teacher):
        self.cache, self.live = cache, live
        self.name = f"{cache.name}+{live.name}"
        self.gives_full_logits = live.gives_full_logits
        self.max_topk = cache.max_topk if live.max_topk is None else min(cache.max_topk, live.max_topk)
        self.can_generate = live.can_generate
        self.requests = {"cache": 0, "live": 0}

    def vocab_size(self) -> int:
        return self.cache.vocab_size()

    def score(self, request: TeacherRequest) -> TeacherScores:
        keys = request.sample_keys
        keyed = torch.zeros(request.batch_size, dtype=torch.bool) if keys is None else keys >= 0
        if bool(keyed.all()):
            self.requests["cache"] += 1
            return self.cache.score(request)
        if bool(keyed.any()):
            raise TeacherError(f"{self.name}: rows {keyed.nonzero().flatten().tolist()} carry corpus window keys and "
                               f"rows {(~keyed).nonzero().flatten().tolist()} do not; a request is either an offline "
                               f"step's windows (the cache) or an on-policy step's continuations (the live teacher)")
        self.requests["live"] += 1
        return self.live.score(request)

    def state_dict(self) -> dict:
        return self.live.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.live.load_state_dict(state)

    def after_optimizer_step(self) -> None:
        self.live.after_optimizer_step()

    def generation_model(self) -> GenerationModel:
        return self.live.generation_model()

    def close(self) -> None:
        self.live.close()
