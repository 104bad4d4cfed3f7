"""The one structure that carries a batch from rollout -> teacher -> loss -> update.

Columns are label-aligned, as in `teachers/base.py`: `tokens [B, L]` holds prompt + response (+ eos), right-padded;
column j of every `[B, L-1]` field describes the prediction of `tokens[:, j+1]` from `tokens[:, :j+1]`, which is
what the student's forward on `tokens[:, :-1]` outputs at position j. The response of row b occupies label columns
`prompt_lengths[b] - 1 .. lengths[b] - 2`; `loss_mask` is 1 exactly there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch

from opd_megatron.teachers.base import TeacherRequest, TeacherScores


@dataclass
class RolloutBatch:
    """tokens `[B, L]` int64 (pad_id after `lengths`); lengths `[B]`; prompt_lengths `[B]`.
    loss_mask `[B, L-1]` float32: 1 on response label columns.
    behaviour_logprobs `[B, L-1]` float32: log-probs of the sampled tokens under the policy that generated them, at
        the sampling temperature's distribution (0 off the response); None for data that was not sampled (e.g. the
        fixed-dataset share of GKD's on-policy fraction).
    old_logprobs `[B, L-1]` float32: log-probs of the sampled tokens under the loss's distribution at the weights
        that sampled them (full softmax at `opd.student_temperature`, from the same logits): the PPO ratio's
        denominator `pi_theta_old`, while behaviour_logprobs is `mu`; same convention (0 off the response), None
        where behaviour_logprobs is.
    group_ids `[B]` int64: rows sampled from the same prompt share a group (leave-one-out baselines).
    on_policy `[B]` bool: sampled by the student (True) or taken from a fixed dataset (False).
    prompts: the prompt texts (for verifiers and reports), domains: per-row tags (multi-teacher routing),
    privileged: per-row privileged-context ids (self-distillation).
    rewards `[B]` (verifier outcomes), teacher (the teacher's scores), advantages `[B, L-1]`, values `[B, L-1]`
    (GAE-OPD's value head) are filled as the batch moves through the loop.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    prompt_lengths: torch.Tensor
    loss_mask: torch.Tensor
    behaviour_logprobs: Optional[torch.Tensor]
    group_ids: torch.Tensor
    on_policy: torch.Tensor
    prompts: list[str] = field(default_factory=list)
    domains: Optional[list[str]] = None
    privileged: Optional[list[list[int]]] = None
    rewards: Optional[torch.Tensor] = None
    teacher: Optional[TeacherScores] = None
    advantages: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    loss_weights: Optional[torch.Tensor] = None   # [B, L-1] normaliser coefficients (objective.normalizer_weights)
    reference_logprobs: Optional[torch.Tensor] = None   # [B, L-1] sampled-token log-probs of the frozen reference
    old_logprobs: Optional[torch.Tensor] = None   # [B, L-1] pi_theta_old(y_t), the full softmax (see above)
    outcome_advantages: Optional[torch.Tensor] = None   # [B] R - b_R, centred on the whole batch (outcome hybrid)
    policy_version: int = 0          # the optimizer step whose weights sampled it (staleness = step - this)
    sample_keys: Optional[torch.Tensor] = None   # [B] int64 corpus window keys (rollout.source corpus), -1: none

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def input_tokens(self) -> torch.Tensor:
        """`[B, L-1]`: what the student's forward reads."""
        return self.tokens[:, :-1]

    @property
    def labels(self) -> torch.Tensor:
        """`[B, L-1]`: the token each column predicts."""
        return self.tokens[:, 1:]

    def response_ids(self, b: int) -> list[int]:
        """Row b's response ids, eos included when it was generated."""
        return self.tokens[b, int(self.prompt_lengths[b]): int(self.lengths[b])].tolist()

    def teacher_request(self, topk: int = 0, extra_ids: Optional[torch.Tensor] = None) -> TeacherRequest:
        """What the teacher scores: the response columns, in the student's own contexts."""
        return TeacherRequest(tokens=self.tokens, lengths=self.lengths, score_start=self.prompt_lengths - 1,
                              topk=topk, extra_ids=extra_ids, domains=self.domains, privileged=self.privileged,
                              sample_keys=self.sample_keys)

    def select(self, rows: Sequence[int] | torch.Tensor) -> "RolloutBatch":
        """The rows `rows` as a new batch (micro-batches, data-parallel shares); every per-row field follows."""
        index = torch.as_tensor(rows, dtype=torch.long)
        picked = [int(i) for i in index.tolist()]

        def rows_of(x):
            if x is None:
                return None
            if isinstance(x, torch.Tensor):
                return x[index]
            if isinstance(x, TeacherScores):
                return TeacherScores(
                    sampled_logprobs=x.sampled_logprobs[index], valid=x.valid[index],
                    topk_ids=rows_of(x.topk_ids), topk_logprobs=rows_of(x.topk_logprobs),
                    extra_logprobs=rows_of(x.extra_logprobs), extra_ids=rows_of(x.extra_ids),
                    logits_shard=rows_of(x.logits_shard),
                    teacher_name=x.teacher_name, per_teacher=x.per_teacher)
            return [x[i] for i in picked] if len(x) else []

        return replace(self, **{name: rows_of(getattr(self, name)) for name in _PER_ROW})

    def micro_batches(self, size: int) -> list["RolloutBatch"]:
        return [self.select(range(start, min(start + size, self.size))) for start in range(0, self.size, size)]

    def trimmed(self) -> "RolloutBatch":
        """The same rows with trailing all-padding columns removed (L = max length), so the forward is short."""
        length = int(self.lengths.max())
        if length == self.tokens.shape[1]:
            return self

        def cut(x, cols):
            return None if x is None else x[:, :cols]

        teacher = self.teacher
        if teacher is not None:
            teacher = TeacherScores(
                sampled_logprobs=cut(teacher.sampled_logprobs, length - 1), valid=cut(teacher.valid, length - 1),
                topk_ids=cut(teacher.topk_ids, length - 1), topk_logprobs=cut(teacher.topk_logprobs, length - 1),
                extra_logprobs=cut(teacher.extra_logprobs, length - 1), extra_ids=cut(teacher.extra_ids, length - 1),
                logits_shard=cut(teacher.logits_shard, length - 1),
                teacher_name=teacher.teacher_name, per_teacher=teacher.per_teacher)
        return replace(self, tokens=self.tokens[:, :length], loss_mask=cut(self.loss_mask, length - 1),
                       behaviour_logprobs=cut(self.behaviour_logprobs, length - 1), teacher=teacher,
                       advantages=cut(self.advantages, length - 1), values=cut(self.values, length - 1),
                       loss_weights=cut(self.loss_weights, length - 1),
                       reference_logprobs=cut(self.reference_logprobs, length - 1),
                       old_logprobs=cut(self.old_logprobs, length - 1))

    @staticmethod
    def from_sequences(prompts_ids: Sequence[Sequence[int]], responses_ids: Sequence[Sequence[int]], pad_id: int,
                       length: Optional[int] = None, behaviour_logprobs: Optional[Sequence[Sequence[float]]] = None,
                       group_ids: Optional[Sequence[int]] = None, on_policy: bool = True,
                       prompts: Optional[list[str]] = None, domains: Optional[list[str]] = None,
                       policy_version: int = 0,
                       old_logprobs: Optional[Sequence[Sequence[float]]] = None) -> "RolloutBatch":
        """Build a batch from per-row prompt and response id lists (responses include eos where one was produced).
        behaviour_logprobs and old_logprobs, if given, have one value per response token."""
        rows = len(prompts_ids)
        if len(responses_ids) != rows:
            raise ValueError(f"{rows} prompts but {len(responses_ids)} responses")
        total = [len(p) + len(r) for p, r in zip(prompts_ids, responses_ids)]
        length = length or max(total)
        if max(total) > length:
            raise ValueError(f"a prompt + response of {max(total)} tokens exceeds the batch length {length}")
        for b, (p, r) in enumerate(zip(prompts_ids, responses_ids)):
            if len(p) < 1 or len(r) < 1:
                raise ValueError(f"row {b}: prompt and response need >= 1 token each, got {len(p)} and {len(r)}")
        tokens = torch.full((rows, length), pad_id, dtype=torch.long)
        loss_mask = torch.zeros(rows, length - 1)
        # Per-response-token log-probs (one value per response token) placed on the response's label columns.
        per_token = {name: (given, torch.zeros(rows, length - 1)) for name, given in
                     (("behaviour", behaviour_logprobs), ("old", old_logprobs)) if given is not None}
        for b, (p, r) in enumerate(zip(prompts_ids, responses_ids)):
            tokens[b, : len(p) + len(r)] = torch.tensor(list(p) + list(r), dtype=torch.long)
            loss_mask[b, len(p) - 1: len(p) + len(r) - 1] = 1.0
            for name, (given, out) in per_token.items():
                values = given[b]
                if len(values) != len(r):
                    raise ValueError(f"row {b}: {len(values)} {name} logprobs for {len(r)} response tokens")
                out[b, len(p) - 1: len(p) + len(r) - 1] = torch.tensor(values, dtype=torch.float32)
        behaviour = per_token["behaviour"][1] if "behaviour" in per_token else None
        old = per_token["old"][1] if "old" in per_token else None
        return RolloutBatch(
            tokens=tokens, lengths=torch.tensor(total, dtype=torch.long),
            prompt_lengths=torch.tensor([len(p) for p in prompts_ids], dtype=torch.long), loss_mask=loss_mask,
            behaviour_logprobs=behaviour,
            group_ids=torch.as_tensor(group_ids if group_ids is not None else range(rows), dtype=torch.long),
            on_policy=torch.full((rows,), on_policy, dtype=torch.bool), prompts=list(prompts or []),
            domains=domains, policy_version=policy_version, old_logprobs=old)


def concat(batches: Sequence[RolloutBatch], pad_id: int) -> RolloutBatch:
    """Rows of several batches (e.g. rollouts and fixed-dataset rows) as one batch, padded to the longest."""
    if not batches:
        raise ValueError("concat needs at least one batch")
    length = max(int(b.tokens.shape[1]) for b in batches)

    def pad(x, cols, value):
        if x.shape[1] == cols:
            return x
        filler = torch.full((x.shape[0], cols - x.shape[1]) + tuple(x.shape[2:]), value, dtype=x.dtype)
        return torch.cat([x, filler], dim=1)

    if any(b.teacher is not None or b.advantages is not None for b in batches):
        raise ValueError("concat batches before teacher scoring and credit assignment")
    def sampled(name: str) -> Optional[torch.Tensor]:
        """A sampler's per-token log-probs over every batch; fixed-dataset rows were not sampled: zeros, and
        `on_policy` False says so."""
        if all(getattr(b, name) is None for b in batches):
            return None
        return torch.cat([pad(getattr(b, name) if getattr(b, name) is not None
                              else torch.zeros(b.size, b.tokens.shape[1] - 1), length - 1, 0.0) for b in batches])

    behaviour, old = sampled("behaviour_logprobs"), sampled("old_logprobs")
    offsets, groups = 0, []
    for b in batches:
        groups.append(b.group_ids + offsets)
        offsets += int(b.group_ids.max()) + 1 if b.size else 0
    domains = None
    if all(b.domains is not None for b in batches):
        domains = [d for b in batches for d in b.domains]
    return RolloutBatch(
        tokens=torch.cat([pad(b.tokens, length, pad_id) for b in batches]),
        lengths=torch.cat([b.lengths for b in batches]), prompt_lengths=torch.cat([b.prompt_lengths for b in batches]),
        loss_mask=torch.cat([pad(b.loss_mask, length - 1, 0.0) for b in batches]), behaviour_logprobs=behaviour,
        group_ids=torch.cat(groups), on_policy=torch.cat([b.on_policy for b in batches]),
        prompts=[p for b in batches for p in b.prompts], domains=domains,
        policy_version=min(b.policy_version for b in batches), old_logprobs=old,
        sample_keys=None if all(b.sample_keys is None for b in batches) else torch.cat(
            [b.sample_keys if b.sample_keys is not None else torch.full((b.size,), -1, dtype=torch.long)
             for b in batches]))


_PER_ROW = ("tokens", "lengths", "prompt_lengths", "loss_mask", "behaviour_logprobs", "group_ids", "on_policy",
            "prompts", "domains", "privileged", "rewards", "teacher", "advantages", "values", "loss_weights",
            "reference_logprobs", "old_logprobs", "outcome_advantages", "sample_keys")
