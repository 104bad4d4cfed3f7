"""Training data: tokenizers (tokenizer.py), JSONL prompt/response or text files (jsonl.py), megatron-core
indexed `.bin/.idx` corpora and their weighted blends (indexed.py), and the resumable global-batch order
(batch_indices.py).

Every dataset serves `SftSample`s of one length (data.seq_length); `collate` stacks them into an `SftBatch`. A JSONL
dataset is finite and shuffled epoch by epoch by its sampler; an indexed blend is an endless order it shuffles itself,
read in consecutive batches.
"""

from __future__ import annotations

from typing import Optional

from opd_megatron.config import ConfigError, DataSection
from opd_megatron.data.batch_indices import GlobalBatchSampler, StreamBatchSampler
from opd_megatron.data.indexed import CorpusBlend, DocumentPacking, IndexedTextDataset
from opd_megatron.data.jsonl import JsonlDataset
from opd_megatron.data.tokenizer import Tokenizer


def build_dataset(data_cfg: DataSection, tokenizer: Tokenizer,
                  seed: Optional[int] = None) -> JsonlDataset | CorpusBlend:
    """The dataset that `data.format` names: a JSONL file read from `data.path`, or the blend of `data.blend`
    (`data.path` alone: a blend of one corpus). seed (run.seed) orders an indexed blend's windows; JSONL ignores
    it (its sampler shuffles)."""
    if data_cfg.format == "indexed" and data_cfg.blend:
        prefixes = [corpus.path for corpus in data_cfg.blend]
        weights = [corpus.weight for corpus in data_cfg.blend]
    else:
        if not data_cfg.path:
            expected = ("a .jsonl file" if data_cfg.format == "jsonl"
                        else "the prefix of an indexed dataset (without .bin/.idx) written by `opd-megatron "
                             "preprocess`, or data.blend")
            raise ConfigError(f"data.path: expected {expected}, got an empty path")
        prefixes, weights = [data_cfg.path], [1.0]
    if data_cfg.format == "jsonl":
        return JsonlDataset(data_cfg.path, tokenizer, data_cfg.seq_length, prompt_key=data_cfg.prompt_key,
                            response_key=data_cfg.response_key, text_key=data_cfg.text_key,
                            apply_chat_template=data_cfg.apply_chat_template,
                            skip_malformed=data_cfg.skip_malformed)
    if data_cfg.format == "indexed":
        if seed is None:
            raise ValueError("build_dataset: an indexed dataset needs the seed (run.seed) that orders its windows")
        packing = DocumentPacking(eod_mask_loss=data_cfg.eod_mask_loss,
                                  reset_position_ids=data_cfg.reset_position_ids,
                                  reset_attention_mask=data_cfg.reset_attention_mask)
        corpora = [IndexedTextDataset(prefix, data_cfg.seq_length, tokenizer.pad_id, packing, tokenizer.vocab_size)
                   for prefix in prefixes]
        return CorpusBlend(corpora, weights, seed, shuffle=data_cfg.shuffle)
    raise ConfigError(f"data.format: expected one of ['jsonl', 'indexed'], got {data_cfg.format!r}")


def build_batch_sampler(dataset: JsonlDataset | CorpusBlend, global_batch_size: int, seed: int,
                        shuffle: bool) -> GlobalBatchSampler | StreamBatchSampler:
    """The global-batch order of `dataset`: epochs of a seeded permutation for a finite dataset (shuffle: data.shuffle),
    consecutive indices for a blend (which drew its own order from the seed)."""
    if isinstance(dataset, CorpusBlend):
        return StreamBatchSampler(global_batch_size, dataset.order_description())
    return GlobalBatchSampler(len(dataset), global_batch_size, seed, shuffle)
