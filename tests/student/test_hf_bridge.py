"""HF Llama / Qwen2 / Qwen3 checkpoints in the megatron GPTModel: the same logits as the transformers forward
(float32, <= 1e-4) at TP=1, TP=2 (also with a vocabulary that needs padding) and PP=2 (also with tied
embeddings and a sharded checkpoint), for Llama 3.2-style llama3 RoPE scaling, Qwen2 with QKV bias and linear
scaling, Qwen3 with QK norm and a tokenizer smaller than its embedding, and a layer-pruned start
(`model.from_hf_layers`) against the same layers cut in transformers; a bit-exact export round trip at TP=1 and
TP=2, and clear errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from opd_megatron.student.hf_bridge import HFBridgeError, model_section_from_hf_config
from tests.harness import run_distributed
from tests.student import hf_bridge_workers as w
from tests.tiny_hf import write_tiny_checkpoint

# Llama 3.1 / 3.2's RoPE scaling with an original context of 16 positions, so that the 12-token test sequences
# turn the scaled frequencies far enough for a missing or partial scaling to show in the logits (at Llama's 8192
# only wavelengths beyond 2048 positions change, invisible in 12 tokens).
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
# name -> (architecture, extra tiny_config / write_tiny_checkpoint arguments, max_shard_size of the saved checkpoint)
MODELS = {
    "llama": ("llama", {}, None),
    "qwen2": ("qwen2", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, None),  # QKV bias, linear RoPE
    "qwen3": ("qwen3", {}, "200KB"),                         # sharded: model.safetensors.index.json
    "llama_tied_pad": ("llama", {"vocab_size": 500, "tie": True}, None),  # 500 -> 512 padded; tied embeddings
    # Llama 3.2-style: llama3 RoPE scaling, tied embeddings, 4 layers (pruned below)
    "llama32": ("llama", {"tie": True, "num_layers": 4, "rope_scaling": LLAMA3_ROPE}, None),
    # Qwen-style: 600 embedding rows, a 500-id tokenizer (Qwen3's 151,936 rows for 151,669 ids)
    "qwen3_small_tokenizer": ("qwen3", {"vocab_size": 600, "tokenizer_size": 500}, None),
}
# name -> (model of MODELS, model.from_hf_layers): a layer-pruned start, through the run config. Reordered on
# purpose: an identity mapping of layer indices would pass with [0, 1].
PRUNED = {"llama32_layers_3_1": ("llama32", [3, 1])}
TOLERANCE = 1e-4


def true_vocab(name: str) -> int:
    config = MODELS[PRUNED[name][0] if name in PRUNED else name][1]
    return config.get("tokenizer_size") or config.get("vocab_size", 512)


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


def hf_logits(directory, ids, layers=None):
    """transformers' logits; `layers`: only those decoder layers, in that order (the model cut in transformers)."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    if layers is not None:
        model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in layers])
        model.config.num_hidden_layers = len(layers)
    with torch.no_grad():
        return model(ids, use_cache=False).logits


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
    pruned = {name: (dirs[source], layers) for name, (source, layers) in PRUNED.items()}
    exports = root / "exports"
    results = run_distributed(w.bridge_layouts, 1, args=(dirs, [(1, 1)], str(exports), pruned), timeout_s=240)[0]
    for rank_result in run_distributed(w.bridge_layouts, 2, args=(dirs, [(2, 1), (1, 2)], str(exports), pruned),
                                       timeout_s=300):
        results.update(rank_result)
    return {"dirs": dirs, "results": results, "exports": exports}


@pytest.mark.parametrize("layout", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
@pytest.mark.parametrize("name", [*MODELS, *PRUNED])
def test_logits_equal_transformers(bridge_runs, name, layout):
    got = bridge_runs["results"][(*layout, name)]
    source, layers = PRUNED.get(name, (name, None))
    vocab = true_vocab(name)
    # Columns past the tokenizer are padding rows of the embedding: the student's logits stop at its true size.
    ref = hf_logits(bridge_runs["dirs"][source], w.tokens(vocab), layers)[..., :vocab]
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
    assert config.get("rope_parameters") == source.get("rope_parameters")
    # The bridge writes weights and config.json; the tokenizer (which gives the true vocabulary) is the exporter's
    # to copy (student/hf_export.py), as here.
    shutil.copy(Path(bridge_runs["dirs"][name]) / "tokenizer.json", exported_dir / "tokenizer.json")
    assert model_section_from_hf_config(exported_dir) == model_section_from_hf_config(bridge_runs["dirs"][name])


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(HFBridgeError, match=r"GPT2LMHeadModel.*not supported.*LlamaForCausalLM"):
        model_section_from_hf_config(tmp_path)


@pytest.mark.parametrize("key, value, message", [
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0},
     r"rope_type='yarn' is not supported; expected 'default' \(plain RoPE\), 'llama3'"),
    ("use_sliding_window", True, r"use_sliding_window=True is not supported; expected False"),
    ("hidden_act", "gelu", r"hidden_act='gelu' is not supported; expected 'silu'"),
])
def test_what_the_student_cannot_reproduce_is_refused_by_key_and_value(tmp_path, key, value, message):
    write_tiny_checkpoint(tmp_path, "qwen2")
    config = json.loads((tmp_path / "config.json").read_text())
    config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFBridgeError, match=message):
        model_section_from_hf_config(tmp_path)


def test_missing_or_unread_tensors_are_clear_errors(bridge_runs, tmp_path):
    """A tensor the student needs that is not there, and tensors the student would not read (an o_proj bias that
    config.json does not announce: ignoring it would change every logit), both refused naming the tensor; a tied
    checkpoint's saved lm_head copy and old checkpoints' rotary inv_freq buffers are not weights and load."""
    from safetensors.torch import load_file, save_file

    def changed(name, source, change):
        directory = tmp_path / name
        shutil.copytree(bridge_runs["dirs"][source], directory)
        tensors = load_file(str(directory / "model.safetensors"))
        change(tensors)
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return str(directory)

    missing = changed("missing", "qwen2", lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    unread = changed("unread", "llama", lambda t: t.update({
        "model.layers.0.self_attn.o_proj.bias": torch.ones(t["model.layers.0.self_attn.o_proj.weight"].shape[0]),
        "model.vision_tower.proj.weight": torch.ones(2, 2)}))
    harmless = changed("harmless", "llama_tied_pad", lambda t: t.update({
        "lm_head.weight": t["model.embed_tokens.weight"].clone(),
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}))
    messages = run_distributed(w.load_errors, 1, args=([missing, unread, harmless],), timeout_s=120)[0]
    assert "model.layers.1.self_attn.k_proj.bias" in messages[0] and "missing" in messages[0]
    assert "model.layers.0.self_attn.o_proj.bias" in messages[1] and "model.vision_tower.proj.weight" in messages[1]
    assert "nothing in the model reads" in messages[1]
    assert messages[2] is None
