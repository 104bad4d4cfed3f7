"""Process body: the student trained through megatron's pipeline schedule with the loss computed by our
vocab-parallel token log-probs on the last stage (chunked), instead of megatron's cross-entropy."""

from opd_megatron.parallel.divergences import vocab_parallel_token_logprobs
from opd_megatron.student.checkpoint import load_checkpoint, resolve_checkpoint
from opd_megatron.student.distributed import init_parallel
from opd_megatron.student.model import build_student
from opd_megatron.student.optimizer import optimizer_step, wrap_for_training, zero_grads
from opd_megatron.student.schedule import forward_backward
from tests.student.parity_workers import SEQ, VOCAB, _micro_batches, global_batch, tiny_config


def _vocab_parallel_nll(logits, mb):
    logp = vocab_parallel_token_logprobs(logits, mb.labels, true_vocab_size=VOCAB, chunk_size=7)
    return -(logp * mb.loss_mask).sum(), mb.loss_mask.sum()


def train_with_vocab_parallel_loss(tp: int, pp: int, init: str, steps: int) -> list[float]:
    cfg = tiny_config(tp, pp)
    ctx = init_parallel(cfg)
    trainable = wrap_for_training(build_student(cfg.model, cfg.parallel, ctx.device), cfg.optim, cfg.model, 10)
    load_checkpoint(resolve_checkpoint(init), trainable, ctx, load_optimizer=False)
    losses = []
    for step in range(steps):
        zero_grads(trainable)
        loss_sum, tokens = forward_backward(trainable.ddp, _micro_batches(global_batch(step), ctx, 2),
                                            _vocab_parallel_nll, SEQ, 2)
        optimizer_step(trainable)
        losses.append(loss_sum / tokens)
    return losses
