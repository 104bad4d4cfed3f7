"""One OPD step at every parallel layout equals the TP=1 step, given the same rollouts and teacher: the loss, the SGD
update of every weight (within 1e-4 of the largest update, float32), the grad norm and the logged metrics, for
every route of `opd_workers.ROUTES` (route A: full reverse KL, JSD on a union+tail support with the sequence
normaliser, forward KL with a reference-KL regulariser, an entropy bonus and a teacher-confidence gate; route B:
return-to-go with a PPO ratio and truncated IS, group baseline + verifier hybrid with the constant normaliser, a
batch-mean baseline, a group baseline on the clipped log-ratio, GAE with a value head, MiniLLM's single-step
decomposition, a PPO step on stale data sampled at another temperature / top-p; CR-OPD), at TP=2, TP=4, PP=2, DP=2,
TP2xPP2 and TP2xDP2, each at two micro-batch sizes of the same global batch.

The vocabulary is a real 1000-id tokenizer (not a multiple of 128: padded to 1024, so at TP=4 every rank holds
real ids and the last one padding too), and the fixed batch's responses and both models' top-k candidates fall
on every TP=4 shard (`test_the_batch_reaches_every_vocab_shard`): every vocab-parallel merge is exercised. At DP=2
each data-parallel rank trains its own half of the batch (whole prompt groups), as the loop gives it.
"""

import time

import pytest

from tests.harness import run_distributed
from tests.opd import opd_workers as w

ROUTES = list(w.ROUTES)
LAYOUTS = {"tp1": (1, 1, 1), "tp2": (2, 1, 1), "tp4": (4, 1, 1), "pp2": (1, 2, 1), "dp2": (1, 1, 2),
           "tp2pp2": (2, 2, 1), "tp2dp2": (2, 1, 2)}          # (tp, pp, dp)
MICRO_BATCH_SIZES = [4, 2]        # the first one at TP=1 is the reference; global batch 8 rows
CASES = [(layout, mbs) for layout in LAYOUTS for mbs in MICRO_BATCH_SIZES if (layout, mbs) != ("tp1", 4)]
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("opd_parity")
    files = {"tokenizer": w.write_tokenizer(str(root / "tokenizer.json")),
             "prompts": w.write_prompts(str(root / "prompts.jsonl")), "student": str(root / "student"),
             "teacher": str(root / "teacher"), "start_logprobs": str(root / "start_logprobs.pt")}
    started = time.perf_counter()
    reach = run_distributed(w.make_init, 1, args=(files,), timeout_s=300)[0]
    TIMINGS["init"] = time.perf_counter() - started
    return {"root": root, "files": files, "reach": reach, "layouts": {}}


@pytest.fixture(scope="module")
def layout_steps(setup):
    """layout -> {(route, mbs): result}, computed on first use (TP=1 first: its checkpoints are the references)."""
    failed: dict[str, str] = {}

    def get(layout: str) -> dict:
        done = setup["layouts"]
        if layout in failed:      # one crash fails every test of the layout, without running it again
            pytest.fail(f"the {layout} processes failed (see the first failing test of {layout}):\n"
                        f"{failed[layout][-3000:]}")
        if layout not in done:
            if layout != "tp1":
                get("tp1")
            tp, pp, dp = LAYOUTS[layout]
            references = {} if layout == "tp1" else {route: done["tp1"][(route, MICRO_BATCH_SIZES[0])]["saved"]
                                                     for route in ROUTES}
            started = time.perf_counter()
            try:
                ranks = run_distributed(w.opd_steps, tp * pp * dp,
                                        args=(tp, pp, setup["files"], str(setup["root"] / layout), ROUTES,
                                              MICRO_BATCH_SIZES, references), timeout_s=600)
            except Exception as exc:
                failed[layout] = str(exc)
                raise
            TIMINGS[layout] = time.perf_counter() - started
            print(f"\n[parity] {layout}: {len(ROUTES)} routes x {len(MICRO_BATCH_SIZES)} micro-batch sizes on "
                  f"{tp * pp * dp} processes in {TIMINGS[layout]:.1f} s")
            done[layout] = ranks[0]
        return done[layout]
    return get


def test_the_batch_reaches_every_vocab_shard(setup):
    from opd_megatron.data.tokenizer import load_tokenizer
    from opd_megatron.student.model import padded_vocab_size
    tokenizer = load_tokenizer(setup["files"]["tokenizer"])
    assert tokenizer.vocab_size == w.VOCAB and w.VOCAB % 128 != 0
    padded = padded_vocab_size(w.VOCAB, 4)
    assert padded - padded // 4 < w.VOCAB < padded, "the last TP=4 shard must hold real ids and padding"
    reach = setup["reach"]
    for key in ("response_shards", "student_top4_shards", "teacher_top4_shards"):
        assert min(reach[key]) > 0, f"{key}: {reach[key]} (count per TP=4 vocab shard); expected every shard"


def test_routes_are_active_at_tp1(layout_steps):
    ref = layout_steps("tp1")
    metrics = {route: ref[(route, MICRO_BATCH_SIZES[0])]["metrics"] for route in ROUTES}
    losses = {route: m["loss"] for route, m in metrics.items()}
    assert len({round(v, 6) for v in losses.values()}) == len(ROUTES), losses
    # Each gate and routing keeps some tokens and drops (or clips) others: the merge paths they add are exercised.
    for route, key in (("cr_opd", "routing/routed_rate"),
                       ("fkl_reference_entropy", "gates/teacher_confidence_keep_rate"),
                       ("pg_rtg_ppo", "gates/truncated_is_keep_rate"),
                       ("pg_ppo_sampled", "gates/truncated_is_keep_rate"),
                       ("pg_ppo_sampled", "importance/clip_fraction"),
                       ("pg_group_logclip", "gates/log_ratio_clip_keep_rate")):
        assert 0.0 < metrics[route][key] < 1.0, f"{route}: {key} = {metrics[route][key]}; expected in (0, 1)"
    assert "value/explained_variance" in metrics["gae"]


def _close(a: float, b: float, rel: float) -> bool:
    """Relative to max(|b|, 1): a policy-gradient loss is a sum of O(1..10) terms (-A_t log pi, log pi ~ -7 over
    1000 ids) that may cancel to far below 1, and float32 sums carry errors relative to the terms."""
    return abs(a - b) <= rel * max(abs(b), 1.0)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("layout,mbs", CASES, ids=[f"{layout}-mbs{mbs}" for layout, mbs in CASES])
def test_step_matches_tp1(layout_steps, layout, mbs, route):
    ref = layout_steps("tp1")[(route, MICRO_BATCH_SIZES[0])]
    got = layout_steps(layout)[(route, mbs)]
    where = f"{layout} mbs={mbs} {route}"
    assert ref["finite"] and got["finite"], where
    a, b = got["metrics"]["loss"], ref["metrics"]["loss"]
    assert _close(a, b, 1e-5), f"{where}: loss {a} vs TP=1 {b}"
    # SGD without momentum or clipping: the update is -lr * gradient, so comparing updates compares gradients.
    update = got["update"]
    scale = max(ref_max for _, ref_max in update.values())
    assert scale > 1e-4, f"{where}: the TP=1 step did not change the weights"
    worst = max((diff / scale, name) for name, (diff, _) in update.items())
    assert worst[0] <= 1e-4, f"{where}: the update of {worst[1]} differs by {worst[0]:.2e} of the largest update"
    a, b = got["metrics"]["grad_norm"], ref["metrics"]["grad_norm"]
    assert _close(a, b, 1e-5), f"{where}: grad_norm {a} vs TP=1 {b}"


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("layout,mbs", CASES, ids=[f"{layout}-mbs{mbs}" for layout, mbs in CASES])
def test_metrics_match_tp1(layout_steps, layout, mbs, route):
    """The logged metrics describe the global batch whatever the layout (not one replica's share)."""
    ref = layout_steps("tp1")[(route, MICRO_BATCH_SIZES[0])]["metrics"]
    got = layout_steps(layout)[(route, mbs)]["metrics"]
    wrong = {key: (got[key], ref[key]) for key in ("log_ratio/mean", "tokens/count", "kl/rkl_exact")
             if not _close(got[key], ref[key], 1e-5)}
    assert not wrong, f"{layout} mbs={mbs} {route}: metric (this layout, TP=1): {wrong}"
