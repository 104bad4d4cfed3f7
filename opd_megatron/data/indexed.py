"""Pretraining-scale data in megatron-core's indexed format (`<prefix>.bin` token ids + `<prefix>.idx` index).

`preprocess_jsonl` tokenizes a JSONL file once into one document a line; `IndexedTextDataset` memory-maps it
and serves fixed windows of the concatenated token stream. Loss masks are not stored: the format is for
pretraining-style text where every token trains, so a prompt/response line becomes the plain concatenation
[bos] prompt response [eos]. Keep prompt-masked SFT data in JSONL.

Why not megatron's GPTDataset on top: it needs a GPTDatasetConfig with a megatron tokenizer, a blend and split,
and the number of samples up front, and it builds (and caches to disk) its own numpy-seeded shuffled
document/sample indices through the `helpers_cpp` C++ extension. The 0.16.1 wheel ships that extension
prebuilt, but a source install must compile it (`compile_helpers`, make + pybind11), and its shuffle would
duplicate GlobalBatchSampler's resumable order. Windows over the stream need only a cumsum and a binary search.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy
import torch
from megatron.core.datasets.indexed_dataset import (DType, IndexedDataset, IndexedDatasetBuilder, get_bin_path,
                                                    get_idx_path)

from opd_megatron.data.jsonl import DataError, JsonlReader, SftSample, encode_record, make_sample
from opd_megatron.data.tokenizer import Tokenizer


def preprocess_jsonl(input_path: str | Path, output_prefix: str | Path, tokenizer: Tokenizer,
                     text_key: str = "text", prompt_key: str = "prompt", response_key: str = "response",
                     append_eod: bool = True, apply_chat_template: bool = False,
                     skip_malformed: bool = False) -> dict[str, Any]:
    """Write `<output_prefix>.bin/.idx` with one document per valid line; returns counts for the log.

    Returned keys: documents, tokens, skipped (count), skipped_lines (1-based), dtype (numpy name), bin_path,
    idx_path. Lines are validated as for JsonlDataset. The files are written under temporary names and renamed
    at the end, so a failed run never leaves a half-written dataset that would load.
    """
    if apply_chat_template and not tokenizer.has_chat_template:
        raise ValueError("apply_chat_template is true but the tokenizer has no chat template")
    prefix = str(output_prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    # Token ids are stored as uint16 when the vocabulary fits (< 65500 by megatron's rule), else int32.
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    partial = prefix + ".partial"
    reader = JsonlReader(input_path, prompt_key, response_key, text_key, skip_malformed)
    builder = IndexedDatasetBuilder(get_bin_path(partial), dtype=dtype)
    documents = tokens = 0
    try:
        for record in reader:
            ids, _ = encode_record(record, tokenizer, apply_chat_template, append_eos=append_eod)
            builder.add_item(torch.tensor(ids, dtype=torch.int64))
            builder.end_document()
            documents += 1
            tokens += len(ids)
        builder.finalize(get_idx_path(partial))
    except BaseException:
        builder.data_file.close()
        for path in (get_bin_path(partial), get_idx_path(partial)):
            if os.path.exists(path):
                os.remove(path)
        raise
    if documents == 0:
        os.remove(get_bin_path(partial))
        os.remove(get_idx_path(partial))
        skipped = f" ({len(reader.skipped_lines)} malformed lines skipped)" if reader.skipped_lines else ""
        raise DataError(f"{input_path}: no valid lines{skipped}; expected JSON objects with "
                        f"{prompt_key!r}+{response_key!r} or {text_key!r}")
    os.replace(get_bin_path(partial), get_bin_path(prefix))
    os.replace(get_idx_path(partial), get_idx_path(prefix))
    return {"documents": documents, "tokens": tokens, "skipped": len(reader.skipped_lines),
            "skipped_lines": list(reader.skipped_lines), "dtype": numpy.dtype(dtype).name,
            "bin_path": get_bin_path(prefix), "idx_path": get_idx_path(prefix)}


class IndexedTextDataset(torch.utils.data.Dataset):
    """Fixed windows over the concatenation of every document, in file order.

    Window i covers stream[i*S : i*S + S + 1] (S = seq_length): consecutive windows share one token, the last
    label of a window being the first input of the next, as in megatron's GPTDataset. The last window is padded
    (pad_id, loss_mask 0) rather than dropped, so small corpora lose nothing. Windows cross document
    boundaries; the eos between documents is an ordinary trained token.
    """

    def __init__(self, prefix: str | Path, seq_length: int, pad_id: int) -> None:
        prefix = str(prefix)
        missing = [p for p in (get_bin_path(prefix), get_idx_path(prefix)) if not os.path.isfile(p)]
        if missing:
            # Checked here because megatron only asserts (gone under python -O) and then errors again in __del__.
            raise FileNotFoundError(f"indexed dataset {prefix!r}: missing {' and '.join(missing)}; expected the "
                                    f"prefix (without .bin/.idx) of files written by `opd-megatron preprocess`")
        if os.path.getsize(get_bin_path(prefix)) == 0:
            raise DataError(f"indexed dataset {prefix!r}: {get_bin_path(prefix)} holds no tokens")
        self.prefix = prefix
        self.seq_length = seq_length
        self.pad_id = pad_id
        self._documents = IndexedDataset(prefix, mmap=True)
        # _ends[d] = number of stream tokens up to and including document d.
        self._ends = numpy.cumsum(self._documents.sequence_lengths, dtype=numpy.int64)
        self.num_tokens = int(self._ends[-1])
        if self.num_tokens < 2:
            raise DataError(f"indexed dataset {prefix!r}: {self.num_tokens} token(s); expected at least 2")
        self._num_windows = -(-(self.num_tokens - 1) // seq_length)  # ceil: every label appears exactly once

    @property
    def num_documents(self) -> int:
        return len(self._documents)

    def __len__(self) -> int:
        return self._num_windows

    def __getitem__(self, index: int) -> SftSample:
        if not 0 <= index < self._num_windows:
            raise IndexError(f"window {index} out of range for {self._num_windows} windows")
        start = index * self.seq_length
        stop = min(start + self.seq_length + 1, self.num_tokens)
        return make_sample(self.read(start, stop).tolist(), 0, self.seq_length, self.pad_id)

    def read(self, start: int, stop: int) -> numpy.ndarray:
        """Stream tokens [start, stop) as int64, gathered across document boundaries."""
        pieces = []
        document = int(numpy.searchsorted(self._ends, start, side="right"))
        position = start
        while position < stop:
            document_start = int(self._ends[document - 1]) if document > 0 else 0
            offset = position - document_start
            length = min(int(self._ends[document]), stop) - position
            pieces.append(self._documents.get(document, offset=offset, length=length))
            position += length
            document += 1
        # The mmap'd arrays are read-only and may be uint16: copy into int64 for torch.
        return numpy.concatenate(pieces).astype(numpy.int64)
