"""Documents packed into one window: the boundary label is masked, positions and attention restart per document
where asked, and then the student's logits and loss on a packed window equal those of its documents run alone."""

import json

import torch

from opd_megatron.data.indexed import DocumentPacking, IndexedTextDataset, preprocess_jsonl
from opd_megatron.data.jsonl import collate
from opd_megatron.data.tokenizer import ByteTokenizer
from tests.data import indexed_workers
from tests.harness import run_distributed

BYTE = ByteTokenizer()
BOS, EOS, PAD = BYTE.bos_id, BYTE.eos_id, BYTE.pad_id


def write_corpus(root, name, texts):
    src = root / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    preprocess_jsonl(src, root / name, BYTE)
    return root / name


def test_boundaries_mask_the_crossing_label_and_restart_positions_and_attention(tmp_path):
    # Stream: [BOS a b EOS] [BOS c d e f EOS] [BOS g EOS]: 13 tokens, windows of 6 share one token.
    prefix = write_corpus(tmp_path, "c", ["ab", "cdef", "g"])
    window = IndexedTextDataset(prefix, 6, PAD, DocumentPacking(True, True, True))[1]
    # window 1: stream tokens 6..12 = [d e f EOS] [BOS g EOS]; labels 7..12
    assert window.tokens.tolist() == [100, 101, 102, EOS, BOS, 103]
    assert window.labels.tolist() == [101, 102, EOS, BOS, 103, EOS]
    # The EOS is predicted (label 2 trains); the BOS after it is not (label 3: it opens the next document).
    assert window.loss_mask.tolist() == [1, 1, 1, 0, 1, 1]
    # The first (partial) document starts at the window's start; the next at its BOS.
    assert window.position_ids.tolist() == [0, 1, 2, 3, 0, 1]
    assert window.document_ids.tolist() == [0, 0, 0, 0, 1, 1]
    last = IndexedTextDataset(prefix, 5, PAD, DocumentPacking(True, True, True))[2]   # stream 10..12, padded
    assert last.tokens.tolist() == [BOS, 103, PAD, PAD, PAD] and last.loss_mask.tolist() == [1, 1, 0, 0, 0]
    assert last.document_ids.tolist() == [0, 0, 1, 1, 1] and last.position_ids.tolist() == [0, 1, 2, 3, 4]
    # Options off: megatron's defaults (no masks, one sequence); eod_mask_loss alone adds no tensors.
    plain = IndexedTextDataset(prefix, 6, PAD, DocumentPacking(False, False, False))[1]
    assert plain.loss_mask.tolist() == [1] * 6 and plain.position_ids is None and plain.document_ids is None
    masked = IndexedTextDataset(prefix, 6, PAD)[1]
    assert masked.loss_mask.tolist() == [1, 1, 1, 0, 1, 1] and masked.document_ids is None

    # The attention mask the forward gets: True where a query may not see a key (a later key or another document).
    batch = collate([window, IndexedTextDataset(prefix, 6, PAD, DocumentPacking(True, True, True))[0]])
    tokens, positions, mask = batch.model_inputs(torch.device("cpu"))
    assert torch.equal(tokens, batch.tokens) and torch.equal(positions, batch.position_ids)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    allowed = ~mask[0, 0]
    assert allowed[5].tolist() == [False, False, False, False, True, True]   # g sees BOS g, not d e f EOS
    assert allowed[3].tolist() == [True, True, True, True, False, False]
    assert not allowed.triu(1).any()
    plain_batch = collate([plain, plain])
    tokens, positions, mask = plain_batch.model_inputs(torch.device("cpu"))
    assert mask is None and positions.tolist() == [list(range(6))] * 2


def test_packed_window_gives_each_document_its_own_logits_and_an_sft_blend_resumes_exactly(tmp_path):
    """One process for both (a spawn costs more than either body)."""
    two = write_corpus(tmp_path, "two", ["hello", "abcdefg"])   # 7 + 9 tokens: one window of 15 + 1
    web = write_corpus(tmp_path, "web", [f"page {i} " + "x" * (i % 9) for i in range(40)])
    code = write_corpus(tmp_path, "code", [f"f{i}() = {i * i}" for i in range(20)])
    blend = [{"path": str(web), "weight": 0.75}, {"path": str(code), "weight": 0.25}]
    result = run_distributed(indexed_workers.packing_and_resume, 1, args=(str(two), 7, str(tmp_path / "runs"), blend),
                             timeout_s=300)[0]

    packing = result["packing"]
    for case, numbers in packing.items():
        assert numbers["trained_labels"] == 14, case   # 15 labels, less the one that opens the second document
    # RoPE is relative and megatron-core reads no position ids for it: the mask alone makes documents independent.
    # Learned absolute embeddings need the positions reset too. Float32 forward: differences of rounding size.
    for case in ("rope/mask_and_positions", "rope/mask_only", "learned_absolute/mask_and_positions"):
        assert packing[case]["logits"] < 1e-5 and packing[case]["loss"] < 1e-5, (case, packing[case])
    # And each is needed: without the mask the second document sees the first; without positions (learned), it
    # sits at positions 7..14.
    for case in ("rope/loss_mask_only", "learned_absolute/loss_mask_only", "learned_absolute/mask_only"):
        assert packing[case]["logits"] > 1e-3, (case, packing[case])

    # SFT on a blend with packed-document masks through megatron's schedule: 4 steps at once, and 2 steps then a
    # resume to 4. Steps 3 and 4 after the resume read the same samples with the same weights: the same losses.
    losses = result["losses"]
    assert len(losses["whole"]) == 4 and len(losses["resumed"]) == 4
    assert losses["resumed"] == losses["whole"], losses
