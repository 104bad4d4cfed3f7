"""InProcessTeacher: its numbers equal a direct transformers forward of each row (float32), the columns are
label-aligned (column j = a forward of the prefix tokens[:j+1]), top-k is in descending order with ties to the
lower id, extra ids are scored, batch chunking changes nothing, and a vocabulary mismatch is a clear error."""

import pytest
import torch

from opd_megatron.teachers.base import TeacherError, TeacherRequest
from opd_megatron.teachers.inprocess import InProcessTeacher, descending_topk
from tests.tiny_hf import write_tiny_checkpoint

VOCAB = 512


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("inprocess") / "llama", "llama", num_layers=1)


@pytest.fixture(scope="module")
def hf_model(llama_dir):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()


def make_request(topk=5, extra=3):
    gen = torch.Generator().manual_seed(11)
    lengths = torch.tensor([9, 5, 12])
    tokens = torch.randint(0, VOCAB, (3, 12), generator=gen)
    tokens[1, 5:] = -7  # pad values are never read
    extra_ids = torch.randint(0, VOCAB, (3, 11, extra), generator=gen)
    extra_ids[:, :, -1] = -1
    return TeacherRequest(tokens=tokens, lengths=lengths, score_start=torch.tensor([2, 0, 4]), topk=topk,
                          extra_ids=extra_ids)


def row_logprobs(model, request, b, temperature=1.0):
    """Direct forward of row b alone (no padding): `[lengths[b] - 1, V]` label-aligned logprobs."""
    with torch.no_grad():
        logits = model(request.tokens[b: b + 1, : int(request.lengths[b])]).logits[0, :-1]
    return torch.log_softmax(logits.float() / temperature, dim=-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_equal_a_direct_forward(llama_dir, hf_model, temperature):
    request = make_request()
    scores = InProcessTeacher(llama_dir, temperature=temperature, batch_chunk=2).score(request)
    assert torch.equal(scores.valid, request.valid_mask())
    for b in range(request.batch_size):
        n = int(request.lengths[b]) - 1
        ref = row_logprobs(hf_model, request, b, temperature)
        valid = scores.valid[b, :n]
        labels = request.tokens[b, 1: n + 1]
        torch.testing.assert_close(scores.sampled_logprobs[b, :n][valid],
                                   ref.gather(-1, labels[:, None])[:, 0][valid], atol=1e-5, rtol=0)
        ref_lp, ref_ids = torch.sort(ref, dim=-1, descending=True, stable=True)
        assert torch.equal(scores.topk_ids[b, :n][valid], ref_ids[:, :5][valid])
        torch.testing.assert_close(scores.topk_logprobs[b, :n][valid], ref_lp[:, :5][valid], atol=1e-5, rtol=0)
        ids = request.extra_ids[b, :n]
        used = valid[:, None] & (ids >= 0)
        torch.testing.assert_close(scores.extra_logprobs[b, :n][used], ref.gather(-1, ids.clamp_min(0))[used],
                                   atol=1e-5, rtol=0)
        assert bool((scores.extra_logprobs[b, :n][ids < 0] == 0).all())
    assert bool((scores.sampled_logprobs[~scores.valid] == 0).all())


def test_column_j_scores_token_j_plus_1_given_the_prefix(llama_dir, hf_model):
    request = make_request(topk=0, extra=1)
    scores = InProcessTeacher(llama_dir).score(request)
    b = 0
    for j in range(int(request.score_start[b]), int(request.lengths[b]) - 1):
        with torch.no_grad():
            logits = hf_model(request.tokens[b: b + 1, : j + 1]).logits[0, -1]
        expected = torch.log_softmax(logits, -1)[request.tokens[b, j + 1]]
        assert abs(float(scores.sampled_logprobs[b, j]) - float(expected)) < 1e-5, j


def test_chunking_and_full_logits(llama_dir, hf_model):
    request = make_request()
    one = InProcessTeacher(llama_dir, batch_chunk=1, full_logits=True, padded_vocab_size=640).score(request)
    all_rows = InProcessTeacher(llama_dir, batch_chunk=8).score(request)
    torch.testing.assert_close(one.sampled_logprobs, all_rows.sampled_logprobs, atol=1e-5, rtol=0)
    assert torch.equal(one.topk_ids, all_rows.topk_ids)
    assert all_rows.logits_shard is None and one.logits_shard.shape == (3, 11, 640)
    assert bool((one.logits_shard[..., VOCAB:] == 0).all())
    with torch.no_grad():
        ref = hf_model(request.tokens[2:3]).logits[0, :-1]
    torch.testing.assert_close(one.logits_shard[2, :, :VOCAB], ref, atol=1e-5, rtol=0)


def test_topk_ties_go_to_the_lower_id():
    values = torch.tensor([[0.5, 2.0, 2.0, 1.0]])    # candidates in ascending id order (ids 3, 5, 8, 9)
    ids = torch.tensor([[3, 5, 8, 9]])
    got_values, got_ids = descending_topk(values, ids)
    assert got_ids.tolist() == [[5, 8, 9, 3]] and got_values.tolist() == [[2.0, 2.0, 1.0, 0.5]]


def test_vocabulary_mismatch_is_a_clear_error(llama_dir):
    with pytest.raises(TeacherError, match="vocabulary mismatch: the teacher has 512 tokens, the student 600"):
        InProcessTeacher(llama_dir, student_vocab_size=600)
    request = make_request()
    tokens = request.tokens.clone()
    tokens[0, 3] = 700  # an id the teacher does not have
    bad = TeacherRequest(tokens=tokens, lengths=request.lengths, score_start=request.score_start)
    with pytest.raises(TeacherError, match=r"ids must lie in \[0, 512\).*teacher vocabulary 512"):
        InProcessTeacher(llama_dir).score(bad)
