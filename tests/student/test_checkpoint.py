"""dist_checkpointing checkpoints: resharding between layouts, resume with optimizer state at another layout,
atomic saves."""

import json
from pathlib import Path

import pytest
import torch

from opd_megatron.student.checkpoint import complete_iterations, resolve_checkpoint
from tests.harness import run_distributed
from tests.student import checkpoint_workers as cw
from tests.student import parity_workers as w


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_saved_at_tp2_loads_at_tp1_and_pp2_with_the_same_logits(tmp_path):
    saved = run_distributed(w.train_layout, 2, args=(2, 1, None, str(tmp_path / "tp2"), 1), timeout_s=180)
    ref = saved[0]["logits"]
    same = run_distributed(w.train_layout, 2, args=(2, 1, str(tmp_path / "tp2"), None, 0), timeout_s=180)
    assert torch.equal(same[0]["logits"], ref)  # same layout: bit-identical
    tp1 = run_distributed(w.train_layout, 1, args=(1, 1, str(tmp_path / "tp2"), None, 0), timeout_s=180)
    pp2 = run_distributed(w.train_layout, 2, args=(1, 2, str(tmp_path / "tp2"), None, 0), timeout_s=180)
    pp2_logits = next(r["logits"] for r in pp2 if r["logits"] is not None)
    assert ref.shape == (2, w.SEQ, w.VOCAB)
    # Across layouts only the float32 reduction order differs.
    assert _rel(tp1[0]["logits"], ref) <= 1e-6
    assert _rel(pp2_logits, ref) <= 1e-6


def test_resume_at_another_layout_continues_the_optimizer(tmp_path):
    """Save after 2 steps at TP=2 (weights + Adam moments + schedule), resume at TP=1 and at PP=2 for 2 more steps:
    the losses equal 4 uninterrupted steps at TP=2."""
    straight = run_distributed(w.train_layout, 2, args=(2, 1, None, None, 4), timeout_s=180)[0]["losses"]
    run_distributed(w.train_layout, 2, args=(2, 1, None, str(tmp_path / "half"), 2), timeout_s=180)
    for tp, pp in ((1, 1), (1, 2)):
        world = tp * pp
        resumed = run_distributed(w.train_layout, world, args=(tp, pp, str(tmp_path / "half"), None, 2, (), True, 2),
                                  timeout_s=180)[0]["losses"]
        for a, b in zip(resumed, straight[2:]):
            assert abs(a - b) <= 1e-5 * abs(b), f"tp={tp} pp={pp}: resumed loss {a} vs uninterrupted {b}"
    # Without the optimizer state the next step differs: the test would notice a lost Adam state.
    weights_only = run_distributed(w.train_layout, 1, args=(1, 1, str(tmp_path / "half"), None, 2, (), False, 2),
                                   timeout_s=180)[0]["losses"]
    assert abs(weights_only[1] - straight[3]) > 1e-4 * abs(straight[3])


def test_a_save_that_dies_midway_never_loads(tmp_path):
    ckpts = tmp_path / "ckpts"
    run_distributed(cw.save_then_crash_in_second_save, 1, args=(str(ckpts),), timeout_s=180)
    assert complete_iterations(ckpts) == [1]
    partials = sorted(p.name for p in ckpts.iterdir() if ".partial-" in p.name)
    assert len(partials) == 1 and partials[0].startswith("iter_0000002.partial-")
    assert resolve_checkpoint(ckpts) == ckpts / "iter_0000001"
    assert (ckpts / "latest").read_text() == "1"
    # The next save clears the partial directory and becomes the latest.
    run_distributed(cw.save_again, 1, args=(str(ckpts), 3), timeout_s=180)
    assert complete_iterations(ckpts) == [1, 3]
    assert not any(".partial-" in p.name for p in ckpts.iterdir())
    assert resolve_checkpoint(ckpts) == ckpts / "iter_0000003"


def test_resolve_checkpoint_rejects_an_incomplete_directory(tmp_path):
    broken = tmp_path / "iter_0000004"
    broken.mkdir()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        resolve_checkpoint(broken)
    assert resolve_checkpoint(tmp_path) is None
    assert json.dumps(complete_iterations(Path(tmp_path))) == "[]"


@pytest.mark.slow
def test_checkpoint_faults_on_two_ranks(tmp_path):
    """Checkpoint faults on 2 ranks at TP=2, one spawn, the cases in order (tests/student/checkpoint_workers.py::
    checkpoint_faults): a failed save, keep_last beside a stale newer checkpoint, a truncated shard, a flipped byte
    found by its checksum and the fallback to the previous checkpoint, a NaN in the weights at a save."""
    root = tmp_path / "ckpts"
    seen = run_distributed(cw.checkpoint_faults, 2, args=(str(root),), timeout_s=240)
    for rank, rank_seen in enumerate(seen):
        # 1. A shard write that fails on rank 1 (EFBIG, as a full disk fails one) stops both ranks with an error
        #    naming the checkpoint and the cause; no partial directory is left; `latest` names iteration 1 still.
        message = rank_seen["save_error"]
        assert message.startswith("CheckpointSaveError: saving checkpoint"), message
        assert str(root / "iter_0000002") in message and "iter_0000001" in message, message
        assert rank_seen["after_failed_save"] == ["iter_0000001", "latest"], rank_seen["after_failed_save"]
        assert rank_seen["latest_after_failed_save"] == "1"
        # 2. keep_last=1 keeps the checkpoint just saved (which `latest` names), whatever newer iteration is there.
        assert "iter_0000003" in rank_seen["after_keep_last"], rank_seen["after_keep_last"]
        assert rank_seen["resolved_after_keep_last"] == str(root / "iter_0000003")
        # 3. A truncated shard is named before anything is read.
        message = rank_seen["truncated_load_error"]
        assert message.startswith("CheckpointCorruptError"), message
        assert "iter_0000003" in message and "__1_0.distcp" in message and "truncated" in message, message
        # 4. A flipped byte (size unchanged) is found by its sha256; without the fallback the error says how to
        #    fall back; with it, iteration 4 loads, 5 is renamed out of the way and `latest` names 4.
        message = rank_seen["no_fallback_error"]
        assert message.startswith("CheckpointCorruptError") and "iter_0000005" in message, message
        assert "__1_0.distcp: sha256 differs" in message and "checkpoint.fallback_to_previous=true" in message
        assert rank_seen["fallbacks"] == [str(root / "iter_0000004"), str(root / "iter_0000003")]
        assert rank_seen["after_fallback"] == ["iter_0000003", "iter_0000004", "iter_0000005.corrupt", "latest"]
        assert rank_seen["latest_after_fallback"] == "4"
        # 5. A NaN in one rank's weights: no rank saves, the checkpoints are as they were.
        assert "NaN/inf (non-finite); not saving over the last checkpoint" in rank_seen["nan_save_error"]
        assert "iter_0000004" in rank_seen["nan_save_error"]
        assert rank_seen["after_nan_save"] == rank_seen["after_fallback"]
    # The cause is rank 0's to name (dist_checkpointing gathers the failed writes on its coordinator): rank 1 and
    # its error (torch's stream writer reports the short write as "unexpected pos", not as EFBIG).
    assert "rank 1: " in seen[0]["save_error"], seen[0]["save_error"]
    assert "another rank" in seen[1]["save_error"], seen[1]["save_error"]


def _fake_checkpoint(checkpoints: Path, iteration: int, files: dict[str, bytes], checksums: bool = True) -> Path:
    """A checkpoint directory as save_checkpoint lays it out (metadata.json, shards, a manifest), without megatron."""
    import hashlib
    path = checkpoints / f"iter_{iteration:07d}"
    path.mkdir(parents=True)
    files = {"metadata.json": b"{}", **files}
    manifest = {}
    for name, data in files.items():
        (path / name).write_bytes(data)
        manifest[name] = {"bytes": len(data), **({"sha256": hashlib.sha256(data).hexdigest()} if checksums else {})}
    (path / "manifest.json").write_text(json.dumps({"format": 1, "files": manifest}))
    return path


def test_verify_names_missing_truncated_and_flipped_files_and_splits_the_hashing(tmp_path):
    from opd_megatron.student.checkpoint import verify_checkpoint
    path = _fake_checkpoint(tmp_path, 1, {"__0_0.distcp": b"a" * 100, "__1_0.distcp": b"b" * 100, "common.pt": b"c"})
    assert verify_checkpoint(path, checksums=True) == []
    (path / "__0_0.distcp").write_bytes(b"a" * 99)                       # truncated
    (path / "__1_0.distcp").write_bytes(b"b" * 99 + b"x")                # same size, one byte flipped
    (path / "common.pt").unlink()
    assert verify_checkpoint(path) == ["__0_0.distcp: 99 bytes, the manifest says 100 (truncated or overwritten)",
                                       "common.pt: missing"]                 # sizes only: the flip goes unseen
    flipped = "__1_0.distcp: sha256 differs from the manifest's (corrupt bytes)"
    assert flipped in verify_checkpoint(path, checksums=True)
    # Two ranks split the hashing (file i on rank i % 2): the flipped file (index 1 of 4, sorted) is rank 1's.
    assert flipped not in verify_checkpoint(path, checksums=True, share=(0, 2))
    assert flipped in verify_checkpoint(path, checksums=True, share=(1, 2))
    (path / "manifest.json").write_text("{not json")
    assert verify_checkpoint(path)[0].startswith("manifest.json: unreadable")
    (path / "manifest.json").unlink()
    assert verify_checkpoint(path) == []                                 # saved before manifests: unverified


def test_keep_last_keeps_the_current_and_the_newest_good_older_ones(tmp_path):
    """After saving 5 with keep_last=2: 5 stays (`latest` names it), the newest older one that verifies stays (3:
    4 is truncated), the rest of the older ones go, and 7 (a newer iteration of a timeline the run went back from)
    is left alone. The old rule (the newest keep_last of all) deleted 5 and 3 and kept the corrupt 4 and 7."""
    from opd_megatron.student.checkpoint import prune
    for iteration in (1, 2, 3, 4, 5, 7):
        _fake_checkpoint(tmp_path, iteration, {"__0_0.distcp": b"w" * 10})
    (tmp_path / "iter_0000004" / "__0_0.distcp").write_bytes(b"w")
    assert prune(tmp_path, keep_last=2, current=5) == [1, 2, 4]
    assert complete_iterations(tmp_path) == [3, 5, 7]
    assert prune(tmp_path, keep_last=1, current=5) == [3]
    assert complete_iterations(tmp_path) == [5, 7]
    assert prune(tmp_path, keep_last=0, current=5) == []                 # 0 keeps all


def test_quarantine_and_older_checkpoints(tmp_path):
    from opd_megatron.student.checkpoint import older_checkpoints, quarantine
    for iteration in (2, 4, 6):
        _fake_checkpoint(tmp_path, iteration, {})
    assert older_checkpoints(tmp_path / "iter_0000006") == [tmp_path / "iter_0000004", tmp_path / "iter_0000002"]
    assert quarantine(tmp_path / "iter_0000004") == tmp_path / "iter_0000004.corrupt"
    _fake_checkpoint(tmp_path, 4, {})
    assert quarantine(tmp_path / "iter_0000004") == tmp_path / "iter_0000004.corrupt-2"
    assert complete_iterations(tmp_path) == [2, 6]


def test_sgd_momentum_survives_a_resume(tmp_path):
    assert run_distributed(cw.sgd_momentum_round_trip, 1, args=(str(tmp_path / "ckpts"),))[0]["equal"]
