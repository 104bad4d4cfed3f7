"""A weights-only load (a converted checkpoint, or `checkpoint.load_optimizer=false`) refreshes the optimizer's own
copies of the weights: megatron's mixed-precision optimizers keep fp32 main parameters taken when they were built,
and a step after a load that skipped `reload_model_params` trains those initial weights instead of the loaded ones
(megatron's own loader calls it for the same reason). The bf16 optimizer runs on GPUs only, so the call is checked
on the CPU's fp32 optimizer, where it is a no-op."""

from tests.harness import run_distributed


def _load_twice(root: str) -> dict:
    from pathlib import Path

    import torch

    from opd_megatron.config import load_config
    from opd_megatron.student.checkpoint import load_checkpoint, save_checkpoint
    from opd_megatron.student.distributed import init_parallel
    from opd_megatron.student.model import build_student
    from opd_megatron.student.optimizer import optimizer_step, wrap_for_training, zero_grads

    cfg = load_config(None, ["parallel.micro_batch_size=1", "parallel.global_batch_size=1"])
    ctx = init_parallel(cfg)

    def trainable(seed: int):
        torch.manual_seed(seed)
        return wrap_for_training(build_student(cfg.model, cfg.parallel, ctx.device), cfg.optim, cfg.model, 10)

    saved = trainable(1)
    zero_grads(saved)
    optimizer_step(saved)                   # an optimizer with state (Adam's moments), as a run's would have
    saved.scheduler.step(increment=2)       # a schedule three steps in, which only a run's resume restores
    full = save_checkpoint(Path(root) / "full", 3, saved, ctx, {}, cfg.to_dict())
    weights = save_checkpoint(Path(root) / "weights", 0, saved, ctx, {}, cfg.to_dict(), weights_only=True)
    out = {}
    for name, path, load_optimizer in [("weights_only_flag", full, False), ("weights_only_file", weights, True),
                                       ("resume", full, True)]:
        target = trainable(2)
        calls = []
        original = target.optimizer.reload_model_params
        target.optimizer.reload_model_params = lambda *a, **k: (calls.append(1), original(*a, **k))
        loaded = load_checkpoint(path, target, ctx, load_optimizer=load_optimizer)
        same = all(torch.equal(a, b) for a, b in zip(saved.module.parameters(), target.module.parameters()))
        out[name] = {"reloads": len(calls), "iteration": loaded.iteration, "same_weights": same,
                     "schedule_steps": target.scheduler.num_steps}
    return out


def test_a_weights_only_load_refreshes_the_optimizer_copies(tmp_path):
    """(Also the regression of a slip made while adding the refresh: the schedule's restore had moved under the
    weights-only branch, so a resume kept a fresh schedule and a weights-only load took the saved one.)"""
    result = run_distributed(_load_twice, 1, args=(str(tmp_path),), timeout_s=180)[0]
    # checkpoint.load_optimizer=false on a full checkpoint, and a weights-only checkpoint (`convert --from-hf`)
    # loaded as a run would (optimizer requested, none saved): the weights, step 0, and the optimizer refreshed.
    for name in ("weights_only_flag", "weights_only_file"):
        assert result[name] == {"reloads": 1, "iteration": 0, "same_weights": True, "schedule_steps": 0}, \
            (name, result[name])
    # A resume restores the optimizer and the schedule (and needs no refresh: the state is the saved one).
    assert result["resume"] == {"reloads": 0, "iteration": 3, "same_weights": True, "schedule_steps": 3}
