"""CR-OPD routing, both forms: the gradient lives on {y_t} U C_t only; matched (the default): the push on z_{y_t} is
exactly the plain PG term's, C_t gets minus it split by rho, linear in A; kl_target: the moved mass is delta_t; the
fallbacks are exactly the plain policy gradient, each routing-weight option splits the mass as stated, and bad input
is refused."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from opd_megatron.math.cr_opd import (ROUTING_FORMS, RoutingConfig, candidate_set, cr_opd_loss, routed_mass,
                                      routed_target, routing_weights, student_reach, teacher_support)
from opd_megatron.math.checks import MathInputError

F64 = torch.float64
CONFIGS = [RoutingConfig(form=f, teacher_support=s, teacher_top_k=4, teacher_min_prob=0.05, student_reach=r,
                         student_top_p=0.8, student_top_k=5, student_min_prob=0.04, weights=w, eta=0.7)
           for f, s, r, w in itertools.product(ROUTING_FORMS, ("topk", "threshold"), ("top_p", "topk", "threshold"),
                                               ("q", "sqrt_q_pi", "uniform"))]


def batch(seed=0, b=3, t=4, v=10, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(b, t, v, generator=g, dtype=F64)).requires_grad_()
    teacher = scale * torch.randn(b, t, v, generator=g, dtype=F64)
    ids = torch.randint(0, v, (b, t), generator=g)
    return student, teacher, ids


def reference_sets(student, teacher, ids, config):
    """C_t, rho_t and pi recomputed with the public pieces on the flattened view."""
    v = student.shape[-1]
    logp = torch.log_softmax(student.detach().reshape(-1, v), -1)
    support, logq = teacher_support(v, config, teacher_logits=teacher.reshape(-1, v))
    cand = candidate_set(support, student_reach(logp, config), ids.reshape(-1))
    rho = routing_weights(cand, logq, logp, config.weights)
    return cand, rho, logp, logq


def with_nan(tensor):
    bad = tensor.clone()
    bad.view(-1)[1] = math.nan
    return bad


def plain_pg(student, ids, adv):
    """-A log pi(y): the reference policy-gradient term."""
    return -adv * torch.log_softmax(student, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def plain_pg_grad(student, ids, adv):
    """The plain PG term's gradient on the logits, `-A (e_y - pi)`, by autograd."""
    leaf = student.detach().clone().requires_grad_()
    plain_pg(leaf, ids, adv).sum().backward()
    return leaf.grad


@pytest.mark.parametrize("config", CONFIGS,
                         ids=lambda c: f"{c.form}-{c.teacher_support}-{c.student_reach}-{c.weights}")
def test_gradient_lives_on_sampled_token_and_candidates_only(config):
    student, teacher, ids = batch(seed=1)
    adv = -torch.rand(ids.shape, dtype=F64) - 0.1
    loss, stats = cr_opd_loss(student, ids, adv, teacher_logits=teacher, config=config)
    loss.sum().backward()
    v = student.shape[-1]
    grad = student.grad.reshape(-1, v)
    cand, rho, logp, _ = reference_sets(student, teacher, ids, config)
    onehot = torch.nn.functional.one_hot(ids.reshape(-1), v).bool()
    routed = stats.routed.reshape(-1)
    assert routed.any() and torch.equal(routed, cand.any(-1))
    in_s = cand | onehot
    # Exactly zero (not just small) outside {y} U C on every routed row.
    assert torch.equal(grad[routed][~in_s[routed]], torch.zeros_like(grad[routed][~in_s[routed]]))
    # On S: |A| m (e_y - rho), m = 1 - pi(y) (matched) or delta (kl_target); routed_mass = |A| m or delta.
    a = adv.reshape(-1)[routed]
    pi_y = logp.exp().gather(-1, ids.reshape(-1, 1)).squeeze(-1)[routed]
    m = 1 - pi_y if config.form == "matched" else pi_y * (1 - torch.exp(config.eta * a))
    expected = (a.abs() * m).unsqueeze(-1) * (onehot[routed].to(F64) - rho[routed])
    torch.testing.assert_close(grad[routed], expected, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(stats.routed_mass.reshape(-1)[routed], a.abs() * m if config.form == "matched" else m,
                               rtol=1e-12, atol=0)
    assert torch.equal(stats.candidate_count.reshape(-1), cand.sum(-1))


@pytest.mark.parametrize("form", ROUTING_FORMS)
def test_gradient_is_zero_outside_in_sparse_and_padded_batches(form):
    student, teacher, ids = batch(seed=2, v=12)
    mask = torch.ones(ids.shape, dtype=torch.bool)
    mask[0] = False
    mask[1, 2:] = False
    adv = -torch.ones(ids.shape, dtype=F64)
    logq = torch.log_softmax(teacher, -1)
    top = logq.topk(6, -1)
    config = RoutingConfig(form=form, teacher_top_k=5, student_reach="topk", student_top_k=6)
    loss, stats = cr_opd_loss(student, ids, adv, mask, teacher_topk_ids=top.indices,
                              teacher_topk_logprobs=top.values, config=config)
    loss.sum().backward()
    grad = student.grad
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    assert torch.equal(loss[~mask], torch.zeros_like(loss[~mask]))
    assert not stats.routed[~mask].any() and not stats.candidate_count[~mask].any()
    cand, _, _, _ = reference_sets(student, teacher, ids, config)
    in_s = (cand | torch.nn.functional.one_hot(ids.reshape(-1), 12).bool()).reshape(grad.shape)
    routed = stats.routed
    assert routed.any()
    assert (grad[routed][~in_s[routed]] == 0).all()


@pytest.mark.parametrize("weights", ["q", "sqrt_q_pi", "uniform"])
def test_moved_mass_equals_delta_and_lands_on_candidates_by_the_weights(weights):
    student, teacher, ids = batch(seed=3, v=9)
    config = RoutingConfig(teacher_support="threshold", teacher_min_prob=0.03, student_reach="threshold",
                           student_min_prob=0.02, weights=weights, eta=1.3)
    cand, rho, logp, logq = reference_sets(student, teacher, ids, config)
    adv = -0.8 * torch.ones(ids.numel(), dtype=F64)
    pi, q = logp.exp(), logq.exp()
    y = ids.reshape(-1)
    delta = routed_mass(logp.gather(-1, y[:, None]).squeeze(-1), adv, config.eta)
    delta = torch.where(cand.any(-1), delta, 0.0)
    target = routed_target(logp, y, delta, rho)
    pi_y = pi.gather(-1, y[:, None]).squeeze(-1)
    formula = pi_y * (1 - math.exp(config.eta * -0.8))
    rows = cand.any(-1)
    assert rows.sum() >= 3
    # Mass on C grows by delta; y keeps pi(y) exp(eta A); nothing else changes; still a distribution.
    torch.testing.assert_close(((target - pi) * cand).sum(-1)[rows], formula[rows], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(target.gather(-1, y[:, None]).squeeze(-1)[rows],
                               (pi_y * math.exp(config.eta * -0.8))[rows], rtol=1e-12, atol=1e-15)
    outside = ~cand
    outside[torch.arange(len(y)), y] = False
    assert torch.equal(target[outside], pi[outside])
    torch.testing.assert_close(target.sum(-1), torch.ones(len(y), dtype=F64), rtol=0, atol=1e-14)
    assert (target >= 0).all()
    # The split on C, against the stated weights.
    for n in torch.nonzero(rows).flatten().tolist():
        members = cand[n]
        if weights == "q":
            raw = q[n][members]
        elif weights == "sqrt_q_pi":
            raw = torch.sqrt(q[n][members] * pi[n][members])
        else:
            raw = torch.ones(int(members.sum()), dtype=F64)
        torch.testing.assert_close((target[n] - pi[n])[members], formula[n] * raw / raw.sum(), rtol=1e-11, atol=1e-16)
        assert torch.equal(rho[n][~members], torch.zeros_like(rho[n][~members]))


def test_kl_target_stats_routed_mass_matches_formula_and_loss_value_is_full_kl():
    student, teacher, ids = batch(seed=4)
    adv = torch.linspace(-2.0, 1.5, ids.numel(), dtype=F64).reshape(ids.shape)
    config = RoutingConfig(form="kl_target", teacher_top_k=5, student_reach="topk", student_top_k=7, eta=0.5)
    loss, stats = cr_opd_loss(student, ids, adv, teacher_logits=teacher, config=config)
    cand, rho, logp, _ = reference_sets(student, teacher, ids, config)
    y, a = ids.reshape(-1), adv.reshape(-1)
    pi = logp.exp()
    pi_y = pi.gather(-1, y[:, None]).squeeze(-1)
    routed = (a < 0) & cand.any(-1)
    assert torch.equal(stats.routed.reshape(-1), routed)
    assert torch.equal(stats.negative_advantage.reshape(-1), a < 0)
    delta = torch.where(routed, pi_y * (1 - torch.exp(0.5 * a)), 0.0)
    torch.testing.assert_close(stats.routed_mass.reshape(-1), delta, rtol=1e-12, atol=0)
    # The value of the restricted loss is |A| KL(p~ || pi) over the full vocabulary.
    target = routed_target(logp, y, delta, rho)
    kl = (torch.xlogy(target, target) - target * logp).sum(-1)
    torch.testing.assert_close(loss.reshape(-1)[routed], (a.abs() * kl)[routed], rtol=1e-9, atol=1e-14)
    assert (loss.reshape(-1)[routed] >= 0).all()


def test_default_matched_form_pushes_the_sampled_token_exactly_as_the_plain_pg_term():
    """The default form (no `form` given): on z_y the gradient equals the plain PG term's, -A (1 - pi(y)); over C_t
    it sums to minus that, split by rho; exactly 0 elsewhere; the value is |A| (1 - pi(y)) [log pi(y) - sum_C rho
    log pi(v)] and routed_mass is |A| (1 - pi(y))."""
    student, teacher, ids = batch(seed=11, b=4, t=5, v=13)
    adv = -0.05 - 2.0 * torch.rand(ids.shape, generator=torch.Generator().manual_seed(11), dtype=F64)
    config = RoutingConfig(teacher_top_k=6, student_reach="topk", student_top_k=8, weights="sqrt_q_pi")
    loss, stats = cr_opd_loss(student, ids, adv, teacher_logits=teacher, config=config)
    loss.sum().backward()
    v = student.shape[-1]
    grad, y, a = student.grad.reshape(-1, v), ids.reshape(-1), adv.reshape(-1)
    plain = plain_pg_grad(student, ids, adv).reshape(-1, v)
    cand, rho, logp, _ = reference_sets(student, teacher, ids, config)
    routed = stats.routed.reshape(-1)
    assert routed.sum() >= 15 and torch.equal(routed, cand.any(-1))
    rows = torch.arange(len(y))
    push, plain_push = grad[rows, y][routed], plain[rows, y][routed]
    assert (plain_push > 0).all()  # descent lowers z_y: -A (1 - pi(y)) > 0 for A < 0
    torch.testing.assert_close(push, plain_push, rtol=1e-12, atol=0)
    torch.testing.assert_close((grad * cand).sum(-1)[routed], -plain_push, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad[routed] * cand[routed], -plain_push.unsqueeze(-1) * rho[routed],
                               rtol=1e-12, atol=0)
    in_s = cand.clone()
    in_s[rows, y] = True
    assert torch.equal(grad[routed][~in_s[routed]], torch.zeros_like(grad[routed][~in_s[routed]]))
    pi_y = logp[rows, y].exp()
    torch.testing.assert_close(stats.routed_mass.reshape(-1)[routed], (a.abs() * (1 - pi_y))[routed],
                               rtol=1e-12, atol=0)
    value = a.abs() * (1 - pi_y) * (logp[rows, y] - (rho * torch.where(cand, logp, 0.0)).sum(-1))
    torch.testing.assert_close(loss.reshape(-1)[routed], value[routed], rtol=1e-10,
                               atol=1e-12 * float(value.abs().max()))


def test_matched_form_is_linear_in_the_advantage_and_kl_target_is_not():
    """Doubling A doubles the matched form's loss and gradient (the push is |A| (1 - pi(y)), like the positive
    side); the kl_target push |A| delta grows faster (delta itself grows with |A|)."""
    student, teacher, ids = batch(seed=12, v=11)
    adv = -0.1 - torch.rand(ids.shape, generator=torch.Generator().manual_seed(12), dtype=F64)
    grads, losses = {}, {}
    for form in ROUTING_FORMS:
        for scale in (1.0, 2.0):
            leaf = student.detach().clone().requires_grad_()
            config = RoutingConfig(form=form, teacher_top_k=5, student_reach="topk", student_top_k=6)
            loss, stats = cr_opd_loss(leaf, ids, scale * adv, teacher_logits=teacher, config=config)
            loss.sum().backward()
            assert stats.routed.all()
            grads[form, scale], losses[form, scale] = leaf.grad, loss.detach()
    torch.testing.assert_close(grads["matched", 2.0], 2 * grads["matched", 1.0], rtol=1e-14, atol=0)
    torch.testing.assert_close(losses["matched", 2.0], 2 * losses["matched", 1.0], rtol=1e-14, atol=0)
    y = ids.unsqueeze(-1)
    ratio = grads["kl_target", 2.0].gather(-1, y) / grads["kl_target", 1.0].gather(-1, y)
    assert (ratio > 2.05).all(), f"kl_target push ratio at 2A / A: expected > 2 (superlinear), got {ratio.min()}"


@pytest.mark.parametrize("form", ROUTING_FORMS)
def test_empty_candidate_set_gives_exactly_the_plain_pg_gradient(form):
    student, teacher, ids = batch(seed=5)
    # The teacher's top-1 is the sampled token and its support is its top-1: C_t is empty everywhere.
    teacher = teacher.scatter(-1, ids.unsqueeze(-1), 50.0)
    adv = -torch.rand(ids.shape, dtype=F64) - 0.2
    loss, stats = cr_opd_loss(student, ids, adv, teacher_logits=teacher,
                              config=RoutingConfig(form=form, teacher_top_k=1))
    loss.sum().backward()
    grad = student.grad.clone()
    student.grad = None
    reference = plain_pg(student, ids, adv)
    reference.sum().backward()
    assert stats.empty_candidates.all() and not stats.routed.any()
    assert torch.equal(stats.routed_mass, torch.zeros_like(stats.routed_mass))
    assert torch.equal(loss, reference)
    assert torch.equal(grad, student.grad)


@pytest.mark.parametrize("form", ROUTING_FORMS)
def test_positive_advantage_gives_exactly_the_plain_pg_gradient(form):
    student, teacher, ids = batch(seed=6)
    adv = torch.rand(ids.shape, dtype=F64) + 0.1
    adv[0, 0] = 0.0
    config = RoutingConfig(form=form, teacher_top_k=8, student_reach="topk", student_top_k=8)
    loss, stats = cr_opd_loss(student, ids, adv, teacher_logits=teacher, config=config)
    loss.sum().backward()
    grad = student.grad.clone()
    student.grad = None
    plain_pg(student, ids, adv).sum().backward()
    assert (stats.candidate_count > 0).all() and not stats.routed.any() and not stats.negative_advantage.any()
    assert torch.equal(grad, student.grad)
    assert torch.equal(grad[0, 0], torch.zeros_like(grad[0, 0]))


@pytest.mark.parametrize("form", ROUTING_FORMS)
def test_one_descent_step_lowers_the_sampled_token_and_raises_only_candidates(form):
    student, teacher, ids = batch(seed=7, v=11)
    adv = -1.5 * torch.ones(ids.shape, dtype=F64)
    config = RoutingConfig(form=form, teacher_top_k=4, student_reach="top_p", student_top_p=0.9,
                           weights="sqrt_q_pi")
    loss, stats = cr_opd_loss(student, ids, adv, teacher_logits=teacher, config=config)
    loss.sum().backward()
    lr = 1e-3
    before = student.detach()
    after = before - lr * student.grad
    cand, rho, _, _ = reference_sets(student, teacher, ids, config)
    cand = cand.reshape(before.shape)
    routed = stats.routed
    assert routed.sum() >= 5
    y = ids.unsqueeze(-1)
    rise = after > before
    # Logits: y falls, every candidate rises (rho > 0), nothing else moves.
    assert (after.gather(-1, y) < before.gather(-1, y))[routed].all()
    assert (rise[routed] == cand[routed]).all()
    others = ~cand & ~torch.nn.functional.one_hot(ids, before.shape[-1]).bool()
    assert torch.equal(after[routed][others[routed]], before[routed][others[routed]])
    # Probability: pi(y) falls.
    pi_before = torch.softmax(before, -1).gather(-1, y).squeeze(-1)
    pi_after = torch.softmax(after, -1).gather(-1, y).squeeze(-1)
    assert (pi_after < pi_before)[routed].all()


def test_sparse_teacher_with_every_id_equals_dense():
    student, teacher, ids = batch(seed=8, v=7)
    adv = torch.randn(ids.shape, dtype=F64)
    logq = torch.log_softmax(teacher, -1)
    top = logq.topk(7, -1)
    for config in CONFIGS:
        dense, dense_stats = cr_opd_loss(student, ids, adv, teacher_logits=teacher, config=config)
        sparse, sparse_stats = cr_opd_loss(student, ids, adv, teacher_topk_ids=top.indices,
                                           teacher_topk_logprobs=top.values, config=config)
        torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-14)
        assert torch.equal(sparse_stats.candidate_count, dense_stats.candidate_count)


def test_supports_and_reaches_on_a_hand_made_row():
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]], dtype=F64))
    reach = lambda **kw: student_reach(logp, RoutingConfig(**kw)).tolist()[0]
    assert reach(student_reach="top_p", student_top_p=0.45) == [True, False, False, False, False]
    assert reach(student_reach="top_p", student_top_p=0.69) == [True, True, False, False, False]
    assert reach(student_reach="top_p", student_top_p=0.71) == [True, True, True, False, False]
    assert reach(student_reach="top_p", student_top_p=1.0) == [True] * 5
    assert reach(student_reach="topk", student_top_k=2) == [True, True, False, False, False]
    assert reach(student_reach="threshold", student_min_prob=0.1) == [True, True, True, True, False]
    teacher = torch.tensor([[0.0, 3.0, 2.0, 1.0, -math.inf]], dtype=F64)
    q = torch.softmax(teacher, -1)
    support, logq = teacher_support(5, RoutingConfig(teacher_top_k=5), teacher_logits=teacher)
    assert support.tolist()[0] == [True, True, True, True, False]  # q = 0 never supports
    support, _ = teacher_support(5, RoutingConfig(teacher_support="threshold", teacher_min_prob=float(q[0, 3])),
                                 teacher_logits=teacher)
    assert support.tolist()[0] == [False, True, True, True, False]
    cand = candidate_set(support, torch.ones_like(support), torch.tensor([2]))
    assert cand.tolist()[0] == [False, True, False, True, False]


def test_temperature_is_a_logit_scale():
    student, teacher, ids = batch(seed=9)
    adv = torch.randn(ids.shape, dtype=F64)
    config = RoutingConfig(teacher_top_k=4, student_reach="topk", student_top_k=5)
    scaled, _ = cr_opd_loss(student, ids, adv, teacher_logits=teacher, config=config, student_temperature=2.0,
                            teacher_temperature=0.5)
    plain, _ = cr_opd_loss(student / 2.0, ids, adv, teacher_logits=teacher / 0.5, config=config)
    torch.testing.assert_close(scaled, plain, rtol=1e-12, atol=1e-14)


def test_bad_input_names_the_argument():
    student, teacher, ids = batch(seed=10, v=6)
    adv = -torch.ones(ids.shape, dtype=F64)
    ok = dict(teacher_logits=teacher, config=RoutingConfig(teacher_top_k=3, student_reach="topk", student_top_k=3))

    def fails(match, *args, **kwargs):
        call = dict(ok, **kwargs)
        with pytest.raises(MathInputError, match=match):
            cr_opd_loss(*(args or (student, ids, adv)), **call)

    fails("sampled_ids", student, ids[:, :-1], adv)
    fails("advantages", student, ids, adv[:-1])
    fails("mask", student, ids, adv, torch.ones(2, 2))
    fails("teacher_logits", teacher_logits=teacher[..., :-1])
    fails("student_logits", with_nan(student.detach()), ids, adv)
    fails("teacher_logits", teacher_logits=with_nan(teacher))
    fails("advantages", student, ids, with_nan(adv))
    fails("sampled_ids", student, ids + 6, adv)
    fails("sampled_ids", student, ids.double(), adv)
    fails("teacher_top_k", config=RoutingConfig(teacher_top_k=7))
    fails("student_top_k", config=RoutingConfig(student_reach="topk", student_top_k=7))
    fails("teacher_logits / teacher_topk_ids", teacher_logits=None)
    top = torch.log_softmax(teacher, -1).topk(3, -1)
    fails("teacher_logits / teacher_topk_ids", teacher_topk_ids=top.indices, teacher_topk_logprobs=top.values)
    sparse = dict(teacher_logits=None, teacher_topk_ids=top.indices, teacher_topk_logprobs=top.values)
    fails("teacher_top_k", **sparse, config=RoutingConfig(teacher_top_k=4, student_top_k=3))
    fails("teacher_temperature", **sparse, teacher_temperature=2.0)
    fails("teacher_topk_logprobs", **dict(sparse, teacher_topk_logprobs=-top.values + 1))
    fails("teacher_topk_ids", **dict(sparse, teacher_topk_ids=top.indices + 6))
    fails("student_temperature", student_temperature=0.0)
    fails("mask", student, ids, adv, torch.full(ids.shape, 0.5))
    for name, value in [("form", "kl"), ("teacher_support", "nucleus"), ("student_reach", "top_q"), ("weights", "pi"),
                        ("teacher_min_prob", 0.0), ("teacher_min_prob", 1.5), ("student_min_prob", -0.1),
                        ("student_top_p", 0.0), ("student_top_p", 1.01), ("eta", 0.0), ("eta", -1.0),
                        ("teacher_top_k", 0), ("student_top_k", 2.5)]:
        with pytest.raises(MathInputError, match=name):
            RoutingConfig(**{name: value})
    with pytest.raises(MathInputError, match="weights"):
        routing_weights(torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 3), torch.zeros(1, 3), "softmax")


@st.composite
def routing_cases(draw):
    b, t, v = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(2, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1.0, 30.0, 1e4]))
    g = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(b, t, v, generator=g, dtype=F64)
    teacher = scale * torch.randn(b, t, v, generator=g, dtype=F64)
    if draw(st.booleans()):  # saturate at exactly +-1e4
        student = torch.where(student > 0, 1e4, -1e4).to(F64)
    ids = torch.randint(0, v, (b, t), generator=g)
    adv = 5 * torch.randn(b, t, generator=g, dtype=F64)
    mask = torch.rand(b, t, generator=g) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    if b > 1 and draw(st.booleans()):
        mask[0] = False  # an all-padding row
    config = RoutingConfig(form=draw(st.sampled_from(ROUTING_FORMS)),
                           teacher_support=draw(st.sampled_from(["topk", "threshold"])),
                           teacher_top_k=draw(st.integers(1, v)), teacher_min_prob=draw(st.sampled_from([1e-6, 0.1])),
                           student_reach=draw(st.sampled_from(["top_p", "topk", "threshold"])),
                           student_top_p=draw(st.sampled_from([0.5, 0.95, 1.0])), student_top_k=draw(st.integers(1, v)),
                           student_min_prob=draw(st.sampled_from([1e-6, 0.1])),
                           weights=draw(st.sampled_from(["q", "sqrt_q_pi", "uniform"])),
                           eta=draw(st.sampled_from([0.1, 1.0, 10.0])))
    temps = (draw(st.sampled_from([0.5, 1.0, 2.0])), draw(st.sampled_from([0.5, 1.0, 2.0])))
    return student, teacher, ids, adv, mask, config, temps


@settings(max_examples=50, deadline=None)
@given(routing_cases())
def test_property_finite_signed_and_local(case):
    student, teacher, ids, adv, mask, config, (tau_s, tau_t) = case
    student.requires_grad_()
    loss, stats = cr_opd_loss(student, ids, adv, mask, teacher_logits=teacher, config=config,
                              student_temperature=tau_s, teacher_temperature=tau_t)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(student.grad).all()
    assert (loss[~mask] == 0).all() and (student.grad[~mask] == 0).all()
    if config.form == "kl_target":
        assert (loss[stats.routed] >= -1e-12).all()  # |A| KL >= 0
    assert (loss[mask & (adv > 0)] >= 0).all()  # -A log pi >= 0
    assert ((stats.routed_mass >= 0) & torch.isfinite(stats.routed_mass)).all()
    v = student.shape[-1]
    logp = torch.log_softmax(student.detach().reshape(-1, v) / tau_s, -1)
    support, _ = teacher_support(v, config, teacher_logits=teacher.reshape(-1, v), teacher_temperature=tau_t)
    cand = candidate_set(support, student_reach(logp, config), ids.reshape(-1)).reshape(student.shape)
    outside = ~cand & ~torch.nn.functional.one_hot(ids, v).bool()
    assert (student.grad[stats.routed][outside[stats.routed]] == 0).all()
    assert torch.equal(stats.candidate_count[mask], cand.sum(-1)[mask])
