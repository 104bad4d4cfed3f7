"""`opd-megatron cache-teacher` on a tiny indexed corpus with a tiny in-process teacher: the cache holds, window by
window, what the teacher computes on that window (ids exactly, log-probs within the encoding's bound); a rerun
resumes with nothing to write; a run for another k into the same directory is refused, naming the field."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from opd_megatron.cli import main
from opd_megatron.config import ConfigError, load_config
from opd_megatron.data import build_dataset
from opd_megatron.data.teacher_cache import logprob_error_bound, open_cache, tokenizer_fingerprint
from opd_megatron.data.tokenizer import load_tokenizer
from opd_megatron.teachers.base import TeacherRequest
from opd_megatron.teachers.inprocess import InProcessTeacher
from opd_megatron.tools.cache_teacher import check_cacheable, window_rows
from tests.tiny_hf import write_tiny_checkpoint, write_tiny_corpus

TOPK = 8
SEQ_LENGTH = 16
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_teacher")
    teacher_dir = write_tiny_checkpoint(root / "teacher", "llama", num_layers=1)
    tokenizer = load_tokenizer(str(teacher_dir))
    write_tiny_corpus(root, "corpus", tokenizer, documents=10, seed=0)
    config = {"run": {"name": "cache", "output_dir": str(root / "runs"), "seed": 3},
              "model": {"vocab_size": 512},
              "parallel": {"micro_batch_size": 3, "global_batch_size": 3},
              "data": {"format": "indexed", "path": str(root / "corpus"), "tokenizer": str(teacher_dir),
                       "seq_length": SEQ_LENGTH},
              "teacher": {"kind": "inprocess", "temperature": 0.8, "topk": TOPK,
                          "inprocess": {"path": str(teacher_dir)}}}
    (root / "kd.yaml").write_text(yaml.safe_dump(config))
    return root, teacher_dir, tokenizer


def test_cache_teacher_writes_what_the_teacher_computes_and_resumes(setup, capsys):
    root, teacher_dir, tokenizer = setup
    output = root / "cache"
    args = ["cache-teacher", "--config", str(root / "kd.yaml"), "--output", str(output), "--samples-per-shard", "4"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "B/token" in printed

    cfg = load_config(root / "kd.yaml")
    blend = build_dataset(cfg.data, tokenizer, seed=cfg.run.seed)
    reader = open_cache(output, expect={"topk": TOPK, "temperature": 0.8, "seq_length": SEQ_LENGTH,
                                        "tokenizer_hash": tokenizer_fingerprint(tokenizer),
                                        "dataset": {"num_windows": blend.num_windows}})
    keys = list(range(blend.num_windows))
    shards = -(-len(keys) // 4)
    assert len(keys) >= 9 and f"{shards} of {shards} shards written" in printed
    tokens, lengths = window_rows(blend, keys)
    request = TeacherRequest(tokens=tokens, lengths=lengths, score_start=torch.zeros_like(lengths), topk=TOPK)
    want = InProcessTeacher(teacher_dir, temperature=0.8).score(request)
    got = reader.scores(keys, tokens=tokens)
    assert torch.equal(got.valid, want.valid)
    assert int(got.valid.sum()) == int((lengths - 1).sum()) and not bool(got.valid[-1].all())
    valid = got.valid
    got_order, want_order = (torch.sort(ids, dim=-1).indices for ids in (got.topk_ids, want.topk_ids))
    assert torch.equal(got.topk_ids.gather(-1, got_order)[valid], want.topk_ids.gather(-1, want_order)[valid])
    got_values = got.topk_logprobs.gather(-1, got_order).double()
    want_values = want.topk_logprobs.gather(-1, want_order).double()
    records = reader.raw_records(keys)
    top, span = (torch.from_numpy(records[name].astype("float64")) for name in ("top", "span"))
    bound = logprob_error_bound(top, span, want_values)
    assert bool(((got_values - want_values).abs()[valid] <= bound[valid] + 1e-6).all())
    tail = torch.log1p(-want.topk_logprobs.double().exp().sum(-1))
    torch.testing.assert_close(got.tail_logprob.double()[valid], tail[valid], rtol=2 ** -10, atol=1e-5)

    # A rerun finds every shard finished: nothing is scored or written.
    before = {path.name: path.stat().st_mtime_ns for path in output.glob("shard-*.bin")}
    assert main(args) == 0
    assert "0 tokens scored" in capsys.readouterr().out
    assert before == {path.name: path.stat().st_mtime_ns for path in output.glob("shard-*.bin")}

    # Another k into the same directory is refused, and the cache is left as it was.
    assert main(args + ["teacher.topk=4"]) == 2
    assert "topk: the cache has 8, expected 4" in capsys.readouterr().err
    assert before == {path.name: path.stat().st_mtime_ns for path in output.glob("shard-*.bin")}


@pytest.mark.slow
def test_two_data_parallel_writers_under_torchrun(setup, tmp_path):
    """Two ranks (dp = 2) split the shards round-robin and the cache they write together reads as the one written by
    one process: the same ids, log-probs within twice the encoding's bound (the ranks run 1 thread each, so the
    teacher's floats may differ in the last bits)."""
    root, _, tokenizer = setup
    single, double = tmp_path / "single", tmp_path / "double"
    base = ["-m", "opd_megatron", "cache-teacher", "--config", str(root / "kd.yaml"), "--samples-per-shard", "2",
            "parallel.global_batch_size=6"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    assert main(base[2:] + ["--output", str(single)]) == 0
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(launcher + base + ["--output", str(double)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("[opd-megatron] cache-teacher:") == 1            # rank 0 reports, for both
    one, two = open_cache(single), open_cache(double)
    shards = one.layout.num_shards
    assert shards >= 4 and f"{shards} of {shards} shards written" in result.stdout
    assert two.manifest["identity"] == one.manifest["identity"]
    keys = list(range(len(one)))
    a, b = one.scores(keys), two.scores(keys)
    assert torch.equal(a.valid, b.valid) and torch.equal(a.topk_ids[a.valid].sort(-1).values,
                                                         b.topk_ids[b.valid].sort(-1).values)
    records = one.raw_records(keys)
    top, span = (torch.from_numpy(records[name].astype("float64")) for name in ("top", "span"))
    bound = logprob_error_bound(top, span, a.topk_logprobs)
    assert bool(((a.topk_logprobs - b.topk_logprobs).abs() <= 2 * bound + 1e-5)[a.valid].all())


@pytest.mark.parametrize("overrides,message", [
    (["data.format=jsonl", "teacher.topk=8"], "data.format: cache-teacher reads an indexed corpus"),
    (["data.format=indexed"], "teacher.topk: the number of top-k log-probs to cache per token; expected an integer "
                              ">= 1, got 0"),
    (["data.format=indexed", "teacher.topk=8", "data.reset_attention_mask=true"],
     "data.reset_attention_mask: cache-teacher scores a window as one sequence"),
])
def test_what_the_config_must_say(overrides, message):
    cfg = load_config(None, ["teacher.kind=inprocess", "teacher.inprocess.path=/ckpt", *overrides])
    with pytest.raises(ConfigError, match=message):
        check_cacheable(cfg)
