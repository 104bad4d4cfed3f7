"""The vocab-parallel ops inside the real training pipeline: at TP=2 x PP=2 the loss runs on the last stage on
vocab-sharded logits (padded vocabulary) and trains the student exactly as megatron's cross-entropy at TP=1."""

from tests.harness import run_distributed
from tests.parallel import pipeline_workers as pw
from tests.student import parity_workers as w


def test_vocab_parallel_loss_at_tp2_pp2_trains_like_megatron_ce_at_tp1(tmp_path):
    init = str(tmp_path / "init")
    run_distributed(w.train_layout, 1, args=(1, 1, None, init, 0), timeout_s=120)
    reference = run_distributed(w.train_layout, 1, args=(1, 1, init, None, 3), timeout_s=180)[0]["losses"]
    ours = run_distributed(pw.train_with_vocab_parallel_loss, 4, args=(2, 2, init, 3), timeout_s=240)[0]
    assert ours and len(ours) == 3
    for step, (a, b) in enumerate(zip(ours, reference)):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: vocab-parallel loss {a} vs megatron CE {b}"
