"""Tokenizers: one small interface, a built-in byte-level tokenizer, and a wrapper for local HF tokenizers.

`load_tokenizer(spec)` takes the `data.tokenizer` config value: "byte", a directory saved by `save_pretrained`
(tokenizer.json + tokenizer_config.json, optionally a chat template), or a bare tokenizer.json file. Nothing is
ever fetched from a hub: a tokenizer for a cluster run is copied next to the data, like the weights.

`encode` never adds special tokens: the datasets place bos/eos themselves, so a chat template that already
writes its own begin-of-text marker does not get a second one. `decode` drops special tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Protocol, Sequence


class Tokenizer(Protocol):
    vocab_size: int          # the true number of ids (every id the tokenizer can produce is < vocab_size)
    eos_id: int
    pad_id: int              # padding positions always carry loss_mask 0, so pad may equal eos
    bos_id: Optional[int]    # None: sequences start without a begin-of-sequence token

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    @property
    def has_chat_template(self) -> bool: ...

    def apply_chat_template(self, prompt: str) -> str:
        """The prompt as a single user turn, followed by the assistant-turn opening (text, not ids)."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then pad, bos, eos. Needs no files; for tests and quick runs."""

    pad_id = 256
    bos_id: Optional[int] = 257
    eos_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # A window or a sampled sequence may cut a multi-byte character: replace it rather than fail.
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    @property
    def has_chat_template(self) -> bool:
        return False

    def apply_chat_template(self, prompt: str) -> str:
        raise ValueError("the byte tokenizer has no chat template; set data.apply_chat_template=false or use an "
                         "HF tokenizer directory whose tokenizer_config.json / chat_template.jinja defines one")


# A bare tokenizer.json records which tokens are special but not their roles; these are the conventional names.
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|bos|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>")


class HFTokenizer:
    """A transformers fast tokenizer loaded from local files."""

    def __init__(self, hf_tokenizer: Any, source: str) -> None:
        self.hf = hf_tokenizer
        self.source = source
        special = {token: id_ for id_, token in _special_tokens(hf_tokenizer).items()}
        eos_id = hf_tokenizer.eos_token_id
        if eos_id is None:
            eos_id = _first_present(_EOS_NAMES, special)
        if eos_id is None:
            raise ValueError(f"tokenizer {source}: no end-of-sequence token; expected eos_token in "
                             f"tokenizer_config.json or a special token named one of {list(_EOS_NAMES)}")
        bos_id = hf_tokenizer.bos_token_id
        if bos_id is None:
            bos_id = _first_present(_BOS_NAMES, special)
        pad_id = hf_tokenizer.pad_token_id
        if pad_id is None:
            pad_id = _first_present(_PAD_NAMES, special)
        self.eos_id: int = int(eos_id)
        self.bos_id: Optional[int] = None if bos_id is None else int(bos_id)
        self.pad_id: int = self.eos_id if pad_id is None else int(pad_id)
        # len() counts added tokens too (the tokenizer's own `vocab_size` does not); the max() covers a file
        # whose added-token ids leave a gap above the base vocabulary.
        self.vocab_size: int = max(len(hf_tokenizer), max(hf_tokenizer.added_tokens_decoder, default=-1) + 1)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(self, prompt: str) -> str:
        if not self.has_chat_template:
            raise ValueError(f"tokenizer {self.source} has no chat template; set data.apply_chat_template=false "
                             f"or save one with the tokenizer (tokenizer_config.json or chat_template.jinja)")
        return self.hf.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)


def load_tokenizer(spec: str) -> Tokenizer:
    """"byte" -> ByteTokenizer; "task:NAME" -> a synthetic task's character tokenizer; an HF tokenizer directory
    or a tokenizer.json file -> HFTokenizer."""
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("task:"):
        from opd_megatron.tasks import get_task
        return get_task(spec[len("task:"):]).tokenizer()
    path = Path(spec)
    expected = ('expected "byte", a directory saved by save_pretrained (with tokenizer.json or '
                'tokenizer_config.json), or a tokenizer.json file')
    if path.is_dir():
        if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise FileNotFoundError(f"tokenizer directory {spec} has neither tokenizer.json nor "
                                    f"tokenizer_config.json; {expected}")
        from transformers import AutoTokenizer
        try:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"tokenizer directory {spec} could not be loaded: {exc}") from exc
        return HFTokenizer(hf, spec)
    if path.is_file():
        from transformers import PreTrainedTokenizerFast
        try:
            hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
        except Exception as exc:  # the tokenizers library raises its own Exception type on a bad file
            raise ValueError(f"tokenizer file {spec} is not a tokenizers-library tokenizer.json: {exc}") from exc
        return HFTokenizer(hf, spec)
    raise FileNotFoundError(f"tokenizer {spec!r} not found; {expected}")


def check_vocab_fits(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Fail before training when the tokenizer can produce ids the model's embedding does not have."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(f"tokenizer vocab_size {tokenizer.vocab_size} exceeds model.vocab_size "
                         f"{model_vocab_size}: ids up to {tokenizer.vocab_size - 1} would index past the "
                         f"embedding; set model.vocab_size >= {tokenizer.vocab_size} or use the model's tokenizer")


def _special_tokens(hf_tokenizer: Any) -> dict[int, str]:
    return {id_: added.content for id_, added in hf_tokenizer.added_tokens_decoder.items() if added.special}


def _first_present(names: Sequence[str], special: dict[str, int]) -> Optional[int]:
    return next((special[name] for name in names if name in special), None)
