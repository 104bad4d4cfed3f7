"""A test-local Teacher over a tiny causal torch model: a direct, unoptimised forward of every row, so tests can
compare a teacher wrapper (self, multi) with the plain model's numbers."""

from __future__ import annotations

from typing import Optional

import torch

from opd_megatron.teachers.base import Teacher, TeacherRequest, TeacherScores


class TinyCausalLM(torch.nn.Module):
    """Token + learned position embeddings, one causal self-attention layer, a head: logits depend on every
    earlier token and on absolute positions, so a misaligned column shows up as a different number."""

    def __init__(self, vocab_size: int = 37, dim: int = 16, max_length: int = 48, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.max_length = max_length
        self.embed = torch.nn.Embedding(vocab_size, dim)
        self.position = torch.nn.Embedding(max_length, dim)
        self.attn = torch.nn.MultiheadAttention(dim, 2, batch_first=True)
        self.head = torch.nn.Linear(dim, vocab_size)
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(3.0)  # peaked distributions: top-k order and log-ratios are informative

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """`[B, T]` ids -> `[B, T, V]` logits; position t reads tokens[:, :t+1]."""
        t = tokens.shape[1]
        if t > self.max_length:
            raise ValueError(f"TinyCausalLM: {t} positions, max_length {self.max_length}")
        h = self.embed(tokens) + self.position(torch.arange(t)).unsqueeze(0)
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
        a, _ = self.attn(h, h, h, attn_mask=causal, need_weights=False)
        return self.head(h + a)


class ModelTeacher(Teacher):
    """Scores a request with `model` directly. Records every request it receives (`requests`)."""

    scores_extra_ids = True

    def __init__(self, model: torch.nn.Module, vocab_size: int, name: str = "ref", full_logits: bool = False,
                 padded_vocab: Optional[int] = None) -> None:
        self.model = model
        self.name = name
        self.gives_full_logits = full_logits
        self.max_length = getattr(model, "max_length", None)
        self._vocab = vocab_size
        self.padded_vocab = padded_vocab
        self.requests: list[TeacherRequest] = []

    def vocab_size(self) -> int:
        return self._vocab

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens).to(torch.float32)

    @torch.no_grad()
    def score(self, request: TeacherRequest) -> TeacherScores:
        request.validate(self._vocab)
        self.requests.append(request)
        real = torch.arange(request.tokens.shape[1]).unsqueeze(0) < request.lengths.unsqueeze(1)
        tokens = torch.where(real, request.tokens, 0).long()
        logits = self.logits(tokens[:, :-1])
        logq = torch.log_softmax(logits, dim=-1)
        valid = request.valid_mask()
        zero = torch.zeros_like

        sampled = torch.where(valid, logq.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1), 0.0)
        topk_ids = topk_lp = extra = shard = None
        if request.topk:
            topk_lp, topk_ids = logq.topk(request.topk, dim=-1)
            topk_lp = torch.where(valid.unsqueeze(-1), topk_lp, 0.0)
            topk_ids = torch.where(valid.unsqueeze(-1), topk_ids, 0)
        if request.extra_ids is not None:
            used = valid.unsqueeze(-1) & (request.extra_ids >= 0)
            extra = torch.where(used, logq.gather(-1, request.extra_ids.clamp_min(0).long()), 0.0)
        if self.gives_full_logits:
            shard = torch.where(valid.unsqueeze(-1), logits, zero(logits))
            if self.padded_vocab is not None:
                pad = torch.full(shard.shape[:-1] + (self.padded_vocab - self._vocab,), 1e3)  # would win if counted
                shard = torch.cat([shard, pad], dim=-1)
        return TeacherScores(sampled_logprobs=sampled, valid=valid, topk_ids=topk_ids, topk_logprobs=topk_lp,
                             extra_logprobs=extra, logits_shard=shard, teacher_name=self.name
                             ).check(request, self._vocab)


def make_request(rows: list[list[int]], prompt_lengths: list[int], topk: int = 0, extra: int = 0,
                 vocab_size: int = 37, seed: int = 0, **kwargs) -> TeacherRequest:
    """A right-padded request (pad id 36... any value: never read) scoring each row's response columns."""
    g = torch.Generator().manual_seed(seed)
    length = max(len(r) for r in rows)
    tokens = torch.full((len(rows), length), vocab_size - 1, dtype=torch.long)
    for b, row in enumerate(rows):
        tokens[b, : len(row)] = torch.tensor(row)
    lengths = torch.tensor([len(r) for r in rows])
    extra_ids = None
    if extra:
        extra_ids = torch.randint(0, vocab_size, (len(rows), length - 1, extra), generator=g)
        extra_ids[..., -1] = -1
    return TeacherRequest(tokens=tokens, lengths=lengths, score_start=torch.tensor(prompt_lengths) - 1,
                          topk=topk, extra_ids=extra_ids, **kwargs)


def random_rows(lengths: list[int], vocab_size: int = 37, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]
