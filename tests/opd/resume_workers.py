"""Process bodies for the exact-resume tests (importable: spawned processes load them). The OPD loop runs as
`opd-megatron train` runs it (`loop/opd.py::train_opd`): N steps straight, or stopped after N/2 the way SIGTERM stops
it (the step finishes, a checkpoint is saved, the loop exits), then resumed from that checkpoint in fresh processes
for the remaining steps. Each returns every rank's state as its final checkpoint holds it."""

from __future__ import annotations

from typing import Optional

import torch

from opd_megatron.config import load_config
from opd_megatron.loop.opd import train_opd
from opd_megatron.student.checkpoint import load_checkpoint, resolve_checkpoint
from opd_megatron.student.distributed import init_parallel, seed_everything
from opd_megatron.student.model import build_student
from opd_megatron.student.optimizer import wrap_for_training

STEPS = 4
# Adam with a cosine schedule and gradient clipping (the defaults): the optimizer moments and the schedule's
# position must come back on resume, not only the weights.
BASE = ["run.algorithm=opd", "run.seed=7", f"run.train_steps={STEPS}", "model.num_layers=2", "model.hidden_size=32",
        "model.ffn_hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=14",
        "model.max_position_embeddings=32", "data.seq_length=32", "data.tokenizer=task:sort_digits",
        "rollout.task_options.length=4", "rollout.max_new_tokens=6", "rollout.prompts_per_step=4",
        "rollout.samples_per_prompt=2", "parallel.global_batch_size=8", "parallel.micro_batch_size=2",
        "optim.lr=3e-3", "optim.warmup_steps=1", "eval.prompts=4", "eval.interval=0", "logging.progress_bar=false",
        "logging.tensorboard=false"]


class StopAfter:
    """The loop's stop request (`loop/common.py::StopRequest`'s interface): agreed after `steps` steps on every
    rank alike, as a SIGTERM is agreed at the end of the step it arrives in; never when `steps` is None."""

    def __init__(self, steps: Optional[int]):
        self.steps, self.calls = steps, 0
        self.received: Optional[str] = None

    def agreed(self) -> bool:
        self.calls += 1
        if self.steps is not None and self.calls >= self.steps:
            self.received = "a test stop"
            return True
        return False


def _run(overrides: list[str], stop_after: Optional[int], ctx=None) -> tuple[dict, object]:
    cfg = load_config(None, BASE + overrides)
    if ctx is None:
        ctx = init_parallel(cfg)
    else:
        seed_everything(cfg.run.seed, ctx)    # what init_parallel does for a fresh process
    result = train_opd(cfg, ctx, StopAfter(stop_after))
    return {"losses": result.losses, "final_step": result.final_step, "start_step": result.start_step,
            "stopped": result.stopped_by_signal, "state": _final_state(cfg, ctx, result.checkpoint)}, ctx


def straight_and_cut(straight: list[str], cut: list[str]) -> dict:
    """Two fresh runs in this process group: STEPS steps straight, and one stopped after STEPS // 2."""
    first, ctx = _run(straight, None)
    second, _ = _run(cut, STEPS // 2, ctx)
    return {"straight": first, "cut": second}


def resume(overrides: list[str]) -> dict:
    """The cut run's configuration again: it resumes from its checkpoints/ and runs to STEPS."""
    return _run(overrides, None)[0]


def _final_state(cfg, ctx, checkpoint: str) -> dict:
    """This rank's weights, optimizer state, scheduler position and per-rank loop state (value head, self-teacher
    EMA, the pending overlap batch) as the checkpoint `checkpoint` holds them, loaded at this layout."""
    trainable = wrap_for_training(build_student(cfg.model, cfg.parallel, ctx.device), cfg.optim, cfg.model,
                                  cfg.run.train_steps)
    loaded = load_checkpoint(resolve_checkpoint(checkpoint), trainable, ctx, load_optimizer=True)
    weights = {k: v.detach().clone() for k, v in trainable.module.state_dict().items()
               if isinstance(v, torch.Tensor) and "_extra_state" not in k}
    rank_state = loaded.rank_state or {}
    pending = rank_state.get("pending")
    return {"iteration": loaded.iteration, "weights": weights,
            "optimizer": _tensors(trainable.optimizer.state_dict()),
            "scheduler": {k: v for k, v in trainable.scheduler.state_dict().items() if isinstance(v, (int, float))},
            "value_head": _tensors(rank_state.get("value_head")),
            "self_teacher": _tensors(rank_state.get("self_teacher")),
            "pending_tokens": None if pending is None else pending.tokens.clone()}


def _tensors(tree) -> dict:
    """The tensors and numbers of a nested state dict, flattened to "a/b/c" keys (for exact comparison)."""
    out: dict = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}/{key}", value)
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(f"{prefix}/{i}", value)
        elif isinstance(node, torch.Tensor):
            out[prefix] = node.detach().clone()
        elif isinstance(node, (int, float, bool)):
            out[prefix] = node
    if tree is not None:
        walk("", tree)
    return out
