"""Training data: tokenizers (tokenizer.py), JSONL prompt/response or text files (jsonl.py), megatron-core
indexed `.bin/.idx` corpora (indexed.py), and the resumable global-batch order (batch_indices.py).

Both dataset kinds serve `SftSample`s of one length (data.seq_length); `collate` stacks them into an `SftBatch`.
"""

from __future__ import annotations

from opd_megatron.config import ConfigError, DataSection
from opd_megatron.data.indexed import IndexedTextDataset
from opd_megatron.data.jsonl import JsonlDataset
from opd_megatron.data.tokenizer import Tokenizer


def build_dataset(data_cfg: DataSection, tokenizer: Tokenizer) -> JsonlDataset | IndexedTextDataset:
    """The dataset that `data.format` names, read from `data.path`."""
    if not data_cfg.path:
        expected = ("a .jsonl file" if data_cfg.format == "jsonl"
                    else "the prefix of an indexed dataset (without .bin/.idx) written by `opd-megatron preprocess`")
        raise ConfigError(f"data.path: expected {expected}, got an empty path")
    if data_cfg.format == "jsonl":
        return JsonlDataset(data_cfg.path, tokenizer, data_cfg.seq_length, prompt_key=data_cfg.prompt_key,
                            response_key=data_cfg.response_key, text_key=data_cfg.text_key,
                            apply_chat_template=data_cfg.apply_chat_template,
                            skip_malformed=data_cfg.skip_malformed)
    if data_cfg.format == "indexed":
        return IndexedTextDataset(data_cfg.path, data_cfg.seq_length, tokenizer.pad_id)
    raise ConfigError(f"data.format: expected one of ['jsonl', 'indexed'], got {data_cfg.format!r}")
