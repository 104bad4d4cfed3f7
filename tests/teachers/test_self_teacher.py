"""SelfTeacher: privileged context spliced into the prompt, scores mapped back to the student's columns exactly
(compared with a direct forward of the concatenated sequence), empty context = the plain scorer, the max-length
error, and the current / frozen / EMA weights (the EMA against its formula)."""

import copy

import pytest
import torch

from opd_megatron.teachers.base import TeacherError
from opd_megatron.teachers.self_teacher import SelfTeacher
from tests.teachers.reference_teacher import ModelTeacher, TinyCausalLM, make_request, random_rows

V = 37
PROMPTS = [5, 3, 6]
ROWS = random_rows([11, 9, 8], V, seed=1)
PRIVILEGED = [[30, 31, 32, 33], [20], [7, 8, 9]]
PREFIX, SUFFIX = [1, 2], [3]


def direct_logits(model, seq):
    with torch.no_grad():
        return model(torch.tensor([seq[:-1]]))[0].to(torch.float32)


def assert_close_at_scale(got, want, scale):
    """float32 values computed along two paths (another sequence length or batch layout) differ by a few float32
    ulps of the largest magnitude involved: TinyCausalLM's logits reach ~75 (its weights are scaled x3), and
    log_softmax subtracts logits of that size, so a log-prob near 0 carries the same absolute error (~1e-5) as one
    near -75. The tolerance is ~8 ulps of `scale`, not an absolute number."""
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * max(1.0, float(scale)))


@pytest.mark.parametrize("insert,keep", [("before_prompt", 0), ("before_prompt", 1), ("after_prompt", 0),
                                         ("after_prompt", 2)])
def test_scores_equal_direct_forward_of_concatenated_sequence(insert, keep):
    model = TinyCausalLM(V, seed=0).eval()
    teacher = SelfTeacher(ModelTeacher(model, V, full_logits=True), insert=insert, keep=keep, prefix_ids=PREFIX,
                          suffix_ids=SUFFIX)
    request = make_request(ROWS, PROMPTS, topk=4, extra=3, vocab_size=V, privileged=PRIVILEGED)
    scores = teacher.score(request)
    assert torch.equal(scores.valid, request.valid_mask())
    checked = 0
    for b, row in enumerate(ROWS):
        p = keep if insert == "before_prompt" else PROMPTS[b] - keep
        ctx = PREFIX + PRIVILEGED[b] + SUFFIX
        seq = row[:p] + ctx + row[p:]
        n = len(ctx)
        logits = direct_logits(model, seq)
        logq = torch.log_softmax(logits, dim=-1)
        scale = logits.abs().max()
        for j in range(PROMPTS[b] - 1, len(row) - 1):
            assert seq[j + n + 1] == row[j + 1]          # the teacher's column j + n predicts the same token
            assert_close_at_scale(scores.sampled_logprobs[b, j], logq[j + n, row[j + 1]], scale)
            top = logq[j + n].topk(4)
            assert scores.topk_ids[b, j].tolist() == top.indices.tolist()
            assert_close_at_scale(scores.topk_logprobs[b, j], top.values, scale)
            ids = request.extra_ids[b, j]
            want = torch.where(ids >= 0, logq[j + n, ids.clamp_min(0)], 0.0)
            assert_close_at_scale(scores.extra_logprobs[b, j], want, scale)
            assert_close_at_scale(scores.logits_shard[b, j], logits[j + n], scale)
            checked += 1
        # unscored columns stay 0
        outside = ~request.valid_mask()[b]
        assert float(scores.sampled_logprobs[b][outside].abs().sum()) == 0.0
    assert checked == sum(len(r) - p for r, p in zip(ROWS, PROMPTS))
    # The context changes the scores (otherwise the test above would not see a misalignment).
    plain = ModelTeacher(model, V).score(make_request(ROWS, PROMPTS, vocab_size=V))
    assert float((plain.sampled_logprobs - scores.sampled_logprobs).abs().max()) > 1e-2


def test_scorer_sees_the_spliced_rows():
    scorer = ModelTeacher(TinyCausalLM(V).eval(), V)
    teacher = SelfTeacher(scorer, insert="after_prompt", keep=1)
    teacher.score(make_request(ROWS, PROMPTS, vocab_size=V, privileged=[[30, 31], [], [9]]))
    inner = scorer.requests[-1]
    assert inner.privileged is None
    assert inner.lengths.tolist() == [13, 9, 9]
    assert inner.score_start.tolist() == [6, 2, 6]
    assert inner.row(0) == ROWS[0][:4] + [30, 31] + ROWS[0][4:]
    assert inner.row(1) == ROWS[1]
    assert inner.row(2) == ROWS[2][:5] + [9] + ROWS[2][5:]


@pytest.mark.parametrize("privileged", [None, [[], [], []]])
def test_empty_privileged_context_equals_plain_teacher(privileged):
    model = TinyCausalLM(V).eval()
    plain = ModelTeacher(model, V, full_logits=True).score(make_request(ROWS, PROMPTS, topk=3, extra=2,
                                                                        vocab_size=V))
    teacher = SelfTeacher(ModelTeacher(model, V, full_logits=True), prefix_ids=PREFIX, suffix_ids=SUFFIX)
    scores = teacher.score(make_request(ROWS, PROMPTS, topk=3, extra=2, vocab_size=V, privileged=privileged))
    for name in ("sampled_logprobs", "valid", "topk_ids", "topk_logprobs", "extra_logprobs", "logits_shard"):
        assert torch.equal(getattr(scores, name), getattr(plain, name)), name


def test_rows_without_context_in_a_mixed_batch_equal_plain_rows():
    model = TinyCausalLM(V).eval()
    plain = ModelTeacher(model, V).score(make_request(ROWS, PROMPTS, vocab_size=V))
    scores = SelfTeacher(ModelTeacher(model, V), prefix_ids=PREFIX).score(
        make_request(ROWS, PROMPTS, vocab_size=V, privileged=[[4, 5], [], []]))
    # Row 0 is longer with its context, so the batch is padded differently: rows 1-2 go through other shapes.
    assert_close_at_scale(scores.sampled_logprobs[1:], plain.sampled_logprobs[1:], plain.sampled_logprobs.abs().max())
    assert float((scores.sampled_logprobs[0] - plain.sampled_logprobs[0]).abs().max()) > 1e-2


def test_context_beyond_max_length_is_a_clear_error():
    model = TinyCausalLM(V, max_length=14).eval()
    teacher = SelfTeacher(ModelTeacher(model, V))
    assert teacher.max_length == 14
    with pytest.raises(TeacherError, match=r"row 0 is 11 tokens \+ 4 of privileged context = 15, beyond the "
                                           r"scorer's max length 14"):
        teacher.score(make_request(ROWS, PROMPTS, vocab_size=V, privileged=[[1, 2, 3, 4], [], []]))
    teacher.score(make_request(ROWS, PROMPTS, vocab_size=V, privileged=[[1, 2, 3], [], []]))  # 14 fits


def test_bad_configuration_and_context_errors():
    scorer = ModelTeacher(TinyCausalLM(V).eval(), V)
    with pytest.raises(ValueError, match="mode"):
        SelfTeacher(scorer, mode="swa")
    with pytest.raises(ValueError, match="pass model="):
        SelfTeacher(scorer, mode="ema")
    with pytest.raises(ValueError, match="insert"):
        SelfTeacher(scorer, insert="middle")
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 37\)"):
        SelfTeacher(scorer, prefix_ids=[37])
    with pytest.raises(ValueError, match=r"privileged\[2\]"):
        SelfTeacher(scorer).score(make_request(ROWS, PROMPTS, vocab_size=V, privileged=[[], [], [40]]))
    with pytest.raises(TeacherError, match="row 1 has a prompt of 3 tokens"):
        SelfTeacher(scorer, insert="after_prompt", keep=4).score(
            make_request(ROWS, PROMPTS, vocab_size=V, privileged=[[1], [1], [1]]))


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


def test_current_mode_follows_the_live_weights_and_frozen_keeps_the_initial_ones():
    model = TinyCausalLM(V).eval()
    initial = copy.deepcopy(model)
    current = SelfTeacher(ModelTeacher(model, V), model=model, mode="current")
    frozen = SelfTeacher(ModelTeacher(model, V), model=model, mode="frozen")
    request = make_request(ROWS, PROMPTS, vocab_size=V, privileged=PRIVILEGED)
    _perturb(model, 3)                                      # an optimizer step
    trained = [p.detach().clone() for p in model.parameters()]
    live = SelfTeacher(ModelTeacher(copy.deepcopy(model), V)).score(request).sampled_logprobs
    old = SelfTeacher(ModelTeacher(initial, V)).score(request).sampled_logprobs
    assert float((live - old).abs().max()) > 1e-2
    assert torch.equal(current.score(request).sampled_logprobs, live)
    before = [p.data_ptr() for p in model.parameters()]
    assert torch.equal(frozen.score(request).sampled_logprobs, old)
    # The live weights are back, the very same storage holding the trained values (not the frozen ones).
    assert [p.data_ptr() for p in model.parameters()] == before
    for name, p, want in zip([n for n, _ in model.named_parameters()], model.parameters(), trained):
        assert torch.equal(p, want), f"{name}: frozen scoring left other values in the live parameter"
    assert torch.equal(current.score(request).sampled_logprobs, live)  # and scoring with them still gives `live`


def test_ema_equals_its_formula_and_scores_with_the_ema_weights():
    model = TinyCausalLM(V).eval()
    decay = 0.8
    teacher = SelfTeacher(ModelTeacher(model, V), model=model, mode="ema", ema_decay=decay)
    thetas = [[p.detach().clone() for p in model.parameters()]]
    for step in range(3):
        _perturb(model, 10 + step)
        thetas.append([p.detach().clone() for p in model.parameters()])
        teacher.update_ema()
    assert teacher.updates == 3
    # e_3 = d^3 theta_0 + (1-d) (d^2 theta_1 + d theta_2 + theta_3)
    for i, ema in enumerate(teacher.teacher_weights()):
        want = decay ** 3 * thetas[0][i] + (1 - decay) * (decay ** 2 * thetas[1][i] + decay * thetas[2][i]
                                                          + thetas[3][i])
        torch.testing.assert_close(ema, want, rtol=1e-6, atol=1e-6)
        assert ema.dtype == torch.float32
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p, e in zip(reference.parameters(), teacher.teacher_weights()):
            p.copy_(e)
    request = make_request(ROWS, PROMPTS, topk=2, vocab_size=V, privileged=PRIVILEGED)
    want = SelfTeacher(ModelTeacher(reference, V)).score(request)
    got = teacher.score(request)
    assert_close_at_scale(got.sampled_logprobs, want.sampled_logprobs, want.sampled_logprobs.abs().max())
    assert torch.equal(got.topk_ids, want.topk_ids)
    # Training weights are untouched by scoring.
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), thetas[3]))


def test_ema_of_bf16_parameters_is_kept_in_float32_and_resumes_from_state_dict():
    model = TinyCausalLM(V).eval().to(torch.bfloat16)
    teacher = SelfTeacher(ModelTeacher(model, V), model=model, mode="ema", ema_decay=0.999)
    theta0 = next(model.parameters()).detach().float().clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    teacher.update_ema()
    theta1 = next(model.parameters()).detach().float()
    shadow = teacher.teacher_weights()[0]
    assert shadow.dtype == torch.float32
    torch.testing.assert_close(shadow, 0.999 * theta0 + 0.001 * theta1, rtol=1e-6, atol=1e-6)
    # The same EMA in bf16 would round most of the update away (back to theta_0).
    assert float((shadow.to(torch.bfloat16).float() == theta0).float().mean()) > 0.5
    assert float((shadow == theta0).float().mean()) == 0.0
    state = teacher.state_dict()
    resumed = SelfTeacher(ModelTeacher(model, V), model=model, mode="ema", ema_decay=0.999)
    resumed.load_state_dict(state)
    assert resumed.updates == 1
    assert all(torch.equal(a, b) for a, b in zip(resumed.teacher_weights(), teacher.teacher_weights()))
    with pytest.raises(ValueError, match="mode 'ema'"):
        SelfTeacher(ModelTeacher(model, V), model=model, mode="frozen").load_state_dict(state)
