"""MultiTeacher: routing by domain (rows grouped per teacher, scattered back in order, diagnostics, errors,
concurrency), and the geometric / arithmetic mixtures against explicit formulas (sampled-only and full logits,
the two-round arithmetic top-k and its certificate, padding excluded), plus the construction checks."""

import math
import threading

import pytest
import torch

from opd_megatron.teachers.base import TeacherError
from opd_megatron.teachers.compat import VocabMismatchError
from opd_megatron.teachers.multi import MultiTeacher
from tests.harness import run_distributed
from tests.teachers.reference_teacher import ModelTeacher, TinyCausalLM, make_request, random_rows

V = 37
PROMPTS = [4, 3, 5, 2, 6]
ROWS = random_rows([9, 12, 7, 10, 8], V, seed=2)


def teachers(full_logits=False, padded_vocab=None, names=("math", "code", "chat")):
    return {n: ModelTeacher(TinyCausalLM(V, seed=10 + i).eval(), V, name=n, full_logits=full_logits,
                            padded_vocab=padded_vocab) for i, n in enumerate(names)}


def log_probs(teacher, request):
    """`[B, L-1, V]` the teacher model's log-probs, directly (float64, so that mixtures of tiny probabilities
    computed from them by the formulas' own definitions stay exact; compared in float32)."""
    real = torch.arange(request.tokens.shape[1]).unsqueeze(0) < request.lengths.unsqueeze(1)
    tokens = torch.where(real, request.tokens, 0)
    with torch.no_grad():
        return torch.log_softmax(teacher.model(tokens[:, :-1]).double(), dim=-1)


def tol(*full):
    """assert_close tolerances for float32 log-probs computed from logits of the size of max |full| (TinyCausalLM's
    weights are scaled x3: log-probs down to about -250 here): ~8 float32 ulps of that scale for every entry, since
    log_softmax subtracts logits of that size (a log-prob near 0 carries the absolute error of one near -250)."""
    scale = max(float(t[torch.isfinite(t)].abs().max()) for t in full)
    return {"rtol": 0.0, "atol": 1e-6 * max(1.0, scale)}


def gather(logq, request, ids=None):
    ids = request.tokens[:, 1:].clamp(0, V - 1).unsqueeze(-1) if ids is None else ids.clamp_min(0)
    return logq.gather(-1, ids).float()


# -- routing ------------------------------------------------------------------------------------------------------

ROUTES = {"aime": "math", "gsm8k": "math", "livecodebench": "code"}
DOMAINS = ["livecodebench", "aime", "arena", "gsm8k", "livecodebench"]
EXPECTED = ["code", "math", "chat", "math", "code"]


def test_each_row_is_scored_by_its_domain_teacher_and_scattered_back_in_order():
    named = teachers()
    multi = MultiTeacher(named, routes=ROUTES, default="chat")
    request = make_request(ROWS, PROMPTS, topk=3, extra=2, vocab_size=V, domains=DOMAINS)
    scores = multi.score(request)
    assert multi.route(request) == EXPECTED
    valid = request.valid_mask()
    assert torch.equal(scores.valid, valid)
    for b, name in enumerate(EXPECTED):
        logq = log_probs(named[name], request)          # this teacher on every row; row b is compared
        v = valid[b]
        torch.testing.assert_close(scores.sampled_logprobs[b][v], gather(logq, request)[b, :, 0][v], **tol(logq[b]))
        assert torch.equal(scores.topk_ids[b][v], logq[b].topk(3).indices[v])
        torch.testing.assert_close(scores.extra_logprobs[b][v], gather(logq, request, request.extra_ids)[b][v]
                                   * (request.extra_ids[b][v] >= 0), **tol(logq[b]))
        assert float(scores.sampled_logprobs[b][~v].abs().sum()) == 0.0
    # One request per teacher, its rows in order, trimmed to its longest row.
    math_request = named["math"].requests[-1]
    assert [math_request.row(i) for i in range(2)] == [ROWS[1], ROWS[3]]
    assert math_request.tokens.shape[1] == 12 and math_request.domains == ["aime", "gsm8k"]
    assert len(named["code"].requests) == 1 and named["code"].requests[0].batch_size == 2
    # Diagnostics per teacher.
    assert set(scores.per_teacher) == {"math", "code", "chat"}
    rows = {"math": [1, 3], "code": [0, 4], "chat": [2]}
    for name, picked in rows.items():
        diag = scores.per_teacher[name]
        assert diag["rows"] == len(picked)
        assert diag["scored_tokens"] == sum(len(ROWS[b]) - PROMPTS[b] for b in picked)
        want = torch.cat([scores.sampled_logprobs[b][valid[b]] for b in picked]).mean()
        assert math.isclose(diag["mean_logprob"], float(want), rel_tol=1e-5)
        assert diag["seconds"] >= 0.0
    assert scores.teacher_name == "multi:chat,code,math"


def test_routed_full_logits_are_merged():
    named = teachers(full_logits=True)
    request = make_request(ROWS, PROMPTS, vocab_size=V, domains=DOMAINS)
    scores = MultiTeacher(named, routes=ROUTES, default="chat").score(request)
    for b, name in enumerate(EXPECTED):
        v = request.valid_mask()[b]
        with torch.no_grad():
            logits = named[name].model(torch.tensor([ROWS[b][:-1]]))[0]
        torch.testing.assert_close(scores.logits_shard[b][v], logits[v[: len(ROWS[b]) - 1]], **tol(logits))


def test_unknown_domain_without_default_names_it_and_the_known_ones():
    multi = MultiTeacher(teachers(), routes=ROUTES)
    with pytest.raises(TeacherError, match=r"row 2 has domain 'arena', which no teacher serves; known domains: "
                                           r"\['aime', 'gsm8k', 'livecodebench'\] \(and no default teacher\)"):
        multi.score(make_request(ROWS, PROMPTS, vocab_size=V, domains=DOMAINS))
    with pytest.raises(TeacherError, match="carries no domains"):
        multi.score(make_request(ROWS, PROMPTS, vocab_size=V))
    named = teachers()
    MultiTeacher(named, routes=ROUTES, default="chat").score(make_request(ROWS, PROMPTS, vocab_size=V))
    assert named["chat"].requests[-1].batch_size == 5 and not named["math"].requests


def test_routed_teachers_are_scored_concurrently():
    barrier = threading.Barrier(2, timeout=20)

    class Waiting(ModelTeacher):
        def score(self, request):
            barrier.wait()          # both teachers must be inside score at once, or this times out
            return super().score(request)

    named = {n: Waiting(TinyCausalLM(V, seed=i).eval(), V, name=n) for i, n in enumerate(("math", "code"))}
    multi = MultiTeacher(named, routes=ROUTES)
    assert multi.concurrent
    multi.score(make_request(ROWS[:2], PROMPTS[:2], vocab_size=V, domains=["aime", "livecodebench"]))
    assert not MultiTeacher(teachers(full_logits=True), routes=ROUTES).concurrent   # colocated: collectives


# -- mixtures on sampled-token logprobs ---------------------------------------------------------------------------

WEIGHTS = {"math": 2.0, "code": 6.0}
W = {"math": 0.25, "code": 0.75}


def test_geometric_mixture_of_served_teachers_is_the_unnormalised_weighted_log_mean():
    named = teachers(names=("math", "code"))
    multi = MultiTeacher(named, mixture="geometric", weights=WEIGHTS)
    assert multi.weights == W
    request = make_request(ROWS, PROMPTS, vocab_size=V)
    scores = multi.score(request)
    logq = [log_probs(t, request) for t in named.values()]
    want = sum(W[n] * gather(lq, request).squeeze(-1) for n, lq in zip(named, logq))
    v = request.valid_mask()
    torch.testing.assert_close(scores.sampled_logprobs[v], want[v], **tol(*logq))
    assert scores.teacher_name == "multi-geometric-unnormalised:code,math"
    # It is below the normalised geometric mixture's log-prob (Z <= 1).
    geo = torch.log_softmax(sum(W[n] * log_probs(t, request) for n, t in named.items()), dim=-1)
    assert bool((scores.sampled_logprobs[v] <= gather(geo, request).squeeze(-1)[v] + 1e-6).all())
    for kwargs in ({"topk": 2}, {"extra": 2}):
        with pytest.raises(TeacherError, match="known only up to its normaliser"):
            multi.score(make_request(ROWS, PROMPTS, vocab_size=V, **kwargs))


def test_arithmetic_mixture_sampled_and_extra_ids_are_exact():
    named = teachers(names=("math", "code"))
    request = make_request(ROWS, PROMPTS, extra=3, vocab_size=V)
    scores = MultiTeacher(named, mixture="arithmetic", weights=WEIGHTS).score(request)
    mix = torch.log(sum(W[n] * log_probs(t, request).exp() for n, t in named.items())).float()
    v = request.valid_mask()
    torch.testing.assert_close(scores.sampled_logprobs[v], gather(mix, request).squeeze(-1)[v], **tol(mix))
    used = v.unsqueeze(-1) & (request.extra_ids >= 0)
    torch.testing.assert_close(scores.extra_logprobs[used], gather(mix, request, request.extra_ids)[used], **tol(mix))
    assert float(scores.extra_logprobs[~used].abs().sum()) == 0.0
    assert scores.teacher_name == "multi-arithmetic:code,math"
    assert set(scores.per_teacher) == {"math", "code"}


def test_arithmetic_topk_from_the_union_is_exact_and_certified_where_the_bound_holds():
    named = teachers(names=("math", "code"))
    request = make_request(ROWS, PROMPTS, topk=4, extra=2, vocab_size=V)
    scores = MultiTeacher(named, mixture="arithmetic", weights=WEIGHTS).score(request)
    mix = torch.log(sum(W[n] * log_probs(t, request).exp() for n, t in named.items())).float()
    v = request.valid_mask()
    # Exact log-probs at the returned ids, descending.
    torch.testing.assert_close(scores.topk_logprobs[v], mix.gather(-1, scores.topk_ids)[v], **tol(mix))
    assert bool((scores.topk_logprobs[v][:, :-1] >= scores.topk_logprobs[v][:, 1:]).all())
    # Where certified, they are the mixture's true top-k.
    rate = scores.per_teacher["mixture"]["topk_certified_rate"]
    kth = torch.stack([log_probs(t, request).topk(4).values[..., -1] for t in named.values()]).float()
    bound = torch.log(W["math"] * kth[0].exp() + W["code"] * kth[1].exp())
    certified = (scores.topk_logprobs[..., -1] >= bound) & v
    assert math.isclose(rate, float(certified.sum() / v.sum()), rel_tol=1e-6) and rate > 0.5
    true_top = mix.topk(4).indices
    assert torch.equal(scores.topk_ids[certified].sort(-1).values, true_top[certified].sort(-1).values)
    # The asked extra ids come back exactly, the union ids are not mixed into them.
    used = v.unsqueeze(-1) & (request.extra_ids >= 0)
    torch.testing.assert_close(scores.extra_logprobs[used], gather(mix, request, request.extra_ids)[used], **tol(mix))
    # Two rounds per teacher: top-k, then the union as extra ids (after the asked ones).
    second = named["math"].requests[-1]
    assert second.topk == 0 and second.extra_ids.shape[-1] == 2 + 8


class ConstantLM(torch.nn.Module):
    """The same next-token distribution at every position."""

    def __init__(self, probs):
        super().__init__()
        self.logits = torch.log(torch.tensor(probs))

    def forward(self, tokens):
        return self.logits.expand(tokens.shape[0], tokens.shape[1], -1)


def test_uncertified_topk_is_reported_and_refused_when_exactness_is_required():
    # q1 = (.5, .1, .4), q2 = (.1, .5, .4): the mixture (.3, .3, .4) has top-1 id 2, in neither teacher's top-1.
    rest = [1e-9] * 3
    named = {"a": ModelTeacher(ConstantLM([.5, .1, .4] + rest), 6, name="a"),
             "b": ModelTeacher(ConstantLM([.1, .5, .4] + rest), 6, name="b")}
    request = make_request([[0, 1, 2, 0]], [2], topk=1, vocab_size=6)
    scores = MultiTeacher(named, mixture="arithmetic").score(request)
    assert scores.topk_ids[0, 1:].tolist() == [[0], [0]]         # the union's best, ties to the lower id
    torch.testing.assert_close(scores.topk_logprobs[0, 1:], torch.full((2, 1), math.log(0.3)), rtol=1e-6, atol=1e-5)
    assert scores.per_teacher["mixture"]["topk_certified_rate"] == 0.0
    with pytest.raises(TeacherError, match=r"top-1 at row 0, column 1 is not certified .* -1\.204 < the bound "
                                           r"-0\.6931"):
        MultiTeacher(named, mixture="arithmetic", require_exact_topk=True).score(request)
    # k = 3: the union holds every id with real mass, and the top-k is certified.
    scores = MultiTeacher(named, mixture="arithmetic", require_exact_topk=True).score(
        make_request([[0, 1, 2, 0]], [2], topk=3, vocab_size=6))
    assert scores.topk_ids[0, 1].tolist() == [2, 0, 1]


def test_topk_mixture_needs_teachers_that_score_extra_ids():
    named = teachers(names=("math", "code"))
    named["code"].scores_extra_ids = False
    with pytest.raises(TeacherError, match=r"\['code'\] cannot score extra ids"):
        MultiTeacher(named, mixture="arithmetic").score(make_request(ROWS, PROMPTS, topk=2, vocab_size=V))


# -- mixtures on full logits --------------------------------------------------------------------------------------

def check_full_logit_mixture(named, mixture, group=None):
    """Score ROWS with the mixture of `named`; assert every field equals the formula on the unpadded logits.
    Returns the scores."""
    request = make_request(ROWS, PROMPTS, topk=5, extra=3, vocab_size=V)
    scores = MultiTeacher(named, mixture=mixture, weights=WEIGHTS, vocab_group=group).score(request)
    assert scores.teacher_name == f"multi-{mixture}:code,math"
    logq = {n: log_probs(t, request) for n, t in named.items()}
    if mixture == "geometric":
        mix = torch.log_softmax(sum(W[n] * logq[n] for n in named), dim=-1).float()
    else:
        mix = torch.log(sum(W[n] * logq[n].exp() for n in named)).float()
    v = request.valid_mask()
    torch.testing.assert_close(scores.sampled_logprobs[v], gather(mix, request).squeeze(-1)[v], **tol(mix))
    used = v.unsqueeze(-1) & (request.extra_ids >= 0)
    torch.testing.assert_close(scores.extra_logprobs[used], gather(mix, request, request.extra_ids)[used], **tol(mix))
    top = mix.topk(5)
    assert torch.equal(scores.topk_ids[v], top.indices[v])
    torch.testing.assert_close(scores.topk_logprobs[v], top.values[v], **tol(mix))
    assert scores.per_teacher["math"]["rows"] == 5
    return scores, mix, v


@pytest.mark.parametrize("mixture", ["geometric", "arithmetic"])
@pytest.mark.parametrize("padded", [None, 40])
def test_full_logit_mixtures_equal_their_formulas(mixture, padded):
    named = teachers(full_logits=True, padded_vocab=padded, names=("math", "code"))
    scores, mix, v = check_full_logit_mixture(named, mixture)
    # The mixture's logits shard: its softmax over the true vocabulary is the mixture.
    assert scores.logits_shard.shape[-1] == (padded or V)
    torch.testing.assert_close(torch.log_softmax(scores.logits_shard[..., :V], -1)[v], mix[v], **tol(mix))


class ShardedTeacher(ModelTeacher):
    """A colocated teacher at TP = world size: returns this rank's contiguous shard of the padded logits."""

    def score(self, request):
        import torch.distributed as dist
        scores = super().score(request)
        width = scores.logits_shard.shape[-1] // dist.get_world_size()
        rank = dist.get_rank()
        scores.logits_shard = scores.logits_shard[..., rank * width:(rank + 1) * width].contiguous()
        return scores


def sharded_mixture_worker(padded_vocab):
    """Every rank: the mixtures of two TP-sharded teachers (vocabulary padded with large logits) equal the
    single-process formulas on the unpadded logits; returns the number of checks."""
    import torch.distributed as dist
    dist.init_process_group("gloo")
    checks = 0
    for mixture in ("geometric", "arithmetic"):
        named = {n: ShardedTeacher(TinyCausalLM(V, seed=10 + i).eval(), V, name=n, full_logits=True,
                                   padded_vocab=padded_vocab) for i, n in enumerate(("math", "code"))}
        scores, _, _ = check_full_logit_mixture(named, mixture, group=dist.group.WORLD)
        assert scores.logits_shard.shape[-1] == padded_vocab // dist.get_world_size()
        checks += 1
    return checks


def test_full_logit_mixtures_of_tp_sharded_teachers_equal_their_formulas():
    # 37 ids padded to 38 (two shards of 19); the padding logit (1e3) would win every top-k if it were counted.
    assert run_distributed(sharded_mixture_worker, world_size=2, args=(38,), timeout_s=120) == [2, 2]


# -- construction -------------------------------------------------------------------------------------------------

def test_construction_checks():
    named = teachers(names=("math", "code"))
    with pytest.raises(VocabMismatchError, match=r"disagree on the vocabulary size: \{'math': 37, 'other': 38\}"):
        MultiTeacher({"math": named["math"], "other": ModelTeacher(TinyCausalLM(38), 38)}, routes={"a": "math"})
    with pytest.raises(ValueError, match="exactly one of routes"):
        MultiTeacher(named)
    with pytest.raises(ValueError, match="exactly one of routes"):
        MultiTeacher(named, routes={"a": "math"}, mixture="geometric")
    with pytest.raises(ValueError, match=r"unknown teachers \['chat', 'law'\]; known: \['code', 'math'\]"):
        MultiTeacher(named, routes={"a": "law"}, default="chat")
    with pytest.raises(ValueError, match="mixture"):
        MultiTeacher(named, mixture="harmonic")
    with pytest.raises(ValueError, match="one weight per teacher"):
        MultiTeacher(named, mixture="arithmetic", weights={"math": 1.0})
    with pytest.raises(ValueError, match="finite weights > 0"):
        MultiTeacher(named, mixture="arithmetic", weights={"math": 1.0, "code": 0.0})
    assert MultiTeacher(named, mixture="arithmetic").weights == {"math": 0.5, "code": 0.5}
