"""Process bodies for tests/student/test_hf_bridge.py (importable: spawned processes load them).

`bridge_layouts(dirs, layouts, export_root)` loads every HF checkpoint of `dirs` at each (tp, pp) layout of
`layouts` in one process group (the model-parallel state is rebuilt per layout), runs a forward on `tokens()` and
returns the full-vocabulary logits from the last stage's TP rank 0 (gathered over TP here in the test only), and,
for layouts with pp == 1, exports the model back to HF format under `export_root/<layout>/<name>`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from opd_megatron.config import load_config
from opd_megatron.student.distributed import ParallelContext, init_parallel
from opd_megatron.student.hf_bridge import (HFBridgeError, export_hf_checkpoint, load_hf_checkpoint,
                                            load_hf_weights, model_section_from_hf_config, read_hf_config)
from opd_megatron.student.model import build_student


def tokens(vocab_size: int, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(5))


def init_layout(tp: int, pp: int) -> ParallelContext:
    """megatron's model-parallel state at (tp, pp) on the running process group (rebuilt if one exists)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    return init_parallel(load_config(None, [f"parallel.tp={tp}", f"parallel.pp={pp}", "parallel.micro_batch_size=1",
                                            "parallel.global_batch_size=4"]))


def gather_vocab(logits_shard: torch.Tensor, vocab_size: int) -> torch.Tensor:
    group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(logits_shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, logits_shard.contiguous(), group=group)
    return torch.cat(shards, dim=-1)[..., :vocab_size]


def pipeline_forward(module, ids: torch.Tensor, ctx: ParallelContext) -> Optional[torch.Tensor]:
    """Forward of one batch through the pipeline with plain p2p: hidden states `[S, B, H]` go stage to stage;
    the last stage returns its logits shard `[B, S, V/tp]`, the others None."""
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    if not ctx.is_first_stage:
        hidden = torch.empty(ids.shape[1], ids.shape[0], module.config.hidden_size)
        dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        module.set_input_tensor(hidden)
    with torch.no_grad():
        out = module(ids, positions, None)
    if not ctx.is_last_stage:
        dist.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
        return None
    return out


def _pruned_student(path: str, layers: list[int], tp: int, pp: int, device: torch.device):
    """The student a run with `model.from_hf=path model.from_hf_layers=layers` starts from (the config path)."""
    cfg = load_config(None, [f"model.from_hf={path}", f"model.from_hf_layers={layers}", f"parallel.tp={tp}",
                             f"parallel.pp={pp}", "parallel.micro_batch_size=1", "parallel.global_batch_size=4"])
    student = build_student(cfg.model, cfg.parallel, device)
    load_hf_weights(student.module, cfg.model, path)
    return student


def bridge_layouts(dirs: dict[str, str], layouts: list[tuple[int, int]], export_root: Optional[str],
                   pruned: Optional[dict[str, tuple[str, list[int]]]] = None) -> dict:
    """`pruned`: name -> (HF directory, from_hf_layers), loaded through the run config like a run's student."""
    results: dict = {}
    for tp, pp in layouts:
        ctx = init_layout(tp, pp)
        loads = [(name, path, None) for name, path in dirs.items()]
        loads += [(name, path, layers) for name, (path, layers) in (pruned or {}).items()]
        for name, path, layers in loads:
            if layers is None:
                student = load_hf_checkpoint(path, load_config(None, [f"parallel.tp={tp}", f"parallel.pp={pp}"]
                                                               ).parallel, ctx.device)
            else:
                student = _pruned_student(path, layers, tp, pp, ctx.device)
            student.module.eval()
            logits = pipeline_forward(student.module, tokens(student.vocab_size), ctx)
            if logits is not None:
                full = gather_vocab(logits, student.vocab_size)
                if ctx.tp_rank == 0:
                    results[(tp, pp, name)] = {"logits": full, "padded_vocab": student.padded_vocab_size}
            if export_root is not None and pp == 1 and layers is None:
                export_hf_checkpoint(student.module, model_section_from_hf_config(path),
                                     Path(export_root) / f"tp{tp}pp{pp}" / name, hf_config=read_hf_config(path))
    return results


def load_errors(paths: list[str]) -> list[Optional[str]]:
    """The message of the HFBridgeError a load of each (broken) checkpoint of `paths` raises (None: it loads)."""
    ctx = init_layout(1, 1)
    messages = []
    for path in paths:
        try:
            load_hf_checkpoint(path, load_config(None, []).parallel, ctx.device)
        except HFBridgeError as error:
            messages.append(str(error))
        else:
            messages.append(None)
    return messages


def checkpoint_logits(checkpoints: str, ids: torch.Tensor) -> torch.Tensor:
    """The full-vocabulary logits (true vocabulary) of the student saved in one of our checkpoints, at TP=1."""
    from opd_megatron.student.checkpoint import resolve_checkpoint, saved_config
    from opd_megatron.student.hf_export import load_model_weights, saved_model
    ctx = init_layout(1, 1)
    path = resolve_checkpoint(checkpoints)
    model = saved_model(saved_config(path), str(path))
    student = build_student(model, load_config(None, []).parallel, ctx.device)
    load_model_weights(student.module, path)
    student.module.eval()
    return pipeline_forward(student.module, ids, ctx)[..., :model.vocab_size]
