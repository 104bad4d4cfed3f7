"""Route A on the student's top-k (`opd.route_a.support: student_topk` / `union`) with a served SGLang teacher.

The loop ranks the student's top-k in a forward-only pass before the request, sends the ids as SGLang's
`token_ids_logprob`, and the loss takes the student's top-k among them with the teacher's log-probs from
`input_token_ids_logprobs`. Checked against a local server answering in SGLang's format from a real (tiny, random)
HF teacher: one OPD step (loss and every weight update) equals the step with the same checkpoint as an in-process
dense teacher on the same support, at TP=1 and TP=2, for both supports in both modes; with teacher.overlap the
top-k pass runs on the main thread of every rank (PP=2) and the first step equals the step without overlap.
Plus the support builder's `student_ids` rule (vocab-parallel = reference; stale ids)."""

from __future__ import annotations

import pytest
import torch

from opd_megatron.math.supports import SparseTeacherLogprobs, build_support, divergence_on_support, top_k_positions
from tests.harness import run_distributed
from tests.opd import sglang_topk_workers as w
from tests.teachers.fake_server import FakeServer, causal_lm_logprobs, sglang_generate, sglang_routes
from tests.tiny_hf import write_tiny_checkpoint

ROUTES = list(w.ROUTES)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The HF teacher directory (its tokenizer is the student's), the student's initial checkpoint, and a fake
    SGLang server on the same HF weights (float32 log_softmax of each row, as SGLang scores prompt tokens)."""
    import transformers

    root = tmp_path_factory.mktemp("sglang_topk")
    teacher_dir = write_tiny_checkpoint(root / "teacher", "llama", seed=3, vocab_size=w.VOCAB, hidden_size=64,
                                        num_heads=2, num_kv_heads=1, intermediate_size=128,
                                        max_position_embeddings=64)
    student = str(root / "student")
    run_distributed(w.make_student_init, 1, args=(student,), timeout_s=120)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    scorer = causal_lm_logprobs(model)
    with FakeServer(sglang_routes(lambda body, headers: sglang_generate(body, scorer))) as server:
        yield {"root": root, "teacher": str(teacher_dir), "student": student, "server": server}


@pytest.fixture(scope="module")
def parity(setup):
    out = {}
    for tp in (1, 2):
        ranks = run_distributed(w.parity_steps, tp, args=(tp, 1, str(setup["root"] / f"tp{tp}"), setup["teacher"],
                                                          setup["server"].url, setup["student"], ROUTES),
                                timeout_s=500)
        out[tp] = ranks
    out["bodies"] = setup["server"].posts("/generate")    # what SGLang was sent by these steps (and nothing else)
    return out


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("tp", [1, 2])
def test_served_step_equals_dense_teacher_on_the_same_support(parity, tp, route):
    for rank, result in enumerate(parity[tp]):
        got = result[route]
        assert got["finite"] == (True, True), f"tp={tp} rank {rank} {route}: a step was not finite"
        # The teacher values differ only by float32 rounding (one row per forward on the server, batched rows in
        # process): updates agree to 1e-4 of the largest update.
        assert got["update_scale"] > 1e-4, f"{route}: the in-process step did not change the weights"
        assert got["update_diff"] <= 1e-4, (f"tp={tp} rank {rank} {route}: the served step's update differs by "
                                            f"{got['update_diff']:.2e} of the largest update")
    served, dense = parity[tp][0][route]["loss"]
    assert abs(served - dense) <= 1e-5 * max(abs(dense), 1e-3), f"tp={tp} {route}: loss {served} vs {dense}"


def test_supports_and_modes_give_different_losses(parity):
    losses = {route: parity[1][0][route]["loss"][1] for route in ROUTES}
    assert len({round(v, 6) for v in losses.values()}) == len(ROUTES), losses


def test_the_student_topk_ids_went_to_sglang(parity):
    batch = w.fixed_batch()
    scored = batch.teacher_request().valid_mask()
    bodies = parity["bodies"]
    with_ids = [body for body in bodies if "token_ids_logprob" in body]
    # One request per served step (8 rows fit one request), 4 routes x (TP=1, TP=2).
    assert len(with_ids) == 2 * len(ROUTES), [sorted(b) for b in bodies]
    for tp in (1, 2):
        for route in ROUTES:
            extra = parity[tp][0][route]["extra_ids"]
            assert extra.shape == (8, 19, w.STUDENT_TOPK)
            assert bool((extra[~scored] == -1).all()) and bool((extra[scored] >= 0).all())
            ordered = extra[scored].sort(dim=-1).values
            assert bool((ordered[:, 1:] > ordered[:, :-1]).all()), "the student's top-k ids are not distinct"
            for rank in range(1, tp):       # every TP rank holds the same answer
                assert torch.equal(parity[tp][rank][route]["extra_ids"], extra)
        # The same weights at TP=1 and TP=2 rank the same ids (ties to the lower id on both layouts).
        assert torch.equal(parity[tp][0][ROUTES[0]]["extra_ids"], parity[1][0][ROUTES[0]]["extra_ids"])
    # What SGLang was sent for a row: the union of its scored columns' ids (it scores one list at every position).
    first = parity[1][0][ROUTES[0]]["extra_ids"]
    body = next(b for b in with_ids if b["top_logprobs_num"] == 0)
    for row, ids in enumerate(body["token_ids_logprob"]):
        assert ids == sorted(set(first[row][scored[row]].flatten().tolist()))


def test_overlap_runs_the_topk_pass_on_the_main_thread_of_every_rank(setup):
    ranks = run_distributed(w.overlap_steps, 2, args=(1, 2, str(setup["root"] / "overlap"), setup["teacher"],
                                                      setup["server"].url, setup["student"], "union_tail"),
                            timeout_s=500)
    for rank, result in enumerate(ranks):
        # Overlap: batch 1 scored at once, batches 2 and 3 at submission; then one batch without overlap. Both
        # pipeline stages take part in every pass, on the main thread.
        assert result["passes"] == [True] * 4, f"rank {rank}: {result['passes']}"
    losses = ranks[0]["losses"]                    # the logging rank reports the loss
    assert all(v is not None and v == v for v in losses[True]), losses
    # The first batch is sampled and scored with the same weights with or without overlap.
    assert abs(losses[True][0] - losses[False][0]) <= 1e-6 * max(abs(losses[False][0]), 1e-3), losses


# -- the support builder's rule for the ids a served teacher scored -------------------------------------------

def _served(student: torch.Tensor, teacher: torch.Tensor, k_t: int, candidates: torch.Tensor):
    logq = torch.log_softmax(teacher, dim=-1)
    top = top_k_positions(teacher, k_t)
    return SparseTeacherLogprobs(top, logq.gather(-1, top), candidates, logq.gather(-1, candidates.clamp_min(0)),
                                 student_ids=candidates)


@pytest.mark.parametrize("support", ["student_topk", "union"])
@pytest.mark.parametrize("mode", ["tail", "renormalized"])
def test_fresh_student_ids_give_the_dense_teacher_support(support, mode):
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(6, 9, 37, generator=gen, dtype=torch.float64) * 3, \
        torch.randn(6, 9, 37, generator=gen, dtype=torch.float64) * 3
    sent = top_k_positions(student, 5)            # what the loop sends: the student's top-5, ascending ids
    got = build_support(student, _served(student, teacher, 4, sent), support, 3, mode)
    want = build_support(student, teacher, support, 3, mode)
    assert torch.equal(got.ids, want.ids)
    for kind in ("reverse_kl", "forward_kl"):
        torch.testing.assert_close(divergence_on_support(kind, got), divergence_on_support(kind, want),
                                   rtol=1e-10, atol=1e-12)


def test_stale_student_ids_give_the_best_scored_ids():
    """teacher.overlap: the ids were ranked one update earlier. The support is the student's best k among them
    (ties to the lower id), every one with a teacher value; the fresh top-k id the teacher never saw is left out."""
    from opd_megatron.math.supports import top_k_among
    student = torch.tensor([[5.0, 4.0, 3.0, 3.0, 1.0, 0.0, 9.0]], dtype=torch.float64)
    stale = torch.tensor([[4, 3, 2, 1, 0]])      # id 6 (now the best) was not sent; ids 2 and 3 tie
    assert top_k_among(student.gather(-1, stale), stale, 3).tolist() == [[0, 1, 2]]
    assert top_k_among(student.gather(-1, stale), torch.tensor([[4, -1, 3, -1, 0]]), 3).tolist() == [[0, 3, 4]]
    teacher = torch.randn(1, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = build_support(student, _served(student, teacher, 1, stale), "student_topk", 3, "tail")
    assert got.ids.tolist() == [[0, 1, 2]]
    logq = torch.log_softmax(teacher, dim=-1)
    torch.testing.assert_close(got.teacher_logp[..., :3], logq[..., [0, 1, 2]])
    with pytest.raises(Exception, match="student_ids: an id appears twice"):
        build_support(student, _served(student, teacher, 1, torch.tensor([[4, 3, 3, 1, 0]])), "student_topk", 3)
    with pytest.raises(Exception, match="k: expected at most 5"):
        build_support(student, _served(student, teacher, 1, stale), "student_topk", 6)


def test_vocab_parallel_student_ids_equal_reference():
    assert run_distributed(w.support_checks, 2, timeout_s=240) == [8, 8]
