"""Process body for the optimizer test: megatron's DDP + get_megatron_optimizer + schedule vs plain PyTorch
(AdamW, or SGD for `optim.optimizer=sgd`)."""

import torch

from opd_megatron.student.distributed import init_parallel
from opd_megatron.student.lm_loss import token_cross_entropy_sum
from opd_megatron.student.model import build_student
from opd_megatron.student.optimizer import current_lr, optimizer_step, wrap_for_training, zero_grads
from opd_megatron.student.schedule import forward_backward
from tests.student.parity_workers import SEQ, VOCAB, _loss_fn, _micro_batches, global_batch, tiny_config


def megatron_vs_reference(steps: int, extra: tuple[str, ...]) -> dict:
    cfg = tiny_config(1, 1, extra)
    ctx = init_parallel(cfg)
    torch.manual_seed(cfg.run.seed)
    trainable = wrap_for_training(build_student(cfg.model, cfg.parallel, ctx.device), cfg.optim, cfg.model, steps)
    torch.manual_seed(cfg.run.seed)
    reference = build_student(cfg.model, cfg.parallel, ctx.device).module  # same seed: same initial weights
    ref_params = dict(reference.named_parameters())
    assert all(torch.equal(p, ref_params[n.removeprefix("module.")])
               for n, p in trainable.ddp.named_parameters())
    # megatron's default parameter groups: no weight decay on biases and 1-D parameters (norms).
    decay = [p for n, p in reference.named_parameters() if p.dim() > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in reference.named_parameters() if not (p.dim() > 1 and not n.endswith(".bias"))]
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.optimizer == "sgd":  # megatron builds torch.optim.SGD (L2 weight decay) when apex is missing
        torch_optimizer = torch.optim.SGD(groups, lr=o.lr, momentum=o.sgd_momentum)
    else:
        torch_optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps)
    lrs, grad_norms = [], []
    for step in range(steps):
        samples = global_batch(step)
        lr = current_lr(trainable.optimizer)
        zero_grads(trainable)
        forward_backward(trainable.ddp, _micro_batches(samples, ctx, cfg.parallel.micro_batch_size), _loss_fn(),
                         SEQ, cfg.parallel.micro_batch_size)
        _, grad_norm = optimizer_step(trainable)
        # The reference: plain PyTorch gradient accumulation over the same micro-batches (sum of token losses),
        # divided by the global token count, then clip (clip_grad 0: no clipping) and step at the same lr.
        torch_optimizer.zero_grad()
        micro = _micro_batches(samples, ctx, cfg.parallel.micro_batch_size)
        for batch in micro:
            positions = torch.arange(SEQ).unsqueeze(0).expand_as(batch.tokens)
            # The same loss function as the megatron path: this test isolates DDP + optimizer + schedule.
            loss_sum, _ = token_cross_entropy_sum(reference(batch.tokens, positions, None), batch.labels,
                                                  batch.loss_mask, VOCAB)
            loss_sum.backward()
        total_tokens = sum(float(b.loss_mask.sum()) for b in micro)
        for p in reference.parameters():
            p.grad /= total_tokens
        if o.clip_grad > 0:
            ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), o.clip_grad)
        else:
            ref_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()]))
        for group in torch_optimizer.param_groups:
            group["lr"] = lr
        torch_optimizer.step()
        lrs.append(lr)
        grad_norms.append((grad_norm, float(ref_norm)))
    worst = max(float((p.detach() - ref_params[n.removeprefix("module.")].detach()).abs().max()
                      / ref_params[n.removeprefix("module.")].abs().max())
                for n, p in trainable.ddp.named_parameters())
    moved = max(float((p.detach() - q).abs().max()) for p, q in zip(reference.parameters(), _initial(cfg, ctx)))
    return {"worst_rel": worst, "lrs": lrs, "grad_norms": grad_norms, "moved": moved}


def _initial(cfg, ctx):
    torch.manual_seed(cfg.run.seed)
    return [p.detach() for p in build_student(cfg.model, cfg.parallel, ctx.device).module.parameters()]
