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
])
def test_bad_config_errors_name_the_key_and_the_expectation(overrides, message):
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
