"""Process bodies for tests/parallel/test_parallel_routing.py (importable: spawned processes load them).

`parity_worker(tp)` runs every routing check of one TP size in one process group and returns, per rank, a dict of
maximum errors (name -> float) and booleans (name -> passed). The reference `routing.cr_opd_loss` runs on every
rank on the unpadded full logits; the vocab-parallel gradient shards are all-gathered and compared with the
reference gradient over the whole vocabulary."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from opd_megatron import routing as ref
from opd_megatron.parallel.routing import vocab_parallel_cr_opd_loss
from opd_megatron.tensor_checks import MathInputError

ROWS, VOCAB, SPARSE_K = 10, 37, 8  # 37 is not divisible by 2 or 4: the padded vocabulary has padding columns
POSITIVE_ROWS = (0, 1)  # A > 0 and A = 0: the plain policy-gradient term
EMPTY_ROW = 2  # A < 0, student peaked on y_t: C_t is empty under threshold / top-p reach (fallback)
MASKED_ROW = 9

CONFIGS = {
    **{f"threshold_threshold_{w}": ref.RoutingConfig(teacher_support="threshold", teacher_min_prob=0.02,
                                                     student_reach="threshold", student_min_prob=0.02, weights=w,
                                                     eta=0.7)
       for w in ref.ROUTING_WEIGHTS},
    **{f"topk_top_p_{w}": ref.RoutingConfig(teacher_support="topk", teacher_top_k=6, student_reach="top_p",
                                            student_top_p=0.9, student_top_k=2, weights=w)
       for w in ref.ROUTING_WEIGHTS},
    "topk_topk_q": ref.RoutingConfig(teacher_support="topk", teacher_top_k=5, student_reach="topk",
                                     student_top_k=7, weights="q"),
}


def _init(tp: int) -> None:
    from opd_megatron.student.cpu_shims import apply_cpu_shims
    apply_cpu_shims()
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)


def _pad(logits: torch.Tensor, padded: int, fill: float) -> torch.Tensor:
    extra = padded - logits.shape[-1]
    return torch.cat([logits, logits.new_full((*logits.shape[:-1], extra), fill)], dim=-1)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _inputs() -> dict:
    gen = torch.Generator().manual_seed(4321)  # the same draw on every rank
    student = 3.0 * torch.randn(ROWS, VOCAB, generator=gen, dtype=torch.float64)
    teacher = 3.0 * torch.randn(ROWS, VOCAB, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (ROWS,), generator=gen)
    advantages = -0.2 - torch.rand(ROWS, generator=gen, dtype=torch.float64)
    advantages[POSITIVE_ROWS[0]], advantages[POSITIVE_ROWS[1]] = 0.8, 0.0
    student[EMPTY_ROW, ids[EMPTY_ROW]] += 40.0
    mask = torch.ones(ROWS, dtype=torch.bool)
    mask[MASKED_ROW] = False
    return dict(student=student, teacher=teacher, ids=ids, advantages=advantages, mask=mask)


def parity_worker(tp: int) -> dict[str, float | bool]:
    _init(tp)
    rank = parallel_state.get_tensor_model_parallel_rank()
    group = parallel_state.get_tensor_model_parallel_group()
    padded = -(-VOCAB // tp) * tp
    width = padded // tp
    cols = slice(rank * width, (rank + 1) * width)
    data = _inputs()
    student, teacher, ids, adv, mask = (data[k] for k in ("student", "teacher", "ids", "advantages", "mask"))
    junk = 50.0  # padding columns hold finite junk: true_vocab_size alone must keep them out
    s_shard, t_shard = _pad(student, padded, junk)[:, cols], _pad(teacher, padded, -junk)[:, cols]
    weights = torch.linspace(0.5, 1.5, ROWS, dtype=torch.float64)  # a non-uniform upstream gradient
    sparse_logp, sparse_ids = torch.log_softmax(teacher, -1).topk(SPARSE_K, dim=-1)
    teachers = {
        "dense": (dict(teacher_logits=teacher), dict(teacher_logits_shard=t_shard), 1.3),
        "sparse": (dict(teacher_topk_ids=sparse_ids, teacher_topk_logprobs=sparse_logp),
                   dict(teacher_topk_ids=sparse_ids, teacher_topk_logprobs=sparse_logp), 1.0),
    }

    out: dict[str, float | bool] = {}
    for config_name, config in CONFIGS.items():
        for teacher_name, (ref_teacher, vp_teacher, tau_t) in teachers.items():
            name = f"{config_name}/{teacher_name}"
            kw = dict(config=config, student_temperature=0.8, teacher_temperature=tau_t)
            full = student.clone().requires_grad_(True)
            ref_loss, ref_stats = ref.cr_opd_loss(full, ids, adv, mask, **ref_teacher, **kw)
            (ref_loss * weights).sum().backward()

            local = s_shard.clone().requires_grad_(True)
            loss, stats = vocab_parallel_cr_opd_loss(local, ids, adv, mask, **vp_teacher, **kw,
                                                     true_vocab_size=VOCAB)
            (loss * weights).sum().backward()
            shards = [torch.empty_like(local.grad) for _ in range(tp)]
            dist.all_gather(shards, local.grad.contiguous(), group=group)
            grad = torch.cat(shards, dim=-1)

            out[f"{name}/value"] = _err(loss.detach(), ref_loss.detach())
            out[f"{name}/grad"] = _err(grad[:, :VOCAB], full.grad)
            # Chunked along tokens (3 rows at a time, recomputed in backward) equals unchunked, stats included.
            chunked = s_shard.clone().requires_grad_(True)
            chunk_loss, chunk_stats = vocab_parallel_cr_opd_loss(chunked, ids, adv, mask, **vp_teacher, **kw,
                                                                 true_vocab_size=VOCAB, chunk_size=3)
            (chunk_loss * weights).sum().backward()
            out[f"{name}/chunked_value"] = _err(chunk_loss.detach(), loss.detach())
            out[f"{name}/chunked_grad"] = _err(chunked.grad, local.grad)
            out[f"{name}/chunked_stats"] = all(bool((getattr(chunk_stats, f) == getattr(stats, f)).all())
                                               for f in ("candidate_count", "routed", "empty_candidates"))
            # float32 against the float32 reference, relative to the reference's largest magnitude.
            ref32 = student.float().requires_grad_(True)
            ref_teacher32 = {k: v.float() if v.is_floating_point() else v for k, v in ref_teacher.items()}
            vp_teacher32 = {k: v.float() if v.is_floating_point() else v for k, v in vp_teacher.items()}
            ref_loss32, _ = ref.cr_opd_loss(ref32, ids, adv.float(), mask, **ref_teacher32, **kw)
            (ref_loss32 * weights.float()).sum().backward()
            local32 = s_shard.float().requires_grad_(True)
            loss32, _ = vocab_parallel_cr_opd_loss(local32, ids, adv.float(), mask, **vp_teacher32, **kw,
                                                   true_vocab_size=VOCAB, chunk_size=4)
            (loss32 * weights.float()).sum().backward()
            shards32 = [torch.empty_like(local32.grad) for _ in range(tp)]
            dist.all_gather(shards32, local32.grad.contiguous(), group=group)
            out[f"{name}/float32_value_rel"] = (_err(loss32.detach(), ref_loss32.detach())
                                                / ref_loss32.detach().abs().max().item())
            out[f"{name}/float32_grad_rel"] = (_err(torch.cat(shards32, -1)[:, :VOCAB], ref32.grad)
                                               / ref32.grad.abs().max().item())
            out[f"{name}/float32_dtype"] = loss32.dtype == local32.grad.dtype == torch.float32
            out[f"{name}/padding_grad_zero"] = bool((grad[:, VOCAB:] == 0).all())
            for field in ("routed_mass", "candidate_count", "empty_candidates", "routed", "negative_advantage"):
                ours, theirs = getattr(stats, field), getattr(ref_stats, field)
                out[f"{name}/stats_{field}"] = ours.dtype == theirs.dtype and bool(
                    (ours == theirs).all() if field != "routed_mass" else _err(ours, theirs) <= 1e-12)
            # Routed rows: this rank's gradient is exactly 0 off {y_t} U C_t (from the reference's sets).
            with torch.no_grad():
                logp = torch.log_softmax(student / 0.8, -1)
                ref_kw = dict(teacher_logits=teacher) if teacher_name == "dense" else ref_teacher
                support, _ = ref.teacher_support(VOCAB, config, teacher_temperature=tau_t, **ref_kw)
                in_s = ref.candidate_set(support, ref.student_reach(logp, config), ids)
                in_s[torch.arange(ROWS), ids] = True
                in_s_shard = _pad(in_s, padded, False)[:, cols]
            routed = stats.routed
            out[f"{name}/zero_off_S"] = bool((local.grad[routed][~in_s_shard[routed]] == 0).all())
            out[f"{name}/masked_row_zero"] = bool((local.grad[MASKED_ROW] == 0).all())
            out[f"{name}/routed_any"] = bool(routed.any())
            if config.student_reach != "topk":  # a student top-k always reaches k tokens
                out[f"{name}/empty_row_falls_back"] = bool(stats.empty_candidates[EMPTY_ROW]) and not bool(
                routed[EMPTY_ROW])

    # Every position masked: zero loss, zero gradient, nothing routed.
    config = CONFIGS["topk_top_p_q"]
    none = torch.zeros(ROWS, dtype=torch.bool)
    local = s_shard.clone().requires_grad_(True)
    loss, stats = vocab_parallel_cr_opd_loss(local, ids, adv, none, teacher_logits_shard=t_shard, config=config,
                                             true_vocab_size=VOCAB, chunk_size=4)
    loss.sum().backward()
    out["all_masked/zero"] = bool((loss == 0).all() and (local.grad == 0).all() and not stats.routed.any())

    # Bad input: a MathInputError naming the argument, on every rank.
    try:
        vocab_parallel_cr_opd_loss(s_shard, ids, adv, mask, true_vocab_size=VOCAB)
        out["bad/no_teacher"] = False
    except MathInputError as error:
        out["bad/no_teacher"] = "teacher" in str(error)
    probe = torch.ones(1)
    dist.all_reduce(probe, group=group)
    out["bad/group_alive"] = int(probe.item()) == tp
    return out
