"""Typed run config: YAML + dotted overrides, and the error message for each kind of bad input."""

import dataclasses
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import yaml

from opd_megatron.config import (MODEL_PRESETS, MOVED_KEYS, ConfigError, RunConfig, ServerSection, from_dict,
                                 load_config)
from opd_megatron.math.cr_opd import RoutingConfig
from opd_megatron.math.gates import GateConfig
from opd_megatron.teachers.http import HTTPTeacherConfig

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
    (["opd.cr_opd.form=kl"], r"opd.cr_opd.form: expected one of \['matched', 'kl_target'\]"),
])
def test_bad_config_errors_name_the_key_and_the_expectation(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


# The bases the combination cases below start from; each is valid on its own (test_the_bases_are_valid), so every
# rejection comes from the keys the case adds.
OPD = ["run.algorithm=opd", "parallel.global_batch_size=64", "teacher.colocated.path=/ckpt/teacher"]
SGLANG = [*OPD, "teacher.kind=sglang", "teacher.server={urls: [http://127.0.0.1:30000], vocab_size: 512}"]
TOPK = ["opd.route_a.support=teacher_topk", "teacher.topk=16"]  # a support a served teacher can give
PG = ["opd.loss=policy_gradient"]
MULTI = [*OPD, "teacher.kind=multi"]
FULL = "needs the teacher's full distribution: use teacher.kind=colocated"


def test_the_bases_are_valid():
    for overrides in (OPD, [*SGLANG, *TOPK], [*SGLANG, *PG], [*OPD, *PG],
                      [*MULTI, "teacher.multi.members=[{name: a, colocated: {path: /a}}]", "teacher.multi.default=a"]):
        load_config(None, overrides)


# Every combination of settings that config/ rejects (the section validates, RunConfig.validate, _validate_opd,
# validate_for_world below), each with the message that names the keys and what would work.
@pytest.mark.parametrize("overrides, message", [
    # section validates
    (["model.hidden_size=66"], r"model.hidden_size: expected a multiple of model.num_attention_heads=4 \(or set "
                               r"model.kv_channels\), got 66"),
    (["model.num_moe_experts=2", "model.moe_router_topk=3"],
     r"model.moe_router_topk: expected an integer in \[1, model.num_moe_experts=2\], got 3"),
    (["optim.min_lr=0.01"], r"optim.min_lr: expected a float in \[0, optim.lr=0.001\], got 0.01"),
    ([*OPD, "rollout.source=jsonl"], r"rollout.path: expected a JSONL prompt file with rollout.source=jsonl, got ''"),
    ([*MULTI, "teacher.multi.members=[{name: a, colocated: {path: /a}}, {name: a, colocated: {path: /b}}]",
      "teacher.multi.default=a"],
     r"teacher.multi.members: expected a list of teachers with distinct non-empty names, got \['a', 'a'\]"),
    ([*MULTI, "teacher.multi.members=[{name: a, colocated: {path: /a}}]", "teacher.multi.default=a",
      "teacher.multi.mixture=geometric"],
     r"teacher.multi.routes: expected either routes \(and/or default\) for per-domain routing, or a mixture, not "
     r"both"),
    ([*MULTI, "teacher.multi.members=[{name: a, colocated: {path: /a}}]"], r"teacher.multi.routes: expected either "
                                                                          r"routes"),
    ([*MULTI, "teacher.multi.members=[{name: a, colocated: {path: /a}}]", "teacher.multi.routes={math: b}"],
     r"teacher.multi.routes: expected member names from \['a'\], got 'b'"),
    ([*MULTI, "teacher.multi.members=[{name: a}]", "teacher.multi.default=a"],
     r"teacher.multi.members\[0\].colocated.path: expected a checkpoint directory, got ''"),
    ([*MULTI, "teacher.multi.members=[{name: a, kind: sglang}]", "teacher.multi.default=a"],
     r"teacher.multi.members\[0\].server.urls: expected a non-empty list of http\(s\):// base URLs, got \[\]"),
    ([*OPD, "teacher.kind=self", "teacher.overlap=true"], r"teacher.overlap: expected false for a self-teacher"),
    ([*OPD, "teacher.kind=sglang"], r"teacher.server.urls: expected a non-empty list of http\(s\):// base URLs"),
    (["run.algorithm=opd", "parallel.global_batch_size=64"],
     r"teacher.colocated.path: expected a checkpoint directory for teacher.kind=colocated, got ''"),
    ([*OPD, "teacher.kind=inprocess", "teacher.inprocess.path=/ckpt/teacher", "teacher.overlap=true"],
     r"teacher.overlap: expected false for an in-process or colocated teacher"),
    ([*OPD, "opd.gates.truncated_is=[1.5, 2.0]"], r"opd.gates.truncated_is: expected 0 <= eps_lo <= 1 <= eps_hi"),
    ([*OPD, *PG, "opd.credit.estimator=baseline"],
     r"opd.credit.baseline: expected one of group_mean, batch_mean, reverse_kl, value with "
     r"opd.credit.estimator=baseline"),
    ([*OPD, *PG, "opd.credit.baseline=group_mean"],
     r"opd.credit.baseline: expected null with opd.credit.estimator=immediate \(set opd.credit.estimator=baseline "
     r"to subtract a baseline\), got 'group_mean'"),
    ([*OPD, *PG, "opd.credit.estimator=return_to_go", "opd.credit.gamma=0.9"],
     r"opd.credit.gamma: expected 1.0 with opd.credit.estimator=return_to_go \(use discounted\), got 0.9"),
    # RunConfig.validate: the layout against the model and the device
    (["model.num_query_groups=2", "parallel.tp=4"],
     r"parallel.tp: expected a divisor of the number of query groups \(2\), got 4"),
    (["model.ffn_hidden_size=250", "parallel.tp=4"], r"parallel.tp: expected a divisor of model.ffn_hidden_size=250"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_length=127"],
     r"data.seq_length: expected a multiple of parallel.tp=2 with sequence parallelism, got 127"),
    (["run.device=cpu", "optim.use_distributed_optimizer=true"],
     r"optim.use_distributed_optimizer / model.dtype=bf16\|fp16 need run.device=cuda"),
    # _validate_opd: what the OPD loop cannot run
    (["run.algorithm=opd", "teacher.colocated.path=/ckpt/teacher"], r"parallel.global_batch_size: expected "
     r"rollout.prompts_per_step x rollout.samples_per_prompt = 16 x 4 = 64 with run.algorithm=opd, got 16"),
    ([*OPD, "teacher.kind=self", "parallel.pp=2"], r"parallel.pp: expected 1 with teacher.kind=self"),
    (SGLANG, rf"teacher.kind=sglang gives sampled-token and top-k logprobs only, but opd.route_a.support=full "
             rf"\(the reverse_kl over the whole vocabulary\) {FULL}"),
    ([*SGLANG, *PG, "opd.credit.estimator=baseline", "opd.credit.baseline=reverse_kl"],
     rf"but opd.credit.baseline=reverse_kl \(the exact per-state reverse KL\) {FULL}"),
    ([*SGLANG, *PG, "opd.credit.estimator=single_step"], rf"but opd.credit.estimator=single_step \(MiniLLM.*\) {FULL}"),
    ([*SGLANG, *TOPK, "opd.gates.teacher_entropy=1.0"], rf"but opd.gates.teacher_entropy {FULL}"),
    ([*SGLANG, "opd.loss=cr_opd", "teacher.topk=20", "opd.cr_opd.teacher_support=threshold"],
     rf"but opd.cr_opd.teacher_support=threshold {FULL}"),
    ([*MULTI, "teacher.multi.default=a",
      "teacher.multi.members=[{name: a, kind: sglang, server: {urls: [http://127.0.0.1:30000], vocab_size: 512}}]"],
     rf"teacher.kind=multi gives sampled-token and top-k logprobs only, but opd.route_a.support=full .* {FULL}"),
    ([*SGLANG, "opd.route_a.support=teacher_topk", "teacher.topk=4"],
     r"teacher.topk: expected >= 16 for the configured support/routing/gates with a served teacher, got 4"),
    ([*SGLANG, "opd.loss=cr_opd", "teacher.topk=5"], r"teacher.topk: expected >= 20 .*, got 5"),
    ([*SGLANG, *PG, "opd.gates.teacher_confidence=0.5"], r"teacher.topk: expected >= 1 .*, got 0"),
    ([*SGLANG, *TOPK, "opd.route_a.support=union"],
     r"teacher.score_student_topk: expected >= opd.route_a.support_k=16 with teacher.kind=sglang .*, got 0"),
    ([*OPD, "opd.credit.estimator=discounted"],
     r"opd.credit.estimator: expected the default \(immediate, ratio logprob\) with opd.loss=divergence"),
    ([*OPD, "opd.policy_gradient.ratio=ppo"], r"opd.credit.estimator: expected the default \(immediate, ratio "
                                              r"logprob\)"),
    ([*OPD, "opd.regularizers.reference_kl_coef=0.1"],
     r"checkpoint.load: expected the starting checkpoint with opd.regularizers.reference_kl_coef > 0"),
    ([*OPD, *PG, "opd.mixtures.on_policy_fraction=0.5"],
     r"opd.mixtures.on_policy_fraction: expected 1.0 unless opd.loss=divergence"),
    ([*OPD, *PG, "opd.credit.length_normalized=true"],
     r"opd.credit.length_normalized: expected false unless opd.credit.estimator=single_step"),
    ([*OPD, "rollout.source=jsonl", "rollout.path=/data/prompts.jsonl", "opd.credit.outcome_beta=1.0"],
     r"opd.credit.outcome_beta: expected 0 unless rollout.source=task"),
    ([*MULTI, "teacher.multi.members=[{name: a, colocated: {path: /a, model: {vocab_size: 300}}}]",
      "teacher.multi.default=a"],
     r"teacher.multi.members\[a\].colocated.model.vocab_size=300 differs from model.vocab_size=512"),
    ([*OPD, "teacher.colocated.model={vocab_size: 300}"],
     r"teacher.colocated.model.vocab_size=300 differs from model.vocab_size=512: student and teacher must share one "
     r"vocabulary"),
    # A teacher cache scores corpus windows, offline only
    ([*OPD, "teacher.kind=cache"], r"teacher.cache.path: expected the directory of a cache"),
    ([*OPD, *TOPK, "teacher.kind=cache", "teacher.cache.path=/c"],
     r"teacher.kind: expected cache only with rollout.source=corpus and opd.mixtures.on_policy_fraction=0"),
    # Served rollouts and corpus prompts
    ([*OPD, *PG, "rollout.engine=vllm", "rollout.server={urls: [http://127.0.0.1:1], model: s}",
      "rollout.sync_interval=2"], r"opd.gates.truncated_is: expected set .*rollout.sync_interval=2"),
    ([*OPD, "rollout.max_staleness=1"], r"rollout.max_staleness=1 needs a served engine"),
    ([*OPD, "rollout.engine=vllm"], r"rollout.server.urls: expected a non-empty list"),
    ([*OPD, "rollout.source=corpus", "eval.path=/data/held"], r"data.format: expected indexed with rollout.source"),
    ([*OPD, "rollout.source=corpus", "data.format=indexed", "data.path=/data/c"],
     r"eval.path: expected the prefix of a held-out indexed corpus"),
    ([*OPD, "rollout.source=corpus", "data.format=indexed", "data.path=/data/c", "eval.path=/data/h",
      "data.seq_length=16", "rollout.prefix_tokens=10"], r"rollout.prefix_tokens: expected at most"),
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


# -- the layout: keys that moved, typed sections, and what config imports -------------------------------------------

# Every key of the old flat `opd` and `teacher` sections that the README and docs/ documented, with its new place.
MOVED = [
    ("opd.divergence=jsd", "opd.route_a.divergence"), ("opd.jsd_beta=0.5", "opd.route_a.jsd_beta"),
    ("opd.skew_alpha=0.1", "opd.route_a.skew_alpha"), ("opd.support=teacher_topk", "opd.route_a.support"),
    ("opd.support_k=8", "opd.route_a.support_k"), ("opd.support_mode=tail", "opd.route_a.support_mode"),
    ("opd.ratio=ppo", "opd.policy_gradient.ratio"), ("opd.clip_eps_low=0.2", "opd.policy_gradient.clip_eps_low"),
    ("opd.clip_eps_high=0.2", "opd.policy_gradient.clip_eps_high"),
    ("opd.dual_clip=3.0", "opd.policy_gradient.dual_clip"), ("opd.estimator=gae", "opd.credit.estimator"),
    ("opd.gamma=0.9", "opd.credit.gamma"), ("opd.gae_lambda=0.9", "opd.credit.gae_lambda"),
    ("opd.baseline=group_mean", "opd.credit.baseline"), ("opd.length_normalized=true", "opd.credit.length_normalized"),
    ("opd.outcome_alpha=1.0", "opd.credit.outcome_alpha"), ("opd.outcome_beta=1.0", "opd.credit.outcome_beta"),
    ("opd.value_lr=1e-4", "opd.credit.value_lr"), ("opd.value_coef=0.5", "opd.credit.value_coef"),
    ("opd.entropy_coef=0.1", "opd.regularizers.entropy_coef"),
    ("opd.reference_kl_coef=0.1", "opd.regularizers.reference_kl_coef"),
    ("opd.reference_kl_estimator=k1", "opd.regularizers.reference_kl_estimator"),
    ("opd.on_policy_fraction=0.5", "opd.mixtures.on_policy_fraction"),
    ("opd.routing.form=kl_target", "opd.cr_opd.form"), ("opd.routing={eta: 0.5}", "opd.cr_opd"),
    ("teacher.path=/ckpt", "teacher.colocated.path (teacher.kind=colocated) or teacher.inprocess.path"),
    ("teacher.model.preset=tiny", "teacher.colocated.model.preset"),
    ("teacher.members=[]", "teacher.multi.members"), ("teacher.routes={math: a}", "teacher.multi.routes"),
    ("teacher.default=a", "teacher.multi.default"), ("teacher.mixture=geometric", "teacher.multi.mixture"),
    ("teacher.weights={a: 1.0}", "teacher.multi.weights"), ("teacher.self_mode=ema", "teacher.self_teacher.mode"),
    ("teacher.ema_decay=0.9", "teacher.self_teacher.ema_decay"),
    ("teacher.self_insert=before_prompt", "teacher.self_teacher.insert"),
    ("teacher.self_keep=1", "teacher.self_teacher.keep"), ("teacher.server.temperature=1.0", "teacher.temperature"),
]


@pytest.mark.parametrize("override, new_key", MOVED, ids=[o.split("=")[0] for o, _ in MOVED])
def test_a_moved_key_names_its_new_place(override, new_key):
    old_key = override.split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(f"{old_key} moved to {new_key}")):
        load_config(None, [override])


def test_moved_keys_in_a_file_are_named_together(tmp_path):
    """An old-layout config file (e.g. a run's config.yaml from before the change) names every moved key at once,
    list items with their index."""
    path = tmp_path / "old.yaml"
    path.write_text("opd:\n  divergence: jsd\n  routing: {form: kl_target}\n  kl_coef: 2.0\n"
                    "teacher:\n  kind: multi\n  multi:\n    members:\n      - {name: a, path: /a}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == (
        "3 config keys moved: opd.divergence moved to opd.route_a.divergence; opd.routing moved to opd.cr_opd; "
        "teacher.multi.members[0].path moved to teacher.multi.members[0].colocated.path (kind colocated) or "
        "teacher.multi.members[0].inprocess.path (kind inprocess)")


def test_every_new_place_of_a_moved_key_is_a_key():
    """MOVED_KEYS points at keys the schema has: each new place (every alternative of it) resolves to a field."""
    def resolves(path: str) -> bool:
        hint: object = RunConfig
        for part in path.split("."):
            part = part.removesuffix("[]")
            if typing.get_origin(hint) in (typing.Union, types.UnionType):   # Optional[Section]
                hint = next(a for a in typing.get_args(hint) if a is not type(None))
            if typing.get_origin(hint) is list:
                hint = typing.get_args(hint)[0]
            if not dataclasses.is_dataclass(hint) or part not in typing.get_type_hints(hint):
                return False
            hint = typing.get_type_hints(hint)[part]
        return True

    for old, new in MOVED_KEYS.items():
        places = re.findall(r"[a-z_\[\].]+\.[a-z_]+", new)
        assert places and all(resolves(place) for place in places), f"{old} -> {new}"
        assert not resolves(old), f"{old} is still a key"


def test_the_sub_sections_hold_their_keys_and_the_math_configs_are_fields():
    """Each part of `opd` and `teacher` reads the keys of its sub-section; the math configs are used as they are."""
    cfg = load_config(None, [*OPD, "opd.loss=cr_opd", "opd.route_a.support_k=4", "opd.policy_gradient.ratio=ppo",
                             "opd.credit.estimator=discounted", "opd.credit.gamma=0.5", "opd.cr_opd.eta=0.5",
                             "opd.gates.sign=negative", "opd.regularizers.entropy_coef=0.1",
                             "teacher.self_teacher.mode=ema"], validate=False)
    assert isinstance(cfg.opd.cr_opd, RoutingConfig) and cfg.opd.cr_opd.eta == 0.5
    assert isinstance(cfg.opd.gates, GateConfig) and cfg.opd.gates.sign == "negative"
    assert (cfg.opd.route_a.support_k, cfg.opd.policy_gradient.ratio) == (4, "ppo")
    assert (cfg.opd.credit.estimator, cfg.opd.credit.gamma, cfg.opd.regularizers.entropy_coef) == ("discounted", 0.5,
                                                                                                   0.1)
    assert cfg.teacher.colocated.path == "/ckpt/teacher" and cfg.teacher.self_teacher.mode == "ema"
    # config.yaml round trip: what a run writes loads back to the same config
    assert load_config(None, [], validate=False).to_dict() == RunConfig().to_dict()
    assert from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["opd.route_a.divergenc=jsd"], r"unknown config key 'opd.route_a.divergenc' \(did you mean "
                                    r"'opd.route_a.divergence'\?\)"),
    (["opd.cr_opd.teacher_topk=3"], r"unknown config key 'opd.cr_opd.teacher_topk' \(did you mean "
                                    r"'opd.cr_opd.teacher_top_k'\?\)"),
    (["opd.credits.gamma=0.5"], r"unknown config key 'opd.credits' \(did you mean 'opd.credit'\?\)"),
    (["teacher.self_teacher.modes=ema"], r"did you mean 'teacher.self_teacher.mode'"),
    (["opd.gates.sign=up"], r"opd.gates.sign: expected one of \['negative', 'positive'\], got 'up'"),
])
def test_unknown_keys_in_the_new_sections_suggest_the_nearest(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


SERVER = "teacher.server={urls: [http://127.0.0.1:30000], vocab_size: 512}"


@pytest.mark.parametrize("overrides, message", [
    ([SERVER, "teacher.server.timeout=3"], r"unknown config key 'teacher.server.timeout' \(did you mean "
                                           r"'teacher.server.timeout_s'\?\)"),
    (["teacher.server={urls: [http://h:1], vocab: 5}"], r"unknown config key 'teacher.server.vocab' \(did you mean "
                                                         r"'teacher.server.vocab_size'\?\)"),
    ([SERVER, "teacher.server.max_inflight=many"], r"teacher.server.max_inflight: expected an integer, got 'many'"),
    ([SERVER, "teacher.server.urls={a: 1}"], r"teacher.server.urls: expected a list, got \{'a': 1\}"),
    ([SERVER, "teacher.server.balance=random"], r"teacher.server.balance: expected one of \['least_inflight', "
                                                r"'round_robin'\], got 'random'"),
    ([SERVER, "teacher.server.check_on_start=maybe"], r"teacher.server.check_on_start: expected true or false"),
    ([*SGLANG, *TOPK, "teacher.server.max_retries=-1"], r"teacher.server.max_retries: expected an integer >= 0, got "
                                                        r"-1"),
    ([*SGLANG, *TOPK, "teacher.server.vocab_size=0"], r"teacher.server.vocab_size: expected the teacher tokenizer's "
                                                      r"true vocabulary size"),
    (["teacher.server=http://h:1"], r"teacher.server: expected a mapping of keys, got str"),
])
def test_typed_teacher_server_rejects_unknown_keys_and_wrong_types(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_typed_teacher_server_builds_the_client_config():
    cfg = load_config(None, [*SGLANG, *TOPK, "teacher.server.urls=http://127.0.0.1:30000/", "teacher.temperature=1.0",
                             "teacher.server.max_inflight=2"])
    assert isinstance(cfg.teacher.server, ServerSection) and cfg.teacher.server.urls == ["http://127.0.0.1:30000/"]
    client = HTTPTeacherConfig.from_section(cfg.teacher.server, cfg.teacher.temperature)
    assert client.urls == ["http://127.0.0.1:30000"] and client.max_inflight == 2 and client.vocab_size == 512


def test_config_imports_no_part_it_configures():
    """config -> math only: the teachers, the loop, the student and rollouts import config, never the reverse."""
    code = ("import sys, opd_megatron.config; "
            "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('opd_megatron.')}))")
    parts = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert parts.stdout.split() == ["['config',", "'math']"], parts.stdout
