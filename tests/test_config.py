"""Typed run config: YAML + dotted overrides, and the error message for each kind of bad input."""

from pathlib import Path

import pytest

from opd_megatron.config import MODEL_PRESETS, ConfigError, RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_overrides_apply_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("parallel:\n  tp: 2\noptim:\n  lr: 1.0e-3\n")
    cfg = load_config(path, ["optim.lr=1e-4", "parallel.sequence_parallel=true", "run.name=x"])
    assert isinstance(cfg, RunConfig)
    assert cfg.parallel.tp == 2 and cfg.optim.lr == 1e-4 and cfg.parallel.sequence_parallel is True
    assert cfg.run.run_dir == Path("runs") / "x"


def test_preset_fills_the_model_and_explicit_keys_win():
    cfg = load_config(None, ["model.preset=llama3-8b", "model.num_layers=2"])
    assert cfg.model.hidden_size == 4096 and cfg.model.query_groups == 8 and cfg.model.num_layers == 2
    assert cfg.model.vocab_size == MODEL_PRESETS["llama3-8b"]["vocab_size"]


def test_repository_configs_load():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tpp=2"], r"unknown config key 'parallel.tpp' \(did you mean 'parallel.tp'\?\)"),
    (["optimizer.lr=1e-3"], r"unknown config key 'optimizer' \(did you mean 'optim'\?\)"),
    (["optim.lr=-1e-4"], r"optim.lr: expected a positive finite float, got -0.0001"),
    (["model.preset=llama-8b"], r"model.preset: unknown preset 'llama-8b'.*did you mean 'llama3-8b'"),
    (["parallel.tp=3"], r"parallel.tp: expected a divisor of model.num_attention_heads=4, got 3"),
    (["parallel.global_batch_size=10", "parallel.micro_batch_size=4"],
     r"parallel.global_batch_size: expected a multiple of parallel.micro_batch_size=4, got 10"),
    (["parallel.tp=two"], r"parallel.tp: expected an integer, got 'two'"),
    (["model.normalization=rmsnorm"], r"model.normalization: expected one of \['RMSNorm', 'LayerNorm'\].*"
                                      r"did you mean 'RMSNorm'"),
    (["model.num_layers=3", "parallel.pp=2"], r"parallel.pp: expected a divisor of model.num_layers=3, got 2"),
    (["model.num_query_groups=3"], r"model.num_query_groups: expected a divisor of model.num_attention_heads=4"),
    (["data.seq_length=1024"], r"data.seq_length: expected at most model.max_position_embeddings=256, got 1024"),
    (["parallel.sequence_parallel=true"], r"parallel.sequence_parallel: expected false when parallel.tp == 1"),
    (["run.device=cpu", "model.dtype=bf16"], r"need run.device=cuda"),
    (["parallel=4"], r"parallel: expected a mapping of keys, got int 4"),
    (["tp=2"], r"unknown config key 'tp'"),
    (["parallel.tp"], r"override 'parallel.tp': expected the form section.key=value"),
    (["logging.rollouts=-1"], r"logging.rollouts: expected an integer >= 0 \(rows per data-parallel rank\), got -1"),
    (["opd.routing.form=kl"], r"opd.routing.form: expected one of \['matched', 'kl_target'\]"),
])
def test_bad_config_errors_name_the_key_and_the_expectation(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


# The bases the combination cases below start from; each is valid on its own (test_the_bases_are_valid), so every
# rejection comes from the keys the case adds.
OPD = ["run.algorithm=opd", "parallel.global_batch_size=64", "teacher.path=/ckpt/teacher"]
SGLANG = [*OPD, "teacher.kind=sglang", "teacher.server={urls: [http://127.0.0.1:30000], vocab_size: 512}"]
TOPK = ["opd.support=teacher_topk", "teacher.topk=16"]  # a support a served teacher can give
PG = ["opd.loss=policy_gradient"]
MULTI = [*OPD, "teacher.kind=multi"]
FULL = "needs the teacher's full distribution: use teacher.kind=colocated"


def test_the_bases_are_valid():
    for overrides in (OPD, [*SGLANG, *TOPK], [*SGLANG, *PG], [*OPD, *PG],
                      [*MULTI, "teacher.members=[{name: a, path: /a}]", "teacher.default=a"]):
        load_config(None, overrides)


# Every combination of settings that config.py rejects (the section validates, RunConfig.validate, _validate_opd,
# validate_for_world below), each with the message that names the keys and what would work.
@pytest.mark.parametrize("overrides, message", [
    # section validates
    (["model.hidden_size=66"], r"model.hidden_size: expected a multiple of model.num_attention_heads=4 \(or set "
                               r"model.kv_channels\), got 66"),
    (["model.num_moe_experts=2", "model.moe_router_topk=3"],
     r"model.moe_router_topk: expected an integer in \[1, model.num_moe_experts=2\], got 3"),
    (["optim.min_lr=0.01"], r"optim.min_lr: expected a float in \[0, optim.lr=0.001\], got 0.01"),
    ([*OPD, "rollout.source=jsonl"], r"rollout.path: expected a JSONL prompt file with rollout.source=jsonl, got ''"),
    ([*MULTI, "teacher.members=[{name: a, path: /a}, {name: a, path: /b}]", "teacher.default=a"],
     r"teacher.members: expected a list of teachers with distinct non-empty names, got \['a', 'a'\]"),
    ([*MULTI, "teacher.members=[{name: a, path: /a}]", "teacher.default=a", "teacher.mixture=geometric"],
     r"teacher.routes: expected either routes \(and/or default\) for per-domain routing, or a mixture, not both"),
    ([*MULTI, "teacher.members=[{name: a, path: /a}]"], r"teacher.routes: expected either routes"),
    ([*MULTI, "teacher.members=[{name: a, path: /a}]", "teacher.routes={math: b}"],
     r"teacher.routes: expected member names from \['a'\], got 'b'"),
    ([*MULTI, "teacher.members=[{name: a}]", "teacher.default=a"],
     r"teacher.members\[0\].path: expected a checkpoint directory, got ''"),
    ([*MULTI, "teacher.members=[{name: a, kind: sglang}]", "teacher.default=a"],
     r"teacher.members\[0\].server.urls: expected a non-empty list of http\(s\):// base URLs, got \[\]"),
    ([*OPD, "teacher.kind=self", "teacher.overlap=true"], r"teacher.overlap: expected false for a self-teacher"),
    ([*OPD, "teacher.kind=sglang"], r"teacher.server.urls: expected a non-empty list of http\(s\):// base URLs"),
    (["run.algorithm=opd", "parallel.global_batch_size=64"],
     r"teacher.path: expected a checkpoint directory for teacher.kind=colocated, got ''"),
    ([*OPD, "teacher.kind=inprocess", "teacher.overlap=true"],
     r"teacher.overlap: expected false for an in-process or colocated teacher"),
    ([*OPD, "opd.gates.truncated_is=[1.5, 2.0]"], r"opd.gates: truncated_is: expected 0 <= eps_lo <= 1 <= eps_hi"),
    ([*OPD, *PG, "opd.estimator=baseline"],
     r"opd.baseline: expected one of group_mean, batch_mean, reverse_kl, value with opd.estimator=baseline"),
    ([*OPD, *PG, "opd.baseline=group_mean"], r"opd.baseline: expected null with opd.estimator=immediate \(set "
                                             r"opd.estimator=baseline to subtract a baseline\), got 'group_mean'"),
    ([*OPD, *PG, "opd.estimator=return_to_go", "opd.gamma=0.9"],
     r"opd.gamma: expected 1.0 with opd.estimator=return_to_go \(use discounted\), got 0.9"),
    # RunConfig.validate: the layout against the model and the device
    (["model.num_query_groups=2", "parallel.tp=4"],
     r"parallel.tp: expected a divisor of the number of query groups \(2\), got 4"),
    (["model.ffn_hidden_size=250", "parallel.tp=4"], r"parallel.tp: expected a divisor of model.ffn_hidden_size=250"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_length=127"],
     r"data.seq_length: expected a multiple of parallel.tp=2 with sequence parallelism, got 127"),
    (["run.device=cpu", "optim.use_distributed_optimizer=true"],
     r"optim.use_distributed_optimizer / model.dtype=bf16\|fp16 need run.device=cuda"),
    # _validate_opd: what the OPD loop cannot run
    (["run.algorithm=opd", "teacher.path=/ckpt/teacher"], r"parallel.global_batch_size: expected "
     r"rollout.prompts_per_step x rollout.samples_per_prompt = 16 x 4 = 64 with run.algorithm=opd, got 16"),
    ([*OPD, "teacher.kind=self", "parallel.pp=2"], r"parallel.pp: expected 1 with teacher.kind=self"),
    (SGLANG, rf"teacher.kind=sglang gives sampled-token and top-k logprobs only, but opd.support=full \(the "
             rf"reverse_kl over the whole vocabulary\) {FULL}"),
    ([*SGLANG, *PG, "opd.estimator=baseline", "opd.baseline=reverse_kl"],
     rf"but opd.baseline=reverse_kl \(the exact per-state reverse KL\) {FULL}"),
    ([*SGLANG, *PG, "opd.estimator=single_step"], rf"but opd.estimator=single_step \(MiniLLM.*\) {FULL}"),
    ([*SGLANG, *TOPK, "opd.gates.teacher_entropy=1.0"], rf"but opd.gates.teacher_entropy {FULL}"),
    ([*SGLANG, "opd.loss=cr_opd", "teacher.topk=20", "opd.routing.teacher_support=threshold"],
     rf"but opd.routing.teacher_support=threshold {FULL}"),
    ([*MULTI, "teacher.default=a",
      "teacher.members=[{name: a, kind: sglang, server: {urls: [http://127.0.0.1:30000], vocab_size: 512}}]"],
     rf"teacher.kind=multi gives sampled-token and top-k logprobs only, but opd.support=full .* {FULL}"),
    ([*SGLANG, "opd.support=teacher_topk", "teacher.topk=4"],
     r"teacher.topk: expected >= 16 for the configured support/routing/gates with a served teacher, got 4"),
    ([*SGLANG, "opd.loss=cr_opd", "teacher.topk=5"], r"teacher.topk: expected >= 20 .*, got 5"),
    ([*SGLANG, *PG, "opd.gates.teacher_confidence=0.5"], r"teacher.topk: expected >= 1 .*, got 0"),
    ([*SGLANG, *TOPK, "opd.support=union"],
     r"teacher.score_student_topk: expected >= opd.support_k=16 with teacher.kind=sglang .*, got 0"),
    ([*OPD, "opd.estimator=discounted"],
     r"opd.estimator: expected the default \(immediate, ratio logprob\) with opd.loss=divergence"),
    ([*OPD, "opd.ratio=ppo"], r"opd.estimator: expected the default \(immediate, ratio logprob\)"),
    ([*OPD, "opd.reference_kl_coef=0.1"],
     r"checkpoint.load: expected the starting checkpoint with opd.reference_kl_coef > 0"),
    ([*OPD, *PG, "opd.on_policy_fraction=0.5"], r"opd.on_policy_fraction: expected 1.0 unless opd.loss=divergence"),
    ([*OPD, *PG, "opd.length_normalized=true"],
     r"opd.length_normalized: expected false unless opd.estimator=single_step"),
    ([*OPD, "rollout.source=jsonl", "rollout.path=/data/prompts.jsonl", "opd.outcome_beta=1.0"],
     r"opd.outcome_beta: expected 0 unless rollout.source=task"),
    ([*MULTI, "teacher.members=[{name: a, path: /a, model: {vocab_size: 300}}]", "teacher.default=a"],
     r"teacher.members\[a\].model.vocab_size=300 differs from model.vocab_size=512"),
    ([*OPD, "teacher.model={vocab_size: 300}"],
     r"teacher.model.vocab_size=300 differs from model.vocab_size=512: student and teacher must share one vocabulary"),
])
def test_incompatible_combinations_are_rejected_naming_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_world_size_must_fit_the_layout():
    cfg = load_config(None, ["parallel.tp=2", "parallel.pp=2"])
    with pytest.raises(ConfigError, match=r"world size 2 is not a multiple of parallel.tp x parallel.pp = 2 x 2"):
        cfg.validate_for_world(2)
    cfg = load_config(None, ["parallel.micro_batch_size=4", "parallel.global_batch_size=12"])
    with pytest.raises(ConfigError, match=r"global_batch_size=12 is not divisible by parallel.micro_batch_size x dp "
                                          r"= 4 x 2"):
        cfg.validate_for_world(2)
    assert cfg.validate_for_world(3).parallel.num_microbatches(3) == 1
    cfg = load_config(None, ["parallel.ep=2"])
    with pytest.raises(ConfigError, match=r"parallel.ep=2 must divide the data-parallel size 3 \(megatron needs tp x "
                                          r"ep x pp to divide the world size 3\)"):
        cfg.validate_for_world(3)
    assert cfg.validate_for_world(4).parallel.dp(4) == 4


def test_bad_yaml_files(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("parallel: [tp: 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections at the top level, got list"):
        load_config(listed)
