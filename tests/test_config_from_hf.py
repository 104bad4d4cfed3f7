"""`model.from_hf` in the config: every architecture key read from the checkpoint's config.json (and its
tokenizer's true size), explicit keys that contradict it named with both values, `from_hf_layers` checked, the
tokenizer defaulting to the checkpoint's, and a resolved config (a run's config.yaml) reading back to itself."""

import json

import pytest

from opd_megatron.config import ConfigError, from_dict, load_config
from opd_megatron.config.hf import model_keys_from_hf
from tests.tiny_hf import write_tiny_checkpoint

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """Qwen-style: 600 embedding rows, a 500-id tokenizer."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3", vocab_size=600, tokenizer_size=500)


@pytest.fixture(scope="module")
def llama31(tmp_path_factory):
    directory = write_tiny_checkpoint(tmp_path_factory.mktemp("llama31"), "llama", tie=True, num_layers=4,
                                      rope_scaling=LLAMA31_ROPE)
    config = json.loads((directory / "config.json").read_text())
    config["rms_norm_eps"] = 9.999999747378752e-06   # Llama's float32 rounding of 1e-5, as its config.json has it
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_every_architecture_key_comes_from_the_checkpoint(qwen3, llama31):
    cfg = load_config(None, [f"model.from_hf={qwen3}"])
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.query_groups, m.head_dim) == \
        (2, 128, 256, 4, 2, 32)
    assert (m.vocab_size, m.checkpoint_vocab_size, m.embedding_rows) == (500, 600, 600)
    assert m.qk_layernorm and not m.add_qkv_bias and m.rotary_base == 1000000 and m.rope_scaling is None
    assert cfg.data.tokenizer == str(qwen3)
    llama = load_config(None, [f"model.from_hf={llama31}"]).model
    assert llama.tie_embeddings and llama.num_layers == 4 and llama.norm_epsilon == 9.999999747378752e-06
    assert llama.rope_scaling.type == "llama3" and llama.rope_scaling.factor == 8.0
    assert llama.rope_scaling.original_max_position_embeddings == 8192


def test_transformers_4_rope_scaling_spelling_reads_the_same(llama31, tmp_path):
    config = json.loads((llama31 / "config.json").read_text())
    theta = config["rope_parameters"]["rope_theta"]
    del config["rope_parameters"]
    config.update(rope_theta=theta, rope_scaling={"type": "llama3", **{k: v for k, v in LLAMA31_ROPE.items()
                                                                       if k != "rope_type"}})
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert model_keys_from_hf(tmp_path)["rope_scaling"] == model_keys_from_hf(llama31)["rope_scaling"]


@pytest.mark.parametrize("override, message", [
    ("model.num_layers=7", r"model.num_layers=7 contradicts model.from_hf=.*whose checkpoint has num_layers=2"),
    ("model.tie_embeddings=true", r"model.tie_embeddings=True contradicts .* tie_embeddings=False"),
    ("model.rotary_base=10000", r"model.rotary_base=10000 contradicts .* rotary_base=1000000"),
    ("model.vocab_size=400", r"model.vocab_size=400 contradicts .* vocab_size=500"),
    ("model.vocab_size=700", r"model.vocab_size=700 contradicts .* vocab_size=500"),
    ("model.preset=tiny", r"model.preset='tiny' and model.from_hf=.* both give the model's shape"),
    ("model.from_hf_layers=[0, 2]", r"model.from_hf_layers=\[0, 2\]: expected a non-empty list of distinct layer "
                                    r"indices in \[0, 2\)"),
    ("model.from_hf_layers=[1, 1]", r"distinct layer indices"),
])
def test_a_key_that_contradicts_the_checkpoint_names_both_values(qwen3, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"model.from_hf={qwen3}", override])


def test_agreeing_keys_training_keys_and_a_tokenizer_inside_the_rows_are_accepted(qwen3, llama31):
    cfg = load_config(None, [f"model.from_hf={qwen3}", "model.num_layers=2", "model.dtype=fp32",
                             "model.hidden_dropout=0.1", "model.vocab_size=550", "data.tokenizer=byte"])
    assert cfg.model.vocab_size == 550 and cfg.model.checkpoint_vocab_size == 600
    assert cfg.model.hidden_dropout == 0.1 and cfg.data.tokenizer == "byte"
    # 1e-5 as a user writes it is the checkpoint's 9.999999747378752e-06
    assert load_config(None, [f"model.from_hf={llama31}", "model.norm_epsilon=1e-5"]).model.num_layers == 4
    pruned = load_config(None, [f"model.from_hf={llama31}", "model.from_hf_layers=[3, 0]"]).model
    assert pruned.num_layers == 2 and pruned.from_hf_layers == [3, 0]


def test_a_resolved_config_reads_back_to_itself(llama31):
    cfg = load_config(None, [f"model.from_hf={llama31}", "model.from_hf_layers=[0, 2]"])
    again = from_dict(cfg.to_dict())        # what `eval --config runs/X/config.yaml` and a resume read
    assert again.model == cfg.model and again.data == cfg.data


def test_layers_without_a_checkpoint_and_a_missing_checkpoint_are_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"model.from_hf_layers: expected null unless model.from_hf is set"):
        load_config(None, ["model.from_hf_layers=[0]"])
    with pytest.raises(ConfigError, match=r"is not a Hugging Face checkpoint directory: no config.json"):
        load_config(None, [f"model.from_hf={tmp_path / 'nowhere'}"])
