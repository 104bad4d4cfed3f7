"""The rows `cache-teacher` scores are the windows the trainer reads: for every window of a corpus, the last partial
one included, `window_rows` gives the tokens `CorpusBlend.window_tokens` gives the OPD loop (whose rows a
`teacher.kind: cache` run checks against the crc the cache wrote). Before the fix the partial last window's last
real token was a pad: the cache scored a token the corpus does not have there, and training refused the cache."""


from opd_megatron.data import build_dataset
from opd_megatron.data.tokenizer import load_tokenizer
from opd_megatron.config import load_config
from opd_megatron.tools.cache_teacher import window_rows
from tests.tiny_hf import write_tiny_checkpoint, write_tiny_corpus

SEQ_LENGTH = 16


def test_window_rows_are_the_trainers_windows_the_partial_last_one_too(tmp_path):
    teacher_dir = write_tiny_checkpoint(tmp_path / "teacher", "llama", num_layers=1)
    tokenizer = load_tokenizer(str(teacher_dir))
    write_tiny_corpus(tmp_path, "corpus", tokenizer, documents=9, seed=1)
    cfg = load_config(None, ["data.format=indexed", f"data.path={tmp_path / 'corpus'}", f"data.tokenizer={teacher_dir}",
                             f"data.seq_length={SEQ_LENGTH}", "model.vocab_size=512"])
    blend = build_dataset(cfg.data, tokenizer, seed=0)
    corpus = blend.corpora[0]
    assert corpus.num_tokens % SEQ_LENGTH not in (0, 1), "the corpus must end in a partial window"
    seen = set()
    for index in range(blend.num_windows * 2):
        key = blend.sample_identity(index).window_key
        ids, _ = blend.window_tokens(index)
        tokens, lengths = window_rows(blend, [key])
        assert int(lengths[0]) == len(ids), (key, int(lengths[0]), len(ids))
        assert tokens[0, : len(ids)].tolist() == [int(t) for t in ids], key
        seen.add(key)
    assert seen == set(range(blend.num_windows))
