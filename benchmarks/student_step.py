"""Step time of the megatron student at TP=1, TP=2, PP=2 (optionally TP=2 x PP=2) against plain PyTorch.

One training step = zero the gradients, forward + backward over every micro-batch of one global batch, clip the
gradient norm, one AdamW step. The megatron side is the project's own path: `init_parallel`, `build_student`,
`wrap_for_training`, `forward_backward` (megatron's schedule) with the vocab-parallel LM loss, `optimizer_step`
(megatron's optimizer). The baseline is a single-process PyTorch model of the same architecture, written below,
started from the same weights (megatron's TP=1 initial weights, loaded by name) and fed the same batches, so the
benchmark can check that both sides do the same work: equal parameter counts and equal losses.

    python -m benchmarks.student_step                          # defaults: about 1 minute on 2 cores
    python -m benchmarks.student_step --with-tp2pp2 --json runs/student_step.json   # about 1.5 minutes

Each megatron layout runs in fresh gloo processes (`tests/harness.py`'s `run_distributed`); the baseline runs in
this process. Measured numbers and what they mean: docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Spawned workers unpickle `benchmarks.student_step.megatron_worker` and import `tests.harness`: both need the
# repository root on the path, also when this file is run as a script.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# megatron-core warns at import that apex / TransformerEngine are missing: expected on the CPU, and noise here.
warnings.filterwarnings("ignore", module=r"megatron\..*")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from opd_megatron.config import load_config  # noqa: E402
from opd_megatron.data.jsonl import SftBatch  # noqa: E402
from opd_megatron.student.distributed import init_parallel  # noqa: E402
from opd_megatron.student.lm_loss import token_cross_entropy_sum  # noqa: E402
from opd_megatron.student.model import build_student, padded_vocab_size  # noqa: E402
from opd_megatron.student.optimizer import optimizer_step, wrap_for_training, zero_grads  # noqa: E402
from opd_megatron.student.schedule import forward_backward  # noqa: E402
from tests.harness import run_distributed  # noqa: E402

SEED = 1234
# The plain model must start from the same weights as megatron's TP=1 model: its first-step loss may differ only
# by float32 summation order (SDPA vs megatron's unfused attention), far below this.
FIRST_LOSS_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Shape:
    """The model and batch being timed (a Llama-style decoder: RMSNorm, GQA + RoPE, SwiGLU, untied output)."""
    layers: int = 4
    hidden: int = 128
    ffn: int = 512
    heads: int = 4
    query_groups: int = 2
    vocab: int = 1024
    seq: int = 128
    micro_batch: int = 4
    global_batch: int = 16

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq

    def overrides(self, tp: int, pp: int, settings: "Settings") -> list[str]:
        """The run-config overrides that build this shape with megatron at tp x pp."""
        return [f"model.num_layers={self.layers}", f"model.hidden_size={self.hidden}",
                f"model.ffn_hidden_size={self.ffn}", f"model.num_attention_heads={self.heads}",
                f"model.num_query_groups={self.query_groups}", f"model.vocab_size={self.vocab}",
                f"model.max_position_embeddings={self.seq}", "model.tie_embeddings=false",
                f"data.seq_length={self.seq}", f"parallel.tp={tp}", f"parallel.pp={pp}",
                f"parallel.micro_batch_size={self.micro_batch}", f"parallel.global_batch_size={self.global_batch}",
                f"optim.lr={settings.lr}", "optim.decay_style=constant", "optim.warmup_steps=0",
                f"optim.clip_grad={settings.clip_grad}", "optim.weight_decay=0.0",
                f"run.train_steps={settings.warmup + settings.steps}", "run.device=cpu", f"run.seed={SEED}"]


@dataclass(frozen=True)
class Settings:
    warmup: int = 3
    steps: int = 10
    threads: int = os.cpu_count() or 1   # the baseline's and TP=1's intra-op threads: the whole machine
    lr: float = 1e-3
    clip_grad: float = 1.0
    timeout_s: float = 600.0
    rounds: int = 2                      # passes over all layouts; each layout reports its quietest round


def global_batch(step: int, shape: Shape) -> list[SftBatch]:
    """The micro-batches of step `step` (data parallel size 1): random tokens, every position trained."""
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, shape.vocab, (shape.global_batch, shape.seq + 1), generator=gen)
    tokens, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    mask = torch.ones(shape.global_batch, shape.seq)
    return [SftBatch(tokens[i:i + shape.micro_batch], labels[i:i + shape.micro_batch], mask[i:i + shape.micro_batch])
            for i in range(0, shape.global_batch, shape.micro_batch)]


# ---------------------------------------------------------------------------------------------------------------
# The megatron side: one layout in tp * pp gloo processes.
# ---------------------------------------------------------------------------------------------------------------

def megatron_worker(tp: int, pp: int, shape: Shape, settings: Settings, return_weights: bool) -> dict:
    """Runs warmup + timed steps on this rank; returns this rank's per-step times (s) and the step losses."""
    cfg = load_config(None, shape.overrides(tp, pp, settings))
    ctx = init_parallel(cfg)  # at world > 1 this sets cpu_count // world intra-op threads per process
    if ctx.world_size == 1:
        torch.set_num_threads(settings.threads)  # the harness starts every process at 1 thread
    assert ctx.dp == 1, "the benchmark times data-parallel size 1: launch tp * pp processes"
    trainable = wrap_for_training(build_student(cfg.model, cfg.parallel, ctx.device), cfg.optim, cfg.model,
                                  settings.warmup + settings.steps)
    module = trainable.module
    # Parameters split over TP ranks are counted on every rank, replicated ones (norms) on TP rank 0 only.
    count = torch.tensor(sum(p.numel() for p in module.parameters()
                             if getattr(p, "tensor_model_parallel", False) or ctx.tp_rank == 0), dtype=torch.long)
    dist.all_reduce(count)
    weights = ({k: p.detach().clone() for k, p in module.named_parameters()}
               if return_weights and ctx.world_size == 1 else None)

    def loss_fn(logits, micro_batch):
        return token_cross_entropy_sum(logits, micro_batch.labels, micro_batch.loss_mask, shape.vocab)

    batches = [global_batch(step, shape) for step in range(settings.warmup + settings.steps)]
    fwd_bwd_s, optim_s, losses = [], [], []
    for micro_batches in batches:
        dist.barrier()  # every rank starts the step together; the step's own collectives end it together
        start = time.perf_counter()
        zero_grads(trainable)
        loss_sum, num_tokens = forward_backward(trainable.ddp, micro_batches, loss_fn, shape.seq, shape.micro_batch)
        mid = time.perf_counter()
        optimizer_step(trainable)
        end = time.perf_counter()
        fwd_bwd_s.append(mid - start)
        optim_s.append(end - mid)
        losses.append(loss_sum / num_tokens)
    return {"rank": ctx.rank, "fwd_bwd_s": fwd_bwd_s, "optim_s": optim_s, "losses": losses,
            "param_count": int(count), "threads": torch.get_num_threads(), "weights": weights}


# ---------------------------------------------------------------------------------------------------------------
# The baseline: the same architecture in plain PyTorch. Parameter names follow megatron's GPTModel so megatron's
# TP=1 weights load with load_state_dict; the fused layouts (qkv grouped per query group, fc1 = [gate; up]) are
# megatron's too.
# ---------------------------------------------------------------------------------------------------------------

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class PlainAttention(nn.Module):
    def __init__(self, shape: Shape):
        super().__init__()
        self.heads, self.groups, self.head_dim = shape.heads, shape.query_groups, shape.head_dim
        qkv_width = self.groups * (self.heads // self.groups + 2) * self.head_dim
        self.linear_qkv = nn.Linear(shape.hidden, qkv_width, bias=False)
        self.linear_proj = nn.Linear(self.heads * self.head_dim, shape.hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x `[B, S, h]`, cos/sin `[S, d]` -> `[B, S, h]`."""
        batch, seq, _ = x.shape
        per_group, d = self.heads // self.groups, self.head_dim
        # megatron's fused layout: per query group, its query heads then one key head then one value head.
        qkv = self.linear_qkv(x).view(batch, seq, self.groups, (per_group + 2) * d)
        q, k, v = qkv.split([per_group * d, d, d], dim=-1)
        q = q.reshape(batch, seq, self.heads, d).transpose(1, 2)   # [B, heads, S, d]
        k, v = k.transpose(1, 2), v.transpose(1, 2)                 # [B, groups, S, d]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        # enable_gqa: query head i reads key/value head i // per_group, megatron's grouping.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.linear_proj(out.transpose(1, 2).reshape(batch, seq, self.heads * d))


class PlainMLP(nn.Module):
    def __init__(self, shape: Shape):
        super().__init__()
        self.linear_fc1 = nn.Linear(shape.hidden, 2 * shape.ffn, bias=False)  # [gate; up]
        self.linear_fc2 = nn.Linear(shape.ffn, shape.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


class PlainLayer(nn.Module):
    def __init__(self, shape: Shape, eps: float):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(shape.hidden, eps=eps)
        self.self_attention = PlainAttention(shape)
        self.pre_mlp_layernorm = nn.RMSNorm(shape.hidden, eps=eps)
        self.mlp = PlainMLP(shape)

    def forward(self, x, cos, sin):
        x = x + self.self_attention(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.pre_mlp_layernorm(x))


class PlainGPT(nn.Module):
    def __init__(self, shape: Shape, padded_vocab: int, eps: float = 1e-5, rotary_base: int = 10000):
        super().__init__()
        self.embedding = nn.ModuleDict({"word_embeddings": nn.Embedding(padded_vocab, shape.hidden)})
        self.decoder = nn.ModuleDict({"layers": nn.ModuleList(PlainLayer(shape, eps) for _ in range(shape.layers)),
                                      "final_layernorm": nn.RMSNorm(shape.hidden, eps=eps)})
        self.output_layer = nn.Linear(shape.hidden, padded_vocab, bias=False)
        d = shape.head_dim
        self.register_buffer("inv_freq", 1.0 / rotary_base ** (torch.arange(0, d, 2, dtype=torch.float32) / d),
                             persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens `[B, S]` -> logits `[B, S, V_padded]`."""
        freqs = torch.outer(torch.arange(tokens.shape[1], dtype=torch.float32), self.inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)  # [S, d], megatron's non-interleaved RoPE
        cos, sin = angles.cos(), angles.sin()
        x = self.embedding["word_embeddings"](tokens)
        for layer in self.decoder["layers"]:
            x = layer(x, cos, sin)
        return self.output_layer(self.decoder["final_layernorm"](x))


def run_plain(shape: Shape, settings: Settings, weights: dict[str, torch.Tensor]) -> dict:
    """The baseline in this process at `settings.threads` threads, from megatron's TP=1 initial weights."""
    torch.set_num_threads(settings.threads)
    torch.manual_seed(SEED)
    model = PlainGPT(shape, padded_vocab_size(shape.vocab, 1))
    model.load_state_dict(weights, strict=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    batches = [global_batch(step, shape) for step in range(settings.warmup + settings.steps)]
    fwd_bwd_s, optim_s, losses = [], [], []
    for micro_batches in batches:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        # Gradient accumulation with megatron's normalisation: the sum of token losses over the whole global
        # batch divided by its token count (calculate_per_token_loss).
        num_tokens = sum(mb.loss_mask.sum() for mb in micro_batches)
        loss_sum = 0.0
        for mb in micro_batches:
            logits = model(mb.tokens)[..., :shape.vocab]  # padded vocabulary rows carry no mass
            token_loss = F.cross_entropy(logits.flatten(0, 1), mb.labels.flatten(), reduction="none")
            batch_sum = (token_loss * mb.loss_mask.flatten()).sum()
            (batch_sum / num_tokens).backward()
            loss_sum += float(batch_sum.detach())
        mid = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad)
        optimizer.step()
        end = time.perf_counter()
        fwd_bwd_s.append(mid - start)
        optim_s.append(end - mid)
        losses.append(loss_sum / float(num_tokens))
    return {"fwd_bwd_s": fwd_bwd_s, "optim_s": optim_s, "losses": losses,
            "param_count": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class LayoutResult:
    name: str
    processes: int
    threads_per_process: int
    step_ms: list[float]      # timed steps only; a multi-process step is its slowest rank
    fwd_bwd_ms: list[float]
    optim_ms: list[float]
    losses: list[float]       # every step, warm-up included
    param_count: int
    stats: dict = field(default_factory=dict)

    def summarise(self, shape: Shape, baseline_median_ms: float) -> None:
        median = float(np.median(self.step_ms))
        self.stats = {"median_ms": median, "p90_ms": float(np.percentile(self.step_ms, 90)),
                      "tokens_per_s": shape.tokens_per_step / (median / 1000.0),
                      "ratio_vs_plain": median / baseline_median_ms,
                      "fwd_bwd_median_ms": float(np.median(self.fwd_bwd_ms)),
                      "optim_median_ms": float(np.median(self.optim_ms))}


def layout_result(name: str, ranks: list[dict], warmup: int) -> LayoutResult:
    """Per step, the slowest rank's time: the step is done when the last rank is."""
    fwd_bwd = np.max([r["fwd_bwd_s"] for r in ranks], axis=0)[warmup:] * 1000.0
    optim = np.max([r["optim_s"] for r in ranks], axis=0)[warmup:] * 1000.0
    step = np.max([np.add(r["fwd_bwd_s"], r["optim_s"]) for r in ranks], axis=0)[warmup:] * 1000.0
    return LayoutResult(name, len(ranks), ranks[0]["threads"], step.tolist(), fwd_bwd.tolist(), optim.tolist(),
                        ranks[0]["losses"], ranks[0]["param_count"])


def markdown_table(results: list[LayoutResult]) -> str:
    lines = ["| layout | processes x threads | median ms/step | p90 ms/step | tokens/s | vs plain PyTorch "
             "| fwd+bwd ms | optimizer ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        s = r.stats
        lines.append(f"| {r.name} | {r.processes} x {r.threads_per_process} | {s['median_ms']:.1f} | "
                     f"{s['p90_ms']:.1f} | {s['tokens_per_s']:,.0f} | {s['ratio_vs_plain']:.2f}x | "
                     f"{s['fwd_bwd_median_ms']:.1f} | {s['optim_median_ms']:.1f} |")
    return "\n".join(lines)


def parse_args(argv=None) -> tuple[Shape, Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    shape, settings = Shape(), Settings()
    for name in ("layers", "hidden", "ffn", "heads", "query_groups", "vocab", "seq", "micro_batch", "global_batch"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(shape, name), help="shape")
    parser.add_argument("--warmup", type=int, default=settings.warmup, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=settings.steps, help="timed steps")
    parser.add_argument("--threads", type=int, default=settings.threads,
                        help="intra-op threads of the baseline and of TP=1 (multi-process layouts: cores / processes)")
    parser.add_argument("--timeout-s", type=float, default=settings.timeout_s, help="per layout")
    parser.add_argument("--rounds", type=int, default=settings.rounds,
                        help="passes over all layouts; each layout reports its quietest round")
    parser.add_argument("--with-tp2pp2", action="store_true", help="also time TP=2 x PP=2 (4 processes)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    shape = Shape(args.layers, args.hidden, args.ffn, args.heads, args.query_groups, args.vocab, args.seq,
                  args.micro_batch, args.global_batch)
    if args.global_batch % args.micro_batch or args.heads % args.query_groups or args.hidden % args.heads:
        parser.error("need global_batch % micro_batch == 0, heads % query_groups == 0, hidden % heads == 0")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("need --steps >= 1, --warmup >= 0 and --rounds >= 1")
    return shape, Settings(args.warmup, args.steps, args.threads, timeout_s=args.timeout_s, rounds=args.rounds), args


def run_round(shape: Shape, settings: Settings, layouts: list[tuple[str, int, int]],
              weights: dict | None) -> tuple[list[LayoutResult], dict]:
    """One pass over every layout: megatron TP=1 first (its initial weights start the baseline), then the
    baseline, then the multi-process layouts. Returns the results in table order and the TP=1 weights."""
    ranks = run_distributed(megatron_worker, 1, args=(1, 1, shape, settings, weights is None),
                            timeout_s=settings.timeout_s)
    megatron_tp1 = layout_result("megatron TP=1", ranks, settings.warmup)
    weights = weights if weights is not None else ranks[0]["weights"]
    results = [layout_result("plain PyTorch", [run_plain(shape, settings, weights)], settings.warmup), megatron_tp1]
    for name, tp, pp in layouts:
        ranks = run_distributed(megatron_worker, tp * pp, args=(tp, pp, shape, settings, False),
                                timeout_s=settings.timeout_s)
        results.append(layout_result(name, ranks, settings.warmup))
    print("  round: " + "; ".join(f"{r.name} {float(np.median(r.step_ms)):.0f} ms" for r in results), flush=True)
    return results, weights


def main(argv=None) -> int:
    shape, settings, args = parse_args(argv)
    layouts = [("megatron TP=2", 2, 1), ("megatron PP=2", 1, 2)]
    if args.with_tp2pp2:
        layouts.append(("megatron TP=2 x PP=2", 2, 2))
    versions = {"torch": torch.__version__, "megatron-core": importlib.metadata.version("megatron-core"),
                "python": platform.python_version(), "cpu_count": os.cpu_count()}
    print(f"student step benchmark  {datetime.datetime.now().isoformat(timespec='seconds')}  " +
          "  ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"shape: {asdict(shape)}; {shape.global_batch // shape.micro_batch} micro-batches, "
          f"{shape.tokens_per_step} tokens/step; {settings.warmup} warm-up + {settings.steps} timed steps, "
          f"{settings.rounds} round(s)")
    load = [os.getloadavg()[0]]
    if load[0] > 0.5:
        print(f"WARNING: 1-minute load average {load[0]:.2f} before starting: other work shares the cores")

    started = time.perf_counter()
    rounds: list[list[LayoutResult]] = []
    weights = None
    for _ in range(settings.rounds):
        results, weights = run_round(shape, settings, layouts, weights)
        rounds.append(results)
        load.append(os.getloadavg()[0])
    # A busy shared machine slows whole stretches of steps (two OpenMP threads on two cores stall when a third
    # process takes one): report each layout's quietest round, and print every round's median beside it.
    best = [min((r[i] for r in rounds), key=lambda res: float(np.median(res.step_ms))) for i in range(len(rounds[0]))]
    baseline_median_ms = float(np.median(best[0].step_ms))
    for r in best:
        r.summarise(shape, baseline_median_ms)
    plain, megatron_tp1 = best[0], best[1]

    print("\nthreads: " + "; ".join(f"{r.name} {r.processes} process(es) x {r.threads_per_process} thread(s)"
                                    for r in best))
    print("1-minute load average at the start and after each round: " + ", ".join(f"{x:.2f}" for x in load))
    print("median ms/step of each round: " + "; ".join(
        f"{best[i].name} " + " / ".join(f"{float(np.median(r[i].step_ms)):.0f}" for r in rounds)
        for i in range(len(best))))
    print("parameters: " + "; ".join(f"{r.name} {r.param_count:,}" for r in best)
          + f" (vocabulary padded to {padded_vocab_size(shape.vocab, 1)})")
    print("loss, first step -> last step: " + "; ".join(f"{r.name} {r.losses[0]:.6f} -> {r.losses[-1]:.6f}"
                                                         for r in best))
    first_gap = abs(plain.losses[0] - megatron_tp1.losses[0])
    print(f"first-step loss, plain vs megatron TP=1 (same weights, same batch): |diff| = {first_gap:.2e}")
    if any(abs(r.losses[0] - megatron_tp1.losses[0]) > 1e-5 for r in best[2:]):
        # Measured with megatron-core 0.16.1: a later pipeline stage draws its initial weights from the seed as if
        # it were the first, so PP layouts start from other (equally distributed) weights than TP=1. The step's
        # work, and so its time, is the same.
        print("note: layouts whose first loss differs from TP=1's started from other initial weights "
              "(pipeline stages > 0 initialise differently); their timing is unaffected")
    print(f"\n{markdown_table(best)}\n")
    print(f"total wall time {time.perf_counter() - started:.0f} s (including process start-up)")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "versions": versions,
            "shape": asdict(shape), "settings": asdict(settings), "load_average_1min": load,
            "results": [asdict(r) for r in best],
            "round_median_ms": {best[i].name: [float(np.median(r[i].step_ms)) for r in rounds]
                                for i in range(len(best))}}, indent=2))
        print(f"wrote {args.json}")

    mismatched = [r.name for r in best if r.param_count != plain.param_count]
    if mismatched:
        print(f"ERROR: parameter count differs from the plain model's ({plain.param_count:,}): {mismatched}")
        return 1
    if first_gap > FIRST_LOSS_TOLERANCE:
        print(f"ERROR: plain and megatron TP=1 first-step losses differ by {first_gap:.2e} "
              f"(> {FIRST_LOSS_TOLERANCE}): the two models are not the same computation")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
