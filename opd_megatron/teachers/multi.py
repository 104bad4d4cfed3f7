"""Several named teachers behind one `Teacher`: per-prompt routing by domain, or a weighted mixture on every row.

Routing (`routes=`, MiMo-V2-Flash MOPD and Nemotron-Cascade 2 [docs/sources.md#mimo-v2-flash,
#nemotron-cascade-2]: one teacher per prompt, picked by the prompt's domain, not a mix): row b goes to
`routes[request.domains[b]]` (or `default`). Rows are grouped per teacher, each group is one request (trimmed to
its longest row), the groups are scored concurrently when the teachers allow it, and the results are scattered back
in row order.

Mixtures (`mixture=`, weights `w_i > 0`, normalised to sum 1), on every row:
- geometric `log p(v) = sum_i w_i log q_i(v) - log Z`, `Z = sum_v prod_i q_i(v)^{w_i}`.
  - With full logits (every teacher colocated): exact; the mixture's logits are `sum_i w_i z_i` (the teachers'
    normalisers are per-position constants), `Z` is taken over the vocabulary (vocab-parallel, padding
    excluded). Valid for route A (distributional losses) and route B (policy-gradient log-ratio).
    Result name `multi-geometric:<names>`.
  - On sampled-token logprobs only (served teachers): `Z` needs the whole vocabulary, so the result is the
    UNNORMALISED log-geometric mean `sum_i w_i log q_i(y_t)` (<= the normalised value: `Z <= 1` by the
    weighted AM-GM inequality). Valid for route B only: its log-ratio `sum_i w_i (log q_i - log pi)` is exactly
    the per-token reward of `sum_i w_i KL(pi || q_i)` (the weighted multi-teacher reverse KL of DeepSeek-V4,
    [docs/sources.md#deepseek-v4]), which differs from `KL(pi || p)` by `E[sum_t log Z(s_t)]`. It is no distribution, so
    top-k and extra ids (route A's inputs) are refused. Result name `multi-geometric-unnormalised:<names>`.
- arithmetic `log p(v) = log sum_i w_i q_i(v)`: exact wherever every teacher's logprob at `v` is known (sampled
  tokens, extra ids, full logits), so valid for route B (log-ratio to the mixture) and route A on those ids.
  Its top-k without full logits takes two rounds: every teacher's top-k, then every teacher's logprobs on the
  union U of those ids (as extra ids; teachers must score extra ids). The returned top-k is the mixture's
  top-k within U with exact logprobs; it is the mixture's true top-k wherever its k-th value is
  >= `log sum_i w_i q_i^(k)` (q_i^(k): teacher i's k-th largest probability, a bound on any id outside U).
  `per_teacher["mixture"]["topk_certified_rate"]` reports the share of columns where that holds;
  `require_exact_topk=True` makes any other column an error. Result name `multi-arithmetic:<names>`.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Optional

import torch

from opd_megatron.teachers.base import Teacher, TeacherError, TeacherRequest, TeacherScores
from opd_megatron.teachers.compat import VocabMismatchError

MIXTURES = ("geometric", "arithmetic")
_FIELDS = ("sampled_logprobs", "topk_ids", "topk_logprobs", "extra_logprobs", "logits_shard")


class MultiTeacher(Teacher):
    """Named teachers; exactly one of `routes` (domain -> teacher name) or `mixture` (with `weights`).

    default: the teacher for rows whose domain has no route (None: such a row is an error).
    concurrent: score the teachers' requests in threads (served teachers wait on the network). None (default)
    means: concurrently unless a teacher gives full logits — colocated teachers run collectives, and ranks
    issuing them from threads in different orders would deadlock.
    vocab_group: the tensor-parallel group of colocated teachers' logit shards (None: megatron's TP group when
        model parallelism is initialised, else tp = 1), for full-logit mixtures.
    """

    def __init__(self, teachers: Mapping[str, Teacher], *, routes: Optional[Mapping[str, str]] = None,
                 default: Optional[str] = None, mixture: Optional[str] = None,
                 weights: Optional[Mapping[str, float]] = None, require_exact_topk: bool = False,
                 concurrent: Optional[bool] = None, vocab_group=None, name: Optional[str] = None) -> None:
        if not teachers:
            raise ValueError("MultiTeacher.teachers: expected at least one named teacher, got none")
        self.teachers = dict(teachers)
        known = sorted(self.teachers)
        sizes = {n: t.vocab_size() for n, t in self.teachers.items()}
        if len(set(sizes.values())) > 1:
            raise VocabMismatchError(f"MultiTeacher: the teachers disagree on the vocabulary size: {sizes}; every "
                                     f"teacher scores the student's token ids, so all must share one vocabulary")
        self._vocab = next(iter(sizes.values()))
        if (routes is None) == (mixture is None):
            raise ValueError("MultiTeacher: expected exactly one of routes= (per-domain routing) or mixture= "
                             f"(one of {list(MIXTURES)}, with weights=)")
        self.routes = None if routes is None else dict(routes)
        self.default = default
        self.mixture = mixture
        self.weights: dict[str, float] = {}
        if routes is not None:
            unknown = sorted({t for t in self.routes.values() if t not in self.teachers}
                             | ({default} if default is not None and default not in self.teachers else set()))
            if unknown:
                raise ValueError(f"MultiTeacher.routes/default name unknown teachers {unknown}; known: {known}")
            if weights is not None:
                raise ValueError("MultiTeacher.weights: only used with mixture=, not with routes=")
            self.name = name or f"multi:{','.join(known)}"
        else:
            if mixture not in MIXTURES:
                raise ValueError(f"MultiTeacher.mixture: expected one of {list(MIXTURES)}, got {mixture!r}")
            weights = dict(weights) if weights is not None else {n: 1.0 for n in self.teachers}
            if set(weights) != set(self.teachers):
                raise ValueError(f"MultiTeacher.weights: expected one weight per teacher {known}, got "
                                 f"{sorted(weights)}")
            if any(not (float(w) > 0 and math.isfinite(float(w))) for w in weights.values()):
                raise ValueError(f"MultiTeacher.weights: expected finite weights > 0, got {weights}")
            total = sum(float(w) for w in weights.values())
            self.weights = {n: float(weights[n]) / total for n in self.teachers}
            if "mixture" in self.teachers:
                raise ValueError("MultiTeacher.teachers: 'mixture' is reserved in a mixture's per_teacher "
                                 "diagnostics; rename that teacher")
            full = all(t.gives_full_logits for t in self.teachers.values())
            kind = mixture if full or mixture == "arithmetic" else "geometric-unnormalised"
            self.name = name or f"multi-{kind}:{','.join(known)}"
        self.require_exact_topk = require_exact_topk
        self.vocab_group = vocab_group
        self.gives_full_logits = all(t.gives_full_logits for t in self.teachers.values())
        caps = [t.max_topk for t in self.teachers.values() if t.max_topk is not None]
        self.max_topk = min(caps) if caps else None
        self.scores_extra_ids = all(t.scores_extra_ids for t in self.teachers.values())
        self.reads_privileged_context = any(t.reads_privileged_context for t in self.teachers.values())
        self.concurrent = (not any(t.gives_full_logits for t in self.teachers.values()) if concurrent is None
                           else concurrent)

    def vocab_size(self) -> int:
        return self._vocab

    def close(self) -> None:
        for teacher in self.teachers.values():
            teacher.close()

    def state_dict(self) -> dict:
        """The members' states by name, those with a state only (empty when every member is frozen)."""
        states = {name: teacher.state_dict() for name, teacher in self.teachers.items()}
        return {name: state for name, state in states.items() if state}

    def load_state_dict(self, state: dict) -> None:
        unknown = sorted(set(state) - set(self.teachers))
        if unknown:
            raise ValueError(f"{self.name}: the checkpoint holds the state of teachers {unknown}, not among "
                             f"{sorted(self.teachers)}")
        for name, member_state in state.items():
            self.teachers[name].load_state_dict(member_state)

    def after_optimizer_step(self) -> None:
        for teacher in self.teachers.values():
            teacher.after_optimizer_step()

    def score(self, request: TeacherRequest) -> TeacherScores:
        request.validate(self._vocab)
        scores = self._routed(request) if self.routes is not None else self._mixed(request)
        # Served members' rejected replies (asked again before their accepted one), for teacher/rejected_replies.
        scores.rejected_replies = sum(part.get("rejected_replies", 0) for part in scores.per_teacher.values())
        return scores.check(request, self._vocab)

    # -- shared ------------------------------------------------------------------------------------------------

    def _score_all(self, jobs: Mapping[str, TeacherRequest]) -> dict[str, tuple[TeacherScores, float]]:
        """Each named teacher scores its request; returns (scores, seconds) per name."""

        def one(name: str) -> tuple[TeacherScores, float]:
            start = time.perf_counter()
            scores = self.teachers[name].score(jobs[name])
            return scores, time.perf_counter() - start

        if self.concurrent and len(jobs) > 1:
            with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
                futures = {name: pool.submit(one, name) for name in jobs}
                return {name: future.result() for name, future in futures.items()}
        return {name: one(name) for name in jobs}

    @staticmethod
    def _diagnostics(scores: TeacherScores, rows: int, seconds: float) -> dict:
        scored = int(scores.valid.sum())
        mean = float(scores.sampled_logprobs[scores.valid].mean()) if scored else float("nan")
        return {"rows": rows, "scored_tokens": scored, "mean_logprob": mean, "seconds": seconds,
                "rejected_replies": scores.rejected_replies}

    # -- routing -----------------------------------------------------------------------------------------------

    def route(self, request: TeacherRequest) -> list[str]:
        """The teacher name of every row."""
        if request.domains is None:
            if self.default is None:
                raise TeacherError(f"{self.name}: the request carries no domains and there is no default teacher; "
                                   f"known domains: {sorted(self.routes)}")
            return [self.default] * request.batch_size
        names = []
        for b, domain in enumerate(request.domains):
            target = self.routes.get(domain, self.default)
            if target is None:
                raise TeacherError(f"{self.name}: row {b} has domain {domain!r}, which no teacher serves; known "
                                   f"domains: {sorted(self.routes)} (and no default teacher)")
            names.append(target)
        return names

    def _routed(self, request: TeacherRequest) -> TeacherScores:
        names = self.route(request)
        groups = {n: [b for b, m in enumerate(names) if m == n] for n in dict.fromkeys(names)}
        jobs = {n: _select_rows(request, rows) for n, rows in groups.items()}
        results = self._score_all(jobs)
        b, columns = request.batch_size, request.columns
        merged: dict[str, Optional[torch.Tensor]] = {}
        for field in _FIELDS:
            parts = [getattr(results[n][0], field) for n in groups]
            if any(p is None for p in parts):
                merged[field] = None
                continue
            trailing = {tuple(p.shape[2:]) for p in parts}
            if len(trailing) > 1:
                raise TeacherError(f"{self.name}: the routed teachers' {field} differ in shape {sorted(trailing)}; "
                                   f"they cannot be merged into one batch")
            out = torch.zeros((b, columns) + trailing.pop(), dtype=parts[0].dtype, device=parts[0].device)
            for n, part in zip(groups, parts):
                index = torch.tensor(groups[n], device=part.device)
                out[index, : part.shape[1]] = part
            merged[field] = out
        per_teacher = {n: self._diagnostics(results[n][0], len(rows), results[n][1]) for n, rows in groups.items()}
        return TeacherScores(valid=request.valid_mask(), teacher_name=self.name, per_teacher=per_teacher, **merged)

    # -- mixtures ----------------------------------------------------------------------------------------------

    def _log_weights(self, like: torch.Tensor) -> torch.Tensor:
        """`[n, 1, ...]` log w_i broadcastable against a stack `[n, ...]` of `like`-shaped tensors."""
        w = torch.tensor([self.weights[n] for n in self.teachers], dtype=torch.float32, device=like.device)
        return w.log().view(-1, *([1] * like.dim()))

    def _combine(self, stacked: torch.Tensor) -> torch.Tensor:
        """Teachers' log-probs `[n, ...]` -> the mixture's: geometric (unnormalised) or arithmetic."""
        logw = self._log_weights(stacked[0])
        if self.mixture == "geometric":
            return (logw.exp() * stacked).sum(0)
        return torch.logsumexp(logw + stacked, dim=0)

    def _mixed(self, request: TeacherRequest) -> TeacherScores:
        if self.gives_full_logits:
            return self._mixed_logits(request)
        if self.mixture == "geometric" and (request.topk or request.extra_ids is not None):
            raise TeacherError(f"{self.name}: the geometric mixture of served teachers is known only up to its "
                               f"normaliser (it needs every teacher's full logits), so it gives sampled-token "
                               f"log-ratios (route B) only; top-k / extra ids (route A) were asked. Use "
                               f"mixture='arithmetic', colocated teachers, or topk=0 and no extra ids")
        if request.topk and not self.scores_extra_ids:
            cannot = sorted(n for n, t in self.teachers.items() if not t.scores_extra_ids)
            raise TeacherError(f"{self.name}: the mixture's top-k needs every teacher's logprobs on the union of "
                               f"the teachers' top-k ids, but {cannot} cannot score extra ids; ask topk=0")
        valid = request.valid_mask()
        if not request.topk:
            results = self._score_all({n: request for n in self.teachers})
            return self._sparse_result(request, results, request.extra_ids, None)
        # Round 1: each teacher's top-k. Round 2: each teacher's logprobs on the union (after the asked extra ids).
        first_request = TeacherRequest(tokens=request.tokens, lengths=request.lengths,
                                       score_start=request.score_start, topk=request.topk,
                                       domains=request.domains, privileged=request.privileged)
        first = self._score_all({n: first_request for n in self.teachers})
        union = _union_ids([first[n][0].topk_ids for n in self.teachers], valid)
        asked = request.extra_ids
        extra_ids = union if asked is None else torch.cat([asked, union.to(asked.dtype)], dim=-1)
        second_request = TeacherRequest(tokens=request.tokens, lengths=request.lengths,
                                        score_start=request.score_start, topk=0, extra_ids=extra_ids,
                                        domains=request.domains, privileged=request.privileged)
        second = self._score_all({n: second_request for n in self.teachers})
        for n in self.teachers:   # both rounds count against the teacher
            second[n] = (second[n][0], second[n][1] + first[n][1])
        return self._sparse_result(request, second, extra_ids, (union, first))

    def _sparse_result(self, request: TeacherRequest, results: dict, extra_ids: Optional[torch.Tensor],
                       topk_round) -> TeacherScores:
        valid = request.valid_mask()
        names = list(self.teachers)
        sampled = self._combine(torch.stack([results[n][0].sampled_logprobs.float() for n in names]))
        sampled = torch.where(valid, sampled, 0.0)
        extra = topk_ids = topk_lp = None
        per_teacher = {n: self._diagnostics(results[n][0], request.batch_size, results[n][1]) for n in names}
        if extra_ids is not None:
            used = valid.unsqueeze(-1) & (extra_ids >= 0)
            mixed = self._combine(torch.stack([results[n][0].extra_logprobs.float() for n in names]))
            mixed = torch.where(used, mixed, 0.0)
            asked = 0 if request.extra_ids is None else request.extra_ids.shape[-1]
            extra = mixed[..., :asked] if request.extra_ids is not None else None
            if topk_round is not None:
                union, first = topk_round
                on_union = torch.where(used[..., asked:], mixed[..., asked:], float("-inf"))
                topk_lp, order = on_union.sort(dim=-1, descending=True, stable=True)  # union ids ascend: ties -> lower id
                topk_lp, topk_ids = topk_lp[..., : request.topk], union.gather(-1, order)[..., : request.topk]
                # Any id outside the union has p <= sum_i w_i q_i^(k) (each teacher's k-th probability).
                kth = torch.stack([first[n][0].topk_logprobs.float().amin(-1) for n in names])
                bound = torch.logsumexp(self._log_weights(kth[0]) + kth, dim=0)
                certified = (topk_lp[..., -1] >= bound) | ~valid
                rate = float(certified[valid].float().mean()) if bool(valid.any()) else 1.0
                per_teacher["mixture"] = {"topk_certified_rate": rate, "union_size_mean":
                                          float((union >= 0).sum(-1)[valid].float().mean()) if bool(valid.any())
                                          else 0.0}
                if self.require_exact_topk and rate < 1.0:
                    b, j = (~certified).nonzero()[0].tolist()
                    raise TeacherError(f"{self.name}: the mixture's top-{request.topk} at row {b}, column {j} is not "
                                       f"certified by the teachers' top-k union (its k-th logprob "
                                       f"{float(topk_lp[b, j, -1]):.4g} < the bound {float(bound[b, j]):.4g} on "
                                       f"ids outside the union); ask a larger top-k, or "
                                       f"require_exact_topk=False to accept the top-k within the union")
                topk_lp = torch.where(valid.unsqueeze(-1), topk_lp, 0.0)
                topk_ids = torch.where(valid.unsqueeze(-1), topk_ids, 0)
        return TeacherScores(sampled_logprobs=sampled, valid=valid, topk_ids=topk_ids, topk_logprobs=topk_lp,
                             extra_logprobs=extra, teacher_name=self.name, per_teacher=per_teacher)

    def _mixed_logits(self, request: TeacherRequest) -> TeacherScores:
        """Every teacher returned its logits shard: the mixture's logits, and every field exactly from them."""
        from opd_megatron.parallel.topk import vocab_parallel_logsumexp, vocab_parallel_topk
        from opd_megatron.parallel.divergences import vocab_parallel_token_logprobs

        names = list(self.teachers)
        plain = TeacherRequest(tokens=request.tokens, lengths=request.lengths, score_start=request.score_start,
                               domains=request.domains, privileged=request.privileged)
        results = self._score_all({n: plain for n in names})
        shards = []
        for n in names:
            shard = results[n][0].logits_shard
            if shard is None:
                raise TeacherError(f"{self.name}: teacher {n} gives full logits but returned no logits_shard")
            shards.append(shard.float())
        if len({tuple(s.shape) for s in shards}) > 1:
            raise TeacherError(f"{self.name}: the teachers' logits shards differ in shape "
                               f"{[tuple(s.shape) for s in shards]}; mixing needs one vocabulary layout")
        vocab, group = self._vocab, self.vocab_group
        w = {n: self.weights[n] for n in names}
        with torch.no_grad():
            if self.mixture == "geometric":
                # sum_i w_i (z_i - lse_i) = sum_i w_i z_i - const: the same softmax, no normaliser needed here.
                mixed = sum(w[n] * s for n, s in zip(names, shards))
            else:
                logq = [s - vocab_parallel_logsumexp(s, vocab, group).unsqueeze(-1) for s in shards]
                mixed = torch.logsumexp(torch.stack([math.log(w[n]) + lq for n, lq in zip(names, logq)]), dim=0)
            valid = request.valid_mask().to(mixed.device)
            lse = vocab_parallel_logsumexp(mixed, vocab, group)
            labels = torch.where(valid, request.tokens[:, 1:].to(mixed.device), 0).long()
            sampled = vocab_parallel_token_logprobs(mixed, labels, true_vocab_size=vocab, group=group)
            sampled = torch.where(valid, sampled, 0.0)
            extra = topk_ids = topk_lp = None
            if request.extra_ids is not None:
                ids = request.extra_ids.to(mixed.device)
                extra = torch.stack([vocab_parallel_token_logprobs(mixed, ids[..., e].clamp_min(0).long(),
                                                                   true_vocab_size=vocab, group=group)
                                     for e in range(ids.shape[-1])], dim=-1)
                extra = torch.where(valid.unsqueeze(-1) & (ids >= 0), extra, 0.0)
            if request.topk:
                values, ids = vocab_parallel_topk(mixed, request.topk, vocab, group)
                values, order = values.sort(dim=-1, descending=True, stable=True)  # ids ascend: ties -> lower id
                topk_ids = torch.where(valid.unsqueeze(-1), ids.gather(-1, order), 0)
                topk_lp = torch.where(valid.unsqueeze(-1), values - lse.unsqueeze(-1), 0.0)
            mixed = torch.where(valid.unsqueeze(-1), mixed, 0.0)
        per_teacher = {n: self._diagnostics(results[n][0], request.batch_size, results[n][1]) for n in names}
        return TeacherScores(sampled_logprobs=sampled, valid=valid, topk_ids=topk_ids, topk_logprobs=topk_lp,
                             extra_logprobs=extra, logits_shard=mixed, teacher_name=self.name,
                             per_teacher=per_teacher)


def _select_rows(request: TeacherRequest, rows: list[int]) -> TeacherRequest:
    """The rows `rows` of `request` as a request of their own, trimmed to their longest row."""
    index = torch.tensor(rows, dtype=torch.long)
    length = int(request.lengths[index].max())
    pick = (lambda seq: None if seq is None else [seq[b] for b in rows])
    extra = None if request.extra_ids is None else request.extra_ids[index, : length - 1]
    return TeacherRequest(tokens=request.tokens[index, :length], lengths=request.lengths[index],
                          score_start=request.score_start[index], topk=request.topk, extra_ids=extra,
                          domains=pick(request.domains), privileged=pick(request.privileged))


def _union_ids(topk_ids: list[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    """Per column, the distinct ids of all teachers' top-k `[B, C, k]` each: `[B, C, n*k]` ascending, with the
    repeats (and every entry of an unscored column) set to -1."""
    ids, _ = torch.cat([t.long() for t in topk_ids], dim=-1).sort(dim=-1)
    repeat = torch.zeros_like(ids, dtype=torch.bool)
    repeat[..., 1:] = ids[..., 1:] == ids[..., :-1]
    return torch.where(repeat | ~valid.unsqueeze(-1), -1, ids)
