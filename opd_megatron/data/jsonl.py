"""JSONL training data: the line format, its errors, and the SFT sample/batch that every dataset serves.

Each non-blank line is a JSON object of one of two kinds (key names are configurable, see DataSection):
    {"prompt": "What is 2+2?", "response": "4"}   loss on the response tokens and the eos after them
    {"text": "Any document."}                      loss on every token, eos appended
A malformed line is a `DataError` naming the file, the 1-based line number and what was expected, or, with
skip_malformed, is skipped and its line number recorded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from opd_megatron.data.tokenizer import Tokenizer


class DataError(ValueError):
    """A data file is malformed; the message names the file, the line and what was expected."""


@dataclass
class SftSample:
    """One training sequence of length S, already shifted: labels[t] is the token that follows tokens[t].
    Several documents packed into one sequence (an indexed corpus, data/indexed.py) may carry per-position
    position ids and document ids; None means the sequence is one document at positions 0..S-1."""
    tokens: torch.Tensor      # [S] int64 input ids
    labels: torch.Tensor      # [S] int64 next-token targets (pad_id where padded: always a valid id)
    loss_mask: torch.Tensor   # [S] float32, 1.0 where labels[t] trains
    position_ids: Optional[torch.Tensor] = None   # [S] int64, restarting at each document (data.reset_position_ids)
    document_ids: Optional[torch.Tensor] = None   # [S] int64, each position's document (data.reset_attention_mask)


@dataclass
class SftBatch:
    tokens: torch.Tensor      # [B, S] int64
    labels: torch.Tensor      # [B, S] int64
    loss_mask: torch.Tensor   # [B, S] float32
    position_ids: Optional[torch.Tensor] = None   # [B, S] int64, or None: 0..S-1 in every row
    document_ids: Optional[torch.Tensor] = None   # [B, S] int64, or None: each row one document

    def to(self, device: torch.device | str) -> "SftBatch":
        return SftBatch(self.tokens.to(device), self.labels.to(device), self.loss_mask.to(device),
                        None if self.position_ids is None else self.position_ids.to(device),
                        None if self.document_ids is None else self.document_ids.to(device))

    def model_inputs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(input ids [B, S], position ids [B, S], attention mask [B, 1, S, S] or None) for the student's forward
        (student/schedule.py). The mask, where document ids are given, is True where query t may not attend to key
        u: u > t or another document (megatron-core's convention: masked scores are filled with -10000); None
        leaves the plain causal mask to the attention."""
        tokens = self.tokens.to(device)
        if self.position_ids is not None:
            position_ids = self.position_ids.to(device)
        else:
            position_ids = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
        if self.document_ids is None:
            return tokens, position_ids, None
        documents = self.document_ids.to(device)
        causal = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool, device=device).tril()
        same_document = documents.unsqueeze(2) == documents.unsqueeze(1)   # [B, S query, S key]
        return tokens, position_ids, (~(same_document & causal)).unsqueeze(1)


def collate(samples: Sequence[SftSample]) -> SftBatch:
    if not samples:
        raise ValueError("collate: expected at least one sample")

    def stacked(name: str, values: list[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
        if all(v is None for v in values):
            return None
        if any(v is None for v in values):
            raise ValueError(f"collate: some samples have {name} and some not; expected samples of one dataset")
        return torch.stack(values)

    return SftBatch(tokens=torch.stack([s.tokens for s in samples]),
                    labels=torch.stack([s.labels for s in samples]),
                    loss_mask=torch.stack([s.loss_mask for s in samples]),
                    position_ids=stacked("position_ids", [s.position_ids for s in samples]),
                    document_ids=stacked("document_ids", [s.document_ids for s in samples]))


def make_sample(ids: Sequence[int], first_trained: int, seq_length: int, pad_id: int) -> SftSample:
    """Shift a token sequence into a sample of length seq_length.

    ids: the whole sequence; labels from position `first_trained` of `ids` on train (0: all of them). It is cut to
    seq_length + 1 tokens (the extra one is the last label), then padded with pad_id and loss_mask 0.
    """
    ids = list(ids[:seq_length + 1])
    n = len(ids) - 1
    tokens = torch.full((seq_length,), pad_id, dtype=torch.long)
    labels = torch.full((seq_length,), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(seq_length, dtype=torch.float32)
    if n > 0:
        tokens[:n] = torch.tensor(ids[:-1], dtype=torch.long)
        labels[:n] = torch.tensor(ids[1:], dtype=torch.long)
        # labels[t] is ids[t + 1], so it trains when t + 1 >= first_trained.
        loss_mask[max(first_trained - 1, 0):n] = 1.0
    return SftSample(tokens, labels, loss_mask)


@dataclass(frozen=True)
class JsonlRecord:
    """One valid line. `target` is the part that trains: the response, or the whole text when prompt is None."""
    line_number: int
    prompt: Optional[str]
    target: str


def require_text(value: object, key: str, where: str) -> str:
    """`value` as the non-empty text of field `key`; anything else is a `DataError` naming `where` and the key. JSON
    lets a string hold a lone UTF-16 surrogate (`"\\ud800"`), which is not Unicode text and no tokenizer encodes."""
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: {key!r} is empty; expected non-empty text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(f"{where}: {key!r} is not valid Unicode text (a lone surrogate {value[exc.start]!r} at "
                        f"character {exc.start}); expected UTF-8 text") from None
    return value


def parse_json_line(raw: bytes, where: str) -> Optional[dict]:
    """One line of a JSONL file -> its JSON object, or None for a blank line; anything else is a `DataError`
    naming `where` (file and line) and what was expected."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: expected UTF-8 text ({exc})") from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); expected one JSON "
                        f"object a line") from None
    except RecursionError:
        raise DataError(f"{where}: not valid JSON (nested deeper than the JSON reader goes); expected one JSON "
                        f"object a line") from None
    except ValueError as exc:   # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise DataError(f"{where}: not valid JSON ({str(exc).split(':')[0]}); expected one JSON object a "
                        f"line") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


class JsonlReader:
    """Iterates over the valid records of a JSONL file, streaming; `skipped_lines` fills as it goes."""

    def __init__(self, path: str | Path, prompt_key: str = "prompt", response_key: str = "response",
                 text_key: str = "text", skip_malformed: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"data file {self.path} not found; expected a .jsonl file with one JSON object "
                                    f"a line")
        self.prompt_key, self.response_key, self.text_key = prompt_key, response_key, text_key
        self.skip_malformed = skip_malformed
        self.skipped_lines: list[int] = []

    def __iter__(self) -> Iterator[JsonlRecord]:
        self.skipped_lines = []
        with self.path.open("rb") as stream:
            for line_number, raw in enumerate(stream, start=1):
                try:
                    record = self._parse(raw, line_number)
                except DataError:
                    if not self.skip_malformed:
                        raise
                    self.skipped_lines.append(line_number)
                    continue
                if record is not None:
                    yield record

    def _parse(self, raw: bytes, line_number: int) -> Optional[JsonlRecord]:
        where = f"{self.path}, line {line_number}"
        obj = parse_json_line(raw, where)
        if obj is None:
            return None
        pk, rk, tk = self.prompt_key, self.response_key, self.text_key
        expected_keys = f"expected keys {pk!r} and {rk!r}, or {tk!r}"
        has_pair = pk in obj or rk in obj
        if has_pair and tk in obj:
            raise DataError(f"{where}: has both {tk!r} and {pk!r}/{rk!r}; {expected_keys}, not both")
        if has_pair:
            missing = [k for k in (pk, rk) if k not in obj]
            if missing:
                raise DataError(f"{where}: missing key {missing[0]!r}; {expected_keys}")
            return JsonlRecord(line_number, self._string(obj, pk, where), self._string(obj, rk, where))
        if tk in obj:
            return JsonlRecord(line_number, None, self._string(obj, tk, where))
        raise DataError(f"{where}: {expected_keys}; got keys {sorted(obj)}")

    @staticmethod
    def _string(obj: dict, key: str, where: str) -> str:
        return require_text(obj[key], key, where)


def encode_record(record: JsonlRecord, tokenizer: Tokenizer, apply_chat_template: bool,
                  append_eos: bool = True) -> tuple[list[int], int]:
    """-> (ids, first_trained): [bos] + prompt + target + [eos], and the index in ids where training starts.

    Prompt and response are encoded separately, as a rollout sees them (generation continues from the prompt's
    ids), so the boundary never merges a prompt token with a response token.
    """
    ids: list[int] = []  # text records: nothing before the target, so every predicted token trains
    if record.prompt is not None:
        prompt = tokenizer.apply_chat_template(record.prompt) if apply_chat_template else record.prompt
        ids = tokenizer.encode(prompt)
    first_trained = len(ids)
    ids += tokenizer.encode(record.target) + ([tokenizer.eos_id] if append_eos else [])
    # A chat template may already write the bos token as text, which encodes to bos_id: do not double it.
    if tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
        ids.insert(0, tokenizer.bos_id)
        first_trained += 1
    return ids, first_trained


class JsonlDataset(torch.utils.data.Dataset):
    """Prompt/response or text lines served as SftSamples of length seq_length.

    The file is read and tokenized once, eagerly, at construction: a malformed line fails the run before the
    first step rather than hours in, and counts (num_skipped, num_truncated) are known up front. It holds every
    line's ids in memory, which suits SFT-sized files; pretraining-scale corpora go through `preprocess_jsonl`
    into the indexed format instead.
    """

    def __init__(self, path: str | Path, tokenizer: Tokenizer, seq_length: int, prompt_key: str = "prompt",
                 response_key: str = "response", text_key: str = "text", apply_chat_template: bool = False,
                 skip_malformed: bool = False) -> None:
        if apply_chat_template and not tokenizer.has_chat_template:
            raise ValueError("data.apply_chat_template is true but the tokenizer has no chat template; set it to "
                             "false or use an HF tokenizer directory that defines one")
        self.path = Path(path)
        self.seq_length = seq_length
        self.pad_id = tokenizer.pad_id
        reader = JsonlReader(path, prompt_key, response_key, text_key, skip_malformed)
        self._sequences: list[tuple[list[int], int]] = []
        for record in reader:
            try:
                self._sequences.append(encode_record(record, tokenizer, apply_chat_template))
            except ValueError as exc:   # text the tokenizer cannot encode (a task's character set)
                raise DataError(f"{self.path}, line {record.line_number}: {exc}") from None
        self.skipped_lines: list[int] = reader.skipped_lines
        if not self._sequences:
            skipped = f" ({len(self.skipped_lines)} malformed lines skipped)" if self.skipped_lines else ""
            raise DataError(f"{self.path}: no valid lines{skipped}; expected JSON objects with "
                            f"{prompt_key!r}+{response_key!r} or {text_key!r}")
        # Truncated: longer than seq_length + 1 tokens, so their end (and maybe all of the response) is cut.
        self.num_truncated = sum(len(ids) > seq_length + 1 for ids, _ in self._sequences)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_lines)

    def __len__(self) -> int:
        return len(self._sequences)

    def __getitem__(self, index: int) -> SftSample:
        ids, first_trained = self._sequences[index]
        return make_sample(ids, first_trained, self.seq_length, self.pad_id)
