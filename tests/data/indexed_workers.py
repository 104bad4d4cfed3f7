"""Process bodies for the indexed-corpus model tests (importable: spawned processes load them)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from opd_megatron.config import load_config
from opd_megatron.data.indexed import DocumentPacking, IndexedTextDataset
from opd_megatron.data.jsonl import collate
from opd_megatron.data.tokenizer import ByteTokenizer
from opd_megatron.student.distributed import init_parallel, seed_everything
from opd_megatron.student.model import build_student

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.vocab_size=259", "model.max_position_embeddings=32",
        "parallel.micro_batch_size=2", "parallel.global_batch_size=4", "run.seed=5"]


def _full_logits(module, tokens, position_ids, attention_mask) -> torch.Tensor:
    with torch.no_grad():
        return module(tokens, position_ids, attention_mask)[..., :259].double()


def packed_versus_separate(prefix: str, first_length: int, ctx) -> dict:
    """For each position embedding and packing: the largest logit and loss differences (relative to the logits'
    scale) between one window holding two whole documents and the two documents run alone."""
    byte = ByteTokenizer()
    cfg = load_config(None, TINY + ["data.seq_length=15"])
    out: dict = {}
    for embedding in ("rope", "learned_absolute"):
        seed_everything(cfg.run.seed, ctx)
        model = dataclasses.replace(cfg.model, position_embedding=embedding)
        module = build_student(model, cfg.parallel, ctx.device).module.eval()
        for name, packing in [("mask_and_positions", DocumentPacking(True, True, True)),
                              ("mask_only", DocumentPacking(True, False, True)),
                              ("loss_mask_only", DocumentPacking(True, False, False))]:
            window = IndexedTextDataset(prefix, 15, byte.pad_id, packing, byte.vocab_size)
            assert len(window) == 1
            batch = collate([window[0]])
            packed = _full_logits(module, *batch.model_inputs(ctx.device))[0]
            stream = window.read(0, 16)
            first, second = torch.from_numpy(stream[:first_length]), torch.from_numpy(stream[first_length:])
            alone = []
            for document in (first, second[:-1]):   # the second's last token is a label only
                tokens = document.unsqueeze(0)
                positions = torch.arange(tokens.shape[1]).unsqueeze(0)
                alone.append(_full_logits(module, tokens, positions, None)[0])
            separate = torch.cat(alone)
            # The loss: every label of each document alone (the first's last token predicts nothing of its own).
            separate_loss = (F.cross_entropy(alone[0][:-1], first[1:], reduction="sum")
                             + F.cross_entropy(alone[1], second[1:], reduction="sum"))
            mask = batch.loss_mask[0].double()
            packed_loss = (F.cross_entropy(packed, batch.labels[0], reduction="none") * mask).sum()
            scale = separate.abs().max().item()
            out[f"{embedding}/{name}"] = {
                "logits": (packed - separate).abs().max().item() / scale,
                "loss": abs(packed_loss.item() - separate_loss.item()) / separate_loss.item(),
                "trained_labels": int(mask.sum().item())}
    return out


def sft_resume(root: str, blend: list[dict], ctx) -> dict:
    """Per-step losses of an SFT run on an indexed blend: 4 steps at once, and 2 steps then a resume to 4."""
    from opd_megatron.loop.common import StopRequest
    from opd_megatron.loop.sft import train_sft

    overrides = TINY + ["data.format=indexed", f"data.blend={json.dumps(blend)}", "data.seq_length=16",
                        "data.reset_attention_mask=true", "data.reset_position_ids=true", f"run.output_dir={root}",
                        "optim.decay_style=constant", "optim.warmup_steps=0", "logging.progress_bar=false",
                        "logging.tensorboard=false", "checkpoint.save_interval=0"]
    stop = StopRequest()
    losses: dict[str, list[float]] = {}
    try:
        for name, steps in [("whole", 4), ("resumed", 2), ("resumed", 4)]:
            cfg = load_config(None, overrides + [f"run.name={name}", f"run.train_steps={steps}",
                                                 f"checkpoint.save_at_end={name == 'resumed'}"])
            seed_everything(cfg.run.seed, ctx)   # the same initial weights for both runs
            train_sft(cfg, ctx, stop)
            metrics = Path(root) / name / "metrics.jsonl"
            losses[name] = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    finally:
        stop.restore()
    return losses


def packing_and_resume(two_documents: str, first_length: int, root: str, blend: list[dict]) -> dict:
    """Both bodies in one process (one spawn: most of a distributed test's cost)."""
    ctx = init_parallel(load_config(None, TINY + ["data.seq_length=16"]))
    return {"packing": packed_versus_separate(two_documents, first_length, ctx),
            "losses": sft_resume(root, blend, ctx)}
