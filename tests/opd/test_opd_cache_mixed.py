"""Training from a teacher cache at TP=2 (issue 15), in one gloo world of 2 processes:
- KD from the cache equals KD from the live teacher on the same top-k + tail support: the loss and the weight update
  (SGD, no clipping: -lr x the gradient) of one step on the same corpus windows, for forward KL, reverse KL and JSD;
  the vocabulary (1000 ids) is not a multiple of 128, so labels and cached ids land on both ranks' shards;
- a run mixing cached offline KD with on-policy continuations of corpus prefixes (`teacher.cache.live`,
  opd.mixtures.on_policy_fraction 0.5): both kinds of step happen; offline steps ask the cache once per replica and
  never the live teacher; on-policy steps ask the live teacher only, and their loss and update equal those of a
  live-teacher-only run on the same batch; a resume at step 2 replays steps 2 and 3 exactly."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.harness import run_distributed
from tests.opd import cache_mixed_workers as workers

pytestmark = pytest.mark.slow

VOCAB = 1000
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, num_heads=2, num_kv_heads=2, intermediate_size=128)


def _corpus(root: Path, name: str, documents: int, seed: int, tokenizer) -> Path:
    """`documents` random documents over every id of the vocabulary."""
    from opd_megatron.data.indexed import preprocess_jsonl
    from tests.tiny_hf import tiny_vocab

    words = [w for w in tiny_vocab(VOCAB)[4:] if w.isalnum()]
    pick = random.Random(seed)
    lines = [json.dumps({"text": " ".join(pick.choice(words) for _ in range(pick.randint(12, 40)))})
             for _ in range(documents)]
    (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    preprocess_jsonl(root / f"{name}.jsonl", root / name, tokenizer)
    return root / name


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """A tiny student and teacher (Hugging Face checkpoints, 1000 ids), training and held-out corpora, and the
    teacher's top-8 cache of the training corpus (`cache-teacher` with the in-process teacher, at TP=1)."""
    import yaml

    from opd_megatron.cli import main
    from opd_megatron.data.tokenizer import load_tokenizer
    from tests.tiny_hf import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("cache_mixed")
    teacher = write_tiny_checkpoint(root / "teacher", "llama", seed=4, num_layers=2, **SHAPE)
    student = write_tiny_checkpoint(root / "student", "llama", seed=7, num_layers=1, **SHAPE)
    tokenizer = load_tokenizer(str(teacher))
    train = _corpus(root, "train", 40, 1, tokenizer)
    held_out = _corpus(root, "held_out", 6, 2, tokenizer)
    config = {"run": {"seed": workers.SEED}, "model": {"vocab_size": VOCAB},
              "data": {"format": "indexed", "path": str(train), "tokenizer": str(teacher), "seq_length": 24},
              "parallel": {"micro_batch_size": 4, "global_batch_size": 8},
              "teacher": {"kind": "inprocess", "topk": 8, "inprocess": {"path": str(teacher)}}}
    (root / "cache.yaml").write_text(yaml.safe_dump(config))
    assert main(["cache-teacher", "--config", str(root / "cache.yaml"), "--output", str(root / "cache")]) == 0
    return {"teacher": str(teacher), "student": str(student), "train": str(train), "held_out": str(held_out),
            "cache": str(root / "cache"), "out": str(root / "runs")}


def test_cache_equals_live_at_tp2_and_a_mixed_run_mixes(files):
    results = run_distributed(workers.cache_against_live_and_mixed, world_size=2, args=(files,), timeout_s=900)
    first = next(r for r in results if r["rank"] == 0)
    for divergence, numbers in first["kd"].items():
        gaps = [rank["kd"][divergence]["update"] for rank in results]
        print(f"\n{divergence}: loss live {numbers['live']:.7g} cache {numbers['cache']:.7g} (relative gap "
              f"{abs(numbers['cache'] / numbers['live'] - 1):.2g}); weight update max |cache - live| / max |live| per "
              f"rank {[f'{gap / scale:.2g}' for gap, scale in gaps]}")
        assert min(numbers["labels_per_shard"]) > 0 and min(numbers["topk_per_shard"]) > 0, numbers
        assert abs(numbers["cache"] - numbers["live"]) <= 1e-3 * abs(numbers["live"]), (divergence, numbers)
        for rank in results:        # each rank's own shards of every weight
            gap, scale = rank["kd"][divergence]["update"]
            assert scale > 0 and gap <= 1e-2 * scale, (divergence, rank["rank"], gap, scale)

    steps = first["mixed"]
    print(f"\nmixed: {steps}\nresumed at {first['resumed_at']}: {first['resumed']}")
    assert [s["on_policy"] for s in steps] == [True, False, True, False]
    assert [s["metric_on_policy"] for s in steps] == [1.0, 0.0, 1.0, 0.0]          # metrics say which kind
    for rank in results:
        for step in rank["mixed"]:
            assert step["keyed"] != step["on_policy"]
            if step["on_policy"]:
                # The live teacher scores each micro-batch (8 rows / 4) inside the loss on every TP rank; no cache.
                assert (step["cache_requests"], step["live_requests"]) == (0, 2), step
            else:
                # The cache, once per replica on its scoring rank (TP rank 0, broadcast to TP rank 1); no live call.
                assert (step["cache_requests"], step["live_requests"]) == ((1, 0) if rank["rank"] == 0 else (0, 0))
    # The on-policy step equals the live-teacher-only run's on the same batch, from the same weights.
    assert steps[0]["loss"] == pytest.approx(steps[0]["live_only"], rel=1e-6)
    for rank in results:
        gap, scale = rank["mixed"][0]["update_vs_live_only"]
        assert gap <= 1e-6 * scale, (rank["rank"], gap, scale)
    assert first["teacher_name"].startswith("cache+")
    # Resume at step 2: the same kinds of step and the same losses.
    assert first["resumed_at"] == 2
    assert [(s["on_policy"], s["loss"]) for s in first["resumed"]] == [(s["on_policy"], s["loss"]) for s in steps[2:]]
