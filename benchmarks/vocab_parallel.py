"""Vocab-parallel losses against megatron-core's `vocab_parallel_cross_entropy`: time ratios and peak memory.

Every row is one forward + backward on this rank's shards, timed in the same run as its baseline:
- on a given logits shard `[N, V/tp]`: megatron CE (the 1.00x baseline), our sampled-token log-prob
  (`vocab_parallel_token_logprobs`, the route-B hot path), every full-vocabulary divergence against a teacher
  shard (reverse KL, also with `keep_softmax`, forward KL, total variation, generalized JSD at beta 0.5, skew
  forward / reverse KL at alpha 0.1), every divergence on a teacher top-64 support (`vocab_parallel_build_support`
  then `divergence_on_support`; tail and renormalised; the teacher dense, or served: its top-64 ids and
  log-probs, as a server or a logit cache gives them), and CR-OPD (`vocab_parallel_cr_opd_loss`, both forms, dense
  or served teacher, teacher top-20 support, student top-20 reach, weights q, advantages ~ N(0, 1));
- with `--compile`, a `(compiled)` row per dense divergence other than the reverse KL: the same op with its chunk
  kernels through `torch.compile` (`divergence_kernels.set_compiled_kernels`), compiled in an untimed first run;
- peers (TP=1 only: they need the whole vocabulary): what a user would write instead, a plain PyTorch version of
  each divergence (`log_softmax` of both sides, `F.kl_div(..., log_target=True)` terms, the mixture by
  `logsumexp` of a stack), and TRL's `GKDTrainer.generalized_jsd_loss` for the JSD when `trl` is importable (else
  the plain version, which follows TRL's code); for the supports, the same support in plain PyTorch
  (`log_softmax`, `gather`, the tail as `log(1 - sum_S p)`); for CR-OPD, the single-device reference
  `math/cr_opd.py::cr_opd_loss` (`[N, V]` masks);
- from the hidden states `[N, H]` and the output-layer shard `[V/tp, H]` (the matmul included): matmul + megatron CE
  (the 1.00x baseline, materialises the logits), matmul + our chunked token log-prob and each divergence, and the
  fused paths (`fused_token_logprobs`, `fused_reverse_kl`, `fused_divergence` for every other divergence) that
  never hold `[N, V/tp]`.
Hidden-input rows wrap `hidden` in megatron's `copy_to_tensor_model_parallel_region` (as megatron's output layer
does) except the fused ones, which all-reduce their hidden gradient themselves: one `[N, H]` all-reduce each.

Peak memory: the growth of the process's peak resident set (`VmHWM`, reset through `/proc/self/clear_refs`)
over its resident size just before the row's first forward + backward, with the inputs already resident; so it
counts everything the row allocates (logits, softmax, saved tensors, gradients including `grad_weight_shard`),
not the inputs. glibc is told to serve every allocation over 64 KiB with its own mmap
(`MALLOC_MMAP_THRESHOLD_`), so freed tensors leave the resident set and earlier rows do not hide later ones.
Hidden-input rows are measured at N and N/2 to show whether memory grows with the number of tokens. Time: the best
of `--reps` rounds, as wall time and as the process's CPU time (both threads at TP=1; a TP=2 row counts its slowest
rank), whose ratios stay steadier when other processes share the cores. The rounds interleave the rows (round 1
runs every row once, then round 2, ...), so a burst of load from other processes hits a row and its baseline
alike rather than one row's every repetition.

    python -m benchmarks.vocab_parallel                       # defaults: N=2048, H=256, V=32000 and 152064
    python -m benchmarks.vocab_parallel --tokens 4096 --vocab 32000 --json runs/vocab_parallel.json
    python -m benchmarks.vocab_parallel --vocab 152064 --tokens 1024 --reps 1   # the large vocabulary, shorter
    python -m benchmarks.vocab_parallel --vocab 32000 --no-hidden --rows "forward KL" --chunk-size none

TP=1 runs one process with all `--threads`; TP=2 runs two gloo processes with one thread each
(`tests/harness.py`'s `run_distributed`). A multi-process row counts its slowest rank and its largest peak.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
warnings.filterwarnings("ignore", module=r"megatron\..*")

import torch  # noqa: E402

from tests.harness import run_distributed  # noqa: E402

MMAP_THRESHOLD = "65536"


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure_interleaved(steps: dict[str, Callable[[], Callable[[], None]]], reps: int,
                         barrier: Callable[[], None], report: Callable[[str, list[float]], None]
                         ) -> dict[str, list[float]]:
    """`_measure` of every step, the rounds interleaved: round r runs each step once in turn. Returns name ->
    [best wall s, best CPU s, peak MiB of the first round]."""
    best: dict[str, list[float]] = {name: [float("inf"), float("inf"), 0.0] for name in steps}
    for rep in range(reps):
        for name, step in steps.items():
            wall, cpu, peak = _measure(step, 1, barrier)
            best[name] = [min(best[name][0], wall), min(best[name][1], cpu), peak if rep == 0 else best[name][2]]
            if rep == reps - 1:
                report(name, best[name])
    return best


def _measure(step: Callable[[], None], reps: int, barrier: Callable[[], None]) -> tuple[float, float, float]:
    """(best wall seconds over `reps` runs, best CPU seconds of this process over them, peak RSS growth in MiB
    of the first run). `step` does its own setup outside the timed call by returning the timed closure. CPU
    time (all threads of the process) does not count waiting for a core, so it is the steadier number when
    other work shares the machine."""
    best, best_cpu, peak = float("inf"), float("inf"), 0.0
    for rep in range(reps):
        timed = step()
        barrier()
        if rep == 0:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            base = _status_kib("VmRSS")
        start, start_cpu = time.perf_counter(), time.process_time()
        timed()
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
        if rep == 0:
            peak = (_status_kib("VmHWM") - base) / 1024
        del timed
    return best, best_cpu, peak


# The divergence rows: name -> (kind, parameters) of `vocab_parallel_divergence`.
DIVERGENCE_ROWS = {
    "reverse KL": ("reverse_kl", {}),
    "forward KL": ("forward_kl", {}),
    "total variation": ("total_variation", {}),
    "generalized JSD 0.5": ("generalized_jsd", {"beta": 0.5}),
    "skew forward KL 0.1": ("skew_forward_kl", {"alpha": 0.1}),
    "skew reverse KL 0.1": ("skew_reverse_kl", {"alpha": 0.1}),
}


def _plain_log_mixture(weight: float, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """`log(weight a + (1 - weight) b)` as TRL's `generalized_jsd_loss` writes it (logsumexp of a stack)."""
    return torch.logsumexp(torch.stack([log_a + math.log(weight), log_b + math.log1p(-weight)]), dim=0)


def _plain_kl(log_target: torch.Tensor, log_input: torch.Tensor) -> torch.Tensor:
    """`KL(target || input)` per row through `F.kl_div(..., log_target=True)`, as a user would write it."""
    return torch.nn.functional.kl_div(log_input, log_target, reduction="none", log_target=True).sum(dim=-1)


def _plain_peer(kind: str, parameter: Optional[float] = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A plain PyTorch version of `kind` on full-vocabulary logits `[N, V]` (the teacher detached)."""
    def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        lp = torch.log_softmax(student_logits, dim=-1)
        lq = torch.log_softmax(teacher_logits.detach(), dim=-1)
        if kind == "forward_kl":
            return _plain_kl(lq, lp)
        if kind == "reverse_kl":
            return _plain_kl(lp, lq)
        if kind == "total_variation":
            return 0.5 * (lq.exp() - lp.exp()).abs().sum(dim=-1)
        if kind == "generalized_jsd":
            mixture = _plain_log_mixture(parameter, lq, lp)
            return parameter * _plain_kl(lq, mixture) + (1.0 - parameter) * _plain_kl(lp, mixture)
        if kind == "skew_forward_kl":
            return _plain_kl(lq, _plain_log_mixture(parameter, lq, lp))
        return _plain_kl(lp, _plain_log_mixture(parameter, lp, lq))
    return divergence


def _jsd_peer(beta: float) -> tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """TRL's `GKDTrainer.generalized_jsd_loss` per row when `trl` is importable, else the plain version."""
    try:
        from trl import GKDTrainer
    except ImportError:
        return "plain PyTorch", _plain_peer("generalized_jsd", beta)

    def trl_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        loss = GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits.detach(), beta=beta, reduction="none")
        return loss.sum(dim=-1)
    return "TRL", trl_jsd


PEERS = {name: ("plain PyTorch", _plain_peer(kind, next(iter(parameters.values()), None)))
         for name, (kind, parameters) in DIVERGENCE_ROWS.items()}
PEERS["generalized JSD 0.5"] = _jsd_peer(0.5)

SUPPORT_K = 64  # the support rows: teacher top-64, as a served teacher or a logit cache returns it
SUPPORT_MODES = ("tail", "renormalized")


def support_row(name: str, mode: str, sparse: bool) -> str:
    return f"{name}, teacher top-{SUPPORT_K} {mode}, {'served' if sparse else 'dense'} teacher"


def _plain_support_peer(kind: str, parameters: dict, mode: str
                        ) -> Callable[[torch.Tensor, torch.Tensor | tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """A plain PyTorch version of a teacher top-k support on full-vocabulary logits `[N, V]`, as a user would write
    it: `log_softmax` of the student (and of a dense teacher, whose ids come from `torch.topk`), the log-probs
    gathered at the ids, the tail as `log(1 - sum_S p)` (clamped away from 0), or the gathered logits renormalised
    by `log_softmax` over the k slots; then the divergence of the two `[N, k(+1)]` rows (`math/divergences.py`, the
    same cheap step as ours). `teacher` is a logits tensor or a served `(ids, logprobs)` pair."""
    from opd_megatron.math.divergences import divergence_from_log_probs

    def tail_of(logp_on_support: torch.Tensor) -> torch.Tensor:
        rest = 1.0 - logp_on_support.exp().sum(dim=-1, keepdim=True)
        return rest.clamp_min(torch.finfo(rest.dtype).tiny).log()

    def loss(student_logits: torch.Tensor, teacher) -> torch.Tensor:
        if isinstance(teacher, torch.Tensor):
            ids = torch.topk(teacher, SUPPORT_K, dim=-1).indices
            teacher_on_support = (torch.log_softmax(teacher, dim=-1).gather(-1, ids) if mode == "tail"
                                  else teacher.gather(-1, ids))
        else:
            ids, teacher_on_support = teacher
        if mode == "tail":
            lp = torch.log_softmax(student_logits, dim=-1).gather(-1, ids)
            lp, lq = torch.cat([lp, tail_of(lp)], -1), torch.cat([teacher_on_support, tail_of(teacher_on_support)], -1)
        else:
            lp = torch.log_softmax(student_logits.gather(-1, ids), dim=-1)
            lq = torch.log_softmax(teacher_on_support, dim=-1)
        return divergence_from_log_probs(kind, lp, lq, **parameters)
    return loss


def compiled_divergence(kind: str, student: torch.Tensor, teacher: torch.Tensor, **options) -> torch.Tensor:
    """`vocab_parallel_divergence` with the compiled kernels switched on for this call (forward and backward)."""
    from opd_megatron.parallel import divergences as vp
    from opd_megatron.parallel.divergence_kernels import set_compiled_kernels

    previous = set_compiled_kernels(True)
    try:
        return vp.vocab_parallel_divergence(kind, student, teacher, **options)
    finally:
        set_compiled_kernels(previous)


def bench_worker(tp: int, tokens: int, hidden_size: int, vocab: int, chunk_size: Optional[int], reps: int,
                 threads: int, with_hidden: bool = True, only: Optional[list[str]] = None,
                 compile_rows: bool = False) -> dict[str, list[float]]:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, vocab_parallel_cross_entropy

    from opd_megatron.parallel import fused
    from opd_megatron.parallel import divergences as vp
    from opd_megatron.parallel.cr_opd import vocab_parallel_cr_opd_loss
    from opd_megatron.parallel.supports import vocab_parallel_build_support
    from opd_megatron.parallel.topk import vocab_parallel_logsumexp, vocab_parallel_topk
    from opd_megatron.math.cr_opd import RoutingConfig, cr_opd_loss
    from opd_megatron.math.supports import SparseTeacherLogprobs, divergence_on_support
    from opd_megatron.student.cpu_shims import apply_cpu_shims

    apply_cpu_shims()
    torch.set_num_threads(threads)
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    rank = parallel_state.get_tensor_model_parallel_rank()
    width = vocab // tp
    gen = torch.Generator().manual_seed(0)
    # Only this rank's shard is drawn (a full [V, H] draw per rank would dominate memory at V=152k).
    gen.manual_seed(1 + rank)
    weight = 0.05 * torch.randn(width, hidden_size, generator=gen)
    gen.manual_seed(0)
    hidden_all = torch.randn(tokens, hidden_size, generator=gen)
    ids_all = torch.randint(0, vocab, (tokens,), generator=gen)
    with torch.no_grad():
        logits = hidden_all @ weight.T
        teacher = logits + 0.5 * torch.randn(logits.shape, generator=gen)
    barrier = dist.barrier

    def on_logits(loss: Callable[[torch.Tensor], torch.Tensor], clone: bool) -> Callable[[], Callable[[], None]]:
        def setup():
            z = logits.clone() if clone else logits  # megatron CE works in place
            z.grad = None  # else every round after the first would add its gradient into the last one's
            z.requires_grad_(True)
            return lambda: loss(z).sum().backward()
        return setup

    def on_hidden(loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                  rows: int) -> Callable[[], Callable[[], None]]:
        def setup():
            h = hidden_all[:rows].clone().requires_grad_(True)
            w = weight.clone().requires_grad_(True)
            ids = ids_all[:rows]
            return lambda: loss(h, w, ids).sum().backward()
        return setup

    def mm(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return copy_to_tensor_model_parallel_region(h) @ w.T

    ids = ids_all
    advantages = torch.randn(tokens, generator=gen)  # about half negative: routed; the rest plain PG
    # Student reach by top-k: these random logits are nearly uniform over V, where a top-p nucleus would hold
    # most of the vocabulary (a trained LM's is small); teacher top-20 support, weights q.
    routing = {form: RoutingConfig(student_reach="topk", form=form) for form in ("matched", "kl_target")}
    # A served teacher's answer: the teacher's top-64 ids and log-probs (global, the same on every rank).
    with torch.no_grad():
        top_values, top_ids = vocab_parallel_topk(teacher, SUPPORT_K, vocab)
        served_logprobs = top_values - vocab_parallel_logsumexp(teacher, vocab).unsqueeze(-1)
    served = SparseTeacherLogprobs(top_ids, served_logprobs)

    def cr_opd(z: torch.Tensor, form: str, sparse: bool) -> torch.Tensor:
        given = (dict(teacher_topk_ids=top_ids, teacher_topk_logprobs=served_logprobs) if sparse
                 else dict(teacher_logits_shard=teacher))
        return vocab_parallel_cr_opd_loss(z, ids, advantages, config=routing[form], chunk_size=chunk_size,
                                          **given)[0]

    def cr_opd_reference(z: torch.Tensor, form: str, sparse: bool) -> torch.Tensor:
        given = (dict(teacher_topk_ids=top_ids, teacher_topk_logprobs=served_logprobs) if sparse
                 else dict(teacher_logits=teacher))
        return cr_opd_loss(z, ids, advantages, config=routing[form], **given)[0]

    support_rows = {}
    for name, (kind, parameters) in DIVERGENCE_ROWS.items():
        for mode in SUPPORT_MODES:
            for sparse in (False, True):
                row = support_row(name, mode, sparse)
                support_rows[row] = on_logits(
                    lambda z, kind=kind, parameters=parameters, mode=mode, sparse=sparse: divergence_on_support(
                        kind, vocab_parallel_build_support(z, served if sparse else teacher, "teacher_topk",
                                                           SUPPORT_K, mode, chunk_size=chunk_size), **parameters),
                    clone=False)
                if mode == "tail":
                    # The loop's route A setting: the tail values kept from forward into the gradient (KeptTail).
                    support_rows[f"{row}, keep softmax"] = on_logits(
                        lambda z, kind=kind, parameters=parameters, sparse=sparse: divergence_on_support(
                            kind, vocab_parallel_build_support(z, served if sparse else teacher, "teacher_topk",
                                                               SUPPORT_K, "tail", chunk_size=chunk_size,
                                                               keep_softmax=True), **parameters),
                        clone=False)
                if tp == 1:
                    peer = _plain_support_peer(kind, parameters, mode)
                    support_rows[f"{row} [plain PyTorch]"] = on_logits(
                        lambda z, peer=peer, sparse=sparse: peer(z, (top_ids, served_logprobs) if sparse else teacher),
                        clone=False)
    cr_opd_rows = {}
    for form in ("matched", "kl_target"):
        for sparse in (False, True):
            row = f"CR-OPD {form}, {'served' if sparse else 'dense'} teacher"
            cr_opd_rows[row] = on_logits(lambda z, form=form, sparse=sparse: cr_opd(z, form, sparse), clone=False)
            if tp == 1:
                cr_opd_rows[f"{row} [math reference]"] = on_logits(
                    lambda z, form=form, sparse=sparse: cr_opd_reference(z, form, sparse), clone=False)
    logit_rows = {
        "megatron CE": on_logits(lambda z: vocab_parallel_cross_entropy(z, ids), clone=True),
        "token log-prob": on_logits(lambda z: -vp.vocab_parallel_token_logprobs(z, ids, chunk_size=chunk_size),
                                    clone=False),
        "token log-prob (keep softmax)": on_logits(
            lambda z: -vp.vocab_parallel_token_logprobs(z, ids, chunk_size=chunk_size, keep_softmax=True),
            clone=False),
        **{row: on_logits(lambda z, kind=kind, parameters=parameters, keep=keep: vp.vocab_parallel_divergence(
            kind, z, teacher, chunk_size=chunk_size, keep_softmax=keep, **parameters), clone=False)
           for name, (kind, parameters) in DIVERGENCE_ROWS.items()
           for row, keep in ((name, False), (f"{name} (keep softmax)", True)) if not keep or kind == "reverse_kl"},
        **({f"{name} (compiled)": on_logits(lambda z, kind=kind, parameters=parameters: compiled_divergence(
            kind, z, teacher, chunk_size=chunk_size, **parameters), clone=False)
            for name, (kind, parameters) in DIVERGENCE_ROWS.items() if kind != "reverse_kl"} if compile_rows else {}),
        **({f"{name} [{PEERS[name][0]}]": on_logits(lambda z, name=name: PEERS[name][1](z, teacher), clone=False)
            for name in DIVERGENCE_ROWS} if tp == 1 else {}),
        **support_rows,
        **cr_opd_rows,
    }

    def hidden_rows(rows: int):
        t = teacher[:rows]
        return {
            "matmul + megatron CE": on_hidden(lambda h, w, i: vocab_parallel_cross_entropy(mm(h, w), i), rows),
            "matmul + token log-prob": on_hidden(
                lambda h, w, i: -vp.vocab_parallel_token_logprobs(mm(h, w), i, chunk_size=chunk_size), rows),
            "fused token log-prob": on_hidden(
                lambda h, w, i: -fused.fused_token_logprobs(h, w, i, chunk_size=chunk_size), rows),
            "fused reverse KL": on_hidden(
                lambda h, w, i: fused.fused_reverse_kl(h, w, t, chunk_size=chunk_size), rows),
            **{f"fused {name}": on_hidden(lambda h, w, i, kind=kind, parameters=parameters: fused.fused_divergence(
                kind, h, w, t, chunk_size=chunk_size, **parameters), rows)
               for name, (kind, parameters) in DIVERGENCE_ROWS.items() if kind != "reverse_kl"},
            **{f"matmul + {name}": on_hidden(lambda h, w, i, kind=kind, parameters=parameters:
                                             vp.vocab_parallel_divergence(kind, mm(h, w), t, chunk_size=chunk_size,
                                                                          **parameters), rows)
               for name, (kind, parameters) in DIVERGENCE_ROWS.items()},
        }

    steps = {**logit_rows, **(hidden_rows(tokens) if with_hidden else {})}
    if only:
        keep = ("megatron CE", "matmul + megatron CE")
        steps = {name: step for name, step in steps.items()
                 if name in keep or any(pattern in name for pattern in only)}

    def report(name: str, values: list[float]) -> None:
        if rank == 0:
            print(f"  V={vocab} tp={tp} {name}: {values[0] * 1e3:,.0f} ms", file=sys.stderr, flush=True)

    for name, step in steps.items():
        if name.endswith("(compiled)"):
            step()()  # compile outside the timed rounds
    out = _measure_interleaved(steps, reps, barrier, report)
    for name, setup in (hidden_rows(tokens // 2) if with_hidden else {}).items():
        if name in out:
            out[name].append(_measure(setup, 1, barrier)[2])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 152064])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--chunk-size", type=lambda text: None if text.lower() == "none" else int(text), default=512,
                        help="rows per chunk, or 'none' (all rows at once, the loop's default opd.chunk_size)")
    parser.add_argument("--rows", nargs="+", help="only the rows whose name contains one of these (and baselines)")
    parser.add_argument("--reps", type=int, default=2, help="timed runs per row; the fastest is kept")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of the TP=1 process")
    parser.add_argument("--no-hidden", action="store_true", help="only the rows on a given logits shard")
    parser.add_argument("--compile", action="store_true",
                        help="add a '(compiled)' row per dense divergence: its kernels through torch.compile "
                             "(OPD_COMPILE_KERNELS=1), run once untimed first, so compiling is not timed")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD  # inherited by the spawned workers

    results = {}
    print(f"N={args.tokens} H={args.hidden} chunk={args.chunk_size} float32, torch {torch.__version__}, "
          f"best of {args.reps}; memory: peak RSS growth (MiB) of the slowest/largest rank at N and N/2\n")
    print("| V | tp | row | ms | vs baseline | CPU ms | CPU vs baseline | CPU vs peer | peak MiB (N) "
          "| peak MiB (N/2) |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for vocab in args.vocab:
        for tp in args.tp:
            if vocab % tp:
                raise SystemExit(f"--vocab {vocab} is not divisible by tp {tp} (megatron CE knows no padding)")
            ranks = run_distributed(bench_worker, world_size=tp, timeout_s=1200,
                                    args=(tp, args.tokens, args.hidden, vocab, args.chunk_size, args.reps,
                                          args.threads if tp == 1 else 1, not args.no_hidden, args.rows,
                                          args.compile))
            rows = {name: [max(r[name][i] for r in ranks) for i in range(len(ranks[0][name]))]
                    for name in ranks[0]}
            results[f"V={vocab},tp={tp}"] = rows
            for name, values in rows.items():
                base = rows["matmul + megatron CE" if name.startswith(("matmul", "fused")) else "megatron CE"]
                half = f"{values[3]:,.0f}" if len(values) > 3 else ""
                own = name.removesuffix(" (keep softmax)").removesuffix(" (compiled)")
                peer = [peer_values for peer_name, peer_values in rows.items()
                        if peer_name.startswith(own + " [") and peer_name != name]
                versus = f"{values[1] / peer[0][1]:.2f}x" if peer else ""
                print(f"| {vocab:,} | {tp} | {name} | {values[0] * 1e3:,.0f} | {values[0] / base[0]:.2f}x | "
                      f"{values[1] * 1e3:,.0f} | {values[1] / base[1]:.2f}x | {versus} | {values[2]:,.0f} | {half} |",
                      flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()
