"""The run's progress bar and metrics.jsonl (loop/metrics.py): the bar shows the last step's loss and tokens/s, and
a record without them (an evaluation after the last step) leaves them as they were, not `nan` / 0."""

from __future__ import annotations

from opd_megatron.loop.metrics import MetricsWriter, read_metrics


def _last_bar_line(stderr: str) -> str:
    return [line for line in stderr.replace("\r", "\n").splitlines() if "train" in line][-1]


def test_progress_bar_keeps_the_last_steps_loss_and_tokens_per_s(tmp_path, capsys):
    with MetricsWriter(tmp_path, total_steps=2, start_step=0, enabled=True, tensorboard=False,
                       progress_bar=True) as writer:
        writer.log(1, {"loss": 0.5, "tokens_per_s": 1234.4})
        writer.advance()
        writer.log(2, {"loss": 0.25, "tokens_per_s": 2000.0})
        writer.advance()
        writer.log(2, {"eval/score": 0.75})          # the final evaluation: no loss, no tokens
    line = _last_bar_line(capsys.readouterr().err)
    assert "loss=0.2500" in line and "tok_s=2000" in line and "nan" not in line, line
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 2]


def test_progress_bar_before_any_step_shows_no_made_up_values(tmp_path, capsys):
    with MetricsWriter(tmp_path, total_steps=2, start_step=0, enabled=True, tensorboard=False,
                       progress_bar=True) as writer:
        writer.log(0, {"eval/score": 0.1})
        writer.advance()
    line = _last_bar_line(capsys.readouterr().err)
    assert "loss=" not in line and "tok_s=" not in line, line
