"""Pretraining-scale data in megatron-core's indexed format (`<prefix>.bin` token ids + `<prefix>.idx` index).

`preprocess_jsonl` tokenizes a JSONL file once into one document a line. `IndexedTextDataset` memory-maps one corpus
and serves fixed windows of its concatenated token stream; `CorpusBlend` draws samples from several corpora by
weight (`data.blend`; `data.path` is a blend of one) and is what training reads.

Documents packed into a window (`DocumentPacking`, megatron GPTDataset's options with the same names and meaning):
- eod_mask_loss (default on): the label that crosses a document boundary (the first token of the next document,
  predicted from the end of the previous one) has loss_mask 0. The last token of a document (its eod when written
  with one) is predicted and trains; the token after it does not. megatron finds the boundary by `tokens == eod`;
  here it comes from the index's document boundaries, so an eos inside a document is no boundary and a corpus
  written without eod (`append_eod=False`) is still masked.
- reset_position_ids: positions restart at 0 at each document start in the window (the window's first, partial,
  document starts at 0 at the window start). megatron-core's GPTModel reads position ids only for
  `learned_absolute` embeddings: RoPE is relative, so with the attention mask below it already sees each
  document from its own start.
- reset_attention_mask: a token attends only to earlier tokens of its own document. Passed to the model as an
  explicit `[B, 1, S, S]` mask (`SftBatch.model_inputs`), which megatron-core's local layer spec (the CPU path)
  applies; TransformerEngine's causal attention ignores an explicit mask, so the GPU path refuses it (it would need
  packed-sequence parameters, THD). With both options on, a packed window gives each document the logits it has
  alone (tests/data/test_indexed_packing.py).

The blend and its order. Sample i of a blend is (corpus, window): the corpus comes from a fixed pattern of
`BLEND_BLOCK` samples built by megatron-core's `build_blending_indices` (the greedy largest-error interleave that
megatron's BlendedDataset uses, from the prebuilt `helpers_cpp` extension of the 0.16.1 wheel: no compiling), and
the pattern repeats, so which corpus sample i reads is O(1) and every prefix of the order has the weights' proportions
to within one sample per corpus per block. The k-th draw from corpus c reads window perm(c, k // n_c)[k % n_c]:
every window once per pass over the corpus, in an order drawn from (run.seed, c, pass) (file order when
data.shuffle is false). The order is an endless sequence that does not depend on the run's length, so the batches
are consecutive sample indices (`StreamBatchSampler`): resuming at a consumed-sample count repeats the order exactly,
and a longer run extends it. Why not megatron's BlendedDataset / GPTDataset themselves: they need the run's sample
count up front (they materialise and cache to disk per-sample index arrays of that length, `size` samples of 10 bytes
each plus GPTDataset's shuffle), a megatron tokenizer object and a split; the sample count would make the order
depend on run.train_steps. Only the interleave is taken from megatron.

A sample's identity (`CorpusBlend.sample_identity`): its corpus, its window in that corpus and `window_key`, the
window's index in the concatenation of all corpora's windows (stable while the corpora and seq_length are, whatever
the weights and seed): what a teacher cache keys samples by, so a window drawn twice is scored once.
`CorpusBlend.identity()` describes the blend for a cache manifest (each corpus's prefix, sizes and .idx sha256, the
weights, seq_length, seed and packing options).

Bad input is named at open time: a missing .bin or .idx (the prefix and which file), a .bin whose size does not
match its .idx (truncated), a corpus shorter than one sample, a corpus written with another tokenizer: token ids
stored as uint16 cannot hold a vocabulary of more than 65,536 ids, and a sampled scan (`VOCAB_CHECK_TOKENS` tokens
spread evenly over each corpus; the index stores no maximum id, and a full scan reads the whole corpus on every
rank) finds ids >= the tokenizer's vocabulary. Every window read is checked too (its max id), so a stray id the scan
missed stops the run naming the corpus and window.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy
import torch
from megatron.core.datasets.helpers_cpp import build_blending_indices
from megatron.core.datasets.indexed_dataset import (DType, IndexedDataset, IndexedDatasetBuilder, get_bin_path,
                                                    get_idx_path)

from opd_megatron.data.jsonl import DataError, JsonlReader, SftSample, encode_record
from opd_megatron.data.tokenizer import Tokenizer

# Samples in one period of the blend pattern (10 bytes a sample): a corpus is drawn within one sample of its share
# per block, and a share the pattern misses by more than BLEND_TOLERANCE (a share under ~1e-4) is refused.
BLEND_BLOCK = 1 << 20
BLEND_TOLERANCE = 0.01
# Tokens read per corpus by the open-time vocabulary check, in VOCAB_CHECK_CHUNKS evenly spaced runs.
VOCAB_CHECK_TOKENS = 1 << 20
VOCAB_CHECK_CHUNKS = 256
# Mixes (seed, corpus, pass) into one generator seed, as batch_indices mixes (seed, epoch).
_PASS_SEED_STRIDE = 1_000_003
_CORPUS_SEED_STRIDE = 7_919


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


@dataclass(frozen=True)
class DocumentPacking:
    """How the documents packed into one window see each other (the module docstring; data.eod_mask_loss,
    data.reset_position_ids, data.reset_attention_mask)."""
    eod_mask_loss: bool = True
    reset_position_ids: bool = False
    reset_attention_mask: bool = False


class IndexedTextDataset(torch.utils.data.Dataset):
    """Fixed windows over the concatenation of one corpus's documents, in file order.

    Window i covers stream[i*S : i*S + S + 1] (S = seq_length): consecutive windows share one token, the last
    label of a window being the first input of the next, as in megatron's GPTDataset. The last window is padded
    (pad_id, loss_mask 0) rather than dropped, so small corpora lose nothing. Windows cross document boundaries;
    `packing` says what a boundary inside a window does. vocab_size: the tokenizer's; token ids at or above it are
    refused (a sampled check at open time, and every window read); None skips the checks.
    """

    def __init__(self, prefix: str | Path, seq_length: int, pad_id: int, packing: DocumentPacking = DocumentPacking(),
                 vocab_size: Optional[int] = None) -> None:
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
        self.packing = packing
        self.vocab_size = vocab_size
        index = IndexedDataset(prefix, mmap=True)
        self.dtype = numpy.dtype(index.index.dtype)
        # sequence_ends[q] = stream tokens up to and including sequence q. A megatron document may hold several
        # sequences (a sentence-split corpus): the boundaries that packing respects are the documents'.
        sequence_ends = numpy.concatenate([[0], numpy.cumsum(index.sequence_lengths, dtype=numpy.int64)])
        self.num_tokens = int(sequence_ends[-1])
        self._document_ends = sequence_ends[numpy.asarray(index.document_indices[1:], dtype=numpy.int64)]
        # The stream as one array: the .bin of a megatron indexed dataset is its sequences back to back, which the
        # file size confirms (a truncated .bin is caught here, not as garbage tokens hours in).
        bin_bytes = os.path.getsize(get_bin_path(prefix))
        if bin_bytes != self.num_tokens * self.dtype.itemsize:
            raise DataError(f"indexed dataset {prefix!r}: {get_bin_path(prefix)} holds {bin_bytes} bytes, but its "
                            f".idx describes {self.num_tokens} {self.dtype.name} tokens "
                            f"({self.num_tokens * self.dtype.itemsize} bytes); the .bin is truncated or belongs to "
                            f"another .idx: rewrite it with `opd-megatron preprocess`")
        self._stream = numpy.memmap(get_bin_path(prefix), dtype=self.dtype, mode="r")
        del index
        if self.num_tokens < seq_length + 1:
            raise DataError(f"indexed dataset {prefix!r}: {self.num_tokens} tokens, shorter than one sample "
                            f"(data.seq_length + 1 = {seq_length + 1} tokens); expected a longer corpus or a "
                            f"smaller data.seq_length")
        self._num_windows = -(-(self.num_tokens - 1) // seq_length)  # ceil: every label appears exactly once
        if vocab_size is not None:
            self._check_vocabulary(vocab_size)

    @property
    def num_documents(self) -> int:
        return len(self._document_ends)

    def __len__(self) -> int:
        return self._num_windows

    def __getitem__(self, window: int) -> SftSample:
        if not 0 <= window < self._num_windows:
            raise IndexError(f"window {window} out of range for {self._num_windows} windows")
        seq_length = self.seq_length
        start = window * seq_length
        stop = min(start + seq_length + 1, self.num_tokens)
        ids = self.read(start, stop)
        if self.vocab_size is not None and int(ids.max()) >= self.vocab_size:
            bad = int(ids.max())
            raise DataError(f"indexed dataset {self.prefix!r}, window {window} (stream tokens {start}..{stop - 1}): "
                            f"token id {bad} >= the tokenizer's vocab_size {self.vocab_size}; the corpus was written "
                            f"with another tokenizer than data.tokenizer")
        n = len(ids) - 1
        tokens = torch.full((seq_length,), self.pad_id, dtype=torch.long)
        labels = torch.full((seq_length,), self.pad_id, dtype=torch.long)
        loss_mask = torch.zeros(seq_length, dtype=torch.float32)
        tokens[:n] = torch.from_numpy(ids[:-1])
        labels[:n] = torch.from_numpy(ids[1:])
        loss_mask[:n] = 1.0
        packing = self.packing
        # document[t]: the document of stream token start + t.
        document = numpy.searchsorted(self._document_ends, numpy.arange(start, stop), side="right")
        if packing.eod_mask_loss:
            # labels[t] = ids[t + 1] crosses a boundary when it opens another document than ids[t] is in.
            loss_mask[:n][torch.from_numpy(document[1:] != document[:-1])] = 0.0
        position_ids = document_ids = None
        if packing.reset_position_ids:
            document_starts = numpy.concatenate([[0], self._document_ends])[document[:-1]]
            position_ids = torch.arange(seq_length, dtype=torch.long)  # padding keeps 0..S-1 (< max positions)
            position_ids[:n] = torch.from_numpy(numpy.arange(start, stop - 1) - numpy.maximum(document_starts, start))
        if packing.reset_attention_mask:
            relative = document[:-1] - document[0]
            # Padding is one more document of its own: real tokens never see it (it comes after them anyway).
            document_ids = torch.full((seq_length,), int(relative[-1]) + 1, dtype=torch.long)
            document_ids[:n] = torch.from_numpy(relative)
        return SftSample(tokens, labels, loss_mask, position_ids=position_ids, document_ids=document_ids)

    def window_tokens(self, window: int) -> tuple[numpy.ndarray, numpy.ndarray]:
        """Window `window`'s stream tokens `[n]` (up to seq_length + 1) and the document of each `[n]` (0 for the
        window's first document, counting up): a corpus prefix for on-policy continuations (rollout.source corpus)
        keeps to one document."""
        if not 0 <= window < self._num_windows:
            raise IndexError(f"window {window} out of range for {self._num_windows} windows")
        start = window * self.seq_length
        stop = min(start + self.seq_length + 1, self.num_tokens)
        document = numpy.searchsorted(self._document_ends, numpy.arange(start, stop), side="right")
        return self.read(start, stop), document - document[0]

    def read(self, start: int, stop: int) -> numpy.ndarray:
        """Stream tokens [start, stop) as int64 (the memory map is read-only and may be uint16: a copy)."""
        return numpy.asarray(self._stream[start:stop], dtype=numpy.int64)

    def _check_vocabulary(self, vocab_size: int) -> None:
        """Refuse a corpus written with another tokenizer: a dtype too narrow for the vocabulary, or a sampled id
        >= vocab_size (the module docstring says why sampled)."""
        if numpy.iinfo(self.dtype).max < vocab_size - 1:
            raise DataError(f"indexed dataset {self.prefix!r}: token ids stored as {self.dtype.name} (at most "
                            f"{numpy.iinfo(self.dtype).max}), but the tokenizer's vocab_size is {vocab_size}: the "
                            f"corpus was written with another (smaller) tokenizer than data.tokenizer")
        chunk = VOCAB_CHECK_TOKENS // VOCAB_CHECK_CHUNKS
        if self.num_tokens <= VOCAB_CHECK_TOKENS:
            starts = [0]
            chunk = self.num_tokens
        else:
            starts = numpy.linspace(0, self.num_tokens - chunk, VOCAB_CHECK_CHUNKS).astype(numpy.int64).tolist()
        for start in starts:
            ids = self._stream[start:start + chunk]
            largest = int(ids.max())
            if largest >= vocab_size:
                at = start + int(numpy.argmax(ids))
                raise DataError(f"indexed dataset {self.prefix!r}: token id {largest} at stream position {at} >= the "
                                f"tokenizer's vocab_size {vocab_size}; the corpus was written with another tokenizer "
                                f"than data.tokenizer")

    def description(self, with_hash: bool) -> dict[str, Any]:
        """What identifies this corpus: its sizes (and the sha256 of its .idx, which holds every document's length,
        when with_hash: one read of the .idx)."""
        described: dict[str, Any] = {"prefix": self.prefix, "documents": self.num_documents,
                                     "tokens": self.num_tokens, "windows": len(self), "dtype": self.dtype.name}
        if with_hash:
            digest = hashlib.sha256()
            with open(get_idx_path(self.prefix), "rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
            described["idx_sha256"] = digest.hexdigest()
        return described


@dataclass(frozen=True)
class SampleIdentity:
    """Which window a blend's sample is: the stable key of its contents."""
    corpus: int        # the corpus's position in data.blend (0 for data.path)
    window: int        # the window within that corpus
    window_key: int    # the window's index among all corpora's windows (earlier corpora's windows first)


class CorpusBlend:
    """Samples drawn from several corpora by weight, in an endless order fixed by the seed (the module docstring).

    Sample i exists for every i >= 0 (there is no length: a pass over every corpus is `samples_per_pass`); the order
    does not depend on how many samples a run takes. Batches of it are consecutive indices (StreamBatchSampler).
    """

    def __init__(self, corpora: Sequence[IndexedTextDataset], weights: Sequence[float], seed: int,
                 shuffle: bool = True) -> None:
        if not corpora or len(corpora) != len(weights):
            raise ValueError(f"CorpusBlend: expected one weight per corpus and at least one corpus, got "
                             f"{len(corpora)} corpora and {len(weights)} weights")
        for position, (corpus, weight) in enumerate(zip(corpora, weights)):
            if not (numpy.isfinite(weight) and weight > 0):
                raise ValueError(f"CorpusBlend: corpus {position} ({corpus.prefix!r}) has weight {weight}; expected "
                                 f"a positive finite number")
            if corpus.seq_length != corpora[0].seq_length:
                raise ValueError(f"CorpusBlend: corpus {position} has seq_length {corpus.seq_length}, corpus 0 "
                                 f"{corpora[0].seq_length}; expected one")
        if len(corpora) > numpy.iinfo(numpy.int16).max:
            raise ValueError(f"CorpusBlend: {len(corpora)} corpora; megatron's blending index holds at most "
                             f"{numpy.iinfo(numpy.int16).max}")
        self.corpora = list(corpora)
        self.weights = [float(w) for w in weights]
        self.seed = seed
        self.shuffle = shuffle
        self.seq_length = corpora[0].seq_length
        shares = numpy.asarray(self.weights, dtype=numpy.float64) / sum(self.weights)
        self._pattern_corpus = numpy.zeros(BLEND_BLOCK, dtype=numpy.int16)
        self._pattern_draw = numpy.zeros(BLEND_BLOCK, dtype=numpy.int64)
        build_blending_indices(self._pattern_corpus, self._pattern_draw, shares, len(corpora), BLEND_BLOCK, False)
        self._draws_per_block = numpy.bincount(self._pattern_corpus, minlength=len(corpora)).astype(numpy.int64)
        for position, draws in enumerate(self._draws_per_block):
            expected = shares[position] * BLEND_BLOCK
            if abs(draws - expected) > BLEND_TOLERANCE * expected:
                raise ValueError(f"CorpusBlend: corpus {position} ({self.corpora[position].prefix!r}) has weight "
                                 f"{self.weights[position]}, a share of {shares[position]:.3g} of the blend: its "
                                 f"pattern of {BLEND_BLOCK} samples draws it {draws} times, not {expected:.3g} "
                                 f"(more than {BLEND_TOLERANCE:.0%} off); raise its weight or leave it out")
        self._window_offsets = numpy.concatenate([[0], numpy.cumsum([len(c) for c in corpora])]).astype(numpy.int64)
        self._permutations: dict[int, tuple[int, torch.Tensor]] = {}   # corpus -> (pass, its window order)

    @property
    def num_windows(self) -> int:
        """Windows of all corpora together: the range of SampleIdentity.window_key."""
        return int(self._window_offsets[-1])

    def __getitem__(self, index: int) -> SftSample:
        identity = self.sample_identity(index)
        return self.corpora[identity.corpus][identity.window]

    def sample_identity(self, index: int) -> SampleIdentity:
        if index < 0:
            raise IndexError(f"sample {index}: expected an index >= 0")
        block, offset = divmod(int(index), BLEND_BLOCK)
        corpus = int(self._pattern_corpus[offset])
        draw = block * int(self._draws_per_block[corpus]) + int(self._pattern_draw[offset])
        passes, position = divmod(draw, len(self.corpora[corpus]))
        window = int(self._window_order(corpus, passes)[position]) if self.shuffle else position
        return SampleIdentity(corpus, window, int(self._window_offsets[corpus]) + window)

    def window_tokens(self, index: int) -> tuple[numpy.ndarray, numpy.ndarray]:
        """Sample `index`'s stream tokens and their documents (`IndexedTextDataset.window_tokens`)."""
        identity = self.sample_identity(index)
        return self.corpora[identity.corpus].window_tokens(identity.window)

    def window_sample(self, window_key: int) -> SftSample:
        """The sample of one window by its key (a teacher cache scores each window once, however often drawn)."""
        if not 0 <= window_key < self.num_windows:
            raise IndexError(f"window key {window_key} out of range for {self.num_windows} windows")
        corpus = int(numpy.searchsorted(self._window_offsets, window_key, side="right")) - 1
        return self.corpora[corpus][window_key - int(self._window_offsets[corpus])]

    def _window_order(self, corpus: int, passes: int) -> torch.Tensor:
        """The order of corpus `corpus`'s windows in its pass `passes`: a permutation drawn from (seed, corpus, pass),
        the latest kept per corpus (samples are read mostly in order, so a pass is drawn about once)."""
        cached = self._permutations.get(corpus)
        if cached is None or cached[0] != passes:
            generator = torch.Generator().manual_seed(
                ((self.seed * _PASS_SEED_STRIDE + passes) * _CORPUS_SEED_STRIDE + corpus) % (1 << 63))
            cached = (passes, torch.randperm(len(self.corpora[corpus]), generator=generator))
            self._permutations[corpus] = cached
        return cached[1]

    @property
    def samples_per_pass(self) -> int:
        """The fewest samples in which every window of every corpus is drawn at least once."""
        last = 0
        for corpus, dataset in enumerate(self.corpora):
            blocks, remainder = divmod(len(dataset) - 1, int(self._draws_per_block[corpus]))
            # The (remainder)-th draw of corpus within a block is at its (remainder)-th position in the pattern.
            position = int(numpy.flatnonzero(self._pattern_corpus == corpus)[remainder])
            last = max(last, blocks * BLEND_BLOCK + position)
        return last + 1

    def order_description(self) -> dict[str, Any]:
        """What the sample order is drawn from, without paths (a corpus may move between machines) or hashes (every
        rank reads this at start): a resumed run whose description differs would read other samples."""
        return {"seq_length": self.seq_length, "seed": self.seed, "shuffle": self.shuffle, "blend_block": BLEND_BLOCK,
                "weights": list(self.weights),
                "corpora": [{key: value for key, value in corpus.description(with_hash=False).items()
                             if key != "prefix"} for corpus in self.corpora]}

    def identity(self) -> dict[str, Any]:
        """The blend's identity for a cache manifest: each corpus's prefix, sizes and .idx sha256, the weights,
        seq_length, seed and packing, and two hashes of it (sha256 of canonical JSON, prefixes left out so a moved
        corpus keeps its identity): `fingerprint` of everything, and `windows_fingerprint` of what a window's
        contents depend on (corpora, seq_length, packing: not the weights, seed or shuffle, which only choose which
        windows are drawn when)."""
        corpora = [corpus.description(with_hash=True) for corpus in self.corpora]
        for corpus, weight in zip(corpora, self.weights):
            corpus["weight"] = weight
        windows = {"seq_length": self.seq_length, "packing": _packing_dict(self.corpora[0].packing),
                   "corpora": [{key: value for key, value in corpus.items() if key not in ("prefix", "weight")}
                               for corpus in corpora]}
        order = {**windows, "seed": self.seed, "shuffle": self.shuffle, "blend_block": BLEND_BLOCK,
                 "weights": list(self.weights)}
        return {**order, "corpora": corpora, "fingerprint": _sha256_json(order),
                "windows_fingerprint": _sha256_json(windows)}


def _packing_dict(packing: DocumentPacking) -> dict[str, bool]:
    return {"eod_mask_loss": packing.eod_mask_loss, "reset_position_ids": packing.reset_position_ids,
            "reset_attention_mask": packing.reset_attention_mask}


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
