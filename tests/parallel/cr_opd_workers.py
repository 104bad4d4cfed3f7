"""Process bodies for tests/parallel/test_cr_opd.py (importable: spawned processes load them).

`parity_worker(tp)` runs every routing check of one TP size in one process group and returns, per rank, a dict of
maximum errors (name -> float) and booleans (name -> passed). The reference `math/cr_opd.py::cr_opd_loss` runs on every
rank on the unpadded full logits; the vocab-parallel gradient shards are all-gathered and compared with the
reference gradient over the whole vocabulary. `_spread_checks` adds the spec's properties of both routed forms on a
vocabulary (203) whose sampled ids and candidate sets land on every TP rank."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from opd_megatron.math import cr_opd as ref
from opd_megatron.parallel.cr_opd import vocab_parallel_cr_opd_loss
from opd_megatron.math.checks import MathInputError

ROWS, VOCAB, SPARSE_K = 10, 37, 8  # 37 is not divisible by 2 or 4: the padded vocabulary has padding columns
POSITIVE_ROWS = (0, 1)  # A > 0 and A = 0: the plain policy-gradient term
EMPTY_ROW = 2  # A < 0, student peaked on y_t: C_t is empty under threshold / top-p reach (fallback)
MASKED_ROW = 9

_MATCHED = {  # the default form
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
CONFIGS = {**_MATCHED, **{f"kl_target_{name}": dataclasses.replace(_MATCHED[name], form="kl_target")
                          for name in ("threshold_threshold_q", "topk_top_p_sqrt_q_pi", "topk_topk_q")}}
assert all(config.form == "matched" for config in _MATCHED.values())

# The spread vocabulary: not a multiple of 128 (nor of 2 or 4: padding columns at TP=2 and 4). Rows 0-4 are routed
# (A < 0) with sampled ids on TP=4 ranks 0, 1, 2, 3, 0 and candidates in every quarter of the vocabulary; row 5 has
# A > 0, row 6 A = 0, row 7 A < 0 with the student peaked on y_t (C_t empty under both spread configs).
SPREAD_VOCAB, SPREAD_ROUTED = 203, 5
SPREAD_IDS = (17, 70, 121, 180, 45, 100, 150, 199)
SPREAD_ADVANTAGES = (-0.3, -1.5, -0.8, -0.05, -2.5, 0.7, 0.0, -0.9)
SPREAD_TAU = 0.9
SPREAD_CONFIGS = {
    f"{form}_{name}": dataclasses.replace(config, form=form)
    for form in ref.ROUTING_FORMS
    for name, config in {
        "topk_top_p": ref.RoutingConfig(teacher_support="topk", teacher_top_k=6, student_reach="top_p",
                                        student_top_p=0.95, student_top_k=4, weights="q", eta=0.8),
        "threshold_threshold": ref.RoutingConfig(teacher_support="threshold", teacher_min_prob=0.01,
                                                 student_reach="threshold", student_min_prob=0.005,
                                                 weights="sqrt_q_pi", eta=0.8),
    }.items()}


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


def _spread_inputs() -> dict:
    """Logits `[8, 203]` (the same draw on every rank): each row's student and teacher are boosted on two ids in
    every quarter of the vocabulary (so `C_t` has members on every TP rank), row 0's teacher also on `y_0` (which
    `C_t` must exclude), row 7's student peaked on `y_7` (an empty `C_t`)."""
    gen = torch.Generator().manual_seed(2024)
    rows, vocab = len(SPREAD_IDS), SPREAD_VOCAB
    student = torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    teacher = torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    ids = torch.tensor(SPREAD_IDS)
    quarter = vocab // 4
    for row in range(rows):
        spread = [q * quarter + (13 * row + 7 * j + 3) % quarter for q in range(4) for j in range(2)]
        student[row, spread] += 6.0
        teacher[row, spread] += 6.0
    teacher[0, SPREAD_IDS[0]] += 8.0
    student[7, SPREAD_IDS[7]] += 40.0
    return dict(student=student, teacher=teacher, ids=ids,
                advantages=torch.tensor(SPREAD_ADVANTAGES, dtype=torch.float64))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return _err(a, b) / max(b.double().abs().max().item(), 1e-300)


def _spread_checks(tp: int, rank: int, group) -> dict[str, float | bool]:
    """Both routed forms on the spread vocabulary, the twin against the reference and against the spec's properties
    (gradients wrt the raw logits, so every push carries the same 1 / tau as the plain PG term's)."""
    vocab, routed_rows = SPREAD_VOCAB, torch.arange(SPREAD_ROUTED)
    padded = -(-vocab // tp) * tp
    width = padded // tp
    cols = slice(rank * width, (rank + 1) * width)
    data = _spread_inputs()
    student, teacher, ids, adv = (data[k] for k in ("student", "teacher", "ids", "advantages"))
    s_shard, t_shard = _pad(student, padded, 50.0)[:, cols], _pad(teacher, padded, -50.0)[:, cols]

    def twin(config, advantages):
        local = s_shard.clone().requires_grad_(True)
        loss, stats = vocab_parallel_cr_opd_loss(local, ids, advantages, teacher_logits_shard=t_shard, config=config,
                                                 student_temperature=SPREAD_TAU, true_vocab_size=vocab, chunk_size=3)
        loss.sum().backward()
        shards = [torch.empty_like(local.grad) for _ in range(tp)]
        dist.all_gather(shards, local.grad.contiguous(), group=group)
        return loss.detach(), stats, torch.cat(shards, dim=-1)

    # The plain PG term -A log pi(y) and its gradient on the raw logits, by autograd on the full vocabulary.
    plain_leaf = student.clone().requires_grad_(True)
    plain_loss = -adv * torch.log_softmax(plain_leaf / SPREAD_TAU, -1).gather(-1, ids[:, None]).squeeze(-1)
    plain_loss.sum().backward()
    plain = plain_leaf.grad
    logp = torch.log_softmax(student / SPREAD_TAU, -1)
    pi_y = logp.gather(-1, ids[:, None]).squeeze(-1).exp()
    rows = torch.arange(len(SPREAD_IDS))

    out: dict[str, float | bool] = {}
    for name, config in SPREAD_CONFIGS.items():
        name = f"spread/{name}"
        full = student.clone().requires_grad_(True)
        ref_loss, ref_stats = ref.cr_opd_loss(full, ids, adv, teacher_logits=teacher, config=config,
                                              student_temperature=SPREAD_TAU)
        ref_loss.sum().backward()
        loss, stats, grad_padded = twin(config, adv)
        grad = grad_padded[:, :vocab]
        support, logq = ref.teacher_support(vocab, config, teacher_logits=teacher)
        cand = ref.candidate_set(support, ref.student_reach(logp, config), ids)
        rho = ref.routing_weights(cand, logq, logp, config.weights)
        in_s = cand.clone()
        in_s[rows, ids] = True
        routed = stats.routed
        r = routed_rows

        # The layout the checks rely on: rows 0-4 routed, sampled ids and candidates on every rank, y_0 excluded.
        out[f"{name}/routed_rows_0_to_4"] = routed.tolist() == [True] * SPREAD_ROUTED + [False] * 3
        out[f"{name}/sampled_ids_on_every_rank"] = set((ids[r] // width).tolist()) == set(range(tp))
        out[f"{name}/candidates_on_every_rank"] = all(bool(cand[r][:, p * width:(p + 1) * width].any())
                                                      for p in range(tp))
        out[f"{name}/sampled_id_not_a_candidate"] = bool(support[0, SPREAD_IDS[0]]) and not bool(cand[0, SPREAD_IDS[0]])
        # Twin == reference: value, gradient, statistics.
        out[f"{name}/value_rel"] = _rel(loss, ref_loss.detach())
        out[f"{name}/grad_rel"] = _rel(grad, full.grad)
        out[f"{name}/routed_mass_rel"] = _rel(stats.routed_mass, ref_stats.routed_mass)
        out[f"{name}/stats"] = all(bool((getattr(stats, f) == getattr(ref_stats, f)).all())
                                   for f in ("candidate_count", "empty_candidates", "routed", "negative_advantage"))
        # Zero gradient outside {y_t} U C_t (exactly), and on the padding columns.
        off = grad[r][~in_s[r]]
        out[f"{name}/zero_off_S"] = bool((off == 0).all()) and bool((grad_padded[:, vocab:] == 0).all())
        # A >= 0 and an empty C_t: exactly the plain PG term (value and gradient).
        fallback = torch.arange(SPREAD_ROUTED, len(SPREAD_IDS))
        out[f"{name}/empty_row_flagged"] = bool(stats.empty_candidates[7]) and int(stats.candidate_count[7]) == 0
        out[f"{name}/fallback_value_rel"] = _rel(loss[fallback], plain_loss.detach()[fallback])
        out[f"{name}/fallback_grad_rel"] = _rel(grad[fallback], plain[fallback])
        push_y = grad[r, ids[r]]
        push_c = (grad[r] * cand[r]).sum(-1)
        if config.form == "matched":
            # The push on z_y is the plain PG term's; C_t gets minus it, split by rho; linear in A.
            out[f"{name}/push_on_y_rel"] = _rel(push_y, plain[r, ids[r]])
            out[f"{name}/push_on_C_rel"] = _rel(push_c, -plain[r, ids[r]])
            out[f"{name}/split_by_rho_rel"] = _rel(grad[r] * cand[r], -plain[r, ids[r]].unsqueeze(-1) * rho[r])
            out[f"{name}/routed_mass_is_push_rel"] = _rel(stats.routed_mass[r], adv[r].abs() * (1 - pi_y[r]))
            _, _, grad_doubled = twin(config, 2.0 * adv)
            out[f"{name}/linear_in_A_rel"] = _rel(grad_doubled[:, :vocab], 2.0 * grad)
        else:
            # The moved mass is delta_t = pi(y) (1 - exp(eta A)): off y_t and onto C_t (gradient |A| delta / tau).
            delta = pi_y[r] * -torch.expm1(config.eta * adv[r])
            scale = adv[r].abs() / SPREAD_TAU
            out[f"{name}/delta_off_y_rel"] = _rel(push_y / scale, delta)
            out[f"{name}/delta_onto_C_rel"] = _rel(-push_c / scale, delta)
            out[f"{name}/routed_mass_is_delta_rel"] = _rel(stats.routed_mass[r], delta)
    return out


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
    out.update(_spread_checks(tp, rank, group))
    return out
