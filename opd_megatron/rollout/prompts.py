"""Prompt sources for rollouts: a synthetic task's endless stream, a JSONL prompt file, or prefixes of an indexed
corpus (rollout.source corpus: the student continues them; the corpus's own continuation is the reference).

Both are stateless: the prompts of (step, data-parallel rank) are a pure function of the seed, so an exact resume
needs only the step. A prompt is `[bos] + encode(prompt)` (through the chat template when configured), the ids a
rollout continues from; `reference` is the ids of a known good response (the task's answer, or the file's
`response`) + eos, used by the fixed-dataset share of GKD's on-policy fraction.

Evaluation prompts of a JSONL source never reach training. With a separate `eval.path` they are that file's first
`eval.prompts` records (read with the rollout keys); without one they are held out of `rollout.path`: the
`eval.prompts` records whose prompt text has the smallest SHA-256. Either way every `rollout.path` record whose text
is an evaluation prompt is dropped from training, so no evaluated prompt is ever a training prompt, duplicates
included. The split depends on the files alone (not on run.seed, the step or the world size): every run and
`opd-megatron eval` on the same files and eval.prompts evaluate on the same prompts. A task source evaluates on the
task's own eval split (its first `eval.prompts` examples for run.seed), built as its training prompts are.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from opd_megatron.data.jsonl import DataError, parse_json_line, require_text
from opd_megatron.data.tokenizer import Tokenizer
from opd_megatron.rollout.batch import RolloutBatch
from opd_megatron.tasks.base import Task


@dataclass(frozen=True)
class Prompt:
    text: str
    ids: list[int]
    reference: Optional[list[int]] = None     # response ids + eos, when known
    domain: Optional[str] = None               # multi-teacher routing tag
    privileged: Optional[list[int]] = None     # a self-teacher's privileged context ids


def _prompt_ids(tokenizer: Tokenizer, text: str, chat: bool) -> list[int]:
    ids = tokenizer.encode(tokenizer.apply_chat_template(text) if chat else text)
    if tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
        ids.insert(0, tokenizer.bos_id)
    return ids


def _text_rank(text: str) -> bytes:
    """The held-out split's order: a hash of the prompt text alone, so the split is the same in every run."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def hold_out(records: list[Prompt], count: int) -> tuple[list[Prompt], list[Prompt]]:
    """(training records in file order, the `count` evaluation records in hash order).

    Evaluation takes the `count` records of smallest `_text_rank` (ties by file order); training keeps every record
    whose text is not among theirs, so a duplicate of an evaluation prompt is held out as well."""
    ranked = sorted(range(len(records)), key=lambda i: (_text_rank(records[i].text), i))
    evaluation = [records[i] for i in ranked[:count]]
    held = {p.text for p in evaluation}
    return [p for p in records if p.text not in held], evaluation


def with_prompt_context(batch: RolloutBatch, rows: Sequence[Prompt], privileged: bool) -> RolloutBatch:
    """`batch` with what a teacher needs of each row besides its tokens, from the row's prompt (`rows[b]`): the
    domain (multi-teacher routing) when every prompt has one, and, with `privileged` (a teacher that reads it), the
    privileged context when every prompt has one. Training and evaluation batches alike: evaluation scored without
    them measures the reverse KL to the wrong teacher."""
    domains = [p.domain for p in rows] if all(p.domain is not None for p in rows) else batch.domains
    context = batch.privileged
    if privileged and all(p.privileged is not None for p in rows):
        context = [p.privileged for p in rows]
    return replace(batch, domains=domains, privileged=context)


def corpus_prompt(tokenizer: Tokenizer, ids: Sequence[int], documents: Sequence[int], prefix_tokens: int,
                  continuation_tokens: int) -> Optional[Prompt]:
    """A corpus window as a prompt to continue (rollout.source corpus, the seed's "partial rollouts"): its first
    `prefix_tokens` tokens, cut back to the start of the last document that begins inside them (a prompt never
    spans two documents), and as reference the corpus's own continuation, up to `continuation_tokens` tokens and
    never past the end of that document. None when nothing is left to continue (the prefix ends its document)."""
    prefix = list(ids[:prefix_tokens])
    last = documents[min(prefix_tokens, len(ids)) - 1]
    first = next(i for i, d in enumerate(documents) if d == last)
    prompt = [int(t) for t in prefix[first:]]
    reference = [int(t) for t, d in zip(ids[prefix_tokens: prefix_tokens + continuation_tokens],
                                        documents[prefix_tokens: prefix_tokens + continuation_tokens]) if d == last]
    if not prompt or not reference:
        return None
    return Prompt(tokenizer.decode(prompt), prompt, reference)


def window_batch(windows: Sequence[tuple[list[int], list[float], int]], pad_id: int,
                 policy_version: int = 0) -> RolloutBatch:
    """Whole corpus samples (`CorpusPrompts.window`) as fixed-dataset rows: every label trains except those that
    open another document, and each row carries its window key (`sample_keys`, a teacher cache's key)."""
    batch = RolloutBatch.from_sequences([ids[:1] for ids, _, _ in windows], [ids[1:] for ids, _, _ in windows],
                                        pad_id, on_policy=False, policy_version=policy_version,
                                        prompts=[""] * len(windows))
    mask = torch.zeros_like(batch.loss_mask)
    for b, (_, boundaries, _) in enumerate(windows):
        mask[b, : len(boundaries)] = torch.tensor(boundaries)
    return replace(batch, loss_mask=batch.loss_mask * mask,
                   sample_keys=torch.tensor([key for _, _, key in windows], dtype=torch.long))


class CorpusPrompts:
    """Prompts cut from an indexed corpus (a `data/indexed.py::CorpusBlend`): sample `index` of the blend's order,
    or the next sample whose prefix leaves something to continue (at most `MAX_SKIP` further)."""

    MAX_SKIP = 64

    def __init__(self, blend, tokenizer: Tokenizer, prefix_tokens: int, continuation_tokens: int, where: str):
        self.blend, self.tokenizer = blend, tokenizer
        self.prefix_tokens, self.continuation_tokens, self.where = prefix_tokens, continuation_tokens, where

    def window(self, index: int) -> tuple[list[int], list[float], int]:
        """Sample `index` whole, for the fixed-dataset share (pretraining-style KD on every token): its tokens, a
        loss mask per label (0 where the label opens another document: the window crosses documents) and its
        window key (what a teacher cache is keyed by)."""
        ids, documents = self.blend.window_tokens(index)
        mask = [1.0 if documents[t + 1] == documents[t] else 0.0 for t in range(len(ids) - 1)]
        return [int(t) for t in ids], mask, self.blend.sample_identity(index).window_key

    def prompt(self, index: int) -> Prompt:
        for offset in range(self.MAX_SKIP + 1):
            ids, documents = self.blend.window_tokens(index + offset)
            prompt = corpus_prompt(self.tokenizer, ids, documents, self.prefix_tokens, self.continuation_tokens)
            if prompt is not None:
                return prompt
        raise DataError(f"{self.where}: samples {index}..{index + self.MAX_SKIP} all end a document within their "
                        f"first rollout.prefix_tokens={self.prefix_tokens} tokens; expected documents longer than the "
                        f"prefix (lower rollout.prefix_tokens)")


class PromptSource:
    """`prompts(step, rank, world, count)`: this data-parallel rank's `count` prompts of `step`;
    `eval_prompts()`: the `eval_count` evaluation prompts, none of which `prompts` ever returns (a task's eval
    split; a JSONL source's from `eval_path` when given, else held out of `path`; see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, seed: int, max_prompt_tokens: int, task: Optional[Task] = None,
                 path: Optional[str] = None, prompt_key: str = "prompt", answer_key: str = "response",
                 apply_chat_template: bool = False, domain_key: str = "", privileged_key: str = "",
                 eval_count: int = 0, eval_path: Optional[str] = None, corpus: Optional[CorpusPrompts] = None,
                 eval_corpus: Optional[CorpusPrompts] = None):
        """corpus / eval_corpus: rollout.source corpus, prompts cut from an indexed corpus and from a held-out one
        (evaluation: its first `eval_count` samples, in file order)."""
        self.corpus, self.eval_corpus = corpus, eval_corpus
        if corpus is not None:
            if task is not None or path is not None or eval_corpus is None:
                raise ValueError("PromptSource: a corpus source needs eval_corpus and neither a task nor a path")
            self.tokenizer, self.seed, self.task, self.eval_count = tokenizer, seed, None, eval_count
            self.max_prompt_tokens = max_prompt_tokens
            return
        if (task is None) == (path is None):
            raise ValueError("PromptSource needs exactly one of a task or a JSONL path")
        if task is not None and eval_path:
            raise ValueError(f"eval.path {eval_path} is read with rollout.source=jsonl only; task {task.name} "
                             f"evaluates on its own eval split (leave eval.path empty)")
        self.tokenizer, self.seed, self.task, self.chat = tokenizer, seed, task, apply_chat_template
        self.max_prompt_tokens = max_prompt_tokens
        self.eval_count = eval_count
        self.domain_key, self.privileged_key = domain_key, privileged_key
        self.records: list[Prompt] = []         # training prompts only
        self._eval: list[Prompt] = []
        self._order: tuple[int, list[int]] = (-1, [])     # the shuffled order of the last epoch read
        if path is None:
            return
        records = self._read(Path(path), prompt_key, answer_key, "rollout.path")
        if eval_path:
            evaluation = self._read(Path(eval_path), prompt_key, answer_key, "eval.path")
            if len(evaluation) < eval_count:
                raise DataError(f"eval.path {eval_path} holds {len(evaluation)} prompts, fewer than "
                                f"eval.prompts={eval_count}; lower eval.prompts to {len(evaluation)} or less, or add "
                                f"prompts to the file")
            self._eval = evaluation[:eval_count]
            held = {p.text for p in self._eval}
            self.records = [p for p in records if p.text not in held]
            if not self.records:
                raise DataError(f"every prompt of rollout.path {path} is also an evaluation prompt of eval.path "
                                f"{eval_path}; expected training prompts that are not evaluated on")
            return
        self.records, self._eval = hold_out(records, eval_count)
        if not self.records:
            distinct = len({p.text for p in records})
            raise DataError(f"rollout.path {path} holds {len(records)} prompts ({distinct} distinct); holding out "
                            f"eval.prompts={eval_count} of them for evaluation leaves none for training: lower "
                            f"eval.prompts to {distinct - 1} or less, or give a separate evaluation file as eval.path")

    def eval_prompts(self) -> list[Prompt]:
        """The `eval_count` evaluation prompts, in a fixed order (the same list on every rank and call). A task's
        carry the domain and the privileged answer, as its training prompts do."""
        if self.corpus is not None:
            return [self.eval_corpus.prompt(i) for i in range(self.eval_count)]
        if self.task is not None:
            examples = self.task.examples("eval", self.eval_count, self.seed)
            return [Prompt(ex.prompt, [self.tokenizer.bos_id] + self.tokenizer.encode(ex.prompt), domain=self.task.name,
                           privileged=self.tokenizer.encode(ex.answer)) for ex in examples]
        if not self._eval:
            raise ValueError("this PromptSource holds no evaluation prompts: it was built with eval_count=0")
        return list(self._eval)

    def _read(self, path: Path, prompt_key: str, answer_key: str, key: str) -> list[Prompt]:
        if not path.is_file():
            raise FileNotFoundError(f"{key} {path} not found; expected a JSONL file of "
                                    f'{{"{prompt_key}": "..."}} lines')
        records = []
        with path.open("rb") as stream:
            for number, raw in enumerate(stream, start=1):
                where = f"{path}, line {number}"
                obj = parse_json_line(raw, where)
                if obj is None:
                    continue
                if not isinstance(obj.get(prompt_key), str) or not obj[prompt_key]:
                    raise DataError(f"{where}: expected an object with a non-empty string {prompt_key!r}, got "
                                    f"{json.dumps(obj)[:120]}")
                text = require_text(obj[prompt_key], prompt_key, where)
                answer = obj.get(answer_key)
                if answer is not None and not isinstance(answer, str):
                    raise DataError(f"{where}: {answer_key!r} must be a string, got {type(answer).__name__}")
                for key, kind in ((self.domain_key, "domain"), (self.privileged_key, "privileged")):
                    if key and not isinstance(obj.get(key), str):
                        raise DataError(f"{where}: expected a string {key!r} (rollout.{kind}_key), got "
                                        f"{type(obj.get(key)).__name__}")
                for key in (answer_key if answer else "", self.domain_key, self.privileged_key):
                    if key and obj[key]:
                        require_text(obj[key], key, where)
                try:
                    ids = _prompt_ids(self.tokenizer, text, self.chat)
                    reference = None if answer is None else self.tokenizer.encode(answer) + [self.tokenizer.eos_id]
                    privileged = self.tokenizer.encode(obj[self.privileged_key]) if self.privileged_key else None
                except ValueError as exc:   # text the tokenizer cannot encode (a task's character set)
                    raise DataError(f"{where}: {exc}") from None
                if len(ids) > self.max_prompt_tokens:
                    raise DataError(f"{where}: the prompt is {len(ids)} tokens, more than the {self.max_prompt_tokens}"
                                    f" that fit before rollout.max_new_tokens in model.max_position_embeddings; "
                                    f"shorten it or raise model.max_position_embeddings")
                domain = obj[self.domain_key] if self.domain_key else None
                records.append(Prompt(text, ids, reference, domain, privileged))
        if not records:
            raise DataError(f"{path}: no prompts")
        return records

    def eval_windows(self) -> list[tuple[list[int], list[float], int]]:
        """rollout.source corpus: the held-out corpus's first `eval_count` whole samples."""
        if self.eval_corpus is None:
            raise ValueError("PromptSource.eval_windows: only a corpus source has windows")
        return [self.eval_corpus.window(index) for index in range(self.eval_count)]

    def windows(self, step: int, rank: int, world: int, count: int) -> list[tuple[list[int], list[float], int]]:
        """rollout.source corpus: this rank's `count` whole samples of `step` (`CorpusPrompts.window`)."""
        if self.corpus is None:
            raise ValueError("PromptSource.windows: only a corpus source has windows")
        first = (step * world + rank) * count
        return [self.corpus.window(index) for index in range(first, first + count)]

    def prompts(self, step: int, rank: int, world: int, count: int) -> list[Prompt]:
        first = (step * world + rank) * count
        return [self._prompt(index) for index in range(first, first + count)]

    def _prompt(self, index: int) -> Prompt:
        if self.corpus is not None:
            return self.corpus.prompt(index)
        if self.task is not None:
            example = self.task.train_example(index, self.seed)
            ids = _prompt_ids(self.tokenizer, example.prompt, False)
            if len(ids) > self.max_prompt_tokens:
                raise DataError(f"task {self.task.name}: prompt of {len(ids)} tokens exceeds the "
                                f"{self.max_prompt_tokens} that fit before rollout.max_new_tokens")
            answer = self.tokenizer.encode(example.answer)
            return Prompt(example.prompt, ids, answer + [self.tokenizer.eos_id], domain=self.task.name,
                          privileged=answer)
        epoch, offset = divmod(index, len(self.records))
        if self._order[0] != epoch:
            order = list(range(len(self.records)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._order = (epoch, order)
        return self.records[self._order[1][offset]]
