"""Every corpus window the trainer draws reads back from a `cache-teacher` cache, the corpus's last, short window
included: its row as the trainer builds it (`CorpusPrompts.window` -> `window_batch`) passes the tokens check of the
cache (the crc `cache-teacher` wrote for the row it scored), end to end through the writer and `CachedTeacher`. Seen
failing before tools/cache_teacher.py::window_rows kept a short window's last label (it wrote a pad there):
tests/tools/test_cache_teacher_windows.py holds the rows equal, this the cache that results."""

from __future__ import annotations

import json
import random

from opd_megatron.cli import main
from opd_megatron.config import load_config
from opd_megatron.data import build_dataset
from opd_megatron.data.indexed import preprocess_jsonl
from opd_megatron.data.tokenizer import load_tokenizer
from opd_megatron.rollout.prompts import CorpusPrompts, window_batch
from opd_megatron.teachers.cached import CachedTeacher
from tests.tiny_hf import tiny_vocab, write_tiny_checkpoint

SEQ_LENGTH = 16


def test_the_last_short_window_reads_back(tmp_path):
    teacher_dir = write_tiny_checkpoint(tmp_path / "teacher", "llama", num_layers=1, hidden_size=64, num_heads=2,
                                        num_kv_heads=2, intermediate_size=128)
    tokenizer = load_tokenizer(str(teacher_dir))
    pick = random.Random(0)
    words = [w for w in tiny_vocab(512)[4:] if w.isalnum()]
    lines = [{"text": " ".join(pick.choice(words) for _ in range(pick.randint(5, 20)))} for _ in range(7)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    tokens = preprocess_jsonl(tmp_path / "corpus.jsonl", tmp_path / "corpus", tokenizer)["tokens"]
    assert (tokens - 1) % SEQ_LENGTH, "the corpus must end in a short window"
    overrides = ["model.vocab_size=512", "data.format=indexed", f"data.path={tmp_path / 'corpus'}",
                 f"data.tokenizer={teacher_dir}", f"data.seq_length={SEQ_LENGTH}", "teacher.kind=inprocess",
                 f"teacher.inprocess.path={teacher_dir}", "teacher.topk=4", "parallel.micro_batch_size=2",
                 "parallel.global_batch_size=2"]
    (tmp_path / "kd.yaml").write_text("{}\n")
    assert main(["cache-teacher", "--config", str(tmp_path / "kd.yaml"), "--output", str(tmp_path / "cache"),
                 *overrides]) == 0
    blend = build_dataset(load_config(None, overrides).data, tokenizer, seed=0)
    corpus = CorpusPrompts(blend, tokenizer, 4, 4, "test")
    last = next(i for i in range(4 * blend.num_windows)
                if blend.sample_identity(i).window_key == blend.num_windows - 1)
    batch = window_batch([corpus.window(last)], tokenizer.pad_id)
    scores = CachedTeacher(tmp_path / "cache").score(batch.teacher_request(topk=4))
    assert int(scores.valid.sum()) == (tokens - 1) % SEQ_LENGTH
