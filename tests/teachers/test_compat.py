"""Vocabulary compatibility: equal tokenizers pass (padded embeddings too); a different size, special id, probe
encoding (same map, other pre-tokeniser), token map, or a short embedding is a VocabMismatchError saying what
differs; a served teacher is checked on its reported size; chat templates are compared and reported."""

import pytest

from opd_megatron.data.tokenizer import ByteTokenizer, load_tokenizer
from opd_megatron.teachers.compat import (VocabMismatchError, check_teacher_compatible, check_teachers_compatible,
                                          check_vocab_compatible)
from tests.teachers.reference_teacher import ModelTeacher, TinyCausalLM
from tests.tiny_hf import tiny_vocab, write_tiny_tokenizer


def _word_level(directory, vocab, pre_tokenizer="Whitespace", eos="</s>"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = getattr(pre_tokenizers, pre_tokenizer)()
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token=eos, unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(str(directory))
    return load_tokenizer(str(directory))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    for name, size in (("a", 512), ("b", 512), ("small", 500)):
        write_tiny_tokenizer(root / name, size)
    base = {w: i for i, w in enumerate(tiny_vocab(512))}
    swapped = dict(base, **{"1": base["2"], "2": base["1"]})
    out = {name: load_tokenizer(str(root / name)) for name in ("a", "b", "small")}
    out["swapped"] = _word_level(root / "swapped", swapped)
    out["split"] = _word_level(root / "split", base, pre_tokenizer="WhitespaceSplit")
    out["eos"] = _word_level(root / "eos", base, eos="<unk>")
    return out


def test_same_tokenizer_passes_and_reports_what_was_checked(tokenizers):
    report = check_vocab_compatible(tokenizers["a"], teacher_tokenizer=tokenizers["b"], teacher_name="t",
                                    student_embedding_rows=640, teacher_embedding_rows=512)
    assert report.true_vocab_size == 512
    assert report.special_ids == {"eos": 2, "bos": 1, "pad": 0}
    assert report.probes_checked == 15 and report.full_map_checked
    assert report.chat_template == "none"
    assert "teacher t: vocabulary 512 ids, compatible (15 probes, full token map)" in report.lines()[0]


def test_padded_embeddings_are_fine_but_a_short_embedding_is_not(tokenizers):
    # Qwen style: 152064 embedding rows for a 151936-id vocabulary, here 640 rows for 512 ids.
    check_vocab_compatible(tokenizers["a"], teacher_vocab_size=512, student_embedding_rows=640,
                           teacher_embedding_rows=640)
    with pytest.raises(VocabMismatchError, match="the teacher big model's embedding has 500 rows, fewer than the "
                                                 "512 ids"):
        check_vocab_compatible(tokenizers["a"], teacher_vocab_size=512, teacher_name="big",
                               teacher_embedding_rows=500)
    with pytest.raises(VocabMismatchError, match="student model's embedding has 511 rows"):
        check_vocab_compatible(tokenizers["a"], teacher_vocab_size=512, student_embedding_rows=511)


def test_different_true_sizes(tokenizers):
    with pytest.raises(VocabMismatchError, match="student tokenizer 512 ids, the teacher tokenizer's 500"):
        check_vocab_compatible(tokenizers["a"], teacher_tokenizer=tokenizers["small"])
    with pytest.raises(VocabMismatchError, match="student tokenizer 259 ids, the teacher tokenizer's 512"):
        check_vocab_compatible(ByteTokenizer(), teacher_tokenizer=tokenizers["a"])


def test_served_teacher_checked_on_its_reported_size(tokenizers):
    report = check_vocab_compatible(tokenizers["a"], teacher_vocab_size=512)
    assert report.probes_checked == 0 and not report.full_map_checked
    with pytest.raises(VocabMismatchError, match=r"the teacher's reported 640; if 640 is the teacher model's "
                                                 r"padded embedding size"):
        check_vocab_compatible(tokenizers["a"], teacher_vocab_size=640)
    teacher = ModelTeacher(TinyCausalLM(512), 512, name="served")
    assert check_teacher_compatible(tokenizers["a"], teacher, tokenizers["b"]).teacher == "served"
    with pytest.raises(VocabMismatchError, match="student vs teacher served: true vocabulary sizes differ"):
        check_teacher_compatible(ByteTokenizer(), teacher)
    with pytest.raises(ValueError, match="neither"):
        check_vocab_compatible(tokenizers["a"])


def test_first_differing_probe_and_its_ids(tokenizers):
    # '1' and '2' swap ids (31 <-> 32): "0123456789" is one unknown word on both sides, the spaced digits differ.
    with pytest.raises(VocabMismatchError) as err:
        check_vocab_compatible(tokenizers["a"], teacher_tokenizer=tokenizers["swapped"])
    assert str(err.value) == ("student vs teacher teacher: probe '0 1 2 3 4 5 6 7 8 9' encodes differently: student "
                              "[30, 31, 32, 33, 34, 35, 36, 37, 38, 39], teacher [30, 32, 31, 33, 34, 35, 36, 37, "
                              "38, 39] (first difference at position 1)")


def test_same_token_map_other_pre_tokenizer_is_caught_by_probes(tokenizers):
    unk, dot = 3, tiny_vocab(512).index(".")
    with pytest.raises(VocabMismatchError) as err:
        check_vocab_compatible(tokenizers["a"], teacher_tokenizer=tokenizers["split"])
    message = str(err.value)
    assert "probe 'The quick brown fox jumps over the lazy dog.'" in message
    # "dog." is "dog" + "." under Whitespace, one unknown word under WhitespaceSplit.
    assert f"student [{unk}, {unk}, {unk}, {unk}, {unk}, {unk}, {unk}, {unk}, {unk}, {dot}], teacher [{unk}, " \
           f"{unk}, {unk}, {unk}, {unk}, {unk}, {unk}, {unk}, {unk}] (first difference at position 9)" in message


def test_special_ids(tokenizers):
    with pytest.raises(VocabMismatchError, match="eos ids differ: student 2, teacher 3"):
        check_vocab_compatible(tokenizers["a"], teacher_tokenizer=tokenizers["eos"])


def test_token_map_difference_outside_the_probes(tmp_path, tokenizers):
    base = {w: i for i, w in enumerate(tiny_vocab(512))}
    other = _word_level(tmp_path / "w", dict(base, w7=base["w8"], w8=base["w7"]))
    with pytest.raises(VocabMismatchError, match="token 'w7' has id 56 in the student's vocabulary, 57 in the "
                                                 "teacher's"):
        check_vocab_compatible(tokenizers["a"], teacher_tokenizer=other)
    # The same pair with the roles exchanged names the same token first: w7 and w8 tie on their lower id (56) and
    # the tie goes to the name, whichever side is the student.
    with pytest.raises(VocabMismatchError, match="token 'w7' has id 57 in the student's vocabulary, 56 in the "
                                                 "teacher's"):
        check_vocab_compatible(other, teacher_tokenizer=tokenizers["a"])


def test_chat_templates_compared_and_reported(bpe_paths):
    with_template = load_tokenizer(str(bpe_paths["dir"]))
    bare = load_tokenizer(str(bpe_paths["file"]))
    report = check_vocab_compatible(with_template, teacher_tokenizer=load_tokenizer(str(bpe_paths["dir"])))
    assert report.chat_template == "same" and report.probes_checked == 16   # + the rendered template
    assert check_vocab_compatible(with_template, teacher_tokenizer=bare).chat_template == "student only"
    assert check_vocab_compatible(bare, teacher_tokenizer=with_template).chat_template == "teacher only"
    with pytest.raises(VocabMismatchError, match="chat templates: student only"):
        check_vocab_compatible(with_template, teacher_tokenizer=bare, require_same_chat_template=True)


def test_several_teachers(tokenizers):
    teachers = {"math": ModelTeacher(TinyCausalLM(512), 512, name="m"),
                "code": ModelTeacher(TinyCausalLM(512), 512, name="c")}
    reports = check_teachers_compatible(tokenizers["a"], teachers, {"math": tokenizers["b"]})
    assert reports["math"].full_map_checked and reports["code"].probes_checked == 0
    with pytest.raises(VocabMismatchError, match="student vs teacher code: probe"):
        check_teachers_compatible(tokenizers["a"], teachers, {"code": tokenizers["swapped"]})
    with pytest.raises(ValueError, match=r"unknown teachers \['chat'\]"):
        check_teachers_compatible(tokenizers["a"], teachers, {"chat": tokenizers["b"]})
