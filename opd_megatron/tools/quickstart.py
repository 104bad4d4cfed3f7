"""`opd-megatron quickstart`: on-policy distillation on a laptop CPU in minutes, end to end.

1. The teacher: a megatron GPTModel trained by our own `sft` path on the task's reference answers, cached by its
   settings (the second run loads it in seconds).
2. The student: a smaller model with a short SFT warm-up, so its rollouts start partly right (from random weights
   its samples would carry almost no signal to distil on this task).
3. OPD from the warmed-up student against the colocated teacher; the run directory gets metrics, plots,
   report.md and summary.json, and the summary is printed.

Every number comes from the config (`configs/quickstart.yaml`, the `quickstart` section for steps 1-2).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path
from typing import Optional

import yaml

from opd_megatron.config import RunConfig
from opd_megatron.student.checkpoint import resolve_checkpoint
from opd_megatron.tasks import get_task


def default_config_path() -> str:
    """configs/quickstart.yaml of the checkout (the package is installed in editable mode from it)."""
    return str(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml")


def _sft_config(base: RunConfig, name: str, output_dir: Path, model, steps: int, lr: float, batch: int,
                data_path: Path, seed: int) -> RunConfig:
    cfg = copy.deepcopy(base)
    cfg.run.name, cfg.run.output_dir, cfg.run.algorithm = name, str(output_dir), "sft"
    cfg.run.train_steps, cfg.run.seed = steps, seed
    cfg.model = copy.deepcopy(model)
    cfg.parallel.micro_batch_size = cfg.parallel.global_batch_size = batch
    cfg.data.path, cfg.data.format = str(data_path), "jsonl"
    cfg.data.tokenizer = f"task:{base.rollout.task}"
    cfg.data.seq_length = min(model.max_position_embeddings,
                              cfg.rollout.max_new_tokens + get_task(base.rollout.task, **base.rollout.task_options)
                              .max_prompt_chars + 2)
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps = lr, lr / 10, min(20, steps // 10)
    cfg.optim.decay_style = "cosine"
    cfg.checkpoint.load, cfg.checkpoint.resume, cfg.checkpoint.save_interval = None, True, 0
    cfg.logging.tensorboard = False
    return cfg.validate()


def _write_task_data(cfg: RunConfig, path: Path) -> None:
    task = get_task(cfg.rollout.task, **cfg.rollout.task_options)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as out:
        for ex in task.examples("train", cfg.quickstart.train_examples, cfg.run.seed):
            out.write(json.dumps({"prompt": ex.prompt, "response": ex.answer}) + "\n")
    tmp.replace(path)


def _teacher_key(cfg: RunConfig) -> str:
    q = cfg.quickstart
    teacher_model = cfg.teacher.colocated.model
    blob = json.dumps({"model": vars(teacher_model) if teacher_model else None, "task": cfg.rollout.task,
                       "options": cfg.rollout.task_options,
                       "steps": q.teacher_steps, "lr": q.teacher_lr, "batch": q.teacher_batch_size,
                       "examples": q.train_examples, "seed": cfg.run.seed}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def run_quickstart(cfg: RunConfig, run_dir: Optional[str] = None, log=print) -> dict:
    """Teacher (cached), warm-up, OPD; returns the OPD run's summary."""
    from opd_megatron.loop.train import train

    started = time.perf_counter()
    if run_dir is not None:
        path = Path(run_dir)
        cfg.run.output_dir, cfg.run.name = str(path.parent), path.name
    out = cfg.run.run_dir
    if (out / "checkpoints").exists() or (out / "warmup").exists():
        # A quickstart run is a demonstration: a second run starts it afresh (the teacher stays cached).
        import shutil
        log(f"[quickstart] removing the previous quickstart run in {out}")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    q = cfg.quickstart
    teacher_model = cfg.teacher.colocated.model
    if teacher_model is None:
        from opd_megatron.config import ConfigError
        raise ConfigError("teacher.colocated.model: the quickstart trains its teacher and needs its shape (see "
                          "configs/quickstart.yaml)")
    data = out / "data" / "train.jsonl"
    if not data.is_file():
        _write_task_data(cfg, data)

    cache = Path(q.teacher_cache).expanduser() / _teacher_key(cfg)
    teacher_ckpt = resolve_checkpoint(cache / "teacher" / "checkpoints")
    if teacher_ckpt is None:
        log(f"[quickstart] 1/3 training the teacher ({teacher_model.num_layers} layers x "
            f"{teacher_model.hidden_size}, {q.teacher_steps} SFT steps) -> cached in {cache}")
        t0 = time.perf_counter()
        train(_sft_config(cfg, "teacher", cache, teacher_model, q.teacher_steps, q.teacher_lr,
                          q.teacher_batch_size, data, cfg.run.seed))
        teacher_ckpt = resolve_checkpoint(cache / "teacher" / "checkpoints")
        log(f"[quickstart]     teacher trained in {time.perf_counter() - t0:.0f} s")
    else:
        log(f"[quickstart] 1/3 teacher loaded from the cache {teacher_ckpt}")
    teacher_preparation_s = time.perf_counter() - started

    warm_dir = out / "warmup"
    warm = resolve_checkpoint(warm_dir / "student_warmup" / "checkpoints")
    if q.warmup_steps and warm is None:
        log(f"[quickstart] 2/3 student warm-up: {q.warmup_steps} SFT steps ({cfg.model.num_layers} layers x "
            f"{cfg.model.hidden_size})")
        train(_sft_config(cfg, "student_warmup", warm_dir, cfg.model, q.warmup_steps, q.warmup_lr,
                          q.warmup_batch_size, data, cfg.run.seed + 1))
        warm = resolve_checkpoint(warm_dir / "student_warmup" / "checkpoints")
    opd = copy.deepcopy(cfg)
    opd.run.algorithm = "opd"
    opd.teacher.kind, opd.teacher.colocated.path = "colocated", str(teacher_ckpt)
    if warm is not None:
        opd.checkpoint.load = str(warm)
    opd.validate()
    (out / "quickstart.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    log(f"[quickstart] 3/3 on-policy distillation: {opd.run.train_steps} steps of {opd.rollout.prompts_per_step} "
        f"prompts x {opd.rollout.samples_per_prompt} rollouts, {opd.opd.loss} ({opd.opd.route_a.divergence})")
    opd.run.name, opd.run.output_dir = out.name, str(out.parent)
    train(opd)
    summary = json.loads((out / "summary.json").read_text())
    summary["quickstart_wall_s"] = round(time.perf_counter() - started, 1)
    # Making the teacher (SFT, or loading it from the cache): not the OPD run's teacher time (time_split_s).
    summary["teacher_preparation_s"] = round(teacher_preparation_s, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
