"""Process bodies for tests/parallel/test_divergences.py (importable: spawned processes load them).

`parity_worker(tp)` runs every check of one TP size in one process group and returns, per rank, a dict of
maximum errors (name -> float) and of booleans (name -> passed) for the test to assert on. The full-vocabulary
references run on every rank on the unpadded logits; each rank compares its own gradient shard with the matching
slice of the reference gradient (that is the gathered gradient, compared piece by piece)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from opd_megatron.math import divergences as ref
from opd_megatron.math.regularizers import entropy as ref_entropy
from opd_megatron.math.checks import MathInputError
from opd_megatron.parallel import divergences as vp
from opd_megatron.parallel.shard import debug_checks

ROWS, VOCAB = 12, 37  # 37 is not divisible by 2 or 4: the padded vocabulary has padding columns


def _init(tp: int) -> None:
    from opd_megatron.student.cpu_shims import apply_cpu_shims
    apply_cpu_shims()
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)


def _cases(ids: torch.Tensor, tau_s: float, tau_t: float) -> dict[str, tuple[Callable, Callable]]:
    """name -> (vocab-parallel fn(student_shard, teacher_shard, **kw), reference fn(student, teacher))."""
    both = dict(student_temperature=tau_s, teacher_temperature=tau_t)
    cases = {
        "token_logprobs": (lambda s, t, **kw: vp.vocab_parallel_token_logprobs(s, ids, tau_s, **kw),
                           lambda s, t: torch.log_softmax(s / tau_s, -1).gather(-1, ids[:, None])[:, 0]),
        "token_logprobs_keep_softmax": (
            lambda s, t, **kw: vp.vocab_parallel_token_logprobs(s, ids, tau_s, keep_softmax=True, **kw),
            lambda s, t: torch.log_softmax(s / tau_s, -1).gather(-1, ids[:, None])[:, 0]),
        "log_normalizer": (lambda s, t, **kw: vp.vocab_parallel_log_normalizer(s, tau_s, **kw),
                           lambda s, t: torch.logsumexp(s / tau_s, -1)),
        "entropy": (lambda s, t, **kw: vp.vocab_parallel_entropy(s, tau_s, **kw),
                    lambda s, t: ref_entropy(s, tau_s)),
        "forward_kl": (lambda s, t, **kw: vp.vocab_parallel_forward_kl(s, t, **both, **kw),
                       lambda s, t: ref.forward_kl(s, t, **both)),
        "reverse_kl": (lambda s, t, **kw: vp.vocab_parallel_reverse_kl(s, t, **both, **kw),
                       lambda s, t: ref.reverse_kl(s, t, **both)),
        "reverse_kl_keep_softmax": (
            lambda s, t, **kw: vp.vocab_parallel_reverse_kl(s, t, **both, keep_softmax=True, **kw),
            lambda s, t: ref.reverse_kl(s, t, **both)),
        "total_variation": (lambda s, t, **kw: vp.vocab_parallel_total_variation(s, t, **both, **kw),
                            lambda s, t: ref.total_variation(s, t, **both)),
    }
    for beta in (0.0, 0.3, 1.0):  # both explicit endpoints and an interior point
        cases[f"generalized_jsd_{beta}"] = (
            lambda s, t, beta=beta, **kw: vp.vocab_parallel_generalized_jsd(s, t, beta, **both, **kw),
            lambda s, t, beta=beta: ref.generalized_jsd(s, t, beta, **both))
    for alpha in (0.0, 0.2):
        cases[f"skew_forward_kl_{alpha}"] = (
            lambda s, t, alpha=alpha, **kw: vp.vocab_parallel_skew_forward_kl(s, t, alpha, **both, **kw),
            lambda s, t, alpha=alpha: ref.skew_forward_kl(s, t, alpha, **both))
        cases[f"skew_reverse_kl_{alpha}"] = (
            lambda s, t, alpha=alpha, **kw: vp.vocab_parallel_skew_reverse_kl(s, t, alpha, **both, **kw),
            lambda s, t, alpha=alpha: ref.skew_reverse_kl(s, t, alpha, **both))
    return cases


def _pad(logits: torch.Tensor, padded: int, fill: float) -> torch.Tensor:
    extra = padded - logits.shape[-1]
    return torch.cat([logits, logits.new_full((*logits.shape[:-1], extra), fill)], dim=-1)


def _value_and_grad(fn: Callable, student: torch.Tensor, *args, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """fn's value and the gradient of `sum(weights * value)` wrt `student` (fixed weights: a non-uniform
    upstream gradient)."""
    student = student.detach().clone().requires_grad_(True)
    value = fn(student, *args, **kw)
    weights = torch.linspace(0.5, 1.5, value.numel(), dtype=value.dtype).reshape(value.shape)
    (value * weights).sum().backward()
    return value.detach(), student.grad.detach()


def _err(a: torch.Tensor, b: torch.Tensor, relative: bool = False) -> float:
    diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    return diff / max(b.double().abs().max().item(), 1e-30) if relative else diff


def _raises(name: str, call: Callable) -> bool:
    """The call raises MathInputError whose message names `name`."""
    try:
        call()
    except MathInputError as error:
        return name in str(error)
    return False


def _all_reduces(call: Callable) -> int:
    """How many all-reduces `call()` runs."""
    count, all_reduce = 0, dist.all_reduce

    def counted(*args, **kwargs):
        nonlocal count
        count += 1
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counted
    try:
        call()
    finally:
        dist.all_reduce = all_reduce
    return count


def parity_worker(tp: int) -> dict[str, float | bool]:
    _init(tp)
    rank = parallel_state.get_tensor_model_parallel_rank()
    padded = -(-VOCAB // tp) * tp
    width = padded // tp
    cols = slice(rank * width, (rank + 1) * width)

    gen = torch.Generator().manual_seed(1234)  # the same draw on every rank
    student = 3.0 * torch.randn(ROWS, VOCAB, generator=gen, dtype=torch.float64)
    teacher = 3.0 * torch.randn(ROWS, VOCAB, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (ROWS,), generator=gen)
    tau_s, tau_t = (0.5 + torch.rand(2, generator=gen, dtype=torch.float64)).tolist()
    # Padding columns hold arbitrary finite junk: true_vocab_size alone must keep them out.
    junk = 50.0
    s_shard, t_shard = _pad(student, padded, junk)[:, cols], _pad(teacher, padded, junk)[:, cols]

    out: dict[str, float | bool] = {}
    for name, (fn, reference) in _cases(ids, tau_s, tau_t).items():
        ref_value, ref_grad = _value_and_grad(reference, student, teacher)
        ref_grad_shard = _pad(ref_grad, padded, 0.0)[:, cols]
        value, grad = _value_and_grad(fn, s_shard, t_shard, true_vocab_size=VOCAB)
        out[f"{name}/value"] = _err(value, ref_value)
        out[f"{name}/grad"] = _err(grad, ref_grad_shard)
        chunk_value, chunk_grad = _value_and_grad(fn, s_shard, t_shard, true_vocab_size=VOCAB, chunk_size=5)
        out[f"{name}/chunked_value"] = _err(chunk_value, value)
        out[f"{name}/chunked_grad"] = _err(chunk_grad, grad)
        # float32 against the reference in float32 on the same rounded logits, relative to the reference's
        # largest magnitude over the whole vocabulary (a shard's own maximum may be tiny).
        ref_value32, ref_grad32 = _value_and_grad(reference, student.float(), teacher.float())
        value32, grad32 = _value_and_grad(fn, s_shard.float(), t_shard.float(), true_vocab_size=VOCAB,
                                          chunk_size=5)
        out[f"{name}/float32_value_rel"] = _err(value32, ref_value32) / ref_value32.abs().max().item()
        out[f"{name}/float32_grad_rel"] = (_err(grad32, _pad(ref_grad32, padded, 0.0)[:, cols])
                                           / ref_grad32.abs().max().item())
        out[f"{name}/float32_dtype"] = value32.dtype == torch.float32 and grad32.dtype == torch.float32

    # The entropy without gradient (the diagnostics' and the gates'): its own one-pass path, the same values, with
    # masked (-inf) ids in the student as well (0 log 0 = 0).
    masked = student.clone()
    masked[:, ::7] = float("-inf")
    m_shard = _pad(masked, padded, junk)[:, cols]
    with torch.no_grad():
        for label, logits, shard in (("plain", student, s_shard), ("masked", masked, m_shard)):
            want = ref_entropy(logits, tau_s)
            for chunk in (None, 5):
                got = vp.vocab_parallel_entropy(shard, tau_s, true_vocab_size=VOCAB, chunk_size=chunk)
                out[f"entropy_no_grad/{label}/chunk{chunk}/value"] = _err(got, want)
            got32 = vp.vocab_parallel_entropy(shard.float(), tau_s, true_vocab_size=VOCAB, chunk_size=5)
            out[f"entropy_no_grad/{label}/float32_value_rel"] = (_err(got32, ref_entropy(logits.float(), tau_s))
                                                                 / want.abs().max().item())
            out[f"entropy_no_grad/{label}/float32_dtype"] = got32.dtype == torch.float32

    # [B, T, V/tp] input: flattened and restored.
    fn, reference = _cases(ids, tau_s, tau_t)["forward_kl"]
    bt_value = fn(s_shard.reshape(3, 4, width), t_shard.reshape(3, 4, width), true_vocab_size=VOCAB)
    out["batched/shape"] = tuple(bt_value.shape) == (3, 4)
    out["batched/value"] = _err(bt_value.reshape(-1), reference(student, teacher))
    bt_logp = vp.vocab_parallel_token_logprobs(s_shard.reshape(3, 4, width), ids.reshape(3, 4), tau_s,
                                               true_vocab_size=VOCAB)
    out["batched/token_logprobs"] = _err(bt_logp.reshape(-1), torch.log_softmax(student / tau_s, -1)
                                         .gather(-1, ids[:, None])[:, 0])

    # megatron-core's vocab_parallel_cross_entropy on the same shards (float32; padding -inf, as it knows no
    # true vocabulary size); it works in place on its input, hence the clones.
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    shard32 = _pad(student, padded, float("-inf"))[:, cols].float()
    megatron_input = shard32.clone().requires_grad_(True)
    megatron_loss = vocab_parallel_cross_entropy(megatron_input, ids)
    megatron_loss.sum().backward()
    ours, our_grad = _value_and_grad(lambda s: -vp.vocab_parallel_token_logprobs(s, ids, true_vocab_size=VOCAB),
                                     shard32)
    weights = torch.linspace(0.5, 1.5, ROWS, dtype=torch.float32)
    out["megatron_ce/value_rel"] = _err(ours, megatron_loss.detach(), relative=True)
    # our grad is of sum(weights * loss); megatron's of sum(loss): compare per-row-scaled.
    out["megatron_ce/grad_rel"] = _err(our_grad / weights[:, None], megatron_input.grad, relative=True)

    # -inf everywhere it can be: padding filled with -inf (no true_vocab_size), and a vocabulary entry masked
    # in both student and teacher. No NaN, and equal to the reference with the same mask.
    masked_s, masked_t = student.clone(), teacher.clone()
    masked_s[:, 3] = float("-inf")
    masked_t[:, 3] = float("-inf")
    ms_shard = _pad(masked_s, padded, float("-inf"))[:, cols]
    mt_shard = _pad(masked_t, padded, float("-inf"))[:, cols]
    finite, worst = True, 0.0
    for name, (fn, reference) in _cases(ids.clamp_min(4), tau_s, tau_t).items():
        value, grad = _value_and_grad(fn, ms_shard, mt_shard, chunk_size=5)
        ref_value, ref_grad = _value_and_grad(reference, masked_s, masked_t)
        finite = finite and not (torch.isnan(value).any() or torch.isnan(grad).any())
        worst = max(worst, _err(value, ref_value), _err(grad, _pad(ref_grad, padded, 0.0)[:, cols]))
    out["masked/no_nan"] = bool(finite)
    out["masked/max_err"] = worst

    # Teacher log-probs without gradient.
    with torch.no_grad():
        teacher_logp = vp.vocab_parallel_token_logprobs(t_shard, ids, tau_t, true_vocab_size=VOCAB)
    out["no_grad/teacher"] = _err(teacher_logp, torch.log_softmax(teacher / tau_t, -1).gather(-1, ids[:, None])[:, 0])

    # The hot path communicates only what the op needs: a token log-prob is three all-reduces of [N] (MAX and SUM
    # for the normaliser, SUM of the owner's logit), a reverse KL three (MAX and SUM of the local normalisers, SUM
    # of the shares); the debug checks add one each.
    token_logprobs = lambda: vp.vocab_parallel_token_logprobs(s_shard, ids, true_vocab_size=VOCAB)  # noqa: E731
    reverse_kl = lambda: vp.vocab_parallel_reverse_kl(s_shard, t_shard, true_vocab_size=VOCAB)  # noqa: E731
    collectives = 3 if tp > 1 else 0
    out["hot_path/token_logprobs_all_reduces"] = _all_reduces(token_logprobs) == collectives
    out["hot_path/reverse_kl_all_reduces"] = _all_reduces(reverse_kl) == collectives
    # The other dense divergences (`_Divergence`): MAX and SUM of the stacked [2, chunk] local normalisers per
    # chunk, one SUM of the [k, N] statistics; none in backward.
    for name in ("forward_kl", "total_variation", "generalized_jsd_0.3", "skew_forward_kl_0.2",
                 "skew_reverse_kl_0.2"):
        fn = _cases(ids, tau_s, tau_t)[name][0]
        for chunk_size, chunks in ((None, 1), (5, 3)):
            grad_input = s_shard.clone().requires_grad_(True)
            value = fn(grad_input, t_shard, true_vocab_size=VOCAB, chunk_size=chunk_size)
            forward_count = _all_reduces(lambda: fn(s_shard, t_shard, true_vocab_size=VOCAB, chunk_size=chunk_size))
            backward_count = _all_reduces(lambda: value.sum().backward())
            out[f"hot_path/{name}_chunks{chunks}_all_reduces"] = (
                forward_count == (2 * chunks + 1 if tp > 1 else 0) and backward_count == 0)
    with debug_checks():
        out["debug/token_logprobs_all_reduces"] = _all_reduces(token_logprobs) == collectives + (tp > 1)
        out["debug/reverse_kl_all_reduces"] = _all_reduces(reverse_kl) == collectives + (tp > 1)

    # Bad input: a MathInputError naming the argument, raised on every rank (no rank left in a collective).
    # The checks that need another rank or a host read run with the debug checks on (`shard.py`).
    with debug_checks():
        out["bad/teacher_shape"] = _raises("teacher_logits_shard", lambda: vp.vocab_parallel_forward_kl(
            s_shard, t_shard[:, :-1], true_vocab_size=VOCAB))
        uneven = s_shard[:-1] if rank == 0 and tp > 1 else s_shard
        out["bad/rank_shapes"] = _raises("logits_shard", lambda: vp.vocab_parallel_entropy(
            uneven, true_vocab_size=VOCAB)) if tp > 1 else True
        out["bad/token_id"] = _raises("token_ids", lambda: vp.vocab_parallel_token_logprobs(
            s_shard, torch.full_like(ids, VOCAB), true_vocab_size=VOCAB))
        out["bad/negative_token_id"] = _raises("token_ids", lambda: vp.vocab_parallel_token_logprobs(
            s_shard, torch.full_like(ids, -1), true_vocab_size=VOCAB))
        nan_shard = s_shard.clone()
        if rank == tp - 1:
            nan_shard[2, 0] = float("nan")
        out["bad/nan_logits"] = _raises("student_logits_shard", lambda: vp.vocab_parallel_reverse_kl(
            nan_shard, t_shard, true_vocab_size=VOCAB))
        out["bad/nan_token_logprobs"] = _raises("logits_shard", lambda: vp.vocab_parallel_token_logprobs(
            nan_shard, ids, true_vocab_size=VOCAB))
        inf_teacher = t_shard.clone()
        if rank == tp - 1:
            inf_teacher[1, 0] = float("inf")
        out["bad/inf_teacher_keep_softmax"] = _raises("teacher_logits_shard", lambda: vp.vocab_parallel_reverse_kl(
                s_shard.clone().requires_grad_(True), inf_teacher, true_vocab_size=VOCAB, keep_softmax=True))
        out["bad/beta"] = _raises("beta", lambda: vp.vocab_parallel_generalized_jsd(s_shard, t_shard, 1.5))
        out["bad/alpha"] = _raises("alpha", lambda: vp.vocab_parallel_skew_reverse_kl(s_shard, t_shard, -0.1))
        out["bad/true_vocab_size"] = _raises("true_vocab_size", lambda: vp.vocab_parallel_entropy(
            s_shard, true_vocab_size=padded + 1))
    # The group is still usable after the errors (every rank left the same collectives).
    probe = torch.ones(1)
    dist.all_reduce(probe, group=parallel_state.get_tensor_model_parallel_group())
    out["bad/group_alive"] = int(probe.item()) == tp
    return out


def compiled_worker(tp: int) -> dict[str, float | bool]:
    """The compiled kernels (`divergence_kernels.set_compiled_kernels`) against the references: every dedicated
    divergence in float64 (padding columns beyond `true_vocab_size`, temperatures, chunks, a token masked on both
    sides, which sends its rows through the eager `fix` recomputation) and float32."""
    from opd_megatron.parallel.divergence_kernels import set_compiled_kernels

    _init(tp)
    set_compiled_kernels(True)
    rank = parallel_state.get_tensor_model_parallel_rank()
    padded = -(-VOCAB // tp) * tp
    width = padded // tp
    cols = slice(rank * width, (rank + 1) * width)
    gen = torch.Generator().manual_seed(99)
    student = 3.0 * torch.randn(ROWS, VOCAB, generator=gen, dtype=torch.float64)
    teacher = 3.0 * torch.randn(ROWS, VOCAB, generator=gen, dtype=torch.float64)
    student[:4, 3] = teacher[:4, 3] = float("-inf")
    ids = torch.zeros(ROWS, dtype=torch.long)
    out: dict[str, float | bool] = {}
    names = ("forward_kl", "total_variation", "generalized_jsd_0.3", "skew_forward_kl_0.2", "skew_reverse_kl_0.2")
    cases = _cases(ids, 0.8, 1.3)
    for name in names:
        fn, reference = cases[name]
        for dtype in (torch.float64, torch.float32):
            s, t = student.to(dtype), teacher.to(dtype)
            ref_value, ref_grad = _value_and_grad(reference, s, t)
            value, grad = _value_and_grad(fn, _pad(s, padded, 50.0)[:, cols], _pad(t, padded, 50.0)[:, cols],
                                          true_vocab_size=VOCAB, chunk_size=5)
            scale = 1.0 if dtype == torch.float64 else ref_value.abs().max().item()
            grad_scale = 1.0 if dtype == torch.float64 else ref_grad.abs().max().item()
            label = "float64" if dtype == torch.float64 else "float32"
            out[f"compiled/{name}/{label}_value{'_rel' if label == 'float32' else ''}"] = (
                _err(value, ref_value) / scale)
            out[f"compiled/{name}/{label}_grad{'_rel' if label == 'float32' else ''}"] = (
                _err(grad, _pad(ref_grad, padded, 0.0)[:, cols]) / grad_scale)
    set_compiled_kernels(False)
    return out
