"""Numbers the spec fixes exactly, one OPD step each (docs/opd-math.md; issue "Trustworthy numbers"):
- the PPO ratio is pi_theta / pi_theta_old under the loss's distribution: 1 on fresh data under top-p + tempered
  sampling, the sampler mismatch logged apart (item 3); truncated IS with a PPO ratio weighs by rho, not rho^2
  (item 8);
- the reverse-KL baseline scales with opd.kl_coef (item 9); GAE-OPD with an outcome term does not depend on the
  micro-batch size (item 5); the whole-batch pre-pass clips the log-ratio as the loss does (item 7); the constant
  normaliser is global rows x rollout.max_new_tokens (item 2);
- sampling never leaves the tokenizer's vocabulary, and a self-teacher over a padded embedding is its own
  vocabulary (item 11);
- the config refuses a rollout temperature other than opd.student_temperature without the flag (item 3) and
  teacher.overlap without a staleness correction (item 4).
Each fails on the code before the fix."""

import pytest

from opd_megatron.config import ConfigError, load_config
from tests.harness import run_distributed
from tests.opd import numbers_workers as w


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    root = tmp_path_factory.mktemp("opd_numbers")
    return run_distributed(w.scenarios, 1, args=(str(root), list(w.SCENARIOS)), timeout_s=600)[0]


def _max_rel(a: dict, b: dict) -> float:
    scale = max(float(v.abs().max()) for v in b.values())
    assert scale > 1e-6, "the reference step did not change the weights"
    return max(float((a[k] - b[k]).abs().max()) for k in b) / scale


def test_ppo_ratio_is_one_on_fresh_data_under_top_p_and_temperature(steps):
    m = steps["ppo_top_p"]["metrics"]
    for key in ("importance/ratio_mean", "importance/ratio_min", "importance/ratio_max"):
        assert abs(m[key] - 1.0) <= 1e-6, (key, m[key])
    assert m["importance/clip_fraction"] == 0.0
    # The sampler mismatch pi_old / mu is the kept nucleus mass (< 1) on every token: logged on its own keys.
    assert m["mismatch/ratio_max"] <= 1.0 + 1e-6 and m["mismatch/ratio_mean"] < 0.999, m


def test_sampling_stays_in_the_tokenizer_vocabulary(steps):
    ids = [t for row in steps["ppo_top_p"]["sampled"] for t in row]
    assert len(ids) > 20 and max(ids) < 14, f"sampled ids {sorted(set(ids))} include ids past the tokenizer's 14"


def test_logged_rollouts_are_the_rows_that_trained(steps):
    """logging.rollouts=3: three rows of the step, each with its ids, reward and per-token student, teacher and
    behaviour log-probs (the last equal to the batch's)."""
    rows, batch = steps["ppo_top_p"]["rollouts"], steps["ppo_top_p"]["batch"]
    assert [r["row"] for r in rows] == [0, 1, 2] and all(r["step"] == 1 and r["dp_rank"] == 0 for r in rows)
    for r in rows:
        ids = batch.response_ids(r["row"])
        assert r["response_ids"] == ids and r["reward"] in (0.0, 1.0)
        assert len(r["student_logprobs"]) == len(r["teacher_logprobs"]) == len(r["behaviour_logprobs"]) == len(ids)
        assert all(x <= 0 for x in r["student_logprobs"] + r["teacher_logprobs"] + r["behaviour_logprobs"])
        start = int(batch.prompt_lengths[r["row"]]) - 1
        expected = batch.behaviour_logprobs[r["row"], start: start + len(ids)].tolist()
        assert r["behaviour_logprobs"] == pytest.approx(expected, abs=1e-6)


def test_truncated_is_with_ppo_weighs_by_rho_not_rho_squared(steps):
    assert _max_rel(steps["ppo_tis"]["update"], steps["logprob_tis"]["update"]) <= 1e-5


def test_reverse_kl_baseline_scales_with_kl_coef(steps):
    one, two = steps["rkl_baseline_k1"]["update"], steps["rkl_baseline_k2"]["update"]
    assert _max_rel({k: v / 2 for k, v in two.items()}, one) <= 1e-5


def test_gae_with_outcome_term_does_not_depend_on_micro_batch_size(steps):
    assert _max_rel(steps["gae_outcome_mb1"]["update"], steps["gae_outcome_mb8"]["update"]) <= 1e-5


def test_whole_batch_prepass_clips_the_log_ratio(steps):
    # |r_t| <= 0.01 after the clip, so returns are within 0.01 x (response length <= 9) and a leave-one-out group
    # baseline within as much again: |A_t| <= 0.18, hence its std too. Raw log-ratios are O(1).
    m = steps["group_clip"]["metrics"]
    assert m["advantage/std"] <= 2 * 0.01 * w.MAX_NEW, m["advantage/std"]


def test_constant_normalizer_is_global_rows_times_max_new_tokens(steps):
    tokens = steps["tokens"]
    mean = steps["rkl_token_mean"]["metrics"]["loss"]
    constant = steps["rkl_constant"]["metrics"]["loss"]
    expected = mean * tokens["mask"] / (tokens["rows"] * tokens["max_new"])
    assert abs(constant - expected) <= 1e-5 * abs(expected), (constant, expected)


def test_self_teacher_over_a_padded_embedding(tmp_path):
    out = run_distributed(w.self_teacher_padded_embedding, 1, args=(str(tmp_path),), timeout_s=300)[0]
    assert out["vocab"] == 259 and out["max_id"] < 259 and out["finite"], out


BASE = ["run.algorithm=opd", "teacher.kind=colocated", "teacher.colocated.path=unused", "parallel.global_batch_size=64"]
SERVED = ["run.algorithm=opd", "teacher.kind=sglang", "teacher.server.urls=[http://127.0.0.1:1]",
          "teacher.server.vocab_size=14", "parallel.global_batch_size=64", "opd.route_a.support=teacher_topk",
          "teacher.topk=20"]


def test_rollout_temperature_must_match_the_loss_unless_allowed():
    with pytest.raises(ConfigError, match=r"rollout.temperature=0.7 differs from opd.student_temperature=1.0"):
        load_config(None, BASE + ["rollout.temperature=0.7"])
    load_config(None, BASE + ["rollout.temperature=0.7", "opd.allow_temperature_mismatch=true"])
    load_config(None, BASE + ["rollout.temperature=0.7", "opd.student_temperature=0.7"])


@pytest.mark.parametrize("route, ok", [
    (["opd.loss=policy_gradient"], False),
    (["opd.loss=cr_opd"], False),
    (["opd.loss=policy_gradient", "opd.policy_gradient.ratio=ppo"], True),
    (["opd.loss=policy_gradient", "opd.gates.truncated_is=[0.5, 2.0]"], True),
    (["opd.loss=cr_opd", "opd.gates.truncated_is=[0.5, 2.0]"], True),
    (["opd.loss=divergence"], True),
])
def test_overlap_needs_a_staleness_correction(route, ok):
    overrides = SERVED + ["teacher.overlap=true"] + route
    if ok:
        load_config(None, overrides)
    else:
        with pytest.raises(ConfigError, match=r"teacher.overlap: expected false with opd.loss="):
            load_config(None, overrides)


@pytest.fixture(scope="module")
def unlogged(tmp_path_factory):
    root = tmp_path_factory.mktemp("opd_unlogged")
    return run_distributed(w.unlogged_steps, 1, args=(str(root),), timeout_s=600)[0]


@pytest.mark.parametrize("name", list(w.UNLOGGED))
def test_a_step_the_run_does_not_log_makes_the_same_update(unlogged, name):
    """A step the run does not log (logging.log_interval) skips the per-step vocabulary diagnostics (entropies,
    top-k overlap, mass on the teacher's support) and the log-ratios nothing in its loss reads, and makes the same
    update and loss as a logged step; only the gates' own entropies are computed."""
    logged, quiet = unlogged[(name, True)], unlogged[(name, False)]
    assert quiet["loss"] == pytest.approx(logged["loss"], rel=1e-6)
    assert _max_rel(quiet["update"], logged["update"]) < 1e-6
    gated = name == "jsd_entropy_gates"
    assert "entropy/student" in logged["metrics"]
    assert ("entropy/student" in quiet["metrics"]) == gated     # the gates' entropies are computed anyway
    assert "agreement/topk_overlap" in logged["metrics"] and "agreement/topk_overlap" not in quiet["metrics"]
    if name == "pg_return_to_go":      # route B's freed-mass split: two more vocabulary passes, logged steps only
        key = "routing/freed_mass_to_teacher_support"
        assert key in logged["metrics"] and key not in quiet["metrics"]
    assert quiet["entropy_passes"] == (2 if gated else 0), quiet["entropy_passes"]
    assert logged["entropy_passes"] >= 1


def test_where_negative_advantages_send_the_mass_they_take(tmp_path):
    """routing/freed_mass_to_teacher_support: 1 when the teacher supports every id (the plain PG term gives each
    other token |A| pi_v, all of them supported); below 1 with the teacher's top-2; CR-OPD on the same support
    sends each routed token's mass into it, so its share is higher (the student reaches every id, so C_t is empty
    only where the sampled token is the one supported id besides none: a fallback to the plain PG term)."""
    metrics = run_distributed(w.freed_mass_steps, 1, args=(str(tmp_path),), timeout_s=600)[0]
    share = {name: m["routing/freed_mass_to_teacher_support"] for name, m in metrics.items()}
    assert share["pg_support_all"] == pytest.approx(1.0, abs=1e-6)
    assert 0.0 < share["pg_support_top2"] < 0.9
    assert share["cr_support_top2"] > share["pg_support_top2"] + 0.05, share
    assert metrics["cr_support_top2"]["routing/routed_rate"] > 0
