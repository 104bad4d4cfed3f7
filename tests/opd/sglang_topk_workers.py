"""Process bodies for test_opd_sglang_student_topk.py (importable: spawned processes load them): OPD steps with the
student_topk / union supports, once through the SGLang client against a local server that answers in SGLang's
format from a real (tiny, random) HF teacher, once with the same HF checkpoint as an in-process (dense) teacher."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from opd_megatron.config import load_config
from opd_megatron.math.supports import build_support, divergence_on_support
from opd_megatron.loop.opd import OpdRun
from opd_megatron.parallel.supports import vocab_parallel_build_support
from opd_megatron.rollout.batch import RolloutBatch
from opd_megatron.student.checkpoint import save_checkpoint
from opd_megatron.student.distributed import destroy_parallel, init_parallel
from opd_megatron.student.model import build_student
from opd_megatron.student.optimizer import wrap_for_training

VOCAB = 64        # the tiny HF tokenizer's (and teacher's) vocabulary; the student's too
MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
         "model.num_query_groups=2", f"model.vocab_size={VOCAB}", "model.max_position_embeddings=32"]
SUPPORT_K = 3
STUDENT_TOPK = 5  # teacher.score_student_topk > opd.route_a.support_k: the loss picks its k among the ids sent
ROUTES = {
    "student_tail": ["opd.route_a.support=student_topk", "opd.route_a.support_mode=tail",
                     "opd.route_a.divergence=reverse_kl"],
    "student_renormalized": ["opd.route_a.support=student_topk", "opd.route_a.support_mode=renormalized",
                             "opd.route_a.divergence=forward_kl"],
    "union_tail": ["opd.route_a.support=union", "opd.route_a.support_mode=tail", "opd.route_a.divergence=jsd",
                   "opd.route_a.jsd_beta=0.3"],
    "union_renormalized": ["opd.route_a.support=union", "opd.route_a.support_mode=renormalized",
                           "opd.route_a.divergence=reverse_kl"],
}


def teacher_options(kind: str, route: str, teacher_dir: str, url: str) -> list[str]:
    if kind == "inprocess":
        return ["teacher.kind=inprocess", f"teacher.inprocess.path={teacher_dir}"]
    # student_topk needs no teacher top-k at all (the teacher is known only on the student's ids); union does.
    topk = SUPPORT_K + 1 if route.startswith("union") else 0
    return ["teacher.kind=sglang", f"teacher.topk={topk}", f"teacher.score_student_topk={STUDENT_TOPK}",
            f"teacher.server={{urls: [{url}], vocab_size: {VOCAB}, backoff_s: 0.01, timeout_s: 60}}"]


def config(tp: int, pp: int, out: str, route: str, kind: str, teacher_dir: str, url: str, student_init: str,
           extra=()):
    prompts = Path(out) / "prompts.jsonl"
    return load_config(None, MODEL + [
        "run.algorithm=opd", f"run.output_dir={out}", f"run.name={route}-{kind}", "run.seed=5", "run.train_steps=3",
        f"parallel.tp={tp}", f"parallel.pp={pp}", "parallel.micro_batch_size=4", "parallel.global_batch_size=8",
        "data.seq_length=24", f"data.tokenizer={teacher_dir}", "rollout.source=jsonl", f"rollout.path={prompts}",
        "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=8",
        "checkpoint.resume=false", f"checkpoint.load={student_init}", "optim.optimizer=sgd", "optim.sgd_momentum=0",
        "optim.lr=0.5", "optim.clip_grad=0", "optim.weight_decay=0", "logging.progress_bar=false",
        "logging.tensorboard=false", "eval.prompts=2", "opd.loss=divergence", f"opd.route_a.support_k={SUPPORT_K}",
        *ROUTES[route], *teacher_options(kind, route, teacher_dir, url), *extra])


def write_prompts(out: str) -> None:
    words = ["a b c", "1 2 3 =", "x y z ?", "h e l l o", "5 + 7 =", "q r s t", "m n", "9 8 7", "d e f g", "u v"]
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "prompts.jsonl").write_text("".join(f'{{"prompt": "{w}"}}\n' for w in words))


def fixed_batch() -> RolloutBatch:
    """8 rows (4 prompts x 2) of random ids of the tiny vocabulary (bos 1, eos 2, pad 0), responses of varying
    length, behaviour log-probs made up but fixed."""
    gen = torch.Generator().manual_seed(0)
    prompts, responses, behaviour = [], [], []
    for i in range(8):
        if i % 2 == 0:
            prompt = [1] + torch.randint(4, VOCAB, (int(torch.randint(3, 7, (1,), generator=gen)),),
                                         generator=gen).tolist()
        prompts.append(prompt)
        length = int(torch.randint(3, 10, (1,), generator=gen))
        responses.append(torch.randint(4, VOCAB, (length - 1,), generator=gen).tolist() + [2])
        behaviour.append((-torch.rand(length, generator=gen) * 2.5).tolist())
    return RolloutBatch.from_sequences(prompts, responses, 0, length=20, behaviour_logprobs=behaviour,
                                       group_ids=[i // 2 for i in range(8)])


def make_student_init(path: str) -> None:
    cfg = load_config(None, MODEL + ["run.seed=11", "data.seq_length=24"])
    ctx = init_parallel(cfg)
    trainable = wrap_for_training(build_student(cfg.model, cfg.parallel, ctx.device), cfg.optim, cfg.model, 4)
    save_checkpoint(path, 0, trainable, ctx, {}, cfg.to_dict())
    destroy_parallel()


def _params(run: OpdRun) -> list[torch.Tensor]:
    return [p.detach().clone() for p in run.trainable.module.parameters()]


def parity_steps(tp: int, pp: int, out: str, teacher_dir: str, url: str, student_init: str,
                 routes: list[str]) -> dict:
    """Per route, one OPD step on `fixed_batch()` with the SGLang teacher and with the in-process teacher, from
    the same student weights. Returns, per route: both losses (rank 0), the largest difference of the two
    weight updates relative to the largest in-process update (this rank's shards), the step being finite, and
    the extra ids the served teacher was asked about (this rank's copy of the scores)."""
    write_prompts(out)
    results, ctx = {}, None
    for route in routes:
        got = {}
        for kind in ("sglang", "inprocess"):
            cfg = config(tp, pp, out, route, kind, teacher_dir, url, student_init)
            if ctx is None:
                ctx = init_parallel(cfg)
            run = OpdRun(cfg, ctx)
            before = _params(run)
            batch = fixed_batch()
            scores = run.scoring.scores_for(batch)       # served: the student top-k pass, then the request
            metrics, finite = run.train_step(batch, scores)
            got[kind] = {"loss": None if metrics is None else metrics["loss"], "finite": finite,
                         "delta": [a - b for a, b in zip(_params(run), before)],
                         "extra_ids": None if scores is None else scores.extra_ids}
            run.teacher.close()
        served, dense = got["sglang"], got["inprocess"]
        scale = max(float(d.abs().max()) for d in dense["delta"])
        worst = max(float((a - b).abs().max()) for a, b in zip(served["delta"], dense["delta"]))
        results[route] = {"loss": (served["loss"], dense["loss"]), "finite": (served["finite"], dense["finite"]),
                          "update_scale": scale, "update_diff": worst / max(scale, 1e-30),
                          "extra_ids": served["extra_ids"]}
    return results


def overlap_steps(tp: int, pp: int, out: str, teacher_dir: str, url: str, student_init: str, route: str) -> dict:
    """Three loop steps (rollouts sampled by the student) with teacher.overlap, then step 1 again without overlap.
    Records every student top-k pass: on which thread it ran and how many per batch."""
    write_prompts(out)
    passes: list[bool] = []
    losses = {}
    ctx = None
    for overlap in (True, False):
        cfg = config(tp, pp, out, route, "sglang", teacher_dir, url, student_init,
                     extra=(f"teacher.overlap={str(overlap).lower()}",))
        if ctx is None:
            ctx = init_parallel(cfg)
        run = OpdRun(cfg, ctx)
        original = run.scoring.student_topk

        def recorded(batch, original=original):
            ids = original(batch)
            passes.append(threading.current_thread() is threading.main_thread())
            return ids

        run.scoring.student_topk = recorded
        steps = 3 if overlap else 1
        losses[overlap] = []
        for _ in range(steps):
            batch, scores = run.next_batch()
            metrics, finite = run.train_step(batch, scores)
            assert finite, f"overlap={overlap}: step {run.step + 1} was not finite"
            losses[overlap].append(None if metrics is None else metrics["loss"])
            run.step += 1
        run.scoring.close()
        run.teacher.close()
    return {"passes": passes, "losses": losses}


def support_checks(tp: int = 2) -> int:
    """`vocab_parallel_build_support` with a sparse teacher's `student_ids` (some stale, some -1, tied logits across
    shards) equals the single-device `build_support`: ids, both sides' log-probs, the loss and its gradient, for
    student_topk / union in both modes. Returns the number of checks."""
    from opd_megatron.math.supports import SparseTeacherLogprobs, top_k_positions
    from tests.parallel import supports_workers as sw

    rank = sw._init(tp)
    student, teacher = sw.tied_logits(3), sw.random_logits(4)
    logq = torch.log_softmax(teacher, dim=-1)
    # Candidates: the top-6 of an older student (stale), shuffled, with an unused slot in half of the rows.
    older = top_k_positions(student + 0.5 * sw.random_logits(5), 6)
    candidates = older.gather(-1, torch.argsort(torch.rand(older.shape, generator=torch.Generator().manual_seed(6)),
                                                dim=-1))
    candidates[::2, 0] = -1
    top = top_k_positions(teacher, 4)
    served = SparseTeacherLogprobs(top, logq.gather(-1, top), candidates, logq.gather(-1, candidates.clamp_min(0)),
                                   student_ids=candidates)
    checks = 0
    for support in ("student_topk", "union"):
        for mode in sw.MODES:
            leaf = sw.shard_of(student, tp, rank).requires_grad_(True)
            got = vocab_parallel_build_support(leaf, served, support, 3, mode, true_vocab_size=sw.VOCAB)
            full = student.clone().requires_grad_(True)
            want = build_support(full, served, support, 3, mode)
            case = f"{support} {mode}"
            assert torch.equal(got.ids, want.ids), case
            sw.assert_close(case + " student_logp", got.student_logp.detach(), want.student_logp.detach())
            sw.assert_close(case + " teacher_logp", got.teacher_logp, want.teacher_logp)
            for kind in sw.KINDS:
                loss, ref = divergence_on_support(kind, got), divergence_on_support(kind, want)
                sw.assert_close(case + " loss", loss.detach(), ref.detach())
                grad_leaf = torch.autograd.grad(loss.sum(), leaf, retain_graph=True)[0]
                grad_full = torch.autograd.grad(ref.sum(), full, retain_graph=True)[0]
                sw.assert_close(case + " grad", sw.gather_shards(grad_leaf, tp)[:, :sw.VOCAB], grad_full)
                checks += 1
    return checks
