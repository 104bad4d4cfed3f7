"""Process bodies for tests/parallel/test_fused.py (importable: spawned processes load them).

`fused_worker(tp)` runs every check of one TP size in one process group and returns, per rank, maximum errors
(name -> float) and booleans (name -> passed). The reference is the unfused single-device path: the full logits
`hidden @ W.T` over the true vocabulary, then `log_softmax` / `math/divergences.py::<divergence>`; each rank compares
its weight-shard gradient with the matching rows of the reference weight gradient (padding rows: 0). Covers the
dedicated token log-prob and reverse KL, `fused_divergence` for every divergence (its endpoints, and a teacher with
-inf entries), and megatron's sequence-parallel hidden layout."""

from __future__ import annotations

from typing import Callable

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

from opd_megatron.math import divergences as ref
from opd_megatron.parallel import fused
from opd_megatron.parallel import divergences as vp
from opd_megatron.parallel.shard import debug_checks
from tests.parallel.divergences_workers import _err, _init, _raises

ROWS, HIDDEN, VOCAB = 12, 8, 37  # 37 is not divisible by 2 or 4: the padded vocabulary has padding rows
SEQ, BATCH = 4, 3  # ROWS as megatron's [S, B]: S/tp rows of the sequence per rank under sequence parallelism
GENERIC = (("forward_kl", {}), ("reverse_kl", {}), ("generalized_jsd", {"beta": 0.3}),
           ("skew_forward_kl", {"alpha": 0.2}), ("skew_reverse_kl", {"alpha": 0.2}), ("total_variation", {}))
# The endpoints `fused_divergence` dispatches to another kernel (forward KL, reverse KL, zero), value and gradients
# checked in float64 at one chunk size.
ENDPOINTS = (("generalized_jsd", {"beta": 0.0}), ("generalized_jsd", {"beta": 1.0}),
             ("skew_forward_kl", {"alpha": 0.0}), ("skew_reverse_kl", {"alpha": 0.0}),
             ("skew_forward_kl", {"alpha": 1.0}), ("skew_reverse_kl", {"alpha": 1.0}))


def _value_and_grads(fn: Callable, hidden: torch.Tensor, weight: torch.Tensor):
    """fn(hidden, weight)'s value and the gradients of `sum(weights * value)` wrt hidden and weight."""
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    value = fn(hidden, weight)
    weights = torch.linspace(0.5, 1.5, value.numel(), dtype=value.dtype).reshape(value.shape)
    (value * weights).sum().backward()
    return value.detach(), hidden.grad.detach(), weight.grad.detach()


def fused_worker(tp: int) -> dict[str, float | bool]:
    _init(tp)
    rank = parallel_state.get_tensor_model_parallel_rank()
    padded = -(-VOCAB // tp) * tp
    width = padded // tp
    rows_of_shard = slice(rank * width, (rank + 1) * width)

    gen = torch.Generator().manual_seed(4321)  # the same draw on every rank
    hidden = torch.randn(ROWS, HIDDEN, generator=gen, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen, dtype=torch.float64)
    teacher = 3.0 * torch.randn(ROWS, VOCAB, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (ROWS,), generator=gen)
    tau_s, tau_t = (0.5 + torch.rand(2, generator=gen, dtype=torch.float64)).tolist()
    # Padding rows of the weight and padding columns of the teacher hold large junk: true_vocab_size alone must
    # keep them out (a padding logit of ~+50 would take all the mass).
    junk_rows = 20.0 * torch.ones(padded - VOCAB, HIDDEN, dtype=torch.float64)
    w_shard = torch.cat([weight, junk_rows])[rows_of_shard]
    t_shard = torch.cat([teacher, teacher.new_full((ROWS, padded - VOCAB), 50.0)], dim=-1)[:, rows_of_shard]

    def pad_rows(grad: torch.Tensor) -> torch.Tensor:
        return torch.cat([grad, grad.new_zeros(padded - VOCAB, HIDDEN)])[rows_of_shard]

    cases = {
        "token_logprobs": (
            lambda h, w, **kw: fused.fused_token_logprobs(h, w, ids, temperature=tau_s, true_vocab_size=VOCAB, **kw),
            lambda h, w: vp.vocab_parallel_token_logprobs(h @ w.T, ids, tau_s, true_vocab_size=VOCAB),
            lambda h, w: torch.log_softmax(h @ w.T / tau_s, -1).gather(-1, ids[:, None])[:, 0]),
        "reverse_kl": (
            lambda h, w, **kw: fused.fused_reverse_kl(h, w, t_shard.to(h.dtype), student_temperature=tau_s,
                                                      teacher_temperature=tau_t, true_vocab_size=VOCAB, **kw),
            lambda h, w: vp.vocab_parallel_reverse_kl(h @ w.T, t_shard, student_temperature=tau_s,
                                                      teacher_temperature=tau_t, true_vocab_size=VOCAB),
            lambda h, w: ref.reverse_kl(h @ w.T, teacher.to(h.dtype), student_temperature=tau_s, teacher_temperature=tau_t)),
    }
    both = dict(student_temperature=tau_s, teacher_temperature=tau_t)
    for kind, extra in GENERIC:  # the one generic fused path, each divergence (reverse KL too)
        cases[f"generic_{kind}"] = (
            lambda h, w, kind=kind, extra=extra, **kw: fused.fused_divergence(
                kind, h, w, t_shard.to(h.dtype), **extra, **both, true_vocab_size=VOCAB, **kw),
            lambda h, w, kind=kind, extra=extra: getattr(vp, f"vocab_parallel_{kind}")(
                h @ w.T, t_shard, *extra.values(), **both, true_vocab_size=VOCAB),
            lambda h, w, kind=kind, extra=extra: getattr(ref, kind)(h @ w.T, teacher.to(h.dtype), *extra.values(),
                                                                    **both))
    out: dict[str, float | bool] = {}
    for name, (fused_fn, unfused_fn, reference) in cases.items():
        ref_value, ref_gh, ref_gw = _value_and_grads(reference, hidden, weight)
        for chunk in (None, 5, 1000):
            value, gh, gw = _value_and_grads(lambda h, w: fused_fn(h, w, chunk_size=chunk), hidden, w_shard)
            out[f"{name}/chunk{chunk}/value"] = _err(value, ref_value)
            out[f"{name}/chunk{chunk}/grad_hidden"] = _err(gh, ref_gh)
            out[f"{name}/chunk{chunk}/grad_weight"] = _err(gw, pad_rows(ref_gw))
            out[f"{name}/chunk{chunk}/padding_grad_zero"] = bool((gw[max(VOCAB - rank * width, 0):] == 0).all())
        # The unfused vocab-parallel path on the materialised logits shard: the hidden gradient it gets through
        # autograd is this rank's partial, summed over the ranks as megatron's output layer would.
        value, gh, gw = _value_and_grads(lambda h, w: unfused_fn(copy_to_tensor_model_parallel_region(h), w),
                                         hidden, w_shard)
        fused_value, fused_gh, fused_gw = _value_and_grads(lambda h, w: fused_fn(h, w, chunk_size=5), hidden, w_shard)
        out[f"{name}/fused_vs_unfused/value"] = _err(fused_value, value)
        out[f"{name}/fused_vs_unfused/grad_hidden"] = _err(fused_gh, gh)
        out[f"{name}/fused_vs_unfused/grad_weight"] = _err(fused_gw, gw)
        # reduce_grad_hidden=False composes with megatron's copy_to_tensor_model_parallel_region.
        value, gh, gw = _value_and_grads(
            lambda h, w: fused_fn(copy_to_tensor_model_parallel_region(h), w, chunk_size=5, reduce_grad_hidden=False),
            hidden, w_shard)
        out[f"{name}/megatron_copy/grad_hidden"] = _err(gh, ref_gh)
        out[f"{name}/megatron_copy/value"] = _err(value, ref_value)
        # float32 against the float32 reference, relative to the reference's largest magnitude.
        ref_value32, ref_gh32, ref_gw32 = _value_and_grads(reference, hidden.float(), weight.float())
        value32, gh32, gw32 = _value_and_grads(lambda h, w: fused_fn(h, w, chunk_size=5), hidden.float(),
                                               w_shard.float())
        out[f"{name}/float32_value_rel"] = _err(value32, ref_value32) / ref_value32.abs().max().item()
        out[f"{name}/float32_grad_hidden_rel"] = _err(gh32, ref_gh32) / ref_gh32.abs().max().item()
        out[f"{name}/float32_grad_weight_rel"] = _err(gw32, pad_rows(ref_gw32)) / ref_gw32.abs().max().item()
        out[f"{name}/float32_dtype"] = value32.dtype == gh32.dtype == gw32.dtype == torch.float32

    # The endpoints, and a teacher with -inf entries (tokens it rules out, the kernels' `0 * inf` rows) for every
    # divergence with finite values there (the reverse KL's is +inf), against the reference.
    masked_teacher = teacher.clone()
    masked_teacher[::3, 5:30:2] = float("-inf")
    masked_shard = torch.cat([masked_teacher, masked_teacher.new_full((ROWS, padded - VOCAB), 50.0)],
                             dim=-1)[:, rows_of_shard]
    extra_cases = [(f"endpoint_{kind}_{extra}", kind, extra, t_shard, teacher) for kind, extra in ENDPOINTS]
    extra_cases += [(f"masked_teacher_{kind}", kind, extra, masked_shard, masked_teacher) for kind, extra in GENERIC
                    if kind not in ("reverse_kl", "skew_reverse_kl")]
    for name, kind, extra, shard_t, full_t in extra_cases:
        # `+ 0 * sum(z)`: the reference of a skew KL at alpha = 1 is a constant 0 without a graph
        ref_value, ref_gh, ref_gw = _value_and_grads(
            lambda h, w: getattr(ref, kind)(h @ w.T, full_t, *extra.values(), **both) + 0.0 * (h @ w.T).sum(-1),
            hidden, weight)
        value, gh, gw = _value_and_grads(lambda h, w: fused.fused_divergence(
            kind, h, w, shard_t, **extra, **both, true_vocab_size=VOCAB, chunk_size=5), hidden, w_shard)
        out[f"{name}/value"] = _err(value, ref_value)
        out[f"{name}/grad_hidden"] = _err(gh, ref_gh)
        out[f"{name}/grad_weight"] = _err(gw, pad_rows(ref_gw))

    # Megatron's sequence-parallel layout: this rank holds hidden [S/tp, B, H]; the op gathers the sequence and
    # reduce-scatters the hidden gradient, so each rank gets the reference gradient of its own slice.
    rows_here = slice(rank * SEQ // tp, (rank + 1) * SEQ // tp)
    sequence_cases = {
        "token_logprobs": lambda h, w: fused.fused_token_logprobs(
            h, w, ids.reshape(SEQ, BATCH), temperature=tau_s, true_vocab_size=VOCAB, chunk_size=5,
            sequence_parallel=True),
        "reverse_kl": lambda h, w: fused.fused_reverse_kl(h, w, t_shard, **both, true_vocab_size=VOCAB,
                                                          chunk_size=5, sequence_parallel=True),
        "generic_forward_kl": lambda h, w: fused.fused_divergence(
            "forward_kl", h, w, t_shard, **both, true_vocab_size=VOCAB, chunk_size=5, sequence_parallel=True),
        "generic_generalized_jsd": lambda h, w: fused.fused_divergence(
            "generalized_jsd", h, w, t_shard, beta=0.3, **both, true_vocab_size=VOCAB, chunk_size=5,
            sequence_parallel=True),
    }
    for name, fn in sequence_cases.items():
        ref_value, ref_gh, ref_gw = _value_and_grads(cases[name][2], hidden, weight)
        local = hidden.reshape(SEQ, BATCH, HIDDEN)[rows_here]
        value, gh, gw = _value_and_grads(fn, local, w_shard)
        out[f"sequence_parallel/{name}/shape"] = tuple(value.shape) == (SEQ, BATCH) and gh.shape == local.shape
        out[f"sequence_parallel/{name}/value"] = _err(value.reshape(-1), ref_value)
        out[f"sequence_parallel/{name}/grad_hidden"] = _err(gh, ref_gh.reshape(SEQ, BATCH, HIDDEN)[rows_here])
        out[f"sequence_parallel/{name}/grad_weight"] = _err(gw, pad_rows(ref_gw))
    if tp > 1:
        uneven = hidden.reshape(SEQ, BATCH, HIDDEN)[:1 if rank == 0 else 2]
        with debug_checks():  # every rank's shape, agreed on with an all-reduce: a debug check (`shard.py`)
            out["bad/sequence_parallel_shapes"] = _raises("hidden", lambda: fused.fused_reverse_kl(
                uneven, w_shard, t_shard, true_vocab_size=VOCAB, sequence_parallel=True))

    # [B, T, H] input: flattened and restored.
    bt = fused.fused_token_logprobs(hidden.reshape(3, 4, HIDDEN), w_shard, ids.reshape(3, 4), temperature=tau_s,
                                    true_vocab_size=VOCAB)
    out["batched/shape"] = tuple(bt.shape) == (3, 4)
    out["batched/value"] = _err(bt.reshape(-1), cases["token_logprobs"][2](hidden, weight))

    # What autograd keeps between forward and backward: hidden, the weight shard (references), ids and [N]
    # statistics; nothing of size [N, V/tp].
    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        fused.fused_token_logprobs(hidden.clone().requires_grad_(True), w_shard.clone().requires_grad_(True), ids,
                                   true_vocab_size=VOCAB, chunk_size=5)
    out["memory/no_logits_saved"] = bool(saved) and all(shape != (ROWS, width) for shape in saved)
    saved.clear()  # the dense divergences: the teacher shard is the caller's tensor, nothing else is [N, V/tp]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused.fused_divergence("generalized_jsd", hidden.clone().requires_grad_(True),
                               w_shard.clone().requires_grad_(True), t_shard, beta=0.3, true_vocab_size=VOCAB,
                               chunk_size=5)
    out["memory/divergence_no_logits_saved"] = bool(saved) and all(
        t.data_ptr() == t_shard.data_ptr() or tuple(t.shape) != (ROWS, width) for t in saved)

    # Bad input: a MathInputError naming the argument, raised on every rank.
    # The checks that need another rank or a host read run with the debug checks on (`shard.py`).
    with debug_checks():
        out["bad/hidden_size"] = _raises("weight_shard", lambda: fused.fused_token_logprobs(
            hidden, w_shard[:, :-1], ids, true_vocab_size=VOCAB))
        out["bad/token_id"] = _raises("token_ids", lambda: fused.fused_token_logprobs(
            hidden, w_shard, torch.full_like(ids, VOCAB), true_vocab_size=VOCAB))
        nan_hidden = hidden.clone()
        if rank == tp - 1:
            nan_hidden[0, 0] = float("nan")
        out["bad/nan_one_rank"] = _raises("hidden", lambda: fused.fused_token_logprobs(
            nan_hidden, w_shard, ids, true_vocab_size=VOCAB))
        uneven = hidden[:-1] if rank == 0 and tp > 1 else hidden
        out["bad/rank_shapes"] = _raises("hidden", lambda: fused.fused_token_logprobs(
            uneven, w_shard, ids[:uneven.shape[0]], true_vocab_size=VOCAB)) if tp > 1 else True
        out["bad/teacher_shape"] = _raises("teacher_logits_shard", lambda: fused.fused_reverse_kl(
            hidden, w_shard, t_shard[:, :-1], true_vocab_size=VOCAB))
        out["bad/chunk_size"] = _raises("chunk_size", lambda: fused.fused_token_logprobs(
            hidden, w_shard, ids, true_vocab_size=VOCAB, chunk_size=0))
    return out
