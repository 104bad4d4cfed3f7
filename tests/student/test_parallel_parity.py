"""The same initial weights trained by plain SGD at TP=1, TP=2, PP=2, TP=2 x PP=2, DP=2 and several micro-batch
sizes for one global batch give the same losses, the same gradient norm at every step and the same weight updates
after 3 steps (float32, relative to the scale of what is compared). Weights move between layouts through
dist_checkpointing.

SGD without momentum, clipping, warm-up or weight decay (parity_workers.SGD) makes every update `-lr * gradient`:
a constant factor on the gradient (a data-parallel sum instead of a mean, an all-reduce applied twice, a token
count taken per rank or per micro-batch) shows in the gradient norm and in every weight update. With Adam, clipping
and a first step at lr 0 it would not (Adam's step is invariant to a gradient scale)."""

import pytest
import torch

from opd_megatron.student.model import VOCAB_PAD_MULTIPLE, padded_vocab_size
from tests.harness import run_distributed
from tests.student import parity_workers as w

# name -> (tp, pp, world size, micro-batch size). The global batch is 8 rows everywhere (parity_workers.TINY):
# DP=2 at micro-batch sizes 1, 2 and 4 is 4, 2 and 1 micro-batches per rank; TP=1 at 8 is one micro-batch.
LAYOUTS = {"tp1": (1, 1, 1, 2), "tp1_mbs8": (1, 1, 1, 8), "dp2": (1, 1, 2, 2), "dp2_mbs1": (1, 1, 2, 1),
           "dp2_mbs4": (1, 1, 2, 4), "tp2": (2, 1, 2, 2), "pp2": (1, 2, 2, 2), "tp2pp2": (2, 2, 4, 2)}
COMPARED = [n for n in LAYOUTS if n != "tp1"]
# Tied input/output embeddings: at PP=2 megatron keeps a copy on the last stage and all-reduces its gradient.
TIED = ("model.tie_embeddings=true",)
STEPS = 3
RTOL = 1e-5           # float32 sums in another order (TP / DP reductions, micro-batch accumulation)
UPDATE_RTOL = 1e-4    # of an update's largest entry: 3 steps of such differences, amplified by the model
F32_EPS = torch.finfo(torch.float32).eps
OUTPUT = "output_layer.weight"  # [padded vocab, hidden]: row v is vocabulary id v (vocab-parallel over TP)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _update_error(got: torch.Tensor, ref: torch.Tensor, init: torch.Tensor) -> float:
    """The largest difference of two updates `got - init` and `ref - init`, in units of the tolerance: the
    reference update's largest entry times UPDATE_RTOL, plus the float32 resolution of the weights themselves
    (a norm weight near 1 moves by ~1e-4, a few ulps of 1)."""
    scale = UPDATE_RTOL * float((ref - init).abs().max()) + 4 * F32_EPS * float(init.abs().max())
    return float((got - ref).abs().max()) / scale


@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    init = str(root / "init")
    run_distributed(w.train_layout, 1, args=(1, 1, None, init, 0), timeout_s=120)
    runs = {}
    for name, (tp, pp, world, mbs) in LAYOUTS.items():
        extra = (*w.SGD, f"parallel.micro_batch_size={mbs}")
        results = run_distributed(w.train_layout, world, args=(tp, pp, init, str(root / name), STEPS, extra),
                                  timeout_s=240)
        runs[name] = {"losses": results[0]["losses"], "grad_norms": [r["grad_norms"] for r in results],
                      "logits": next(r["logits"] for r in results if r["logits"] is not None),
                      "parameters": [r["parameters"] for r in results]}
    weights = run_distributed(w.full_weights, 1, args=([init] + [str(root / n) for n in LAYOUTS],), timeout_s=120)[0]
    runs["init"] = {"weights": weights[0]}
    for name, state in zip(LAYOUTS, weights[1:]):
        runs[name]["weights"] = state
    tied_init = str(root / "tied_init")
    run_distributed(w.train_layout, 1, args=(1, 1, None, tied_init, 0, TIED), timeout_s=120)
    for name, (tp, pp, world) in {"tied_tp1": (1, 1, 1), "tied_pp2": (1, 2, 2)}.items():
        results = run_distributed(w.train_layout, world, args=(tp, pp, tied_init, None, STEPS, TIED + w.SGD),
                                  timeout_s=240)
        runs[name] = {"losses": results[0]["losses"], "grad_norms": [r["grad_norms"] for r in results],
                      "logits": next(r["logits"] for r in results if r["logits"] is not None),
                      "parameters": [r["parameters"] for r in results]}
    return runs


def _assert_grad_norms_match(got_ranks: list[list[float]], ref: list[float], what: str) -> None:
    assert len(ref) == STEPS and all(g > 0.1 for g in ref), f"TP=1 gradient norms {ref}: expected {STEPS} > 0.1"
    for rank, got in enumerate(got_ranks):
        for step, (a, b) in enumerate(zip(got, ref, strict=True)):
            assert abs(a - b) <= RTOL * b, (f"{what} rank {rank} step {step}: gradient norm {a} vs TP=1 {b} "
                                            f"(ratio {a / b:.6f}, expected 1 within {RTOL})")


def test_the_vocabulary_is_padded_and_split_over_both_tp_ranks():
    """The model's vocabulary (300 ids) is not a multiple of the pad multiple; at TP=2 the padded 384 rows split
    192 / 192, so real ids land on both ranks (192..299 on rank 1) and the padding (300..383) too, and the training
    batches' labels use ids of both shards."""
    assert w.VOCAB % VOCAB_PAD_MULTIPLE != 0
    padded = padded_vocab_size(w.VOCAB, 2)
    shard = padded // 2
    assert (padded, shard) == (384, 192) and shard < w.VOCAB < padded
    labels = torch.cat([s.labels[s.loss_mask > 0] for step in range(STEPS) for s in w.global_batch(step)])
    assert int((labels < shard).sum()) > 20 and int((labels >= shard).sum()) > 20, labels
    assert int(labels.max()) < w.VOCAB


@pytest.mark.parametrize("layout", COMPARED)
def test_losses_match_tp1(parity_runs, layout):
    ref = parity_runs["tp1"]["losses"]
    got = parity_runs[layout]["losses"]
    assert len(got) == STEPS and ref[0] > 5.0  # ~log(300): an untrained model
    for step, (a, b) in enumerate(zip(got, ref)):
        assert abs(a - b) <= RTOL * abs(b), f"{layout} step {step}: loss {a} vs TP=1 {b}"


@pytest.mark.parametrize("layout", COMPARED)
def test_gradient_norms_match_tp1_at_every_step(parity_runs, layout):
    _assert_grad_norms_match(parity_runs[layout]["grad_norms"], parity_runs["tp1"]["grad_norms"][0], layout)


@pytest.mark.parametrize("layout", COMPARED)
def test_weight_updates_after_three_steps_match_tp1(parity_runs, layout):
    init, ref = parity_runs["init"]["weights"], parity_runs["tp1"]["weights"]
    got = parity_runs[layout]["weights"]
    assert set(got) == set(ref) == set(init) and len(ref) > 10
    # The updates are large enough to compare: every tensor moved by more than its float32 resolution.
    for key in ref:
        moved = float((ref[key] - init[key]).abs().max())
        assert moved > 100 * F32_EPS * float(init[key].abs().max()), f"{key} moved only {moved:.2e} in 3 steps"
    worst = max(((_update_error(got[k], ref[k], init[k]), k) for k in ref), key=lambda x: x[0])
    assert worst[0] <= 1.0, (f"{layout}: the update of {worst[1]} differs from TP=1's by {worst[0]:.1f} x the "
                             f"tolerance ({UPDATE_RTOL} of its largest entry)")


@pytest.mark.parametrize("layout", ["tp1"] + COMPARED)
def test_real_vocabulary_rows_on_both_tp_shards_train_and_padding_rows_do_not(parity_runs, layout):
    """The output layer's rows of real ids on both TP=2 shards moved; the padding rows got no gradient, so plain
    SGD left them exactly at their initial values."""
    shard = padded_vocab_size(w.VOCAB, 2) // 2
    delta = parity_runs[layout]["weights"][OUTPUT] - parity_runs["init"]["weights"][OUTPUT]
    for rows, what in ((slice(0, shard), "ids 0..191 (TP rank 0)"), (slice(shard, w.VOCAB), "ids 192..299 (rank 1)")):
        assert bool((delta[rows].abs().amax(dim=1) > 0).all()), f"{layout}: some output rows of {what} did not move"
    assert float(delta[w.VOCAB:].abs().max()) == 0.0, f"{layout}: the padding rows 300.. of {OUTPUT} changed"


@pytest.mark.parametrize("layout", COMPARED)
def test_logits_after_training_match_tp1(parity_runs, layout):
    ref = parity_runs["tp1"]["logits"]
    got = parity_runs[layout]["logits"]
    assert got.shape == ref.shape == (2, w.SEQ, w.VOCAB)
    assert _rel(got, ref) <= RTOL


def test_tied_embeddings_pp2_matches_tp1(parity_runs):
    ref, got = parity_runs["tied_tp1"], parity_runs["tied_pp2"]
    for step, (a, b) in enumerate(zip(got["losses"], ref["losses"], strict=True)):
        assert abs(a - b) <= RTOL * abs(b), f"tied PP=2 step {step}: loss {a} vs TP=1 {b}"
    # The shared embedding's gradient is summed over its two copies once: a missing or doubled all-reduce between
    # the first and last stage changes the gradient norm and, through the SGD updates, the logits.
    _assert_grad_norms_match(got["grad_norms"], ref["grad_norms"][0], "tied PP=2")
    assert ref["losses"] != parity_runs["tp1"]["losses"]  # tying changed the model
    assert _rel(got["logits"], ref["logits"]) <= RTOL


def test_the_student_parameter_count_is_the_same_at_every_layout(parity_runs):
    """compute/student_flops counts the model's parameters once: TP shards summed, TP-replicated norms once, and the
    last stage's copy of tied embeddings at PP=2 not at all; every rank reports the whole model's count."""
    for tied, layouts in ((False, list(LAYOUTS)), (True, ["tied_tp1", "tied_pp2"])):
        reference = parity_runs[layouts[0]]["parameters"][0]
        for name in layouts:
            assert parity_runs[name]["parameters"] == [reference] * len(parity_runs[name]["parameters"]), \
                f"{name}: parameter counts per rank {parity_runs[name]['parameters']}, expected {reference} (TP=1)"
