"""On-policy continuations of corpus prefixes (`rollout.source: corpus`, issue 15): prompts cut from an indexed
corpus, never across a document, the corpus's own continuation as the reference, mixed with offline rows by
`opd.mixtures.on_policy_fraction`, evaluated on a held-out corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opd_megatron.rollout.prompts import corpus_prompt

REPO = Path(__file__).resolve().parents[2]


class _Tokens:
    def decode(self, ids):
        return " ".join(map(str, ids))


def test_a_corpus_prompt_keeps_to_one_document():
    ids = [10, 11, 12, 13, 14, 15, 16, 17, 18]
    # One document: the first 4 tokens, continued by up to 3.
    prompt = corpus_prompt(_Tokens(), ids, [0] * 9, prefix_tokens=4, continuation_tokens=3)
    assert prompt.ids == [10, 11, 12, 13] and prompt.reference == [14, 15, 16]
    # A document starts at token 2: the prompt starts there; the continuation stops where the document ends.
    documents = [0, 0, 1, 1, 1, 2, 2, 2, 2]
    prompt = corpus_prompt(_Tokens(), ids, documents, prefix_tokens=4, continuation_tokens=3)
    assert prompt.ids == [12, 13] and prompt.reference == [14]
    # The prefix ends its document: nothing to continue.
    assert corpus_prompt(_Tokens(), ids, [0, 0, 0, 0, 1, 1, 1, 1, 1], prefix_tokens=4, continuation_tokens=3) is None


def _corpus(tmp_path: Path, name: str, documents: int, seed: int) -> Path:
    import random

    from opd_megatron.data.indexed import preprocess_jsonl
    from opd_megatron.data.tokenizer import load_tokenizer

    rng = random.Random(seed)
    words = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [f"w{i}" for i in range(40)]
    lines = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(12, 40)))})
             for _ in range(documents)]
    (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    preprocess_jsonl(tmp_path / f"{name}.jsonl", tmp_path / name, load_tokenizer(str(tmp_path / "teacher")))
    return tmp_path / name


@pytest.mark.slow
def test_opd_on_corpus_prefixes_mixed_with_offline_rows(tmp_path):
    from tests.tiny_hf import write_tiny_checkpoint

    teacher = write_tiny_checkpoint(tmp_path / "teacher", arch="llama", seed=4)
    train, held_out = _corpus(tmp_path, "train", 60, seed=1), _corpus(tmp_path, "held_out", 10, seed=2)
    args = ["train", f"run.output_dir={tmp_path}", "run.name=corpus", "run.algorithm=opd", "run.train_steps=4",
            "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
            "model.vocab_size=512", "model.max_position_embeddings=64", f"data.tokenizer={teacher}",
            "data.format=indexed", f"data.path={train}", "data.seq_length=32", "parallel.micro_batch_size=4",
            "parallel.global_batch_size=8", "rollout.source=corpus", "rollout.prefix_tokens=8",
            "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=8",
            "opd.mixtures.on_policy_fraction=0.5", "teacher.kind=inprocess", f"teacher.inprocess.path={teacher}",
            f"eval.path={held_out}", "eval.prompts=4", "logging.rollouts=8", "logging.progress_bar=false",
            "logging.tensorboard=false"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-m", "opd_megatron", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    run_dir = tmp_path / "corpus"
    steps = [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4] and all(m["tokens/count"] > 0 for m in steps)
    rows = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    on_policy = {row["step"] for row in rows if row["on_policy"]}
    assert 0 < len(on_policy) < 4, on_policy           # both kinds of step in 4 (seeded; on-policy fraction 0.5)
    # Every prompt is a run of one training document's words, never one of the held-out corpus.
    train_docs = [json.loads(line)["text"] for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    held_docs = [json.loads(line)["text"] for line in (tmp_path / "held_out.jsonl").read_text().splitlines()]
    for row in rows:
        prompt = row["prompt"].strip()
        assert any(prompt in doc for doc in train_docs), prompt
        if len(prompt.split()) >= 5:        # 5 random words of 66 are in no held-out document by chance
            assert not any(prompt in doc for doc in held_docs), prompt


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "opd_megatron", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_kd_from_the_teacher_cache_trains_as_the_live_teacher(tmp_path):
    """Offline corpus KD (on_policy_fraction 0: whole windows, forward KL on the teacher's top-8 + tail), once with
    the in-process teacher and once from a cache `cache-teacher` wrote with it: the same losses step by step
    (SGD without clipping, so a different gradient would move step 2's loss), within the cache's encoding error."""
    import yaml

    from tests.tiny_hf import write_tiny_checkpoint

    teacher = write_tiny_checkpoint(tmp_path / "teacher", arch="llama", seed=4)
    train, held_out = _corpus(tmp_path, "train", 40, seed=1), _corpus(tmp_path, "held_out", 8, seed=2)
    config = {"run": {"algorithm": "opd", "train_steps": 3, "seed": 2, "output_dir": str(tmp_path)},
              "model": {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
                        "vocab_size": 512, "max_position_embeddings": 64},
              "data": {"tokenizer": str(teacher), "format": "indexed", "path": str(train), "seq_length": 32},
              "parallel": {"micro_batch_size": 4, "global_batch_size": 8},
              "optim": {"optimizer": "sgd", "lr": 0.5, "clip_grad": 0.0, "sgd_momentum": 0.0},
              "rollout": {"source": "corpus", "prefix_tokens": 8, "prompts_per_step": 4, "samples_per_prompt": 2,
                          "max_new_tokens": 8},
              "teacher": {"kind": "inprocess", "topk": 8, "inprocess": {"path": str(teacher)}},
              "opd": {"mixtures": {"on_policy_fraction": 0.0}, "loss": "divergence",
                      "route_a": {"divergence": "forward_kl", "support": "teacher_topk", "support_k": 8,
                                  "support_mode": "tail"}},
              "eval": {"path": str(held_out), "prompts": 4},
              "logging": {"progress_bar": False, "tensorboard": False}}
    (tmp_path / "kd.yaml").write_text(yaml.safe_dump(config))
    cached = _cli("cache-teacher", "--config", str(tmp_path / "kd.yaml"), "--output", str(tmp_path / "cache"))
    assert cached.returncode == 0, cached.stdout[-2000:] + cached.stderr[-3000:]
    losses = {}
    for name, extra in (("live", []), ("cache", ["teacher.kind=cache", f"teacher.cache.path={tmp_path / 'cache'}"])):
        result = _cli("train", "--config", str(tmp_path / "kd.yaml"), f"run.name={name}", *extra)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        steps = [m for m in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
                 if "loss" in m]
        losses[name] = [m["loss"] for m in steps]
        summary = json.loads((tmp_path / name / "summary.json").read_text())
    print(f"\nlive {losses['live']}\ncache {losses['cache']}")
    assert len(losses["cache"]) == 3
    for live, cache in zip(losses["live"], losses["cache"]):
        assert abs(live - cache) <= 1e-3 * abs(live), (losses["live"], losses["cache"])   # measured 6e-5
    # The cache run's evaluation: the held-out corpus's per-token NLL (a cache cannot score student samples).
    assert summary["rkl_after"] is None and "held-out per-token NLL" in result.stdout
