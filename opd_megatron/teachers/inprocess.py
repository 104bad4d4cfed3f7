"""InProcessTeacher: a `transformers` causal LM loaded from a local directory and run in the training process.

For teachers small enough to sit beside the student (and for tests): no server, no sharding. Each `score` runs
batched forwards of at most `batch_chunk` rows (right-padded, with an attention mask; each chunk is cut to its
longest row), so activation memory is bounded by `batch_chunk x L x V` floats whatever the request's batch.

Numbers: float32 log-probs `logits / temperature - logsumexp(logits / temperature)` over the teacher's vocabulary
(`vocab_size()`: the tokenizer's size when the directory has a tokenizer, else config.json's; embedding rows past it
are not tokens and get no mass). Top-k ids are the k largest scaled logits (the k most probable tokens), in
descending logprob, ties to the lower id. Only the scored columns are read (`request.valid_mask()`), in chunks of
about `CHUNK_ELEMENTS` floats, and no `[tokens, V]` log-prob tensor is built: per chunk one max, one exp-sum in a
reused buffer, one top-k, and gathers at the few ids asked for (`score_columns`). `logits_shard` (only with
`full_logits=True`) is the whole vocabulary as one shard, TP=1 semantics, at temperature 1, padded with zeros to
`padded_vocab_size` columns so that it lines up with a student's TP=1 logits (the vocab-parallel losses mask ids
past the true vocabulary).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from opd_megatron.math.supports import top_k_positions
from opd_megatron.teachers.base import NonFiniteTeacherError, Teacher, TeacherError, TeacherRequest, TeacherScores

# Floats per chunk of the scoring pass (8 MB in float32): a chunk's temporaries stay in the CPU's cache, where a pass
# over the whole [b, L, V] logits streams from memory three times (measured on 1,020 x 32,000 logits, one thread:
# the log-sum-exp in chunks 0.033 CPU-s, `torch.logsumexp` 0.095, `log_softmax` 0.076 plus 0.20 for `isfinite`).
CHUNK_ELEMENTS = 1 << 21


def descending_topk(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k candidates given in ascending id order (`top_k_positions`, `vocab_parallel_topk`) -> the same
    entries in descending value; the stable sort keeps equal values in ascending id order (ties to the lower id)."""
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    return values.gather(-1, order), ids.gather(-1, order)


class NonFiniteLogitsError(ArithmeticError):
    """Some logit of a chunk is NaN or +inf (the log-sum-exp of its row is not finite). Internal: `score` turns it
    into the NonFiniteTeacherError naming the teacher that users see."""


def score_columns(logits: torch.Tensor, temperature: float, labels: torch.Tensor, topk: int,
                  extra_ids: Optional[torch.Tensor], buffer: torch.Tensor
                  ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One chunk of columns: logits `[n, V]` (any row stride, last dim contiguous), labels `[n]`, extra_ids `[n, E]`
    (-1 = unused) -> (sampled logprob `[n]`, top-k logprobs `[n, k]` in descending order, their ids `[n, k]`, extra
    logprobs `[n, E]`), all of `log_softmax(logits / temperature)` without building it: the log-probs of the gathered
    ids are the scaled logits there minus the row's log-sum-exp, and log_softmax is monotone, so its top-k ids are
    the scaled logits' (`top_k_positions`: ties to the lower id). buffer: float32 `[>= n, V]` scratch, overwritten.
    Raises NonFiniteLogitsError when a row's log-sum-exp is NaN/inf: NaN and +inf logits anywhere make it so (a -inf
    logit is a token of probability 0; if a scored log-prob is -inf, `TeacherScores.check` rejects it)."""
    scaled = logits if temperature == 1.0 else logits / temperature
    row_max = scaled.amax(dim=-1, keepdim=True)                                    # [n, 1]
    shifted = torch.sub(scaled, row_max, out=buffer[: scaled.shape[0]])            # in the buffer: no [n, V] temporary
    lse = shifted.exp_().sum(dim=-1, keepdim=True).log_().add_(row_max)            # [n, 1]
    if not bool(torch.isfinite(lse).all()):
        raise NonFiniteLogitsError("NaN/inf logits")
    sampled = (scaled.gather(-1, labels.unsqueeze(-1)) - lse).squeeze(-1)
    topk_logprobs = topk_ids = extra = None
    if topk:
        positions = top_k_positions(scaled, topk)
        topk_logprobs, topk_ids = descending_topk(scaled.gather(-1, positions) - lse, positions)
    if extra_ids is not None:
        used = extra_ids >= 0
        extra = torch.where(used, scaled.gather(-1, extra_ids.clamp_min(0)) - lse, torch.zeros((), dtype=lse.dtype))
    return sampled, topk_logprobs, topk_ids, extra


def request_vocab_check(teacher: Teacher, request: TeacherRequest) -> None:
    """`request.validate` against the teacher's vocabulary, as a TeacherError naming the teacher."""
    try:
        request.validate(teacher.vocab_size())
    except ValueError as error:
        raise TeacherError(f"{teacher.name}: {error} (teacher vocabulary {teacher.vocab_size()}; is the student's "
                           f"tokenizer the teacher's?)") from error


def check_student_vocab(teacher: Teacher, student_vocab_size: Optional[int]) -> None:
    if student_vocab_size is not None and student_vocab_size != teacher.vocab_size():
        raise TeacherError(f"{teacher.name}: vocabulary mismatch: the teacher has {teacher.vocab_size()} tokens, the "
                           f"student {student_vocab_size}; on-policy distillation needs the same tokenizer")


class InProcessTeacher(Teacher):
    """A frozen transformers causal LM (eval mode, no grad) scoring `TeacherRequest`s in this process."""

    scores_extra_ids = True

    def __init__(self, path: str | Path, *, temperature: float = 1.0, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, batch_chunk: int = 4, full_logits: bool = False,
                 padded_vocab_size: Optional[int] = None, student_vocab_size: Optional[int] = None,
                 name: Optional[str] = None) -> None:
        import transformers

        if temperature <= 0:
            raise ValueError(f"InProcessTeacher.temperature: expected > 0, got {temperature}")
        if batch_chunk < 1:
            raise ValueError(f"InProcessTeacher.batch_chunk: expected >= 1, got {batch_chunk}")
        path = Path(path)
        self.name = name or f"inprocess:{path.name}"
        self.temperature = float(temperature)
        self.batch_chunk = batch_chunk
        self.device = torch.device(device)
        self.gives_full_logits = full_logits
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, local_files_only=True).to(self.device).eval()
        self.model.requires_grad_(False)
        self._vocab = self._true_vocab_size(path, int(self.model.config.vocab_size))
        self.padded_vocab_size = padded_vocab_size or self._vocab
        if self.padded_vocab_size < self._vocab:
            raise ValueError(f"InProcessTeacher.padded_vocab_size: expected >= the vocabulary {self._vocab}, got "
                             f"{padded_vocab_size}")
        check_student_vocab(self, student_vocab_size)

    @staticmethod
    def _true_vocab_size(path: Path, embedding_rows: int) -> int:
        if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
            return embedding_rows
        import transformers
        tokens = len(transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True))
        if tokens > embedding_rows:
            raise TeacherError(f"inprocess:{path.name}: the tokenizer has {tokens} tokens but the model only "
                               f"{embedding_rows} embedding rows")
        return tokens

    def vocab_size(self) -> int:
        return self._vocab

    @torch.no_grad()
    def _logits(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Rows `[b, Lc]` right-padded -> float32 logits `[b, Lc - 1, V]` over the true vocabulary, on the teacher's
        device (a view of the model's output: no copy on the CPU); column j predicts tokens[:, j + 1]. Pad positions
        are masked out of attention (and never read)."""
        mask = torch.arange(tokens.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
        ids = torch.where(mask, tokens, torch.zeros((), dtype=tokens.dtype)).to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask.to(self.device).long()).logits
        return out[:, :-1, : self._vocab].float()

    def score(self, request: TeacherRequest) -> TeacherScores:
        request_vocab_check(self, request)
        b, columns = request.batch_size, request.columns
        k, extra = request.topk, request.extra_ids
        sampled = torch.zeros(b, columns)
        topk_ids = torch.zeros(b, columns, k, dtype=torch.long) if k else None
        topk_lp = torch.zeros(b, columns, k) if k else None
        extra_lp = torch.zeros(extra.shape) if extra is not None else None
        full = torch.zeros(b, columns, self.padded_vocab_size) if self.gives_full_logits else None
        chunk = max(1, CHUNK_ELEMENTS // self._vocab)
        buffer = torch.empty(0)
        for start in range(0, b, self.batch_chunk):
            rows = slice(start, min(start + self.batch_chunk, b))
            lengths = request.lengths[rows]
            width = int(lengths.max())
            tokens = request.tokens[rows, :width].long()
            logits = self._logits(tokens, lengths)                      # [b, width - 1, V]
            if buffer.shape[0] < min(chunk, width - 1):
                buffer = torch.empty(min(chunk, width - 1), self._vocab, dtype=logits.dtype, device=logits.device)
            for row in range(logits.shape[0]):
                # The scored columns only (valid_mask: score_start .. length - 2); the others are zeroed anyway.
                b_row = start + row
                first, stop = int(request.score_start[b_row]), int(lengths[row]) - 1
                for lo in range(first, stop, chunk):
                    cols = slice(lo, min(lo + chunk, stop))
                    labels = tokens[row, cols.start + 1: cols.stop + 1].clamp(0, self._vocab - 1).to(logits.device)
                    wanted = extra[b_row, cols].long().to(logits.device) if extra is not None else None
                    try:
                        got_sampled, got_lp, got_ids, got_extra = score_columns(
                            logits[row, cols], self.temperature, labels, k, wanted, buffer)
                    except NonFiniteLogitsError:
                        raise NonFiniteTeacherError(f"{self.name}: the teacher's logits are NaN/inf; its weights "
                                                    f"are broken") from None
                    sampled[b_row, cols] = got_sampled.cpu()
                    if k:
                        topk_lp[b_row, cols], topk_ids[b_row, cols] = got_lp.cpu(), got_ids.cpu()
                    if extra is not None:
                        extra_lp[b_row, cols] = got_extra.cpu()
            if full is not None:
                full[rows, : width - 1, : self._vocab] = logits.cpu()
        valid = request.valid_mask()
        return finish_scores(request, self, valid, sampled, topk_ids, topk_lp, extra_lp, full)


def finish_scores(request: TeacherRequest, teacher: Teacher, valid: torch.Tensor, sampled: torch.Tensor,
                  topk_ids: Optional[torch.Tensor], topk_logprobs: Optional[torch.Tensor],
                  extra_logprobs: Optional[torch.Tensor], logits_shard: Optional[torch.Tensor]) -> TeacherScores:
    """Zero every value outside `valid` (the interface's convention) and check the result."""
    zero = torch.zeros(())

    def masked(values: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if values is None:
            return None
        keep = valid.reshape(*valid.shape, *([1] * (values.dim() - 2)))
        return torch.where(keep, values, zero.to(values.dtype))

    scores = TeacherScores(sampled_logprobs=masked(sampled), valid=valid, topk_ids=masked(topk_ids),
                           topk_logprobs=masked(topk_logprobs), extra_logprobs=masked(extra_logprobs),
                           logits_shard=logits_shard, teacher_name=teacher.name)
    return scores.check(request, teacher.vocab_size())


__all__ = ["CHUNK_ELEMENTS", "InProcessTeacher", "NonFiniteLogitsError", "descending_topk",
           "score_columns", "finish_scores", "request_vocab_check", "check_student_vocab"]
