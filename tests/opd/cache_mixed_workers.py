"""Process bodies for tests/opd/test_opd_cache_mixed.py (importable: spawned processes load them), all at TP=2 on one
gloo world of 2: KD from a teacher cache against the live teacher on the same support, and a run that mixes cached
offline steps with on-policy continuations of corpus prefixes scored by a live teacher.

The vocabulary is 1000 ids (not a multiple of 128): the student's embedding pads to 1024 rows, 512 per TP rank, and
the corpus's words are drawn from every id, so real ids (labels and the teacher's top-k) land on both shards: the
cached ids are looked up on both ranks' shards."""

from __future__ import annotations

import torch

from opd_megatron.config import load_config
from opd_megatron.loop.opd import OpdRun
from opd_megatron.student.distributed import init_parallel

DIVERGENCES = {"forward_kl": [], "reverse_kl": [], "jsd": ["opd.route_a.jsd_beta=0.3"]}
SEED = 10                 # OnPolicyMixture(0.5, 10): steps 0..3 on-policy, offline, on-policy, offline
STEPS = 4
SHARD = 512               # ids per TP rank of the 1024-row padded embedding


def config(files: dict, name: str, divergence: str, teacher: list[str], fraction: float = 0.0):
    return load_config(None, [
        "run.algorithm=opd", f"run.output_dir={files['out']}", f"run.name={name}", f"run.seed={SEED}",
        f"run.train_steps={STEPS}", f"model.from_hf={files['student']}", "parallel.tp=2",
        "parallel.micro_batch_size=4", "parallel.global_batch_size=8", "data.format=indexed",
        f"data.path={files['train']}", "data.seq_length=24", "rollout.source=corpus", "rollout.prefix_tokens=8",
        "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=8",
        f"opd.mixtures.on_policy_fraction={fraction}", "opd.loss=divergence", f"opd.route_a.divergence={divergence}",
        *DIVERGENCES[divergence], "opd.route_a.support=teacher_topk", "opd.route_a.support_k=8",
        "opd.route_a.support_mode=tail", "teacher.topk=8", *teacher, "optim.optimizer=sgd", "optim.lr=0.5",
        "optim.sgd_momentum=0", "optim.clip_grad=0", "optim.weight_decay=0", "optim.warmup_steps=0",
        "optim.decay_style=constant",
        f"eval.path={files['held_out']}", "eval.prompts=2", "logging.rollouts=0", "logging.progress_bar=false",
        "logging.tensorboard=false"])


def live(files: dict) -> list[str]:
    """The live teacher: the cache's teacher checkpoint, colocated (its logits sharded like the student's)."""
    return ["teacher.kind=colocated", f"teacher.colocated.path={files['teacher']}"]


def cached(files: dict, mixed: bool = False) -> list[str]:
    out = ["teacher.kind=cache", f"teacher.cache.path={files['cache']}"]
    if mixed:
        out += ["teacher.cache.live.kind=colocated", f"teacher.cache.live.colocated.path={files['teacher']}"]
    return out


def _weights(run: OpdRun) -> list[torch.Tensor]:
    return [p.detach().clone() for p in run.trainable.module.parameters()]


def _restore(run: OpdRun, weights: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for param, value in zip(run.trainable.module.parameters(), weights):
            param.copy_(value)


def _step(run: OpdRun, batch, scores) -> tuple[dict, list[torch.Tensor]]:
    """One update of `run` on `batch`: the step's metrics (logging rank; {} elsewhere) and this rank's weight
    update."""
    before = _weights(run)
    metrics, applied = run.train_step(batch, scores)
    assert applied
    return metrics or {}, [a - b for a, b in zip(_weights(run), before)]


def _update_gap(got: list[torch.Tensor], want: list[torch.Tensor]) -> tuple[float, float]:
    """(max |got - want|, max |want|) over this rank's weight shards."""
    return (max(float((g - w).abs().max()) for g, w in zip(got, want)), max(float(w.abs().max()) for w in want))


def cache_against_live_and_mixed(files: dict) -> dict:
    """1. For each divergence: one update from the cache and one from the live teacher on the same offline batch
    (whole corpus windows) from the same weights: losses and weight updates (SGD, no clipping: -lr x gradient).
    2. A mixed run (on-policy fraction 0.5, cache + live teacher): its steps, what each asked of which teacher, its
    on-policy step against the live-teacher-only run on the same batch, and a resume at step 2 replayed exactly.
    Returns, on every rank, this rank's numbers (update gaps are per rank: each holds its own shards)."""
    out: dict = {"kd": {}}
    ctx = init_parallel(config(files, "probe", "forward_kl", live(files)))
    out["rank"] = ctx.rank
    runs = {}
    for divergence in DIVERGENCES:
        live_run = OpdRun(config(files, f"live_{divergence}", divergence, live(files)), ctx)
        cache_run = OpdRun(config(files, f"cache_{divergence}", divergence, cached(files)), ctx)
        start = _weights(live_run)
        batch, scores = live_run.next_batch()
        cache_batch, cache_scores = cache_run.next_batch()
        assert scores is None and cache_scores is not None          # the live teacher scores inside the loss
        assert torch.equal(batch.tokens, cache_batch.tokens) and batch.sample_keys is not None
        live_metrics, live_update = _step(live_run, batch, scores)
        cache_metrics, cache_update = _step(cache_run, cache_batch, cache_scores)
        real = batch.tokens[:, 1:][batch.loss_mask > 0]
        cached_ids = cache_scores.topk_ids[cache_scores.valid]
        out["kd"][divergence] = {"live": live_metrics.get("loss"), "cache": cache_metrics.get("loss"),
                                 "update": _update_gap(cache_update, live_update),
                                 "labels_per_shard": torch.bincount(real // SHARD, minlength=2).tolist(),
                                 "topk_per_shard": torch.bincount(cached_ids.flatten() // SHARD,
                                                                  minlength=2).tolist()}
        _restore(live_run, start)
        runs[divergence] = live_run
        cache_run.teacher.close()

    # 2. The mixed run, step by step; the live-only forward_kl run (back at the starting weights) beside it.
    reference = runs["forward_kl"]
    start = _weights(reference)
    mixed = OpdRun(config(files, "mixed", "forward_kl", cached(files, mixed=True), fraction=0.5), ctx)
    composite = mixed.teacher
    steps = []
    for step in range(STEPS):
        if step == 2:
            mixed.save()
        before = dict(composite.requests)
        batch, scores = mixed.next_batch()
        metrics, update = _step(mixed, batch, scores)
        mixed.step += 1
        entry = {"on_policy": bool(batch.on_policy.all()), "keyed": batch.sample_keys is not None,
                 "loss": metrics.get("loss"), "metric_on_policy": metrics.get("rollout/on_policy"),
                 "cache_requests": composite.requests["cache"] - before["cache"],
                 "live_requests": composite.requests["live"] - before["live"]}
        if step == 0:
            # The same on-policy batch, from the same weights, with the live teacher alone.
            live_metrics, live_update = _step(reference, batch, None)
            entry.update(live_only=live_metrics.get("loss"), update_vs_live_only=_update_gap(update, live_update))
            _restore(reference, start)
        steps.append(entry)
    out["mixed"] = steps
    out["teacher_name"] = composite.name
    resumed = OpdRun(config(files, "mixed", "forward_kl", cached(files, mixed=True), fraction=0.5), ctx)
    out["resumed_at"] = resumed.step
    out["resumed"] = []
    while resumed.step < STEPS:
        batch, scores = resumed.next_batch()
        metrics, _ = _step(resumed, batch, scores)
        resumed.step += 1
        out["resumed"].append({"on_policy": bool(batch.on_policy.all()), "loss": metrics.get("loss")})
    for run in (*runs.values(), mixed, resumed):
        run.teacher.close()
    return out
