"""A small byte-level BPE tokenizer trained offline on a few lines, saved both as a bare tokenizer.json and as
an HF directory with a chat template."""

from pathlib import Path

import pytest

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TRAINING_LINES = ["hello world", "the quick brown fox jumps over the lazy dog", "what is two plus two", "four"]


@pytest.fixture(scope="session")
def bpe_paths(tmp_path_factory) -> dict[str, Path]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("bpe")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TRAINING_LINES * 4, trainer)
    tokenizer.save(str(root / "tokenizer.json"))
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(root / "hf"))
    return {"file": root / "tokenizer.json", "dir": root / "hf"}


@pytest.fixture(scope="session", autouse=True)
def _stop_the_vllm_server_at_the_end():
    """Whichever module started the shared real vLLM server (tests/teachers, tests/opd), it stops with the session."""
    yield
    from tests.teachers.vllm_server import stop_session_server
    stop_session_server()
