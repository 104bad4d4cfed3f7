"""Self-distillation (OPSD / SDFT): the student's own weights, conditioned on privileged context, as the teacher.

The teacher's view of row b is the student's sequence with extra context `c_b` (e.g. the tokenised reference
solution, wrapped in a template `prefix + c_b + suffix`) spliced into the prompt:

    student row:  x_<p  x_>=p  y            (p = the insertion point, inside the prompt)
    teacher row:  x_<p  c_b  x_>=p  y

and the teacher's log-probs `q(y_t | x, c_b, y_<t)` are mapped back to the student's columns. Splicing `n_b =
len(prefix + c_b + suffix)` tokens at `p <= prompt_len` shifts every token at index >= p by `n_b`, so the
student's label column j (predicting `tokens[j+1]`, j >= p - 1) is the teacher's column `j + n_b`; the student
scores columns `score_start..lengths-2` with `score_start = prompt_len - 1 >= p - 1`, so every scored column
shifts by exactly `n_b`. Top-k and extra ids are vocabulary ids, not positions: they are passed and returned
untouched, only their columns move; a colocated scorer's `logits_shard` columns move the same way.

Insertion point (`insert`, with `keep` prompt tokens left on the far side):
- `before_prompt`: at prompt position `keep` (keep = 0: ahead of everything; 1: after a bos; the length of a
  fixed system part: after it).
- `after_prompt`: at `prompt_len - keep` (keep = 0: between prompt and response; the length of the
  assistant-turn opening of a chat template: inside the user turn, as SDFT places its demonstration).
The prompt length is taken as `score_start + 1` (the request carries no other prompt boundary).

Which weights (`mode`) [tinker SDFT: frozen base; OPSD: the live policy; EMA: a slow copy, the usual
self-distillation target]:
- `current`: whatever the scorer reads (the live student when it is colocated on the student's model); no copy.
- `frozen`: a copy of `model`'s parameters taken at construction, swapped into `model` while scoring.
- `ema`: `e_0 = theta_0`, `e_k = d * e_{k-1} + (1 - d) * theta_k` after each optimizer step k (`update_ema`,
  which the training loop calls through `after_optimizer_step`), kept in float32 whatever the parameters' dtype (a bf16 EMA with d = 0.999
  would round most updates away), swapped into `model` (cast to its dtype) while scoring.
Swapping sets `param.data` to the copy and back (try/finally), so scoring sees the copy and training the live
weights; no second model instance. Only parameters are swapped (causal LMs have no learned buffers).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch

from opd_megatron.teachers.base import Teacher, TeacherError, TeacherRequest, TeacherScores

MODES = ("current", "frozen", "ema")
INSERT_POSITIONS = ("before_prompt", "after_prompt")


class SelfTeacher(Teacher):
    """The student (via `scorer`, a Teacher over the student's weights) with privileged context in the prompt.
    Its frozen / EMA weights are its checkpoint state (`state_dict`), updated after each optimizer step (`ema`).

    scorer: scores sequences with the weights held by `model` (a colocated or in-process teacher built on the
        student's own model), or with its own weights when `model` is None (only `mode="current"`).
    model: the module whose parameters `frozen` / `ema` copy and swap in; None for `current`.
    ema_decay: d in `e_k = d e_{k-1} + (1 - d) theta_k`, in [0, 1).
    prefix_ids / suffix_ids: template ids around each row's privileged ids (not added when a row has none, so
        a row without privileged context is scored exactly as the plain scorer would).
    max_length: the longest sequence (prompt + context + response) the scorer accepts; default
        `scorer.max_length` when the scorer has one. Longer rows are a TeacherError naming the row.
    """

    reads_privileged_context = True

    def __init__(self, scorer: Teacher, *, model: Optional[torch.nn.Module] = None, mode: str = "current",
                 ema_decay: float = 0.999, insert: str = "before_prompt", keep: int = 0,
                 prefix_ids: Sequence[int] = (), suffix_ids: Sequence[int] = (),
                 max_length: Optional[int] = None, name: Optional[str] = None) -> None:
        if mode not in MODES:
            raise ValueError(f"SelfTeacher.mode: expected one of {list(MODES)}, got {mode!r}")
        if insert not in INSERT_POSITIONS:
            raise ValueError(f"SelfTeacher.insert: expected one of {list(INSERT_POSITIONS)}, got {insert!r}")
        if not isinstance(keep, int) or keep < 0:
            raise ValueError(f"SelfTeacher.keep: expected an integer >= 0, got {keep!r}")
        if not 0.0 <= float(ema_decay) < 1.0:
            raise ValueError(f"SelfTeacher.ema_decay: expected a value in [0, 1), got {ema_decay}")
        if mode != "current" and model is None:
            raise ValueError(f"SelfTeacher.mode={mode!r} copies the student's weights: pass model= (the module the "
                             f"scorer reads)")
        self.scorer = scorer
        self.model = model
        self.mode = mode
        self.ema_decay = float(ema_decay)
        self.insert = insert
        self.keep = keep
        self.prefix_ids = [int(i) for i in prefix_ids]
        self.suffix_ids = [int(i) for i in suffix_ids]
        self.max_length = max_length if max_length is not None else getattr(scorer, "max_length", None)
        self.name = name or f"self[{mode}]:{scorer.name}"
        self.gives_full_logits = scorer.gives_full_logits
        self.max_topk = scorer.max_topk
        self.scores_extra_ids = scorer.scores_extra_ids
        vocab = scorer.vocab_size()
        bad = [i for i in self.prefix_ids + self.suffix_ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"SelfTeacher.prefix_ids/suffix_ids: ids must lie in [0, {vocab}), got {bad}")
        self.updates = 0
        self._params: list[torch.nn.Parameter] = [] if model is None else list(model.parameters())
        self._shadow: list[torch.Tensor] = []
        with torch.no_grad():
            if mode == "frozen":
                self._shadow = [p.detach().clone() for p in self._params]
            elif mode == "ema":
                self._shadow = [p.detach().to(torch.float32, copy=True) for p in self._params]

    def vocab_size(self) -> int:
        return self.scorer.vocab_size()

    # -- weights ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def update_ema(self) -> None:
        """After an optimizer step: `e <- d e + (1 - d) theta` (float32). A no-op for `current` and `frozen`."""
        if self.mode != "ema":
            return
        for shadow, param in zip(self._shadow, self._params):
            shadow.mul_(self.ema_decay).add_(param.detach().to(torch.float32), alpha=1.0 - self.ema_decay)
        self.updates += 1

    def after_optimizer_step(self) -> None:
        self.update_ema()

    def teacher_weights(self) -> list[torch.Tensor]:
        """The weights scoring uses, one tensor per `model.parameters()` entry (float32 for `ema`)."""
        if self.mode == "current":
            return [p.detach() for p in self._params]
        return list(self._shadow)

    def state_dict(self) -> dict:
        """What a checkpoint keeps so a resumed run scores with the same frozen / EMA weights."""
        return {"mode": self.mode, "ema_decay": self.ema_decay, "updates": self.updates,
                "shadow": [s.clone() for s in self._shadow]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != self.mode or len(state.get("shadow", [])) != len(self._shadow):
            raise ValueError(f"SelfTeacher.load_state_dict: checkpoint holds mode {state.get('mode')!r} with "
                             f"{len(state.get('shadow', []))} tensors, this teacher mode {self.mode!r} with "
                             f"{len(self._shadow)}")
        with torch.no_grad():
            for mine, saved in zip(self._shadow, state["shadow"]):
                if mine.shape != saved.shape:
                    raise ValueError(f"SelfTeacher.load_state_dict: a shadow tensor of shape {tuple(saved.shape)} "
                                     f"does not fit parameter shape {tuple(mine.shape)}")
                mine.copy_(saved)
        self.updates = int(state.get("updates", 0))

    @contextlib.contextmanager
    def _weights_swapped(self) -> Iterator[None]:
        if self.mode == "current":
            yield
            return
        saved = [p.data for p in self._params]
        try:
            for param, shadow in zip(self._params, self._shadow):
                param.data = shadow if shadow.dtype == param.dtype else shadow.to(param.dtype)
            yield
        finally:
            for param, data in zip(self._params, saved):
                param.data = data

    # -- scoring ------------------------------------------------------------------------------------------------

    def context_ids(self, request: TeacherRequest, b: int) -> list[int]:
        """Row b's inserted ids: `prefix + privileged[b] + suffix`, or nothing when the row has no context."""
        if request.privileged is None or len(request.privileged[b]) == 0:
            return []
        return self.prefix_ids + [int(i) for i in request.privileged[b]] + self.suffix_ids

    def insertion_point(self, request: TeacherRequest, b: int) -> int:
        """Token index of row b at which the context is spliced in (0 <= p <= prompt_len)."""
        prompt_len = int(request.score_start[b]) + 1
        if self.keep > prompt_len:
            raise TeacherError(f"{self.name}: row {b} has a prompt of {prompt_len} tokens (score_start + 1), fewer "
                               f"than keep={self.keep} tokens to leave {self.insert.replace('_', ' ')}")
        return self.keep if self.insert == "before_prompt" else prompt_len - self.keep

    def score(self, request: TeacherRequest) -> TeacherScores:
        vocab = self.vocab_size()
        request.validate(vocab)
        contexts = [self.context_ids(request, b) for b in range(request.batch_size)]
        for b, ctx in enumerate(contexts):
            if ctx and (min(ctx) < 0 or max(ctx) >= vocab):
                raise ValueError(f"TeacherRequest.privileged[{b}]: ids must lie in [0, {vocab}), got "
                                 f"[{min(ctx)}, {max(ctx)}]")
        if not any(contexts):
            plain = TeacherRequest(tokens=request.tokens, lengths=request.lengths, score_start=request.score_start,
                                   topk=request.topk, extra_ids=request.extra_ids, domains=request.domains)
            with self._weights_swapped():
                scores = self.scorer.score(plain)
            scores.teacher_name = self.name
            return scores.check(request, vocab)
        inner, shift = self._with_context(request, contexts)
        with self._weights_swapped():
            scores = self.scorer.score(inner)
        return self._map_back(request, scores, shift).check(request, vocab)

    def _with_context(self, request: TeacherRequest, contexts: list[list[int]]
                      ) -> tuple[TeacherRequest, torch.Tensor]:
        """The longer request the scorer sees, and the per-row shift `n_b` of every scored column."""
        shift = torch.tensor([len(c) for c in contexts], dtype=torch.long)
        lengths = request.lengths.to(torch.long) + shift
        longest = int(lengths.max())
        if self.max_length is not None and longest > self.max_length:
            b = int(lengths.argmax())
            raise TeacherError(f"{self.name}: row {b} is {int(request.lengths[b])} tokens + {int(shift[b])} of "
                               f"privileged context = {longest}, beyond the scorer's max length {self.max_length}; "
                               f"shorten the privileged context (or the responses) or raise the model's max length")
        tokens = torch.zeros((request.batch_size, longest), dtype=request.tokens.dtype)
        for b, ctx in enumerate(contexts):
            row = request.row(b)
            p = self.insertion_point(request, b)
            tokens[b, : int(lengths[b])] = torch.tensor(row[:p] + ctx + row[p:], dtype=request.tokens.dtype)
        extra_ids = None
        if request.extra_ids is not None:
            extra_ids = torch.full((request.batch_size, longest - 1, request.extra_ids.shape[-1]), -1,
                                   dtype=request.extra_ids.dtype)
            rows, cols = request.valid_mask().nonzero(as_tuple=True)
            extra_ids[rows, cols + shift[rows]] = request.extra_ids[rows, cols]
        inner = TeacherRequest(tokens=tokens, lengths=lengths, score_start=request.score_start.to(torch.long) + shift,
                               topk=request.topk, extra_ids=extra_ids, domains=request.domains)
        return inner, shift

    def _map_back(self, request: TeacherRequest, scores: TeacherScores, shift: torch.Tensor) -> TeacherScores:
        """Column j of row b <- the scorer's column j + n_b, on the request's scored columns; 0 elsewhere."""
        valid = request.valid_mask()
        rows, cols = valid.nonzero(as_tuple=True)
        src = cols + shift[rows]
        b, columns = request.batch_size, request.columns

        def moved(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            if x is None:
                return None
            out = torch.zeros((b, columns) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
            out[rows.to(x.device), cols.to(x.device)] = x[rows.to(x.device), src.to(x.device)]
            return out

        return TeacherScores(sampled_logprobs=moved(scores.sampled_logprobs), valid=valid,
                             topk_ids=moved(scores.topk_ids), topk_logprobs=moved(scores.topk_logprobs),
                             extra_logprobs=moved(scores.extra_logprobs), logits_shard=moved(scores.logits_shard),
                             teacher_name=self.name, per_teacher=scores.per_teacher)

    def close(self) -> None:
        self.scorer.close()
