"""`opd-megatron dry-run`: check a cluster-scale config on a laptop, without building a tensor.

Prints the parallel layout (which rank holds which tp/pp/dp coordinate, in megatron-core's order), the parameter
count of each pipeline stage as megatron-core's GPTModel (local layer spec) holds it, MoE experts included (split over
tp x ep ranks), and a per-GPU memory estimate (weights, fp32 gradients, optimizer state, activations, logits)
compared with the GPU's memory. For an OPD run (`run.algorithm: opd`) the estimate adds what the loop holds beside
the student: the weights of colocated / in-process teachers (and a self-teacher's frozen or EMA copy) on the last
stage, the teacher's logits and the full-vocabulary loss temporaries of a micro-batch, and the rollout phase (the
KV cache of every row this data-parallel rank samples, at `data.seq_length` = the longest prompt +
`rollout.max_new_tokens`); a step's peak is the larger of its training and rollout phases.

Everything here is arithmetic on the config; `tests/tools/test_dry_run.py` holds the counts equal to real megatron
models and the layout equal to megatron-core's process groups.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from opd_megatron.config import ConfigError, ModelSection, RunConfig, load_config
from opd_megatron.student.model import padded_vocab_size

# megatron-core 0.16.1 `initialize_model_parallel(order="tp-cp-ep-dp-pp")` with cp = ep = 1: generate_masked_
# orthogonal_rank_groups decomposes a global rank as  rank = tp_rank + tp * (dp_rank + dp * pp_rank).
MEGATRON_RANK_ORDER = "tp-cp-ep-dp-pp"
FULL_TABLE_MAX_RANKS = 64
GIB = 2 ** 30
# Held back from the GPU's memory for what the estimate does not count: the CUDA context, NCCL buffers, the
# caching allocator's fragmentation and temporaries of the backward pass.
RESERVED_FRACTION = 0.10
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


# ---------------------------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RankCoord:
    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int


def rank_layout(tp: int, pp: int, world_size: int) -> list[RankCoord]:
    """Global rank -> (tp, pp, dp) coordinate in megatron-core's default order: tp fastest, then dp, then pp."""
    if world_size % (tp * pp) != 0:
        raise ConfigError(f"world size {world_size} is not a multiple of parallel.tp x parallel.pp = {tp * pp}")
    dp = world_size // (tp * pp)
    return [RankCoord(rank=r, tp_rank=r % tp, dp_rank=(r // tp) % dp, pp_rank=r // (tp * dp))
            for r in range(world_size)]


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Count:
    """Parameters of one part of the model. `sharded` is split evenly over the tp ranks (column/row-parallel
    weights, vocab-parallel embeddings); `replicated` is held whole by every tp rank (norms, row-parallel biases,
    learned position embeddings, MoE routers); `expert` is MoE expert weights: each of the ep ranks of an expert-
    parallel group holds num_moe_experts / ep experts, each tp-sharded (megatron-core's expert tp = tp)."""
    sharded: int = 0
    replicated: int = 0
    expert: int = 0

    def __add__(self, other: "Count") -> "Count":
        return Count(self.sharded + other.sharded, self.replicated + other.replicated, self.expert + other.expert)

    def __mul__(self, n: int) -> "Count":
        return Count(self.sharded * n, self.replicated * n, self.expert * n)

    @property
    def total(self) -> int:
        return self.sharded + self.replicated + self.expert

    def per_rank(self, tp: int, ep: int = 1) -> int:
        return self.sharded // tp + self.replicated + self.expert // (tp * ep)


@dataclass(frozen=True)
class StageParams:
    stage: int
    num_layers: int
    embedding: Count       # word (+ learned position) embeddings: first stage only
    layers: Count
    final_norm: Count      # last stage only
    output_layer: Count    # last stage; with tied embeddings only when pp > 1 (a copy of the embedding)
    output_is_tied_copy: bool

    @property
    def count(self) -> Count:
        return self.embedding + self.layers + self.final_norm + self.output_layer


@dataclass(frozen=True)
class StageCounts:
    stages: tuple[StageParams, ...]
    tp: int
    padded_vocab_size: int
    ep: int = 1

    @property
    def total(self) -> int:
        """Distinct parameters of the model: a tied output layer's copy on the last stage is not counted again."""
        return sum(s.count.total for s in self.stages) - sum(
            s.output_layer.total for s in self.stages if s.output_is_tied_copy)

    @property
    def stored(self) -> int:
        """Parameters stored over one model replica (tp x pp ranks), the tied copy included."""
        return sum(s.count.total for s in self.stages)


def _norm(cfg: RunConfig, width: int) -> Count:
    # torch RMSNorm holds a weight; LayerNorm a weight and a bias.
    return Count(replicated=width * (2 if cfg.model.normalization == "LayerNorm" else 1))


def layer_count(cfg: RunConfig) -> Count:
    """One transformer layer of megatron-core's local spec (get_gpt_layer_local_spec)."""
    m = cfg.model
    h, d, bias = m.hidden_size, m.head_dim, m.add_bias_linear
    q_width, kv_width = m.num_attention_heads * d, m.query_groups * d
    qkv_width = q_width + 2 * kv_width                      # GQA: query heads + one K and one V per group
    fc1_width = 2 * m.ffn_hidden_size if m.activation == "swiglu" else m.ffn_hidden_size  # gate and up in one
    count = _norm(cfg, h) * 2                                # input_layernorm, pre_mlp_layernorm
    count += Count(sharded=qkv_width * h + (qkv_width if bias or m.add_qkv_bias else 0))  # linear_qkv: column-par.
    count += Count(sharded=h * q_width, replicated=h if bias else 0)       # linear_proj: row-parallel
    if m.num_moe_experts is None:
        count += Count(sharded=fc1_width * h + (fc1_width if bias else 0))     # linear_fc1: column-parallel
        count += Count(sharded=h * m.ffn_hidden_size, replicated=h if bias else 0)  # linear_fc2: row-parallel
    else:
        # MoELayer: a TopKRouter [experts, h] (whole on every rank) and `experts` MLPs of width moe_ffn_hidden_size
        # (SequentialMLP of the local spec). An expert's fc2 bias is counted as split like its weights.
        experts, f_e = m.num_moe_experts, m.moe_ffn_hidden_size or m.ffn_hidden_size
        fc1_e = 2 * f_e if m.activation == "swiglu" else f_e
        count += Count(replicated=experts * h + (experts if bias else 0))
        count += Count(expert=experts * (fc1_e * h + h * f_e + ((fc1_e + h) if bias else 0)))
    if m.qk_layernorm:
        count += _norm(cfg, d) * 2                           # q_layernorm, k_layernorm over the head dim
    return count


def parameter_counts(cfg: RunConfig) -> StageCounts:
    """Parameters of each pipeline stage as megatron-core's GPTModel (local spec) builds them, with the embedding's
    rows (an HF checkpoint's, else the vocabulary) padded as `student.model.build_student` pads them."""
    m, p = cfg.model, cfg.parallel
    vocab = padded_vocab_size(m.embedding_rows, p.tp)
    word_embedding = Count(sharded=vocab * m.hidden_size)   # VocabParallelEmbedding
    position_embedding = Count(replicated=m.max_position_embeddings * m.hidden_size
                               if m.position_embedding == "learned_absolute" else 0)
    layers_per_stage = m.num_layers // p.pp
    stages = []
    for stage in range(p.pp):
        first, last = stage == 0, stage == p.pp - 1
        # Tied embeddings: one stage reuses the embedding; with pp > 1 megatron keeps a copy of it as the last
        # stage's output layer and all-reduces its gradient with the first stage's.
        has_output = last and not (m.tie_embeddings and first)
        stages.append(StageParams(
            stage=stage, num_layers=layers_per_stage,
            embedding=word_embedding + position_embedding if first else Count(),
            layers=layer_count(cfg) * layers_per_stage,
            final_norm=_norm(cfg, m.hidden_size) if last else Count(),
            output_layer=word_embedding if has_output else Count(),
            output_is_tied_copy=has_output and m.tie_embeddings))
    return StageCounts(stages=tuple(stages), tp=p.tp, padded_vocab_size=vocab, ep=p.ep)


# ---------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------

def layer_activation_bytes(cfg: RunConfig) -> tuple[int, int]:
    """Bytes one transformer layer keeps for backward, for one micro-batch, on one tp rank ->
    (total, the part in attention scores [b, heads, s, s]).

    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (arXiv:2205.05198),
    section 4 / table 2, with 2-byte activations and 1-byte dropout masks:
        no parallelism                   s*b*h * (34 + 5*a*s/h)
        tensor parallel t                s*b*h * (10 + 24/t + 5*a*s/(h*t))
        tensor + sequence parallel t     s*b*h/t * (34 + 5*a*s/h)
    The same accounting, term by term, for this model (h_q = heads*head_dim, h_kv = groups*head_dim, f = ffn):
        outside the tp regions (split by t only with sequence parallelism):
            two norm inputs 2*2sbh, QKV input 2sbh, fc1 input 2sbh, two dropout masks 2sbh (only if dropout > 0)
        inside the tp regions (split by t):
            Q and K 2sb(h_q + h_kv), V 2sb*h_kv, output-projection input 2sb*h_q,
            GeLU: fc1 output 2sbf + GeLU output 2sbf;  SwiGLU: fc1 output 2sb*2f + silu(gate) 2sbf + product 2sbf,
            qk_layernorm: pre-norm Q and K 2sb(h_q + h_kv)
            attention scores: softmax output 2as^2b, plus dropout mask as^2b and output 2as^2b if dropout > 0
    With GPT's MLP (GeLU, f = 4h), multi-head attention and dropout this is exactly the paper's formula; "2" is
    the activation dtype's size (4 for fp32). The scores term is what megatron's local DotProductAttention stores;
    TransformerEngine's fused (flash) attention stores none of it.
    """
    m, p = cfg.model, cfg.parallel
    s, b, h, t = cfg.data.seq_length, p.micro_batch_size, m.hidden_size, p.tp
    act = DTYPE_BYTES[m.dtype]
    h_q, h_kv, f = m.num_attention_heads * m.head_dim, m.query_groups * m.head_dim, m.ffn_hidden_size
    hidden_masks = 2 * h if m.hidden_dropout > 0 else 0
    outside = act * (2 * h + h + h) + hidden_masks
    moe_dispatch = 0
    if m.num_moe_experts is not None:
        # Each token passes through moe_router_topk experts: their MLP activations count top-k times, plus the
        # permuted copies of its input and the router's fp32 logits and probabilities.
        f = m.moe_router_topk * (m.moe_ffn_hidden_size or m.ffn_hidden_size)
        moe_dispatch = act * m.moe_router_topk * h
        outside += 4 * 2 * m.num_moe_experts
    mlp = (2 * f + f + f) if m.activation == "swiglu" else (f + f)
    inside = act * ((h_q + h_kv) + h_kv + h_q + mlp + ((h_q + h_kv) if m.qk_layernorm else 0)) + moe_dispatch
    scores_per_token = m.num_attention_heads * s * (act + (1 + act if m.attention_dropout > 0 else 0))
    sp = t if p.sequence_parallel else 1
    scores = s * b * scores_per_token // t
    return s * b * outside // sp + s * b * inside // t + scores, scores


def logits_bytes(cfg: RunConfig, padded_vocab: int) -> int:
    """Last stage, one micro-batch [b, s, V/tp]: the output layer's logits in the model dtype, the fp32 copy the
    loss makes (`student.lm_loss`), and the fp32 softmax megatron's vocab_parallel_cross_entropy saves for backward;
    all three are live while the loss runs. (A rank whose vocabulary shard holds padding makes one more
    model-dtype copy to mask it; llama3 and qwen3 vocabularies need no padding.)"""
    p = cfg.parallel
    elements = p.micro_batch_size * cfg.data.seq_length * padded_vocab // p.tp
    return elements * (DTYPE_BYTES[cfg.model.dtype] + 4 + 4)


def optimizer_bytes_per_param(cfg: RunConfig) -> int:
    """Megatron's optimizer: an fp32 master copy when the model is bf16/fp16, plus Adam's two fp32 moments
    (SGD: one fp32 momentum buffer if momentum > 0)."""
    master = 4 if cfg.model.dtype != "fp32" else 0
    if cfg.optim.optimizer == "adam":
        return master + 8
    return master + (4 if cfg.optim.sgd_momentum > 0 else 0)


# ---------------------------------------------------------------------------------------------------------------
# OPD: teachers beside the student, the loss's vocabulary temporaries, the rollout phase
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResidentTeacher:
    """A teacher whose weights live on the student's last-stage ranks: its name in the report, its shape (None
    where neither the config nor a config.json gives it: read from the checkpoint at run time) and where the shape
    was read."""
    name: str
    model: Optional[ModelSection]
    origin: str = ""


def resident_teachers(cfg: RunConfig) -> list[ResidentTeacher]:
    """Colocated and in-process teachers (multi-teacher members too) and a self-teacher's frozen / EMA copy of the
    student (`current` shares the student's weights). A colocated teacher's shape is its HF checkpoint's config.json
    when its path is one (`RunConfig.colocated_teachers`), else its config section's. Served teachers hold nothing
    on the training GPUs."""
    if cfg.run.algorithm != "opd":
        return []
    t = cfg.teacher
    if t.kind == "self":
        mode = t.self_teacher.mode
        return [] if mode == "current" else [ResidentTeacher(f"self ({mode} copy)", cfg.model, "the student's")]
    colocated = iter(cfg.colocated_teachers())
    members = [(m.name, m) for m in t.multi.members] if t.kind == "multi" else [(t.kind, t.as_member())]
    if t.live_member is not None:      # a teacher cache's live teacher of the on-policy rows
        members = [("cache.live", t.live_member)]
    resident = []
    for name, member in members:
        if member.kind == "colocated":
            shape = next(colocated)
            resident.append(ResidentTeacher(name, shape.model, shape.origin))
        elif member.kind == "inprocess":
            resident.append(ResidentTeacher(name, None))
    return resident


def teacher_weight_bytes(cfg: RunConfig, model: ModelSection) -> int:
    """One last-stage rank's share of a colocated teacher: the whole model (PP=1) at the student's tp (and ep), in
    the teacher's dtype (teachers/colocated.py: `build_teacher_model`)."""
    whole = dataclasses.replace(cfg, model=model, parallel=dataclasses.replace(cfg.parallel, pp=1))
    return parameter_counts(whole).stages[0].count.per_rank(cfg.parallel.tp, cfg.parallel.ep) * DTYPE_BYTES[model.dtype]


def teacher_logits_bytes(cfg: RunConfig, padded_vocab: int) -> int:
    """A dense teacher's answer for one micro-batch, kept until its loss ran: the fp32 logits shard
    `[b, s, V/tp]` (teachers/colocated.py) and the model-dtype logits it was cast from; a mixture of teachers
    holds one shard per member. Served teachers send `[b, s, k]` top-k logprobs (negligible)."""
    if cfg.run.algorithm != "opd" or not cfg.teacher.dense_on_some_steps:
        return 0
    t, p = cfg.teacher, cfg.parallel
    members = len(t.multi.members) if t.kind == "multi" and t.multi.mixture is not None else 1
    model = (t.live_member or t).colocated.model      # a teacher cache's on-policy steps: its live teacher's
    teacher_dtype = 4 if model is None else DTYPE_BYTES[model.dtype]
    return members * p.micro_batch_size * cfg.data.seq_length * padded_vocab // p.tp * (4 + teacher_dtype)


def opd_loss_bytes(cfg: RunConfig, padded_vocab: int) -> int:
    """Full-vocabulary loss temporaries on the last stage: the student's and the teacher's fp32 log-probabilities
    `[rows, V/tp]` of a divergence on the full support (or the exact reverse-KL baseline), rows = opd.chunk_size
    tokens or the whole micro-batch. Sparse supports and sampled-token losses keep `[rows, k]` (negligible)."""
    o, p = cfg.opd, cfg.parallel
    if cfg.run.algorithm != "opd" or not cfg.teacher.dense:
        return 0
    if not ((o.loss == "divergence" and o.route_a.support == "full") or o.credit.baseline == "reverse_kl"):
        return 0
    rows = p.micro_batch_size * cfg.data.seq_length
    if o.chunk_size is not None:
        rows = min(rows, o.chunk_size)
    return 2 * 4 * rows * padded_vocab // p.tp


def rollout_rows(cfg: RunConfig, world_size: int) -> int:
    """Rows one data-parallel rank samples on an on-policy step: all its global-batch rows, since the on-policy
    fraction picks whole batches (`math/mixtures.py::OnPolicyMixture`); none when no batch is on-policy."""
    if cfg.run.algorithm != "opd" or cfg.opd.mixtures.on_policy_fraction == 0:
        return 0
    return cfg.parallel.global_batch_size // cfg.parallel.dp(world_size)


def served_rollouts(cfg: RunConfig) -> bool:
    """Whether rollouts come from rollout servers (rollout.engine vllm / sglang): then the training GPUs hold no
    KV cache and no sampling logits; the servers do (`format_opd_notes`)."""
    return cfg.rollout.engine != "megatron"


def kv_cache_bytes(cfg: RunConfig, rows: int, layers: int) -> int:
    """megatron's StaticInferenceContext for the sampler (rollout/generate.py): K and V `[seq, rows, groups/tp,
    head_dim]` per layer of the stage, in the model dtype, for every row of the batch at once."""
    m, p = cfg.model, cfg.parallel
    return 2 * layers * cfg.data.seq_length * rows * (m.query_groups // p.tp) * m.head_dim * DTYPE_BYTES[m.dtype]


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one GPU of a pipeline stage. Training phase: weights .. opd_loss; rollout phase (OPD): weights,
    gradients, optimizer, teacher, kv_cache, rollout_logits (activations are freed between the two)."""
    stage: int
    params: int                     # parameters on one tp rank of this stage
    microbatches_in_flight: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    attention_scores: int           # the part of `activations` in attention scores
    logits: int
    teacher: int = 0                # colocated teachers' weights (last stage)
    teacher_logits: int = 0         # a dense teacher's logits of one micro-batch (last stage)
    opd_loss: int = 0               # full-vocabulary loss temporaries (last stage)
    kv_cache: int = 0               # rollout phase
    rollout_logits: int = 0         # rollout phase: a decoding step's logits shard [rows, V/tp] (last stage)

    @property
    def resident(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.teacher

    @property
    def training(self) -> int:
        return self.resident + self.activations + self.logits + self.teacher_logits + self.opd_loss

    @property
    def rollout(self) -> int:
        return self.resident + self.kv_cache + self.rollout_logits if self.kv_cache else 0

    @property
    def total(self) -> int:
        return max(self.training, self.rollout)


@dataclass(frozen=True)
class MemoryEstimate:
    stages: tuple[StageMemory, ...]
    world_size: int
    dp: int
    num_microbatches: int

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    @property
    def per_gpu(self) -> int:
        return self.worst.total


def estimate_memory(cfg: RunConfig, world_size: int) -> MemoryEstimate:
    """Per-GPU bytes of each pipeline stage during a training step.

    weights      params on the rank x dtype size
    gradients    params x 4: megatron DDP accumulates into fp32 main grads (grad_reduce_in_fp32)
    optimizer    params x `optimizer_bytes_per_param`, / dp with optim.use_distributed_optimizer
    activations  `layer_activation_bytes` x layers per stage x micro-batches in flight. 1F1B (megatron's
                 forward_backward_pipelining_without_interleaving) runs min(pp - stage - 1, M) warm-up forwards
                 and then one more before its first backward, so stage i holds min(pp - i, M) micro-batches.
    logits       `logits_bytes` on the last stage (its forward and backward of a micro-batch are back to back)
    Not counted: the embedding/final-norm/output-layer inputs (a few sbh, less than one layer), pipeline send/recv
    buffers, the CUDA context and allocator fragmentation (see RESERVED_FRACTION).
    """
    p = cfg.parallel
    cfg.validate_for_world(world_size)
    counts = parameter_counts(cfg)
    dp, num_microbatches = p.dp(world_size), p.num_microbatches(world_size)
    layer_bytes, layer_scores = layer_activation_bytes(cfg)
    distributed = cfg.optim.use_distributed_optimizer
    if cfg.model.num_moe_experts is not None:
        if cfg.model.num_moe_experts % p.ep != 0:
            raise ConfigError(f"parallel.ep={p.ep} does not divide model.num_moe_experts={cfg.model.num_moe_experts}")
        if dp % p.ep != 0:
            raise ConfigError(f"parallel.ep={p.ep} does not divide the data-parallel size {dp} (megatron-core carves "
                              f"the expert-parallel groups out of the data-parallel ranks)")
    teachers = resident_teachers(cfg)
    teacher_bytes = sum(teacher_weight_bytes(cfg, t.model) for t in teachers if t.model is not None)
    rows = 0 if served_rollouts(cfg) else rollout_rows(cfg, world_size)
    vocab = counts.padded_vocab_size
    stages = []
    for stage in counts.stages:
        params = stage.count.per_rank(p.tp, p.ep)
        experts = stage.count.expert // (p.tp * p.ep)
        # The distributed optimizer shards dense state over dp and expert state over the expert-data-parallel
        # group (dp / ep).
        optimizer = optimizer_bytes_per_param(cfg) * (
            ((params - experts) // dp + experts // max(1, dp // p.ep)) if distributed else params)
        in_flight = min(p.pp - stage.stage, num_microbatches)
        last = stage.stage == p.pp - 1
        stages.append(StageMemory(
            stage=stage.stage, params=params, microbatches_in_flight=in_flight,
            weights=params * DTYPE_BYTES[cfg.model.dtype],
            gradients=params * 4,
            optimizer=optimizer,
            activations=layer_bytes * stage.num_layers * in_flight,
            attention_scores=layer_scores * stage.num_layers * in_flight,
            logits=logits_bytes(cfg, vocab) if last else 0,
            teacher=teacher_bytes if last else 0,
            teacher_logits=teacher_logits_bytes(cfg, vocab) if last else 0,
            opd_loss=opd_loss_bytes(cfg, vocab) if last else 0,
            kv_cache=kv_cache_bytes(cfg, rows, stage.num_layers) if rows else 0,
            rollout_logits=rows * vocab // p.tp * (DTYPE_BYTES[cfg.model.dtype] + 4) if rows and last else 0))
    return MemoryEstimate(stages=tuple(stages), world_size=world_size, dp=dp, num_microbatches=num_microbatches)


def usable_bytes(gpu_memory_gb: float) -> int:
    return int(gpu_memory_gb * GIB * (1 - RESERVED_FRACTION))


def _verdict(per_gpu: int, gpu_memory_gb: float) -> str:
    return "fits" if per_gpu <= usable_bytes(gpu_memory_gb) else "does not fit"


def remedies(cfg: RunConfig, estimate: MemoryEstimate, gpu_memory_gb: float) -> list[str]:
    """What to change, each with its estimate: the same config with one change, re-estimated."""
    p, m, world_size = cfg.parallel, cfg.model, estimate.world_size
    lines = []
    without_scores = max(max(s.training - s.attention_scores, s.rollout) for s in estimate.stages)
    if estimate.per_gpu - without_scores > 0.05 * estimate.per_gpu:
        lines.append(f"TransformerEngine installed (flash attention stores no attention scores): "
                     f"{_gib(without_scores)} GiB per GPU ({_verdict(without_scores, gpu_memory_gb)})")
    served = max(s.total - s.teacher - s.teacher_logits - s.opd_loss for s in estimate.stages)
    if estimate.worst.teacher:
        lines.append(f"serve the teacher (teacher.kind=sglang, top-k supports): {_gib(served)} GiB per GPU "
                     f"({_verdict(served, gpu_memory_gb)})")
    if estimate.worst.kv_cache:
        fewer = dataclasses.replace(cfg, rollout=dataclasses.replace(
            cfg.rollout, prompts_per_step=max(1, cfg.rollout.prompts_per_step // 2)))
        fewer = dataclasses.replace(fewer, parallel=dataclasses.replace(
            p, global_batch_size=fewer.rollout.prompts_per_step * fewer.rollout.samples_per_prompt))
        served = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, engine="vllm"))
        on_servers = estimate_memory(served, world_size).per_gpu
        lines.append(f"rollout.engine=vllm (rollouts on rollout servers of their own, docs/teacher-servers.md): "
                     f"{_gib(on_servers)} GiB per GPU ({_verdict(on_servers, gpu_memory_gb)})")
        try:
            rollout_half = estimate_memory(fewer, world_size).per_gpu
            lines.append(f"rollout.prompts_per_step={fewer.rollout.prompts_per_step} (half the KV cache): "
                         f"{_gib(rollout_half)} GiB per GPU ({_verdict(rollout_half, gpu_memory_gb)})")
        except ConfigError:
            pass

    def with_parallel(**changes) -> RunConfig:
        return dataclasses.replace(cfg, parallel=dataclasses.replace(p, **changes))

    candidates: list[tuple[str, RunConfig, int]] = []
    if not cfg.optim.use_distributed_optimizer and p.dp(world_size) > 1:
        sharded = dataclasses.replace(cfg.optim, use_distributed_optimizer=True)
        candidates.append(("optim.use_distributed_optimizer=true", dataclasses.replace(cfg, optim=sharded),
                           world_size))
    if m.dtype == "fp32":
        candidates.append(("model.dtype=bf16", dataclasses.replace(cfg, model=dataclasses.replace(m, dtype="bf16")),
                           world_size))
    if p.tp > 1 and not p.sequence_parallel:
        candidates.append(("parallel.sequence_parallel=true", with_parallel(sequence_parallel=True), world_size))
    # More tp or pp at the same dp: the world grows unless it already has the ranks.
    for key, bigger in (("tp", with_parallel(tp=p.tp * 2)), ("pp", with_parallel(pp=p.pp * 2))):
        model_parallel = bigger.parallel.tp * bigger.parallel.pp
        world = world_size if world_size % model_parallel == 0 else model_parallel * p.dp(world_size)
        candidates.append((f"parallel.{key}={getattr(bigger.parallel, key)}", bigger, world))
    if p.micro_batch_size > 1:
        candidates.append((f"parallel.micro_batch_size={p.micro_batch_size // 2}",
                           with_parallel(micro_batch_size=p.micro_batch_size // 2), world_size))
    for change, candidate, world in candidates:
        try:
            per_gpu = estimate_memory(candidate.validate(), world).per_gpu
        except ConfigError:  # e.g. tp no longer divides the query groups
            continue
        world_note = f" --world-size {world}" if world != world_size else ""
        lines.append(f"{change}{world_note}: {_gib(per_gpu)} GiB per GPU ({_verdict(per_gpu, gpu_memory_gb)})")
    if not any(line.endswith("(fits)") for line in lines):
        lines.append("no single change fits: combine them")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------

def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _ranks(ranks: list[int]) -> str:
    if len(ranks) <= 8:
        return "[" + ", ".join(map(str, ranks)) + "]"
    return f"[{ranks[0]}, {ranks[1]}, ..., {ranks[-1]}] ({len(ranks)} ranks, stride {ranks[1] - ranks[0]})"


def format_layout(cfg: RunConfig, world_size: int) -> str:
    p = cfg.parallel
    layout = rank_layout(p.tp, p.pp, world_size)
    dp = p.dp(world_size)
    lines = [
        "Parallel layout",
        f"  world size {world_size} = tp {p.tp} x pp {p.pp} x dp {dp}; sequence parallel "
        f"{'on' if p.sequence_parallel else 'off'}",
        f"  micro-batch {p.micro_batch_size} x seq {cfg.data.seq_length}; global batch {p.global_batch_size} -> "
        f"{p.num_microbatches(world_size)} micro-batches per step on each dp rank",
        f"  megatron-core rank order {MEGATRON_RANK_ORDER}: rank = tp_rank + {p.tp}*dp_rank + {p.tp * dp}*pp_rank",
        f"  rank 0's groups: tp {_ranks([c.rank for c in layout if c.pp_rank == 0 and c.dp_rank == 0])}, "
        f"dp {_ranks([c.rank for c in layout if c.pp_rank == 0 and c.tp_rank == 0])}, "
        f"pp {_ranks([c.rank for c in layout if c.tp_rank == 0 and c.dp_rank == 0])}",
        "   rank  tp_rank  pp_rank  dp_rank",
    ]
    shown = layout if world_size <= FULL_TABLE_MAX_RANKS else layout[:8] + [None] + layout[-8:]
    for c in shown:
        lines.append("    ..." if c is None else f"  {c.rank:5d}  {c.tp_rank:7d}  {c.pp_rank:7d}  {c.dp_rank:7d}")
    if world_size > FULL_TABLE_MAX_RANKS:
        lines.append(f"  ({world_size - 16} ranks not shown; every rank follows the formula above)")
    return "\n".join(lines)


def format_parameters(cfg: RunConfig, counts: StageCounts) -> str:
    m, tp = cfg.model, counts.tp
    rows = (f"vocabulary {m.vocab_size} in {m.checkpoint_vocab_size} embedding rows"
            if m.checkpoint_vocab_size else f"vocabulary {m.vocab_size}")
    lines = [f"Parameters ({rows} padded to {counts.padded_vocab_size}; per GPU = one tp rank: sharded weights / "
             f"{tp} + replicated norms and row-parallel biases)",
             "  stage  layers     embedding        layers    final norm  output layer     stage total       per GPU"]
    for s in counts.stages:
        lines.append(f"  {s.stage:5d}  {s.num_layers:6d}  {s.embedding.total:12,d}  {s.layers.total:12,d}  "
                     f"{s.final_norm.total:12,d}  {s.output_layer.total:12,d}  {s.count.total:14,d}  "
                     f"{s.count.per_rank(tp, counts.ep):12,d}")
    lines.append(f"  total {counts.total:,d} ({counts.total:.3g})")
    experts = sum(s.count.expert for s in counts.stages)
    if experts:
        active = counts.total - experts + experts * m.moe_router_topk // m.num_moe_experts
        lines.append(f"  MoE: {experts:,d} in experts, split over tp x ep = {tp} x {counts.ep} ranks; active per token "
                     f"{active:,d} ({active:.3g})")
    tied = [s for s in counts.stages if s.output_is_tied_copy]
    if tied:
        lines.append(f"  tied embeddings with pp > 1: the last stage keeps a copy of the embedding as its output layer "
                     f"({tied[0].output_layer.total:,d}, counted in its stage, not in the total; its gradient is "
                     f"all-reduced with the first stage's); stored over tp x pp ranks: {counts.stored:,d}")
    elif m.tie_embeddings:
        lines.append("  tied embeddings: the output layer reuses the embedding weight")
    return "\n".join(lines)


def format_memory(cfg: RunConfig, estimate: MemoryEstimate, gpu_memory_gb: float) -> str:
    m, o = cfg.model, cfg.optim
    optimizer_note = (f"{o.optimizer}, {optimizer_bytes_per_param(cfg)} B/param"
                      + (f" / dp {estimate.dp} (distributed optimizer)" if o.use_distributed_optimizer else ""))
    lines = [f"Memory per GPU, GiB ({m.dtype} weights, fp32 grads, optimizer {optimizer_note}; activations: "
             f"Korthikanti et al. 2022 per layer x layers x micro-batches in flight under 1F1B)"]
    opd = cfg.run.algorithm == "opd"
    if not opd:
        lines.append("  stage  in flight    weights      grads  optimizer  activations     logits      total")
    else:
        lines.append("  stage  in flight    weights      grads  optimizer    teacher  activations     logits  "
                     "t.logits+loss   training   kv cache    rollout       peak")
    for s in estimate.stages:
        row = (f"  {s.stage:5d}  {s.microbatches_in_flight:9d}  {_gib(s.weights):>9}  {_gib(s.gradients):>9}  "
               f"{_gib(s.optimizer):>9}  ")
        if not opd:
            lines.append(row + f"{_gib(s.activations):>11}  {_gib(s.logits):>9}  {_gib(s.total):>9}")
        else:
            lines.append(row + f"{_gib(s.teacher):>9}  {_gib(s.activations):>11}  {_gib(s.logits):>9}  "
                         f"{_gib(s.teacher_logits + s.opd_loss):>13}  {_gib(s.training):>9}  {_gib(s.kv_cache):>9}  "
                         f"{_gib(s.rollout):>9}  {_gib(s.total):>9}")
    if opd:
        lines += format_opd_notes(cfg, estimate)
    worst = estimate.worst
    usable = usable_bytes(gpu_memory_gb)
    lines.append(f"  worst stage {worst.stage}: {_gib(worst.total)} GiB per GPU "
                 f"(attention scores {_gib(worst.attention_scores)} GiB of its activations: none with "
                 f"TransformerEngine flash attention)")
    lines.append(f"  logits: [micro-batch, seq, vocab/tp] in {m.dtype} + an fp32 copy + the fp32 softmax the "
                 f"cross-entropy saves, one micro-batch on the last stage")
    budget = (f"{_gib(worst.total)} GiB of {_gib(usable)} GiB usable ({gpu_memory_gb:g} GiB less "
              f"{RESERVED_FRACTION:.0%} for the CUDA context, NCCL and fragmentation)")
    if worst.total <= usable:
        lines.append(f"FITS: {budget}")
    else:
        lines.append(f"DOES NOT FIT: {budget}. Options, each estimated alone:")
        lines += [f"  - {line}" for line in remedies(cfg, estimate, gpu_memory_gb)]
    return "\n".join(lines)


def format_opd_notes(cfg: RunConfig, estimate: MemoryEstimate) -> list[str]:
    t, r = cfg.teacher, cfg.rollout
    lines = []
    teachers = resident_teachers(cfg)
    for teacher in teachers:
        model = teacher.model
        if model is None:
            lines.append(f"  teacher {teacher.name}: shape not in the config (read from the checkpoint at run time), "
                         f"NOT counted: give teacher.colocated.model (or its preset) for an estimate")
        else:
            lines.append(f"  teacher {teacher.name}: {model.preset or 'custom'} {model.dtype} ({teacher.origin}), "
                         f"whole (PP=1) at tp {cfg.parallel.tp} on each last-stage rank: "
                         f"{_gib(teacher_weight_bytes(cfg, model))} GiB")
    if not teachers:
        where = {"self": "shares the student's weights (self_teacher.mode current)",
                 "cache": "read from disk: nothing on the training GPUs"}.get(t.kind, "served: nothing on the "
                                                                               "training GPUs")
        if t.live_member is not None:
            where += f"; its on-policy rows' live teacher ({t.live_member.kind}) is served"
        lines.append(f"  teacher {t.kind}: {where}")
    if r.source == "corpus" and cfg.opd.mixtures.on_policy_fraction < 1 and t.topk:
        lines.append(teacher_cache_note(cfg))
    rows = rollout_rows(cfg, estimate.world_size)
    if rows and served_rollouts(cfg):
        lines += served_rollout_notes(cfg, rows * estimate.dp)
    elif rows:
        lines.append(f"  rollout: {rows} rows per dp rank ({r.prompts_per_step} prompts x {r.samples_per_prompt} "
                     f"samples / dp {estimate.dp} x on-policy fraction {cfg.opd.mixtures.on_policy_fraction:g}) "
                     f"sampled at once into one KV cache of {cfg.data.seq_length} positions (data.seq_length)")
    else:
        lines.append("  rollout: none (opd.mixtures.on_policy_fraction=0: fixed rows only)")
    return lines


def teacher_cache_note(cfg: RunConfig) -> str:
    """The disk a teacher top-k cache of the run's offline corpus tokens takes (`opd-megatron cache-teacher`,
    data/teacher_cache.py's encoding): train_steps x global batch x seq_length x the offline share."""
    from opd_megatron.data.teacher_cache import cache_bytes

    offline = 1.0 - cfg.opd.mixtures.on_policy_fraction
    tokens = int(cfg.run.train_steps * cfg.parallel.global_batch_size * cfg.data.seq_length * offline)
    size = cache_bytes(tokens, cfg.teacher.topk, cfg.model.vocab_size, cfg.data.seq_length)
    where = "read by teacher.kind=cache" if cfg.teacher.kind == "cache" else "if cached (teacher.kind=cache)"
    return (f"  teacher cache, {where}: top-{cfg.teacher.topk} of {tokens:.3g} corpus tokens (train_steps x global "
            f"batch x data.seq_length x offline share {offline:g}) = {size / 1e12:.3g} TB "
            f"({size / max(tokens, 1):.0f} B/token); fewer when the corpus has fewer windows (each is cached once)")


def served_rollout_notes(cfg: RunConfig, global_rows: int) -> list[str]:
    """The rollout servers' side of a served engine: each holds the whole student (its weights in the model
    dtype) and the KV cache of the rows it serves; the weight sync writes the student to disk each time."""
    m, r = cfg.model, cfg.rollout
    servers = max(1, len(r.server.urls))
    weights = parameter_counts(cfg).total * DTYPE_BYTES[m.dtype]
    # Every row of a step on the servers at once (vLLM admits as many as its KV cache holds, then queues), split
    # evenly over the servers; with max_staleness k, k later steps' rows may be queued behind them.
    per_server_rows = -(-global_rows // servers)
    kv = 2 * m.num_layers * cfg.data.seq_length * per_server_rows * m.query_groups * m.head_dim * DTYPE_BYTES[m.dtype]
    return [f"  rollout: served by {r.engine} ({servers} server(s) at rollout.server.urls): no KV cache and no "
            f"sampling logits on the training GPUs",
            f"    each server: the student's weights {_gib(weights)} GiB ({m.dtype}), and {_gib(kv)} GiB of KV cache "
            f"to hold its {per_server_rows} rows of a step x {cfg.data.seq_length} positions at once (vLLM admits "
            f"what its cache holds and queues the rest), over the GPUs of its tensor parallelism",
            f"    weight sync every {r.sync_interval} update(s): {_gib(weights)} GiB written to "
            f"{r.server.weights_dir or '<run_dir>/rollout-weights'} each time ({r.server.keep_versions} versions "
            f"kept: {_gib(weights * r.server.keep_versions)} GiB on disk); rows up to {r.max_staleness} update(s) "
            f"stale (rollout.max_staleness)"]


def format_report(cfg: RunConfig, world_size: int, gpu_memory_gb: float = 80.0) -> str:
    m = cfg.model
    counts = parameter_counts(cfg)
    estimate = estimate_memory(cfg, world_size)
    name = m.preset or "custom model"
    moe = (f", MoE {m.num_moe_experts} experts x ffn {m.moe_ffn_hidden_size or m.ffn_hidden_size}, top-"
           f"{m.moe_router_topk}, ep {cfg.parallel.ep}" if m.num_moe_experts is not None else "")
    header = (f"opd-megatron dry-run: {name} ({m.num_layers} layers, hidden {m.hidden_size}, "
              f"{m.num_attention_heads} heads / {m.query_groups} query groups, head dim {m.head_dim}, "
              f"ffn {m.ffn_hidden_size} {m.activation}, {m.normalization}{moe}), {m.dtype}; "
              f"{cfg.run.algorithm}; no tensors built")
    return "\n\n".join([header, format_layout(cfg, world_size), format_parameters(cfg, counts),
                        format_memory(cfg, estimate, gpu_memory_gb)])


def run_dry_run(config_path: Optional[str | Path], overrides: Optional[list[str]] = None,
                world_size: Optional[int] = None, gpu_memory_gb: float = 80.0) -> str:
    """The `opd-megatron dry-run` command: load and validate the config (world size default tp x pp, i.e. dp = 1)
    and return the report. A bad config raises ConfigError naming the key. `gpu_memory_gb` is read as GiB: an
    "80 GB" H100 has 80 GiB of HBM."""
    cfg = load_config(config_path, overrides)
    if world_size is None:
        world_size = cfg.parallel.tp * cfg.parallel.pp
    if world_size < 1:
        raise ConfigError(f"--world-size: expected an integer >= 1, got {world_size}")
    if gpu_memory_gb <= 0:
        raise ConfigError(f"--gpu-memory-gb: expected a positive number, got {gpu_memory_gb}")
    cfg.validate_for_world(world_size)
    return format_report(cfg, world_size, gpu_memory_gb)
