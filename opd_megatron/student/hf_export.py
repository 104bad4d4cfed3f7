"""Hugging Face out, and conversion both ways: `opd-megatron export-hf`, `opd-megatron convert` and
`checkpoint.export_hf` (at the end of a run).

    opd-megatron export-hf --run-dir runs/opd --output hf/student            # the run's latest checkpoint
    opd-megatron export-hf --run-dir runs/opd --iteration 200 --output hf/student-200 --dtype bfloat16
    opd-megatron convert --from-hf hf/Qwen3-0.6B --output ckpts/qwen3 --tp 2    # HF -> a megatron checkpoint
    opd-megatron convert --from-megatron runs/opd/checkpoints --output hf/student  # megatron -> HF
    torchrun --nproc_per_node 4 -m opd_megatron export-hf --run-dir ... --output ... --tp 2 --pp 2

The same bridge (`student/hf_bridge.py`) as `model.from_hf`: each rank reads or writes only its slices, and a
writer holds one pipeline stage's tensors at a time. Any saved layout loads at any export layout (dist_checkpointing
reshards), so a run trained at TP=4 x PP=2 exports from one CPU process when memory allows, or from tp x pp
processes under torchrun when it does not.

An export is a directory transformers and vLLM load as they are: safetensors (one file per pipeline stage, with
the index), `config.json` (the source checkpoint's, with the trained shape written over it: token ids, chat
settings and the rest are kept), and the tokenizer files with the chat template. It is written into
`<output>.partial-<pid>` and renamed when complete, so an interrupted export never leaves a directory that looks
finished.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from opd_megatron.config import ConfigError, ModelSection, ParallelSection, from_dict
from opd_megatron.config.hf import CONFIG_FILE, hf_family, read_hf_config
from opd_megatron.config.loader import build_dataclass
from opd_megatron.student.checkpoint import iteration_dir, resolve_checkpoint, save_checkpoint, saved_config
from opd_megatron.student.distributed import ParallelContext, destroy_parallel, init_parallel
from opd_megatron.student.hf_bridge import check_exportable, export_hf_checkpoint, load_hf_weights
from opd_megatron.student.model import build_student
from opd_megatron.student.optimizer import wrap_for_training

# What a Hugging Face tokenizer directory may hold (fast and slow tokenizers, chat templates of transformers 4 and
# 5, generation defaults); each one present in the source is copied.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "vocab.txt")
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ExportResult:
    output: Path
    checkpoint: Path                 # the megatron checkpoint exported
    family: str
    dtype: str                       # the storage dtype
    tokenizer_files: tuple[str, ...]  # copied beside the weights (empty: the run's tokenizer is not an HF one)


def _layout(tp: int, pp: int) -> dict[str, Any]:
    """The config sections of a job that only loads and saves at (tp, pp) over all of its processes."""
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    dp = max(1, world // (tp * pp))
    return {"parallel": {"tp": tp, "pp": pp, "micro_batch_size": 1, "global_batch_size": dp}}


def saved_model(config: dict[str, Any], where: str) -> ModelSection:
    """The model section a checkpoint was saved with, every architecture key resolved (a `from_hf` run's config
    holds the keys its checkpoint gave), independent of whether that HF directory still exists."""
    raw = dict(config.get("model") or {})
    if not raw:
        raise ConfigError(f"{where}: the checkpoint holds no model section in its saved config")
    raw.update(from_hf=None, from_hf_layers=None, preset=None)
    if not torch.cuda.is_available():
        raw["dtype"] = "fp32"  # bf16 / fp16 are GPU paths; the weights load into fp32 (exact) for the export
    model = build_dataclass(ModelSection, raw, "model.")
    model.validate()
    return model


def _source_directories(config: dict[str, Any]) -> tuple[Optional[Path], Optional[Path]]:
    """(the HF checkpoint the run started from, the HF tokenizer directory), each None when there is none."""
    from_hf = (config.get("model") or {}).get("from_hf")
    source = Path(from_hf) if from_hf and (Path(from_hf) / CONFIG_FILE).is_file() else None
    tokenizer = (config.get("data") or {}).get("tokenizer")
    tokenizer_dir = Path(tokenizer) if tokenizer and Path(tokenizer).is_dir() else None
    if tokenizer_dir is None and tokenizer and Path(tokenizer).is_file():
        tokenizer_dir = Path(tokenizer).parent  # a tokenizer.json path: its directory holds the rest
    return source, tokenizer_dir or source


def _storage_dtype(requested: Optional[str], base: Optional[dict[str, Any]]) -> str:
    """`requested`, else the source checkpoint's own (`dtype` / `torch_dtype` of its config.json), else float32."""
    name = requested or (base or {}).get("dtype") or (base or {}).get("torch_dtype") or "float32"
    if name not in STORAGE_DTYPES:
        raise ConfigError(f"export dtype {name!r}: expected one of {sorted(STORAGE_DTYPES)}")
    return name


def _shared_partial_name(output: Path, ctx: ParallelContext) -> Path:
    names = [f"{output.name}.partial-{os.getpid()}" if ctx.rank == 0 else None]
    if ctx.world_size > 1:
        dist.broadcast_object_list(names, src=0)
    return output.with_name(names[0])


def _refuse_existing(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"--output {str(output)!r} exists and is not empty; choose a new directory (an export "
                              f"never writes over one)")


def _publish(partial: Path, output: Path) -> None:
    """`partial` becomes `output`; a previous `output` is moved aside first and deleted only after the swap, so
    that at every moment one complete export exists under one of the two names."""
    previous = None
    if output.exists():
        previous = output.with_name(f"{output.name}.previous-{os.getpid()}")
        os.replace(output, previous)
    os.replace(partial, output)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def load_model_weights(module, checkpoint: Path) -> None:
    """The model weights of one of our checkpoints (any saved layout) into this rank's stage; nothing else."""
    loaded = dist_checkpointing.load({"model": module.sharded_state_dict()}, str(checkpoint))
    module.load_state_dict(loaded["model"])


def export_checkpoint(checkpoint: str | Path, output: str | Path, *, tp: int = 1, pp: int = 1,
                      family: Optional[str] = None, dtype: Optional[str] = None,
                      ctx: Optional[ParallelContext] = None, replace: bool = False) -> ExportResult:
    """Write one of our checkpoints (an iter_* directory, or a checkpoints/ directory: its latest) as a Hugging
    Face checkpoint in `output`. Collective over every process of the job. `ctx`: the running parallel state
    (an export at the end of a run, at the run's layout); None: one at (tp, pp) is set up and torn down here.
    replace: an existing `output` is swapped for the new export once it is complete (the end-of-run export of a
    run that was extended); otherwise an existing non-empty `output` is an error."""
    output = Path(output)
    path = resolve_checkpoint(checkpoint)
    if path is None:
        raise FileNotFoundError(f"{str(checkpoint)!r}: no complete checkpoint there")
    config = saved_config(path)
    model = saved_model(config, str(path))
    check_exportable(model)
    source, tokenizer_dir = _source_directories(config)
    base = read_hf_config(source) if source is not None else None
    if family is None:
        if base is None:
            raise ConfigError(f"{str(path)!r} was not trained from a Hugging Face checkpoint (its model.from_hf is "
                              f"empty or gone): name the architecture with --family llama | qwen2 | qwen3")
        family = hf_family(base, str(source / CONFIG_FILE))
    storage = _storage_dtype(dtype, base)
    if not replace:
        _refuse_existing(output)
    owns_parallel = ctx is None
    ctx = ctx or init_parallel(from_dict(_layout(tp, pp)))
    try:
        student = build_student(model, ParallelSection(tp=ctx.tp, pp=ctx.pp), ctx.device)
        load_model_weights(student.module, path)
        copied = export_module(student.module, model, output, ctx, family=family, hf_config=base,
                               dtype=STORAGE_DTYPES[storage], tokenizer_dir=tokenizer_dir)
    finally:
        if owns_parallel:
            destroy_parallel()
    return ExportResult(output=output, checkpoint=path, family=family, dtype=storage, tokenizer_files=copied)


def export_module(module, model: ModelSection, output: Path, ctx: ParallelContext, *, family: str,
                  hf_config: Optional[dict[str, Any]], dtype: Optional[torch.dtype],
                  tokenizer_dir: Optional[Path]) -> tuple[str, ...]:
    """The live `module` (this rank's stage; every rank calls) as an HF checkpoint in `output`, with the tokenizer's
    files: written under a partial name and renamed once complete, so that a reader (a rollout server reloading
    weights, a user) never sees half of it. Returns the tokenizer files copied."""
    partial = _shared_partial_name(output, ctx)
    export_hf_checkpoint(module, model, partial, family=family, hf_config=hf_config, dtype=dtype)
    copied: list[str] = []
    if ctx.rank == 0:
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (tokenizer_dir / name).is_file():
                    shutil.copy2(tokenizer_dir / name, partial / name)
                    copied.append(name)
        _publish(partial, output)
    if ctx.world_size > 1:
        dist.barrier()
    return tuple(copied)


def export_run(run_dir: str | Path, output: str | Path, iteration: Optional[int] = None, **kwargs) -> ExportResult:
    """`export_checkpoint` of a run's checkpoint: its latest, or `iteration`."""
    checkpoints = Path(run_dir) / "checkpoints"
    target = iteration_dir(checkpoints, iteration) if iteration is not None else checkpoints
    if iteration is None and resolve_checkpoint(checkpoints) is None:
        raise FileNotFoundError(f"--run-dir {str(run_dir)!r}: no complete checkpoint under {str(checkpoints)!r}")
    return export_checkpoint(target, output, **kwargs)


def convert_from_hf(hf_dir: str | Path, output: str | Path, *, tp: int = 1, pp: int = 1,
                    layers: Optional[list[int]] = None) -> Path:
    """An HF checkpoint as one of our checkpoints under `output` (a checkpoints/ directory: `iter_0000000` and
    `latest`), saved at (tp, pp): weights only, so that a run that loads it (`checkpoint.load`) starts a fresh
    optimizer at step 0. Its saved config is the resolved `model.from_hf` config. Collective."""
    overrides = {"model": {"from_hf": str(hf_dir)}}
    if layers is not None:
        overrides["model"]["from_hf_layers"] = list(layers)
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"--output {str(output)!r} exists and is not empty; choose a new directory")
    cfg = from_dict({**_layout(tp, pp), **overrides}).validate()
    ctx = init_parallel(cfg)
    try:
        student = build_student(cfg.model, cfg.parallel, ctx.device)
        load_hf_weights(student.module, cfg.model, cfg.model.from_hf)
        trainable = wrap_for_training(student, cfg.optim, cfg.model, cfg.run.train_steps)
        return save_checkpoint(output, 0, trainable, ctx, {}, cfg.to_dict(), weights_only=True)
    finally:
        destroy_parallel()


__all__ = ["ExportResult", "TOKENIZER_FILES", "export_checkpoint", "export_run", "convert_from_hf", "saved_model",
           "load_model_weights"]
