"""Diagnostics: every value against a direct computation on a small hand-made batch, masked positions excluded,
missing inputs leave their keys out, and no NaN/inf on extreme inputs."""

import math
import statistics

import pytest
import torch
from hypothesis import given, settings, strategies as st

from opd_megatron.math.diagnostics import DiagnosticsBatch, DiagnosticsSettings, batch_diagnostics
from opd_megatron.math.cr_opd import RoutingConfig, cr_opd_loss
from opd_megatron.math.checks import MathInputError

F64 = torch.float64
STUDENT = [[[2.0, 1.0, 0.0, -1.0], [0.5, 0.4, 3.0, -2.0], [1.0, 2.0, 3.0, 4.0]],
           [[-1.0, 0.0, 0.2, 1.5], [3.0, -3.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]]
TEACHER = [[[1.0, 2.5, -1.0, 0.0], [0.0, 1.0, 2.0, -1.0], [4.0, 3.0, 2.0, 1.0]],
           [[0.3, 0.0, 2.0, 1.0], [2.0, -1.0, 1.5, 0.5], [1.0, 1.0, 1.0, 1.0]]]
IDS = [[1, 2, 3], [3, 0, 1]]
MASK = [[1, 1, 1], [1, 1, 0]]
KEPT = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
TOP2 = DiagnosticsSettings(top_k=2)


def softmax(row):
    top = max(row)
    e = [math.exp(x - top) for x in row]
    return [x / sum(e) for x in e]


def inputs():
    return dict(mask=torch.tensor(MASK), student_logits=torch.tensor(STUDENT, dtype=F64),
                teacher_logits=torch.tensor(TEACHER, dtype=F64), sampled_ids=torch.tensor(IDS))


def direct():
    """The diagnostics by plain Python over the kept positions."""
    r, rkl, match, overlap, mass, h_q, h_pi = [], [], [], [], [], [], []
    for b, t in KEPT:
        pi, q, y = softmax(STUDENT[b][t]), softmax(TEACHER[b][t]), IDS[b][t]
        r.append(math.log(q[y]) - math.log(pi[y]))
        rkl.append(sum(p * (math.log(p) - math.log(qq)) for p, qq in zip(pi, q)))
        match.append(float(max(range(4), key=lambda v: q[v]) == y))
        top_q = set(sorted(range(4), key=lambda v: -q[v])[:2])
        top_pi = set(sorted(range(4), key=lambda v: -pi[v])[:2])
        overlap.append(len(top_q & top_pi) / 2)
        mass.append(sum(pi[v] for v in top_q))
        h_q.append(-sum(p * math.log(p) for p in q))
        h_pi.append(-sum(p * math.log(p) for p in pi))
    return dict(r=r, rkl=rkl, match=match, overlap=overlap, mass=mass, h_q=h_q, h_pi=h_pi)


def quantile(values, q):
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def test_each_value_against_a_direct_computation():
    d = direct()
    out = batch_diagnostics(DiagnosticsBatch(**inputs()), TOP2)
    mean = statistics.fmean
    expected = {
        "tokens/count": 5.0,
        "log_ratio/mean": mean(d["r"]),
        "log_ratio/std": statistics.pstdev(d["r"]),
        "log_ratio/negative_share": sum(x < 0 for x in d["r"]) / 5,
        "kl/k1": mean(-x for x in d["r"]),
        "kl/k2": mean(x * x / 2 for x in d["r"]),
        "kl/k3": mean(math.exp(x) - 1 - x for x in d["r"]),
        "kl/rkl_exact": mean(d["rkl"]),
        "agreement/teacher_top1_match": mean(d["match"]),
        "agreement/topk_overlap": mean(d["overlap"]),
        "agreement/student_mass_on_teacher_support": mean(d["mass"]),
        "entropy/teacher": mean(d["h_q"]),
        "entropy/student": mean(d["h_pi"]),
    }
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        expected[f"log_ratio/q{round(100 * q):02d}"] = quantile(d["r"], q)
    assert out == pytest.approx(expected, rel=1e-12, abs=1e-14)
    # The hand-made batch is not degenerate: the shares are strictly between 0 and 1.
    assert 0 < out["log_ratio/negative_share"] < 1 and 0 < out["agreement/teacher_top1_match"] < 1
    assert 0 < out["agreement/topk_overlap"] < 1


def test_sampled_token_inputs_importance_value_rollout_and_throughput():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    student_lp = torch.tensor([[-0.5, -1.0, -9.0], [-2.0, 5.0, 0.0]], dtype=F64)
    teacher_lp = torch.tensor([[-0.2, -3.0, -9.0], [-1.0, 7.0, 0.0]], dtype=F64)
    old = torch.tensor([[-0.4, -1.5, 30.0], [-1.0, -50.0, 0.0]], dtype=F64)        # pi_theta_old (loss's dist.)
    behaviour = torch.tensor([[-0.1, -1.5, 0.0], [-3.0, 0.0, 0.0]], dtype=F64)     # mu (what sampled)
    adv = torch.tensor([[1.0, -2.0, 100.0], [0.5, 100.0, 100.0]], dtype=F64)
    values = torch.tensor([[0.5, 1.0, 9.0], [2.0, 9.0, 9.0]], dtype=F64)
    targets = torch.tensor([[1.0, 0.0, -9.0], [2.5, -9.0, -9.0]], dtype=F64)
    out = batch_diagnostics(DiagnosticsBatch(
        mask, student_logprobs=student_lp, teacher_logprobs=teacher_lp, behaviour_logprobs=behaviour,
        old_logprobs=old, advantages=adv, values=values, value_targets=targets, staleness=torch.tensor([0, 2]),
        response_lengths=torch.tensor([2, 1]), teacher_tokens=300, wall_time_s=1.5,
        gate_keep_rates={"sign": 0.25, "all": 0.2}), DiagnosticsSettings(ratio_interval=(0.8, 1.2)))
    ratio = [math.exp(-0.5 + 0.4), math.exp(-1.0 + 1.5), math.exp(-2.0 + 1.0)]     # the PPO ratio pi / pi_old
    mismatch = [math.exp(-0.4 + 0.1), math.exp(-1.5 + 1.5), math.exp(-1.0 + 3.0)]  # pi_old / mu
    g, v = [1.0, 0.0, 2.5], [0.5, 1.0, 2.0]
    residual = [a - b for a, b in zip(g, v)]
    expected = {
        "importance/ratio_mean": statistics.fmean(ratio), "importance/ratio_max": max(ratio),
        "importance/ratio_min": min(ratio), "importance/clip_fraction": 2 / 3,
        "mismatch/ratio_mean": statistics.fmean(mismatch), "mismatch/ratio_max": max(mismatch),
        "mismatch/ratio_min": min(mismatch), "mismatch/outside_fraction": 1 / 3,
        "mismatch/log_ratio_abs_mean": statistics.fmean([0.3, 0.0, 2.0]),
        "advantage/mean": statistics.fmean([1.0, -2.0, 0.5]), "advantage/std": statistics.pstdev([1.0, -2.0, 0.5]),
        "value/explained_variance": 1 - statistics.pvariance(residual) / statistics.pvariance(g),
        "rollout/staleness_mean": 1.0, "rollout/staleness_max": 2.0,
        "rollout/response_length_mean": 1.5, "rollout/response_length_max": 2.0,
        "throughput/teacher_tokens_per_s": 200.0,
        "gates/sign_keep_rate": 0.25, "gates/all_keep_rate": 0.2,
        "log_ratio/mean": statistics.fmean([0.3, -2.0, 1.0]),
    }
    assert out == pytest.approx({**out, **expected}, rel=1e-12, abs=1e-14)
    assert "kl/rkl_exact" not in out and "entropy/student" not in out  # no logits given


def test_routing_stats():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 6, 8, generator=g, dtype=F64)
    teacher = torch.randn(2, 6, 8, generator=g, dtype=F64)
    ids = torch.randint(0, 8, (2, 6), generator=g)
    adv = torch.randn(2, 6, generator=g, dtype=F64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    teacher[0, :3] = teacher[0, :3].scatter(-1, ids[0, :3, None], 40.0)  # a few empty candidate sets
    _, stats = cr_opd_loss(student, ids, adv, mask, teacher_logits=teacher,
                           config=RoutingConfig(teacher_top_k=2, student_reach="topk", student_top_k=4))
    out = batch_diagnostics(DiagnosticsBatch(mask, routing_stats=stats))
    negative = mask & (adv < 0)
    routed = stats.routed
    assert routed.any() and (negative & stats.empty_candidates).any()
    assert out["routing/routed_rate"] == pytest.approx(int(routed.sum()) / int(mask.sum()))
    assert out["routing/routed_mass_mean"] == pytest.approx(float(stats.routed_mass[routed].mean()), rel=1e-12)
    assert out["routing/empty_candidate_rate"] == pytest.approx(
        int((negative & stats.empty_candidates).sum()) / int(negative.sum()))
    assert out["routing/candidate_count_mean"] == pytest.approx(float(stats.candidate_count[negative].double().mean()))


def test_masked_positions_never_count():
    base = batch_diagnostics(DiagnosticsBatch(**inputs()), TOP2)
    wild = inputs()
    wild["student_logits"][1, 2] = torch.tensor([1e4, -math.inf, -1e4, 7.0])
    wild["teacher_logits"][1, 2] = -math.inf  # a padding row of -inf logits
    wild["sampled_ids"][1, 2] = -100  # an ignore-index id on padding
    assert batch_diagnostics(DiagnosticsBatch(**wild), TOP2) == base
    # Dropping the masked position equals masking it.
    cut = {name: t[:, :2] for name, t in inputs().items()}
    cut["mask"] = torch.ones(2, 2)
    full = dict(inputs())
    full["mask"] = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert batch_diagnostics(DiagnosticsBatch(**full), TOP2) == pytest.approx(
        batch_diagnostics(DiagnosticsBatch(**cut), TOP2), rel=1e-13)


def test_missing_inputs_leave_their_keys_out():
    assert batch_diagnostics(DiagnosticsBatch()) == {}
    assert batch_diagnostics(DiagnosticsBatch(torch.ones(2, 3))) == {"tokens/count": 6.0}
    only_student = batch_diagnostics(DiagnosticsBatch(student_logits=torch.tensor(STUDENT, dtype=F64)))
    assert set(only_student) == {"tokens/count", "entropy/student"}
    top = torch.log_softmax(torch.tensor(TEACHER, dtype=F64), -1).topk(2, -1)
    served = batch_diagnostics(DiagnosticsBatch(torch.tensor(MASK), student_logits=torch.tensor(STUDENT, dtype=F64),
                                                teacher_topk_ids=top.indices, teacher_topk_logprobs=top.values,
                                                sampled_ids=torch.tensor(IDS)), TOP2)
    dense = batch_diagnostics(DiagnosticsBatch(**inputs()), TOP2)
    for key in ("agreement/teacher_top1_match", "agreement/topk_overlap", "agreement/student_mass_on_teacher_support"):
        assert served[key] == pytest.approx(dense[key], rel=1e-13)
    assert "kl/rkl_exact" not in served and "entropy/teacher" not in served and "log_ratio/mean" not in served
    # Nothing masked in: per-token keys are absent, not NaN.
    empty = batch_diagnostics(DiagnosticsBatch(**dict(inputs(), mask=torch.zeros(2, 3))), TOP2)
    assert empty == {"tokens/count": 0.0}
    # A constant value target has no explained variance.
    flat = batch_diagnostics(DiagnosticsBatch(torch.ones(1, 2), values=torch.zeros(1, 2, dtype=F64),
                                              value_targets=torch.ones(1, 2, dtype=F64)))
    assert "value/explained_variance" not in flat
    assert "throughput/teacher_tokens_per_s" not in batch_diagnostics(DiagnosticsBatch(teacher_tokens=10))


def test_bad_input_names_the_argument():
    x = inputs()
    cases = [  # (the argument named, the batch, the DiagnosticsSettings fields)
        ("sampled_ids", dict(x, sampled_ids=torch.tensor(IDS)[:, :2]), {}),
        ("teacher_logits", dict(x, teacher_logits=x["teacher_logits"][..., :3]), {}),
        ("student_logits", dict(x, student_logits=x["student_logits"].index_put((torch.tensor([1]),) * 3,
                                                                                  torch.tensor(math.nan, dtype=F64))),
         {}),
        ("sampled_ids", dict(x, sampled_ids=torch.tensor(IDS) + 4), {}),
        ("top_k", x, dict(top_k=5)),
        ("mask", dict(x, mask=torch.full((2, 3), 0.5)), {}),
        ("quantiles", x, dict(quantiles=(0.5, 1.5))),
        ("wall_time_s", dict(teacher_tokens=5, wall_time_s=0.0), {}),
        ("staleness", dict(staleness=-1), {}),
        ("teacher_topk_ids", dict(teacher_topk_ids=torch.zeros(2, 3, 2, dtype=torch.long)), {}),
        ("student_temperature", x, dict(student_temperature=-1.0)),
    ]
    for name, batch, options in cases:
        with pytest.raises(MathInputError, match=name):
            batch_diagnostics(DiagnosticsBatch(**batch), DiagnosticsSettings(**options))


@settings(max_examples=50, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 4), v=st.integers(2, 8), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([1.0, 1e4]), keep_share=st.sampled_from([0.0, 0.5, 1.0]),
       tau=st.sampled_from([0.5, 1.0, 2.0]), dtype=st.sampled_from([torch.float32, F64]))
def test_property_every_value_is_finite(b, t, v, seed, scale, keep_share, tau, dtype):
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(b, t, v, generator=g)).to(dtype)
    teacher = (scale * torch.randn(b, t, v, generator=g)).to(dtype)
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) < keep_share
    mask[0] = False  # an all-padding row
    adv = torch.randn(b, t, generator=g, dtype=dtype)
    _, stats = cr_opd_loss(student.double(), ids, adv.double(), mask, teacher_logits=teacher.double(),
                           config=RoutingConfig(teacher_top_k=1, student_reach="topk", student_top_k=1))
    out = batch_diagnostics(
        DiagnosticsBatch(mask, student_logits=student, teacher_logits=teacher, sampled_ids=ids,
                         behaviour_logprobs=-scale * torch.rand(b, t, generator=g).to(dtype), advantages=adv,
                         routing_stats=stats, values=torch.randn(b, t, generator=g).to(dtype),
                         value_targets=torch.randn(b, t, generator=g).to(dtype), staleness=3),
        DiagnosticsSettings(top_k=min(2, v), student_temperature=tau, teacher_temperature=tau))
    assert all(math.isfinite(value) for value in out.values()), out
    assert out["tokens/count"] == int(mask.sum())
    if mask.any():
        assert 0 <= out["agreement/topk_overlap"] <= 1 and out["kl/rkl_exact"] >= -1e-4
        assert out["entropy/student"] >= -1e-6 and out["kl/k2"] >= 0 and out["kl/k3"] >= 0
