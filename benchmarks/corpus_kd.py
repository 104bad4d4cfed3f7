"""Corpus KD: the teacher top-k cache's size and read speed, and `cache-teacher` against the teacher's bare forward.

Two measurements, in one process:
- **cache size and reads** (`data/teacher_cache.py`): a cache of `--samples` windows of `--seq` tokens at top-`--topk`
  over Llama 3's 128,256 ids, written from synthetic top-k (distinct ids, log-probs of a random softmax; the size and
  the decoding work do not depend on the values), then read back: bytes per token on disk (all shards / label
  columns) and the layout's own count, and `TeacherCacheReader.scores` on random batches of `--read-batch` samples
  in tokens/s, with and without the per-sample crc32 check (median of `--rounds`).
- **cache-teacher vs bare forward**: a random Llama teacher (`--layers --hidden --vocab`, transformers, in-process)
  on an indexed corpus of `--teacher-windows` windows of `--teacher-seq` tokens. `run_cache_teacher` (the whole
  command's loop: windows read, `InProcessTeacher.score` with top-k, encoding, writing, fsync) in tokens/s, against
  the bare `model(input_ids).logits` forward of the same model on the same windows in batches of the same size, and
  against `InProcessTeacher.score` with top-k on those batches (the teacher's own log-softmax, tie-exact top-k and
  checks, nothing cached: the ratio to it is what the cache itself costs, as is the share of cache-teacher's time
  spent inside `Teacher.score`, which the machine's load moves much less); the scoring and bare-forward rates are
  also given per CPU second of the process (`time.process_time`, all threads), which other load hardly moves;
  after one uncounted round of each, each round runs both, alternating which goes first; the ratio is of the medians
  (target >= 0.9x). The loop's own CPU seconds (`CacheTeacherResult.loop_cpu_s`: reading, scoring, encoding,
  writing; not the teacher's loading) give a second, fixed-cost-free ratio.
- **KD step from the cache vs a cross-entropy step**: a megatron GPTModel student (`--student-*`, built by the loop)
  on windows of an indexed corpus (`--kd-seq` tokens), a cache of them written by `cache-teacher` (a small random
  teacher of the same vocabulary, top-`--topk`). The KD step is the loop's (`OpdRun`, teacher.kind cache,
  rollout.source corpus, forward KL on the top-k + tail support): the cached rows read from the memory-mapped cache
  (`TeacherScoring.scores_for`) + `OpdRun.train_step` (forward, the route A loss, backward, megatron's optimizer
  step, the step's diagnostics); the plain step is megatron's `vocab_parallel_cross_entropy`
  (`token_cross_entropy_sum`) through the same schedule and optimizer on the same windows. Each arm runs in a
  process of its own (the same setup: config, student, cache reader), arms alternating over `--kd-rounds`: median
  step time (wall and CPU seconds) over `--kd-steps` after `--kd-warmup`, and the process's peak RSS
  (`ru_maxrss`, the resident high-water mark, which includes the mapped cache pages the step touched) and its rise
  over the RSS before the first step (targets: time <= 1.10x, peak memory <= 1.05x).

    python -m benchmarks.corpus_kd
    python -m benchmarks.corpus_kd --samples 32 --seq 1024 --teacher-windows 8 --rounds 2   # about a minute
    python -m benchmarks.corpus_kd --skip-cache --skip-teacher                              # the KD step only
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from opd_megatron.config import load_config  # noqa: E402
from opd_megatron.data import build_dataset  # noqa: E402
from opd_megatron.data.indexed import preprocess_jsonl  # noqa: E402
from opd_megatron.data.teacher_cache import (BatchScores, CacheIdentity, CacheLayout, TeacherCacheWriter,  # noqa: E402
                                             open_cache)
from opd_megatron.data.tokenizer import load_tokenizer  # noqa: E402
from opd_megatron.teachers.base import TeacherRequest  # noqa: E402
from opd_megatron.teachers.inprocess import InProcessTeacher  # noqa: E402
from opd_megatron.tools.cache_teacher import run_cache_teacher, window_rows  # noqa: E402
from tests.tiny_hf import tiny_vocab, write_tiny_checkpoint  # noqa: E402

LLAMA3_VOCAB = 128256
# Strides coprime with 128,256 = 2^8 * 3 * 167: (base + i * stride) % V gives k distinct ids.
STRIDES = (5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 1009, 4099)


def synthetic_scores(indices, seq_length: int, topk: int, vocab: int) -> BatchScores:
    """Top-k of a random softmax over k + 1 outcomes (the last standing for the tail) at distinct ids, per window."""
    rows = len(indices)
    generator = torch.Generator().manual_seed(int(indices[0]))
    logprobs = torch.log_softmax(torch.randn(rows, seq_length, topk + 1, generator=generator) * 3.0, dim=-1)
    values = torch.sort(logprobs[..., :topk], dim=-1, descending=True).values
    base = torch.randint(0, vocab, (rows, seq_length, 1), generator=generator)
    stride = torch.tensor(STRIDES)[torch.randint(0, len(STRIDES), (rows, seq_length, 1), generator=generator)]
    ids = (base + torch.arange(topk) * stride) % vocab
    tokens = torch.randint(0, vocab, (rows, seq_length + 1), generator=generator)
    return BatchScores(ids, values, torch.ones(rows, seq_length, dtype=torch.bool), tokens)


def cache_size_and_reads(args, root: Path) -> dict:
    seq, k, vocab = args.seq, args.topk, LLAMA3_VOCAB
    layout = CacheLayout(args.samples, seq, k, vocab, args.samples_per_shard)
    identity = CacheIdentity(teacher={"kind": "synthetic"}, tokenizer_hash="-", topk=k, temperature=1.0,
                             vocab_size=vocab, dataset={"windows": args.samples}, seq_length=seq)
    writer = TeacherCacheWriter(root / "synthetic", identity, layout)
    writer.prepare()
    start = time.perf_counter()
    for shard in writer.pending_shards():
        writer.write_shard(shard, lambda indices: synthetic_scores(indices, seq, k, vocab), args.read_batch)
    write_s = time.perf_counter() - start
    writer.finish()
    on_disk = sum(path.stat().st_size for path in (root / "synthetic").glob("shard-*.bin"))
    tokens = args.samples * seq
    out = {"topk": k, "vocab": vocab, "seq_length": seq, "samples": args.samples,
           "bytes_per_token_on_disk": on_disk / tokens, "bytes_per_token_layout": layout.bytes_per_token,
           "write_tokens_per_s": tokens / write_s}
    pick = random.Random(0)
    read_batch = min(args.read_batch, args.samples)
    for verify in (True, False):
        reader = open_cache(root / "synthetic", verify=verify)
        reader.scores(list(range(read_batch)))   # maps the shards
        rates = []
        for _ in range(args.rounds):
            batches = [pick.sample(range(args.samples), read_batch) for _ in range(args.read_batches)]
            start = time.perf_counter()
            for batch in batches:
                reader.scores(batch)
            rates.append(read_batch * args.read_batches * seq / (time.perf_counter() - start))
        out[f"read_tokens_per_s_{'verified' if verify else 'unverified'}"] = statistics.median(rates)
    return out


def teacher_setup(args, root: Path) -> Path:
    """A random Llama teacher, its tokenizer, an indexed corpus of its words, and a cache-teacher config."""
    teacher_dir = write_tiny_checkpoint(root / "teacher", "llama", vocab_size=args.vocab, hidden_size=args.hidden,
                                        num_layers=args.layers, num_heads=args.hidden // 32,
                                        num_kv_heads=max(1, args.hidden // 64), intermediate_size=4 * args.hidden,
                                        max_position_embeddings=max(256, args.teacher_seq + 1))
    tokenizer = load_tokenizer(str(teacher_dir))
    words = tiny_vocab(args.vocab)[4:]
    pick = random.Random(0)
    lines, total = [], 0
    while total < args.teacher_windows * args.teacher_seq + 1:
        count = pick.randint(50, 400)
        lines.append(json.dumps({"text": " ".join(pick.choice(words) for _ in range(count))}) + "\n")
        total += count + 1
    (root / "corpus.jsonl").write_text("".join(lines))
    preprocess_jsonl(root / "corpus.jsonl", root / "corpus", tokenizer)
    config = {"run": {"name": "corpus_kd", "output_dir": str(root / "runs"), "seed": 1},
              "model": {"vocab_size": args.vocab, "max_position_embeddings": max(256, args.teacher_seq + 1)},
              "parallel": {"micro_batch_size": args.teacher_batch, "global_batch_size": args.teacher_batch},
              "data": {"format": "indexed", "path": str(root / "corpus"), "tokenizer": str(teacher_dir),
                       "seq_length": args.teacher_seq},
              "teacher": {"kind": "inprocess", "topk": args.topk, "inprocess": {"path": str(teacher_dir)}}}
    (root / "kd.yaml").write_text(yaml.safe_dump(config))
    return root / "kd.yaml"


def scoring_tokens_per_s(teacher, tokens: torch.Tensor, lengths: torch.Tensor, batch: int,
                         topk: int) -> tuple[float, float]:
    """`Teacher.score` with top-k on the same batches, nothing cached: the teacher's own work besides the forward.
    (tokens per wall second, tokens per CPU second of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for first in range(0, len(tokens), batch):
        rows = slice(first, first + batch)
        teacher.score(TeacherRequest(tokens=tokens[rows], lengths=lengths[rows],
                                     score_start=torch.zeros_like(lengths[rows]), topk=topk))
    columns = float((lengths - 1).sum())
    return columns / (time.perf_counter() - wall), columns / (time.process_time() - cpu)


@torch.no_grad()
def bare_forward_tokens_per_s(model, tokens: torch.Tensor, lengths: torch.Tensor, batch: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for first in range(0, len(tokens), batch):
        rows = slice(first, first + batch)
        mask = torch.arange(tokens.shape[1]).unsqueeze(0) < lengths[rows].unsqueeze(1)
        model(input_ids=tokens[rows] * mask, attention_mask=mask.long()).logits
    columns = float((lengths - 1).sum())
    return columns / (time.perf_counter() - wall), columns / (time.process_time() - cpu)


def cache_teacher_vs_forward(args, root: Path) -> dict:
    import transformers

    config_path = teacher_setup(args, root)
    cfg = load_config(config_path)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    blend = build_dataset(cfg.data, tokenizer, seed=cfg.run.seed)
    keys = list(range(min(blend.num_windows, args.teacher_windows)))
    tokens, lengths = window_rows(blend, keys)
    model = transformers.AutoModelForCausalLM.from_pretrained(cfg.teacher.inprocess.path, dtype=torch.float32).eval()
    teacher = InProcessTeacher(cfg.teacher.inprocess.path, temperature=cfg.teacher.temperature)
    rates: dict[str, list[float]] = {"cache_teacher": [], "scoring": [], "bare_forward": []}
    teacher_shares = []
    cpu_rates: dict[str, list[float]] = {"cache_teacher": [], "scoring": [], "bare_forward": [],
                                         "cache_teacher_loop": []}
    # A first round of each, not counted: transformers and torch initialise lazily on a process's first forward.
    run_cache_teacher(cfg, root / "cache-warmup", samples_per_shard=args.samples_per_shard, log=lambda line: None)
    bare_forward_tokens_per_s(model, tokens, lengths, args.teacher_batch)
    for round_ in range(args.rounds):
        kinds = list(rates) if round_ % 2 == 0 else list(rates)[::-1]
        for kind in kinds:
            if kind == "cache_teacher":
                cpu = time.process_time()
                result = run_cache_teacher(cfg, root / f"cache-{round_}", samples_per_shard=args.samples_per_shard,
                                           log=lambda line: None)
                # CPU seconds of the whole call, the teacher's loading included (a bound on the loop's own).
                cpu_rates[kind].append(result.columns_scored / (time.process_time() - cpu))
                cpu_rates["cache_teacher_loop"].append(result.columns_scored / result.loop_cpu_s)
                rates[kind].append(result.tokens_per_s)
                teacher_shares.append(result.teacher_share)
            else:
                wall, cpu = (scoring_tokens_per_s(teacher, tokens, lengths, args.teacher_batch, args.topk)
                             if kind == "scoring" else
                             bare_forward_tokens_per_s(model, tokens, lengths, args.teacher_batch))
                rates[kind].append(wall)
                cpu_rates[kind].append(cpu)
    medians = {kind: statistics.median(values) for kind, values in rates.items()}
    parameters = sum(p.numel() for p in model.parameters())
    return {"teacher_parameters": parameters, "teacher_vocab": args.vocab, "windows": blend.num_windows,
            "seq_length": args.teacher_seq, "topk": args.topk,
            **{f"{kind}_tokens_per_s": value for kind, value in medians.items()},
            "ratio_to_bare_forward": medians["cache_teacher"] / medians["bare_forward"],
            "ratio_to_scoring": medians["cache_teacher"] / medians["scoring"],
            "teacher_share": statistics.median(teacher_shares),
            "cpu_scoring_to_bare_forward": statistics.median(cpu_rates["scoring"]) /
            statistics.median(cpu_rates["bare_forward"]),
            "cpu_cache_teacher_to_bare_forward": statistics.median(cpu_rates["cache_teacher"]) /
            statistics.median(cpu_rates["bare_forward"]),
            "cpu_cache_teacher_to_scoring": statistics.median(cpu_rates["cache_teacher"]) /
            statistics.median(cpu_rates["scoring"]),
            "cpu_cache_teacher_loop_to_bare_forward": statistics.median(cpu_rates["cache_teacher_loop"]) /
            statistics.median(cpu_rates["bare_forward"]), "rounds": rates, "cpu_rounds": cpu_rates}


def kd_setup(args, root: Path) -> Path:
    """A random teacher of the student's vocabulary, a training and a held-out corpus of its words, the teacher's
    top-k cache of the training corpus (`run_cache_teacher`), and the student's KD config (returned)."""
    vocab, seq = args.student_vocab, args.kd_seq
    teacher_dir = write_tiny_checkpoint(root / "kd-teacher", "llama", vocab_size=vocab, hidden_size=64, num_layers=1,
                                        num_heads=2, num_kv_heads=1, intermediate_size=128,
                                        max_position_embeddings=max(256, seq + 1))
    tokenizer = load_tokenizer(str(teacher_dir))
    words = tiny_vocab(vocab)[4:]
    pick = random.Random(1)
    windows = args.kd_batch * (args.kd_warmup + args.kd_steps) + 1
    for name, tokens in (("kd-corpus", windows * seq + 1), ("kd-held-out", 4 * seq)):
        lines, total = [], 0
        while total < tokens:
            count = pick.randint(100, 800)
            lines.append(json.dumps({"text": " ".join(pick.choice(words) for _ in range(count))}) + "\n")
            total += count + 1
        (root / f"{name}.jsonl").write_text("".join(lines))
        preprocess_jsonl(root / f"{name}.jsonl", root / name, tokenizer)
    config = {"run": {"name": "kd-step", "output_dir": str(root / "kd-runs"), "seed": 1, "algorithm": "opd",
                      "train_steps": args.kd_warmup + args.kd_steps, "device": "cpu"},
              "model": {"num_layers": args.student_layers, "hidden_size": args.student_hidden,
                        "ffn_hidden_size": 4 * args.student_hidden, "num_attention_heads": args.student_hidden // 64,
                        "vocab_size": vocab, "max_position_embeddings": seq, "tie_embeddings": False},
              "parallel": {"micro_batch_size": args.kd_micro_batch, "global_batch_size": args.kd_batch},
              "optim": {"lr": 1e-4, "warmup_steps": 0, "use_distributed_optimizer": False},
              "data": {"format": "indexed", "path": str(root / "kd-corpus"), "tokenizer": str(teacher_dir),
                       "seq_length": seq},
              "rollout": {"source": "corpus", "prompts_per_step": args.kd_batch, "samples_per_prompt": 1},
              "teacher": {"kind": "inprocess", "topk": args.topk, "inprocess": {"path": str(teacher_dir)}},
              "opd": {"mixtures": {"on_policy_fraction": 0.0}, "loss": "divergence",
                      "route_a": {"divergence": "forward_kl", "support": "teacher_topk", "support_k": args.topk,
                                  "support_mode": "tail"}},
              "eval": {"path": str(root / "kd-held-out"), "prompts": 2, "interval": 0},
              "checkpoint": {"save_interval": 0, "save_at_end": False},
              "logging": {"progress_bar": False, "tensorboard": False}}
    (root / "kd-teacher.yaml").write_text(yaml.safe_dump(config))
    run_cache_teacher(load_config(root / "kd-teacher.yaml"), root / "kd-cache", samples_per_shard=64,
                      log=lambda line: None)
    config["teacher"] = {"kind": "cache", "topk": args.topk, "cache": {"path": str(root / "kd-cache")}}
    (root / "kd-student.yaml").write_text(yaml.safe_dump(config))
    return root / "kd-student.yaml"


def kd_arm(arm: str, config_path: str, warmup: int, steps: int, threads: int) -> dict:
    """In a process of its own: the loop's setup for the KD config, then `warmup + steps` steps of one arm on the
    corpus's windows: `kd` (cached rows + OpdRun.train_step) or `ce` (vocab-parallel cross-entropy on the same
    windows, same schedule and optimizer). Per-step wall and CPU seconds, RSS before the first step and at peak."""
    from opd_megatron.loop.opd import OpdRun
    from opd_megatron.loop.objective import StudentInput
    from opd_megatron.student.distributed import init_parallel
    from opd_megatron.student.lm_loss import token_cross_entropy_sum
    from opd_megatron.student.optimizer import optimizer_step, zero_grads
    from opd_megatron.student.schedule import forward_backward

    cfg = load_config(config_path)
    ctx = init_parallel(cfg)
    torch.set_num_threads(threads)
    run = OpdRun(cfg, ctx)
    vocab, mbs = cfg.model.vocab_size, cfg.parallel.micro_batch_size

    def cross_entropy(logits, micro: StudentInput):
        return token_cross_entropy_sum(logits, micro.rollout.labels, micro.rollout.loss_mask, vocab)

    batches = [run.make_batch(step) for step in range(warmup + steps)]   # corpus reads: neither arm's step
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall, cpu, tokens = [], [], []
    for step, batch in enumerate(batches):
        started, cpu_started = time.perf_counter(), time.process_time()
        if arm != "ce":
            scores = run.scoring.scores_for(batch)
            # kd_unlogged: a step the run does not log (logging.log_interval), which skips the per-step vocabulary
            # diagnostics (the student's entropy, top-k overlap, mass on the teacher's support) and the log-ratios
            # nothing in this loss reads; the update is the same (tests/opd/test_opd_numbers.py).
            run.train_step(batch, scores, diagnostics=arm == "kd")
        else:
            trimmed = batch.trimmed()
            zero_grads(run.trainable)
            forward_backward(run.trainable.ddp, StudentInput.of(trimmed, mbs), cross_entropy,
                             trimmed.tokens.shape[1] - 1, mbs)
            optimizer_step(run.trainable)
        run.step += 1
        if step >= warmup:
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - cpu_started)
            tokens.append(float(batch.loss_mask.sum()))
    return {"arm": arm, "wall_s": wall, "cpu_s": cpu, "tokens": tokens, "rss_before_kb": rss_before,
            "rss_peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "threads": torch.get_num_threads()}


def kd_step_vs_cross_entropy(args, root: Path) -> dict:
    config_path = kd_setup(args, root)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(args.kd_threads))
    runs: dict[str, list[dict]] = {"kd": [], "ce": [], "kd_unlogged": []}
    for round_ in range(args.kd_rounds):
        for arm in (list(runs) if round_ % 2 == 0 else list(runs)[::-1]):
            result = subprocess.run([sys.executable, "-m", "benchmarks.corpus_kd", "--kd-arm", arm, "--kd-config",
                                     str(config_path), "--kd-warmup", str(args.kd_warmup), "--kd-steps",
                                     str(args.kd_steps), "--kd-threads", str(args.kd_threads)],
                                    cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
            if result.returncode != 0:
                raise RuntimeError(f"the {arm} arm failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
            runs[arm].append(json.loads(result.stdout.strip().splitlines()[-1]))

    def median(arm: str, key: str) -> float:
        return statistics.median(value for run in runs[arm] for value in run[key])

    def peak(arm: str, key: str = "rss_peak_kb") -> float:
        return statistics.median(run[key] for run in runs[arm]) / 1024

    rise = {arm: statistics.median((run["rss_peak_kb"] - run["rss_before_kb"]) / 1024 for run in runs[arm])
            for arm in runs}
    return {"student": {"layers": args.student_layers, "hidden": args.student_hidden, "vocab": args.student_vocab},
            "seq_length": args.kd_seq, "global_batch": args.kd_batch, "micro_batch": args.kd_micro_batch,
            "topk": args.topk, "tokens_per_step": statistics.median(runs["kd"][0]["tokens"]),
            "kd_step_s": median("kd", "wall_s"), "ce_step_s": median("ce", "wall_s"),
            "kd_step_cpu_s": median("kd", "cpu_s"), "ce_step_cpu_s": median("ce", "cpu_s"),
            "kd_unlogged_step_s": median("kd_unlogged", "wall_s"),
            "kd_unlogged_step_cpu_s": median("kd_unlogged", "cpu_s"),
            "cpu_time_ratio_unlogged": median("kd_unlogged", "cpu_s") / median("ce", "cpu_s"),
            # A run logging every 10th step (megatron's pretraining runs log every 1-100): 1 logged + 9 unlogged.
            "cpu_time_ratio_log_interval_10": (median("kd", "cpu_s") + 9 * median("kd_unlogged", "cpu_s"))
            / (10 * median("ce", "cpu_s")),
            "memory_ratio_unlogged": peak("kd_unlogged") / peak("ce"),
            "time_ratio": median("kd", "wall_s") / median("ce", "wall_s"),
            "cpu_time_ratio": median("kd", "cpu_s") / median("ce", "cpu_s"),
            "kd_peak_rss_mib": peak("kd"), "ce_peak_rss_mib": peak("ce"), "memory_ratio": peak("kd") / peak("ce"),
            "kd_rss_rise_mib": rise["kd"], "ce_rss_rise_mib": rise["ce"], "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--seq", type=int, default=4096, help="cache size / read part: tokens per window")
    parser.add_argument("--samples", type=int, default=64, help="cache size / read part: windows")
    parser.add_argument("--samples-per-shard", type=int, default=16)
    parser.add_argument("--read-batch", type=int, default=8)
    parser.add_argument("--read-batches", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000, help="teacher part: the random teacher's vocabulary")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--teacher-seq", type=int, default=256)
    parser.add_argument("--teacher-windows", type=int, default=32)
    parser.add_argument("--teacher-batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-teacher", action="store_true")
    parser.add_argument("--skip-cache", action="store_true", help="skip the cache size / read part")
    parser.add_argument("--skip-kd-step", action="store_true")
    parser.add_argument("--student-layers", type=int, default=4, help="KD step part: the megatron student")
    parser.add_argument("--student-hidden", type=int, default=256)
    parser.add_argument("--student-vocab", type=int, default=32000)
    parser.add_argument("--kd-seq", type=int, default=512)
    parser.add_argument("--kd-batch", type=int, default=8, help="windows per step")
    parser.add_argument("--kd-micro-batch", type=int, default=4)
    parser.add_argument("--kd-warmup", type=int, default=2)
    parser.add_argument("--kd-steps", type=int, default=4)
    parser.add_argument("--kd-rounds", type=int, default=2)
    parser.add_argument("--kd-threads", type=int, default=1,
                        help="intra-op threads of each arm's process (1: on a shared machine a waiting OpenMP thread "
                             "spins, which inflates CPU seconds with other jobs' load)")
    parser.add_argument("--kd-arm", choices=("kd", "ce", "kd_unlogged"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--kd-config", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="write the raw numbers here")
    args = parser.parse_args()
    if args.kd_arm is not None:       # one arm of the KD-step comparison, in its own process (kd_step_vs_cross_entropy)
        print(json.dumps(kd_arm(args.kd_arm, args.kd_config, args.kd_warmup, args.kd_steps, args.kd_threads)),
              flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results = {}
        if not args.skip_cache:
            size = cache_size_and_reads(args, root)
            print(f"| k | vocab | B/token (layout) | B/token (on disk) | write tokens/s | read tokens/s (crc checked) "
                  f"| read tokens/s (unchecked) |\n|---:|---:|---:|---:|---:|---:|---:|\n"
                  f"| {size['topk']} | {size['vocab']} | {size['bytes_per_token_layout']:.2f} | "
                  f"{size['bytes_per_token_on_disk']:.2f} | {size['write_tokens_per_s']:,.0f} | "
                  f"{size['read_tokens_per_s_verified']:,.0f} | {size['read_tokens_per_s_unverified']:,.0f} |",
                  flush=True)
            results["cache"] = size
        if not args.skip_teacher:
            teacher = cache_teacher_vs_forward(args, root)
            results["cache_teacher"] = teacher
            print(f"\n| teacher params | vocab | k | cache-teacher tokens/s | Teacher.score tokens/s | bare forward "
                  f"tokens/s | cache-teacher / bare forward | cache-teacher / Teacher.score | in Teacher.score |\n"
                  f"|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n| {teacher['teacher_parameters'] / 1e6:.1f}M | "
                  f"{teacher['teacher_vocab']} | {teacher['topk']} | {teacher['cache_teacher_tokens_per_s']:,.0f} | "
                  f"{teacher['scoring_tokens_per_s']:,.0f} | {teacher['bare_forward_tokens_per_s']:,.0f} | "
                  f"{teacher['ratio_to_bare_forward']:.3f}x | {teacher['ratio_to_scoring']:.3f}x | "
                  f"{100 * teacher['teacher_share']:.1f}% |", flush=True)
            print(f"\nPer CPU second of this process (steadier under load; cache-teacher's with the teacher's "
                  f"loading): cache-teacher / bare forward = {teacher['cpu_cache_teacher_to_bare_forward']:.3f}x, "
                  f"cache-teacher / Teacher.score = {teacher['cpu_cache_teacher_to_scoring']:.3f}x, Teacher.score / "
                  f"bare forward = {teacher['cpu_scoring_to_bare_forward']:.3f}x; cache-teacher's shard loop alone / "
                  f"bare forward = {teacher['cpu_cache_teacher_loop_to_bare_forward']:.3f}x", flush=True)
        if not args.skip_kd_step:
            kd = kd_step_vs_cross_entropy(args, root)
            results["kd_step"] = kd
            print(f"\n| student | vocab | tokens/step | k | KD step s (CPU s) | CE step s (CPU s) | KD / CE time "
                  f"(CPU) | peak RSS KD / CE MiB | KD / CE peak | RSS rise in the steps KD / CE MiB |\n"
                  f"|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
                  f"| {kd['student']['layers']} x {kd['student']['hidden']} | {kd['student']['vocab']} | "
                  f"{kd['tokens_per_step']:.0f} | {kd['topk']} | {kd['kd_step_s']:.3f} ({kd['kd_step_cpu_s']:.3f}) | "
                  f"{kd['ce_step_s']:.3f} ({kd['ce_step_cpu_s']:.3f}) | {kd['time_ratio']:.3f}x "
                  f"({kd['cpu_time_ratio']:.3f}x) | {kd['kd_peak_rss_mib']:.0f} / {kd['ce_peak_rss_mib']:.0f} | "
                  f"{kd['memory_ratio']:.3f}x | {kd['kd_rss_rise_mib']:.0f} / {kd['ce_rss_rise_mib']:.0f} |",
                  flush=True)
            print(f"\nA step the run does not log (no per-step vocabulary diagnostics): KD step "
                  f"{kd['kd_unlogged_step_s']:.3f} s ({kd['kd_unlogged_step_cpu_s']:.3f} CPU s) = "
                  f"{kd['cpu_time_ratio_unlogged']:.3f}x the CE step's CPU time, peak RSS "
                  f"{kd['memory_ratio_unlogged']:.3f}x; at logging.log_interval=10 the KD steps average "
                  f"{kd['cpu_time_ratio_log_interval_10']:.3f}x", flush=True)
    print(f"\ntorch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
