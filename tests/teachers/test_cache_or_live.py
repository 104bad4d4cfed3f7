"""A teacher cache with a live teacher for the on-policy rows (`teacher.cache.live`, `CacheOrLiveTeacher`): keyed rows
(an offline step's corpus windows) are read from the cache and call no teacher, unkeyed rows (an on-policy step's
continuations) go to the live teacher; the live teacher is checked against the cache's manifest (vocabulary, k, the
teacher itself); the config says what it needs, and dry-run accepts it. The run itself: tests/opd/
test_opd_cache_mixed.py."""

from __future__ import annotations

import pytest
import torch

from opd_megatron.config import ConfigError, load_config
from opd_megatron.data.teacher_cache import (BatchScores, CacheIdentity, CacheLayout, TeacherCacheMismatchError,
                                             TeacherCacheWriter, logprob_error_bound)
from opd_megatron.teachers.base import TeacherError, TeacherRequest
from opd_megatron.teachers.cached import CachedTeacher, CacheOrLiveTeacher, check_live_teacher, files_fingerprint
from tests.teachers.reference_teacher import ModelTeacher, TinyCausalLM

VOCAB, SEQ, K, SAMPLES = 37, 12, 6, 6


def _windows() -> torch.Tensor:
    """SAMPLES corpus windows of SEQ + 1 tokens (sample i is window key i)."""
    return torch.randint(0, VOCAB, (SAMPLES, SEQ + 1), generator=torch.Generator().manual_seed(3))


def _write_cache(directory, teacher: ModelTeacher, identity: dict, topk: int = K) -> None:
    windows = _windows()

    def score_batch(indices):
        tokens = windows[indices]
        lengths = torch.full((len(indices),), SEQ + 1)
        scores = teacher.score(TeacherRequest(tokens=tokens, lengths=lengths, score_start=torch.zeros_like(lengths),
                                              topk=topk))
        return BatchScores(scores.topk_ids, scores.topk_logprobs, scores.valid, tokens)

    layout = CacheLayout(num_samples=SAMPLES, seq_length=SEQ, topk=topk, vocab_size=VOCAB, samples_per_shard=4)
    writer = TeacherCacheWriter(directory, CacheIdentity(teacher=identity, tokenizer_hash="tok", topk=topk,
                                                         temperature=1.0, vocab_size=VOCAB, dataset={},
                                                         seq_length=SEQ), layout)
    writer.prepare()
    for shard in writer.pending_shards():
        writer.write_shard(shard, score_batch, 2)
    writer.finish()
    teacher.requests.clear()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache of a tiny teacher's top-K, written with a local teacher identity; the teacher; its checkpoint dir."""
    root = tmp_path_factory.mktemp("cache_or_live")
    checkpoint = root / "teacher"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text('{"vocab_size": 37}')
    teacher = ModelTeacher(TinyCausalLM(VOCAB, seed=1), VOCAB, name="tiny")
    _write_cache(root / "cache", teacher, {"kind": "inprocess", "name": "tiny", "path": str(checkpoint),
                                           "files_sha256": files_fingerprint(checkpoint)})
    return root, teacher, checkpoint


def test_keyed_rows_read_the_cache_and_unkeyed_rows_go_to_the_live_teacher(cache):
    root, live, _ = cache
    teacher = CacheOrLiveTeacher(CachedTeacher(root / "cache"), live)
    windows = _windows()[[4, 1]]
    lengths = torch.full((2,), SEQ + 1)
    keyed = TeacherRequest(tokens=windows, lengths=lengths, score_start=torch.zeros_like(lengths), topk=K,
                           sample_keys=torch.tensor([4, 1]))
    offline = teacher.score(keyed)
    assert live.requests == [] and teacher.requests == {"cache": 1, "live": 0}
    # What the cache read is what the live teacher computes on those windows, within the encoding's bound.
    direct = live.score(keyed)
    live.requests.clear()
    # (Entries within one quantisation step may swap places: compare them in id order.)
    got_order, want_order = (torch.sort(s.topk_ids, dim=-1).indices for s in (offline, direct))
    assert torch.equal(offline.topk_ids.gather(-1, got_order), direct.topk_ids.gather(-1, want_order))
    got, want = offline.topk_logprobs.gather(-1, got_order), direct.topk_logprobs.gather(-1, want_order)
    top = direct.topk_logprobs[..., 0]
    bound = logprob_error_bound(top, top - direct.topk_logprobs[..., -1], want) + 2e-3 * top.abs().unsqueeze(-1)
    assert bool(((got - want).abs() <= bound).all())
    # An on-policy step's continuations (no window keys, scored from the prompt's end) go to the live teacher.
    continuation = TeacherRequest(tokens=windows, lengths=lengths, score_start=torch.tensor([5, 7]), topk=K)
    online = teacher.score(continuation)
    assert len(live.requests) == 1 and teacher.requests == {"cache": 1, "live": 1}
    assert torch.equal(online.topk_logprobs, live.score(continuation).topk_logprobs)
    unkeyed = TeacherRequest(tokens=windows, lengths=lengths, score_start=torch.tensor([5, 7]), topk=K,
                             sample_keys=torch.tensor([-1, -1]))
    teacher.score(unkeyed)
    assert teacher.requests == {"cache": 1, "live": 2}
    live.requests.clear()


def test_a_request_mixing_windows_and_continuations_is_refused(cache):
    root, live, _ = cache
    teacher = CacheOrLiveTeacher(CachedTeacher(root / "cache"), live)
    lengths = torch.full((2,), SEQ + 1)
    mixed = TeacherRequest(tokens=_windows()[:2], lengths=lengths, score_start=torch.zeros_like(lengths), topk=K,
                           sample_keys=torch.tensor([0, -1]))
    with pytest.raises(TeacherError, match=r"rows \[0\] carry corpus window keys and rows \[1\] do not"):
        teacher.score(mixed)
    assert live.requests == [] and teacher.requests == {"cache": 0, "live": 0}


def _served(model: str) -> dict:
    return {"kind": "vllm", "name": model, "urls": ["http://teacher:8000"], "model": model}


@pytest.mark.parametrize("case,message", [
    ("same files elsewhere", None),
    ("other files", r"teacher.files_sha256: the cache was written with teacher .*teacher' \(kind inprocess, "
                    r"files_sha256 .* another teacher would score"),
    ("served live", r"teacher: the cache was written with teacher .* \(kind inprocess\), the live teacher of the "
                    r"on-policy rows is 'org/tiny' \(kind vllm\).* set teacher.cache.check_live_identity=false"),
    ("served live, unchecked", None),
    ("k above the cache's", r"teacher.topk=7 but the cache holds the top 6"),
    ("k above the live teacher's", r"teacher.topk=6 but the live teacher tiny returns at most the top 5"),
    ("other vocabulary", r"vocab_size: the cache's teacher has 37 ids, the live teacher .* 40"),
])
def test_the_live_teacher_must_be_the_teacher_of_the_cache(cache, tmp_path, case, message):
    root, live, checkpoint = cache
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "config.json").write_text(checkpoint.joinpath("config.json").read_text())
    identity = {"kind": "colocated", "name": "colocated:moved", "path": str(moved),
                "files_sha256": files_fingerprint(moved)}
    topk = K
    other = ModelTeacher(TinyCausalLM(VOCAB, seed=1), VOCAB, name="tiny")
    if case == "other files":
        (moved / "config.json").write_text('{"vocab_size": 37, "layers": 3}')
        identity["files_sha256"] = files_fingerprint(moved)
    elif case.startswith("served live"):
        identity = None if case.endswith("unchecked") else _served("org/tiny")
    elif case == "k above the cache's":
        topk = K + 1
    elif case == "k above the live teacher's":
        other.max_topk = K - 1
    elif case == "other vocabulary":
        other = ModelTeacher(TinyCausalLM(40, seed=1), 40, name="tiny")
    cached = CachedTeacher(root / "cache")
    if message is None:
        check_live_teacher(cached, other, identity, topk)
    else:
        with pytest.raises(TeacherCacheMismatchError, match=message):
            check_live_teacher(cached, other, identity, topk)


def test_a_served_live_teacher_is_compared_by_its_model_name(tmp_path):
    teacher = ModelTeacher(TinyCausalLM(VOCAB, seed=1), VOCAB, name="org/tiny")
    _write_cache(tmp_path / "cache", teacher, _served("org/tiny"))
    cached = CachedTeacher(tmp_path / "cache")
    # Other URLs, the same model: the same teacher.
    check_live_teacher(cached, teacher, {**_served("org/tiny"), "urls": ["http://elsewhere:9000"]}, K)
    with pytest.raises(TeacherCacheMismatchError, match=r"teacher.model: .*'org/tiny'.* 'org/other'"):
        check_live_teacher(cached, teacher, _served("org/other"), K)


# -- the config ------------------------------------------------------------------------------------------------------

CORPUS = ["run.algorithm=opd", "parallel.global_batch_size=64", "rollout.source=corpus", "data.format=indexed",
          "data.path=/c", "eval.path=/h", "rollout.prefix_tokens=8", "opd.route_a.support=teacher_topk",
          "teacher.topk=16", "teacher.kind=cache", "teacher.cache.path=/cache"]
LIVE = ["teacher.cache.live.kind=inprocess", "teacher.cache.live.inprocess.path=/t"]


@pytest.mark.parametrize("overrides,message", [
    (["opd.mixtures.on_policy_fraction=0.5"], r"teacher.cache.live.kind: expected colocated, inprocess, sglang or "
                                              r"vllm: the teacher of the on-policy rows"),
    (["opd.mixtures.on_policy_fraction=0", *LIVE], r"teacher.cache.live.kind: expected unset with opd.mixtures."
                                                   r"on_policy_fraction=0"),
    (["opd.mixtures.on_policy_fraction=1", *LIVE], r"opd.mixtures.on_policy_fraction: expected below 1 with "
                                                   r"teacher.kind=cache"),
    (["opd.mixtures.on_policy_fraction=0.5", "teacher.cache.live.kind=inprocess"],
     r"teacher.cache.live.inprocess.path: expected a checkpoint directory"),
    (["opd.mixtures.on_policy_fraction=0.5", "teacher.cache.live.kind=vllm"], r"teacher.cache.live.server.urls"),
    (["opd.mixtures.on_policy_fraction=0.5", *LIVE, "teacher.cache.live.temperature=2"],
     r"unknown config key 'teacher.cache.live.temperature'"),
    (["opd.mixtures.on_policy_fraction=0.5", "teacher.cache.live.kind=cache"],
     r"teacher.cache.live.kind: expected one of \['colocated', 'inprocess', 'sglang', 'vllm'\]"),
    (["opd.mixtures.on_policy_fraction=0.5", *LIVE, "opd.route_a.support=full"],
     r"teacher.kind=cache gives sampled-token and top-k logprobs only"),
    (["opd.mixtures.on_policy_fraction=0.5", *LIVE, "opd.loss=policy_gradient"],
     r"opd.mixtures.on_policy_fraction: expected 1.0 unless opd.loss=divergence|opd.loss: expected divergence"),
    (["opd.mixtures.on_policy_fraction=0.5", *LIVE, "teacher.overlap=true"], r"teacher.overlap: expected false"),
    (["opd.mixtures.on_policy_fraction=0.5", "teacher.cache.live.kind=colocated",
      "teacher.cache.live.colocated.path=/t", "teacher.cache.live.colocated.model.preset=small",
      "teacher.cache.live.colocated.model.vocab_size=1024"],
     r"the live teacher of the on-policy rows: an embedding of 1024 rows"),
])
def test_what_the_config_of_a_mixed_run_must_say(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, CORPUS + overrides)


def test_dry_run_accepts_a_mixed_run_and_counts_its_live_teacher():
    from opd_megatron.tools.dry_run import estimate_memory, format_opd_notes, run_dry_run

    colocated = ["opd.mixtures.on_policy_fraction=0.25", "teacher.cache.live.kind=colocated",
                 "teacher.cache.live.colocated.path=/t", "teacher.cache.live.colocated.model.preset=small",
                 "teacher.cache.live.colocated.model.vocab_size=512"]
    cfg = load_config(None, CORPUS + colocated)
    assert cfg.teacher.live_member.kind == "colocated" and cfg.teacher.dense_on_some_steps
    estimate = estimate_memory(cfg, 1)
    notes = "\n".join(format_opd_notes(cfg, estimate))
    assert "teacher cache.live: small" in notes and "teacher cache, read by teacher.kind=cache" in notes, notes
    # Its on-policy steps hold the live teacher's weights and a micro-batch of its logits on the last stage.
    assert estimate.stages[-1].teacher > 0 and estimate.stages[-1].teacher_logits > 0
    served = ["opd.mixtures.on_policy_fraction=0.25", "teacher.cache.live.kind=vllm",
              "teacher.cache.live.server.urls=[http://t:8000]", "teacher.cache.live.server.model=org/t",
              "teacher.cache.live.server.vocab_size=32000"]
    report = run_dry_run(None, CORPUS + served)
    assert "teacher cache: read from disk: nothing on the training GPUs; its on-policy rows' live teacher (vllm) is " \
           "served" in report, report
    assert load_config(None, CORPUS + served).teacher.dense_on_some_steps is False
