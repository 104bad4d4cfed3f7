"""`opd-megatron` command line: train, quickstart, eval, dry-run, preprocess, cache-teacher, sweep, sweep-report,
export-hf, convert.

    opd-megatron quickstart                                   # OPD on the CPU in minutes (configs/quickstart.yaml)
    opd-megatron train --config configs/sft_tiny.yaml parallel.tp=2 optim.lr=1e-4
    opd-megatron eval --config runs/quickstart/config.yaml --checkpoint runs/quickstart/checkpoints
    torchrun --nproc_per_node 2 -m opd_megatron train --config configs/sft_tiny.yaml parallel.tp=2
    opd-megatron dry-run --config configs/llama3_8b_sft.yaml --world-size 64 --gpu-memory-gb 80
    opd-megatron preprocess --input corpus.jsonl --output-prefix data/corpus --tokenizer path/to/tokenizer
    opd-megatron cache-teacher --config kd.yaml --output cache/teacher   # teacher top-k of an indexed corpus, once
    opd-megatron sweep --config sweeps/smoke.yaml --results results/smoke
    opd-megatron sweep-report --results results/smoke --out docs/results/smoke.md
    opd-megatron export-hf --run-dir runs/opd --output hf/student         # safetensors + config.json + tokenizer
    opd-megatron convert --from-hf hf/Qwen3-0.6B --output ckpts/qwen3 --tp 2  # or --from-megatron CKPT
"""

from __future__ import annotations

import argparse
import json
import io
import logging
import os
import sys
import traceback
import warnings

from opd_megatron.config import ConfigError, load_config
from opd_megatron.errors import NonFiniteLossError, ReportedError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opd-megatron", description="On-policy distillation on megatron-core")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train the student (run.algorithm: sft or opd)")
    train.add_argument("--config", help="YAML run config")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. parallel.tp=2")

    quick = sub.add_parser("quickstart", help="teacher (cached) -> student warm-up -> OPD on a synthetic task, CPU")
    quick.add_argument("--config", default=None, help="YAML run config (default configs/quickstart.yaml)")
    quick.add_argument("--run-dir", default=None, help="where the run is written (default runs/quickstart)")
    quick.add_argument("overrides", nargs="*")

    ev = sub.add_parser("eval", help="held-out task score and per-token reverse KL to the teacher of a checkpoint")
    ev.add_argument("--config", required=True, help="the OPD run config (its teacher, task and eval sections)")
    ev.add_argument("--checkpoint", required=True, help="an iter_* directory or a checkpoints/ directory")
    ev.add_argument("overrides", nargs="*")

    dry = sub.add_parser("dry-run", help="validate a config and print layout, parameters and memory per GPU")
    dry.add_argument("--config", help="YAML run config")
    dry.add_argument("--world-size", type=int, default=None, help="number of GPUs (default tp x pp)")
    dry.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU, for the fit check")
    dry.add_argument("overrides", nargs="*")

    pre = sub.add_parser("preprocess", help="tokenize a JSONL corpus into megatron's indexed .bin/.idx format")
    pre.add_argument("--input", required=True, help="JSONL file")
    pre.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    pre.add_argument("--tokenizer", default="byte", help="'byte' or an HF tokenizer directory / tokenizer.json")
    pre.add_argument("--text-key", default="text")
    pre.add_argument("--prompt-key", default="prompt")
    pre.add_argument("--response-key", default="response")
    pre.add_argument("--apply-chat-template", action="store_true")
    pre.add_argument("--skip-malformed", action="store_true", help="skip and count malformed lines")
    pre.add_argument("--no-eod", action="store_true", help="do not append the end-of-document token")

    cache = sub.add_parser("cache-teacher", help="score an indexed corpus with the config's teacher once into a "
                                                 "sharded top-k cache (resumable; one writer per DP rank)")
    cache.add_argument("--config", required=True, help="YAML run config: its data (indexed) and teacher sections")
    cache.add_argument("--output", required=True, help="the cache directory (an unfinished one is resumed)")
    cache.add_argument("--samples-per-shard", type=int, default=256, help="samples per shard file")
    cache.add_argument("--batch-size", type=int, default=None,
                       help="samples per teacher request (default parallel.micro_batch_size)")
    cache.add_argument("overrides", nargs="*")

    sweep = sub.add_parser("sweep", help="run (or resume) a grid of run configs x seeds, one run after another")
    sweep.add_argument("--config", required=True, help="sweep YAML (format: sweeps/README.md)")
    sweep.add_argument("--results", default=None, help="results directory (default results/<sweep name>)")
    sweep.add_argument("--only", action="append", default=None, metavar="ARM", help="run only this arm (repeatable)")
    sweep.add_argument("--dry", action="store_true", help="validate every run config and list the runs, run nothing")
    sweep.add_argument("--keep-checkpoints", action="store_true",
                       help="keep each finished run's checkpoints, TensorBoard logs and plots")

    export = sub.add_parser("export-hf", help="a run's checkpoint as a Hugging Face checkpoint (safetensors, "
                                              "config.json, tokenizer, chat template)")
    export.add_argument("--run-dir", required=True, help="the run directory (its checkpoints/)")
    export.add_argument("--iteration", type=int, default=None, help="which checkpoint (default: the latest)")
    export.add_argument("--output", required=True, help="a new directory")
    _export_options(export)

    convert = sub.add_parser("convert", help="a Hugging Face checkpoint <-> one of ours, at a given layout")
    source = convert.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", help="an HF checkpoint directory -> a megatron checkpoints/ directory")
    source.add_argument("--from-megatron", help="an iter_* or checkpoints/ directory -> an HF checkpoint directory")
    convert.add_argument("--output", required=True, help="a new directory")
    convert.add_argument("--layers", default=None, help="--from-hf: keep only these decoder layers, e.g. 0,2,4")
    _export_options(convert)

    report = sub.add_parser("sweep-report", help="markdown + PNG plots of a sweep, from its results directory alone")
    report.add_argument("--results", required=True, help="the sweep's results directory")
    report.add_argument("--out", default=None, help="the markdown page (default RESULTS/results.md); PNGs beside it")
    return parser


def _export_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the job (world = tp x pp x dp)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the job")
    parser.add_argument("--family", choices=["llama", "qwen2", "qwen3"], default=None,
                        help="the HF architecture (default: the one the run started from, model.from_hf)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="storage dtype (default: the source checkpoint's, else float32)")


def _export_line(result) -> str:
    tokenizer = (f"tokenizer files {', '.join(result.tokenizer_files)}" if result.tokenizer_files else
                 "no tokenizer files (the run's tokenizer is not a Hugging Face one)")
    return (f"[opd-megatron] wrote {result.output} ({result.family}, {result.dtype}) from {result.checkpoint}; "
            f"{tokenizer}")


def _quickstart_lines(summary: dict, run_dir: str) -> str:
    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}%"
    teacher, before, after = (summary.get(k) for k in ("teacher_score", "student_score_before",
                                                        "student_score_after"))
    share = f" = {after / teacher:.0%} of the teacher" if teacher and after is not None else ""
    return (f"[quickstart] held-out accuracy: teacher {pct(teacher)}, student before OPD {pct(before)}, after "
            f"{pct(after)}{share}\n[quickstart] per-token reverse KL to the teacher: {summary.get('rkl_before'):.3f} "
            f"-> {summary.get('rkl_after'):.3f}; {summary.get('steps')} OPD steps; total "
            f"{summary.get('quickstart_wall_s')} s\n[quickstart] report: {run_dir}/report.md, plots and "
            f"metrics.jsonl beside it")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # megatron-core announces at import time, once per module, every optional GPU package it did not find
    # (TransformerEngine, apex): expected on a CPU machine. One of them is shown per run; OPD_SHOW_IMPORT_WARNINGS=1
    # shows them all.
    if not os.environ.get("OPD_SHOW_IMPORT_WARNINGS"):
        from opd_megatron.student.cpu_shims import show_one_missing_gpu_packages_warning
        show_one_missing_gpu_packages_warning()
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"megatron\..*")
    logging.basicConfig(level=os.environ.get("OPD_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.command == "train":
            from opd_megatron.loop.train import train
            cfg = load_config(args.config, args.overrides)
            result = train(cfg)
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"[opd-megatron] done: steps {result.start_step}->{result.final_step}, "
                      f"loss {result.losses[0] if result.losses else float('nan'):.4f} -> "
                      f"{result.losses[-1] if result.losses else float('nan'):.4f}, {result.wall_s:.1f} s, "
                      f"checkpoint {result.checkpoint}", flush=True)
        elif args.command == "quickstart":
            from opd_megatron.tools.quickstart import default_config_path, run_quickstart
            cfg = load_config(args.config or default_config_path(), args.overrides)
            summary = run_quickstart(cfg, args.run_dir)
            print(_quickstart_lines(summary, args.run_dir or str(cfg.run.run_dir)), flush=True)
        elif args.command == "eval":
            from opd_megatron.loop.opd import evaluate_checkpoint
            cfg = load_config(args.config, args.overrides)
            result = evaluate_checkpoint(cfg, args.checkpoint)
            if int(os.environ.get("RANK", "0")) == 0:
                print(json.dumps(result, indent=2), flush=True)
        elif args.command == "dry-run":
            from opd_megatron.tools.dry_run import run_dry_run
            print(run_dry_run(args.config, args.overrides, args.world_size, args.gpu_memory_gb))
        elif args.command == "preprocess":
            from opd_megatron.data.indexed import preprocess_jsonl
            from opd_megatron.data.tokenizer import load_tokenizer
            stats = preprocess_jsonl(args.input, args.output_prefix, load_tokenizer(args.tokenizer),
                                     text_key=args.text_key, prompt_key=args.prompt_key,
                                     response_key=args.response_key, append_eod=not args.no_eod,
                                     apply_chat_template=args.apply_chat_template,
                                     skip_malformed=args.skip_malformed)
            print(f"[opd-megatron] wrote {stats['documents']} documents, {stats['tokens']} tokens "
                  f"({stats['dtype']}) to {stats['bin_path']} / {stats['idx_path']}; skipped {stats['skipped']}")
        elif args.command == "cache-teacher":
            from opd_megatron.tools.cache_teacher import result_line, run_cache_teacher
            cfg = load_config(args.config, args.overrides)
            outcome = run_cache_teacher(cfg, args.output, args.samples_per_shard, args.batch_size,
                                        log=lambda line: print(line, flush=True))
            if int(os.environ.get("RANK", "0")) == 0:
                print(result_line(outcome), flush=True)
        elif args.command == "sweep":
            from opd_megatron.tools.sweep import run_sweep
            outcome = run_sweep(args.config, args.results, args.only, args.dry, args.keep_checkpoints,
                                log=lambda line: print(line, flush=True))
            if not args.dry:
                print(f"[opd-megatron] sweep: {len(outcome.launched)} runs launched, {len(outcome.skipped)} skipped "
                      f"(done before), {len(outcome.failed)} failed", flush=True)
            if outcome.failed:
                print(f"opd-megatron sweep: error: {len(outcome.failed)} runs failed: {', '.join(outcome.failed)} "
                      f"(their logs: run.log in each run directory; rc and log tail in runs.jsonl)", file=sys.stderr)
                return 1
        elif args.command in ("export-hf", "convert"):
            from opd_megatron.student.hf_export import convert_from_hf, export_checkpoint, export_run
            options = dict(tp=args.tp, pp=args.pp)
            if args.command == "convert" and args.from_hf:
                layers = [int(i) for i in args.layers.split(",")] if args.layers else None
                saved = convert_from_hf(args.from_hf, args.output, layers=layers, **options)
                message = f"[opd-megatron] wrote {saved} (weights only; load it with checkpoint.load={args.output})"
            else:
                options.update(family=args.family, dtype=args.dtype)
                result = (export_run(args.run_dir, args.output, args.iteration, **options)
                          if args.command == "export-hf" else
                          export_checkpoint(args.from_megatron, args.output, **options))
                message = _export_line(result)
            if int(os.environ.get("RANK", "0")) == 0:
                print(message, flush=True)
        elif args.command == "sweep-report":
            from opd_megatron.tools.sweep import render_report
            print(f"[opd-megatron] wrote {render_report(args.results, args.out)}")
    except NonFiniteLossError as exc:
        _report(args.command, exc)
        return 3
    except EXPECTED_ERRORS as exc:
        # Bad input or a failing service: one clear line, no traceback. Anything else is a bug and keeps its
        # traceback.
        _report(args.command, exc)
        return 2
    return 0


# What a user can cause or fix (config, data, teacher, checkpoint, layout, files): reported as one line.
EXPECTED_ERRORS = (ConfigError, ValueError, FileNotFoundError, FileExistsError, ReportedError)


def _report(command: str, exc: BaseException) -> None:
    """`opd-megatron <command>: error: <message>` as one line on stderr (a multi-line message is joined), its
    traceback before it only with OPD_DEBUG=1."""
    if os.environ.get("OPD_DEBUG"):
        traceback.print_exception(exc)
    message = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    line = f"opd-megatron {command}: error: {message}\n"
    # One write() of the whole line: every rank of a torchrun job reports on the same stderr pipe, and print()
    # writes the text and its newline separately, so two ranks' lines could interleave into one (seen in CI).
    sys.stderr.flush()
    try:
        os.write(sys.stderr.fileno(), line.encode("utf-8", errors="replace"))
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):   # a captured stderr has no file
        sys.stderr.write(line)
        sys.stderr.flush()
