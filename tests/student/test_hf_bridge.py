"""HF Llama / Qwen2 / Qwen3 checkpoints in the megatron GPTModel: the same logits as the transformers forward
(float32, <= 1e-4) at TP=1, TP=2 (also with a vocabulary that needs padding) and PP=2 (also with tied
embeddings and a sharded checkpoint), a bit-exact export round trip at TP=1 and TP=2, and clear errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from opd_megatron.student.hf_bridge import HFBridgeError, model_section_from_hf_config
from tests.harness import run_distributed
from tests.student import hf_bridge_workers as w
from tests.tiny_hf import write_tiny_checkpoint

# name -> (architecture, extra tiny_config arguments, max_shard_size of the saved checkpoint)
MODELS = {
    "llama": ("llama", {}, None),
    "qwen2": ("qwen2", {}, None),
    "qwen3": ("qwen3", {}, "200KB"),                         # sharded: model.safetensors.index.json
    "llama_tied_pad": ("llama", {"vocab_size": 500, "tie": True}, None),  # 500 -> 512 padded; tied embeddings
}
TOLERANCE = 1e-4


def write_model(directory: Path, arch, max_shard_size=None, **config):
    """A tiny random checkpoint whose 1-D tensors (norms, Qwen2's QKV biases) are random too, so that their
    mapping is tested (transformers initialises them to ones / zeros)."""
    import transformers
    write_tiny_checkpoint(directory, arch, **config)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=gen))
    for old in directory.glob("*.safetensors"):
        old.unlink()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(directory), **kwargs)
    return directory


def hf_logits(directory, ids):
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def safetensors_tensors(directory):
    from safetensors.torch import load_file
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


@pytest.fixture(scope="module")
def bridge_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_bridge")
    dirs = {name: str(write_model(root / name, arch, shard, **config)) for name, (arch, config, shard) in MODELS.items()}
    exports = root / "exports"
    results = run_distributed(w.bridge_layouts, 1, args=(dirs, [(1, 1)], str(exports)), timeout_s=240)[0]
    for rank_result in run_distributed(w.bridge_layouts, 2, args=(dirs, [(2, 1), (1, 2)], str(exports)),
                                       timeout_s=300):
        results.update(rank_result)
    return {"dirs": dirs, "results": results, "exports": exports}


@pytest.mark.parametrize("layout", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
@pytest.mark.parametrize("name", list(MODELS))
def test_logits_equal_transformers(bridge_runs, name, layout):
    got = bridge_runs["results"][(*layout, name)]
    vocab = MODELS[name][1].get("vocab_size", 512)
    ref = hf_logits(bridge_runs["dirs"][name], w.tokens(vocab))
    assert got["logits"].shape == ref.shape
    diff = float((got["logits"] - ref).abs().max())
    assert diff <= TOLERANCE, f"{name} at tp,pp={layout}: max |megatron - HF| = {diff:.2e}"
    assert float(ref.std()) > 0.1  # the logits are informative, not ~0


def test_vocab_padding_is_used(bridge_runs):
    assert bridge_runs["results"][(2, 1, "llama_tied_pad")]["padded_vocab"] == 512


@pytest.mark.parametrize("layout", ["tp1pp1", "tp2pp1"])
@pytest.mark.parametrize("name", list(MODELS))
def test_export_round_trip_is_bit_exact(bridge_runs, name, layout):
    original = safetensors_tensors(Path(bridge_runs["dirs"][name]))
    exported_dir = bridge_runs["exports"] / layout / name
    exported = safetensors_tensors(exported_dir)
    # transformers drops lm_head.weight from a tied checkpoint, as the export does
    assert set(exported) == set(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    config = json.loads((exported_dir / "config.json").read_text())
    source = json.loads((Path(bridge_runs["dirs"][name]) / "config.json").read_text())
    assert config["architectures"] == source["architectures"]
    assert model_section_from_hf_config(exported_dir) == model_section_from_hf_config(bridge_runs["dirs"][name])


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(HFBridgeError, match=r"GPT2LMHeadModel.*not supported.*LlamaForCausalLM"):
        model_section_from_hf_config(tmp_path)


def test_rope_scaling_is_a_clear_error(tmp_path):
    write_tiny_checkpoint(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFBridgeError, match="rope_type='llama3'"):
        model_section_from_hf_config(tmp_path)


def test_missing_tensor_is_a_clear_error(bridge_runs, tmp_path):
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "broken"
    shutil.copytree(bridge_runs["dirs"]["qwen2"], broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    message = run_distributed(w.load_error, 1, args=(str(broken),), timeout_s=120)[0]
    assert "model.layers.1.self_attn.k_proj.bias" in message and "missing" in message
