"""ColocatedTeacher: at TP=2 the rank shards of its logits, concatenated, equal the TP=1 teacher's logits and the
transformers forward (loaded from HF); its sampled logprobs equal megatron's vocab-parallel CE negated; its top-k
and extra-id logprobs equal the full-vocabulary ones; loaded from our megatron checkpoint it gives the same numbers;
at student PP=2 the teacher (all layers, on the last stage) gives the TP=1 result."""

import pytest
import torch

from tests.harness import run_distributed
from tests.student.test_hf_bridge import write_model
from tests.teachers import colocated_workers as w

TOL = 1e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("colocated")
    hf_dir = write_model(root / "qwen2", "qwen2", vocab_size=w.VOCAB)
    ranks = run_distributed(w.colocated_layouts, 2, args=(str(hf_dir), str(root / "ckpts")), timeout_s=300)
    return {"hf_dir": hf_dir, "ranks": ranks}


def _hf_logits(hf_dir, req):
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(req.tokens[:, :-1].clamp_min(0)).logits


def _tp2(runs, key):
    first, second = runs["ranks"][0][key], runs["ranks"][1][key]
    return torch.cat([first["logits_shard"], second["logits_shard"]], dim=-1), first, second


def _max(a, b, mask):
    return float((a - b)[mask].abs().max())


@pytest.mark.parametrize("source", ["hf", "ckpt"])
def test_tp2_shards_equal_tp1_and_transformers(runs, source):
    req = w.request()
    full, first, second = _tp2(runs, f"tp2_{source}")
    tp1 = runs["ranks"][1][f"pp2_{source}"]
    valid = tp1["valid"]
    assert full.shape == (3, 9, 512) and tp1["logits_shard"].shape == (3, 9, 512)
    assert _max(full, tp1["logits_shard"], valid) <= TOL
    hf = _hf_logits(runs["hf_dir"], req)
    assert _max(full[..., : w.VOCAB], hf, valid) <= TOL
    assert float(full[..., w.VOCAB:].abs().max()) == 0.0  # padding rows of the output layer are zero
    for rank in (first, second):  # results replicated on the TP ranks, equal to TP=1
        assert _max(rank["sampled"], tp1["sampled"], valid) <= 1e-5
        assert torch.equal(rank["topk_ids"], tp1["topk_ids"])
        assert _max(rank["extra"], tp1["extra"], valid) <= 1e-5


@pytest.mark.parametrize("key", ["tp2_hf", "tp2_ckpt", "pp2_hf", "pp2_ckpt"])
def test_sampled_logprobs_equal_megatron_cross_entropy(runs, key):
    rank = 1 if key.startswith("pp2") else 0
    assert runs["ranks"][rank][key]["ce_diff"] <= 1e-5


def test_topk_and_extra_equal_full_vocabulary_logprobs(runs):
    req = w.request()
    tp1 = runs["ranks"][1]["pp2_hf"]
    logprobs = torch.log_softmax(tp1["logits_shard"][..., : w.VOCAB], dim=-1)
    valid = tp1["valid"]
    ref_lp, ref_ids = torch.sort(logprobs, dim=-1, descending=True, stable=True)
    assert torch.equal(tp1["topk_ids"][valid], ref_ids[..., : w.TOPK][valid])
    assert _max(tp1["topk_logprobs"], ref_lp[..., : w.TOPK], valid) <= 1e-5
    used = valid.unsqueeze(-1) & (req.extra_ids >= 0)
    assert _max(tp1["extra"], logprobs.gather(-1, req.extra_ids.clamp_min(0)), used) <= 1e-5
    assert bool((tp1["extra"][req.extra_ids < 0] == 0).all())
    assert torch.equal(valid, req.valid_mask())


def test_pp2_teacher_lives_on_the_last_stage_with_every_layer(runs):
    assert runs["ranks"][0]["pp2_first_stage_holds"] is False
    assert runs["ranks"][1]["pp2_layers"] == [1, 2]
