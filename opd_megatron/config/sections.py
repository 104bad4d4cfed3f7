"""The run config's sections that are not the OPD objective's or the teacher's: what the run is, the student
model, the parallel layout, data, optimizer, checkpoints, logging, rollouts, evaluation and the quickstart."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional

from opd_megatron.config.loader import ConfigError, did_you_mean, require
from opd_megatron.config.presets import check_preset


@dataclass
class RunSection:
    """What the run is and where it writes."""
    name: str = "run"
    output_dir: str = "runs"           # the run directory is output_dir/name
    algorithm: Literal["sft", "opd"] = "sft"  # sft: supervised on data.path; opd: on-policy distillation
    seed: int = 1234
    train_steps: int = 100
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA + NCCL where a GPU is present, else CPU + gloo
    # A collective that waits longer than this raises on the waiting ranks (torch.distributed's process-group
    # timeout, megatron's TP/PP/DP groups included; gloo honours it for every collective).
    collective_timeout_s: float = 600.0
    # The watchdog (loop/watchdog.py): a rank whose run makes no progress (no step, save or evaluation finishing) for
    # this long prints which rank and step it waits on and exits non-zero, so Slurm can requeue; 0 = off. It must
    # exceed the longest step, checkpoint save and evaluation of the run.
    hang_timeout_s: float = 3600.0

    def validate(self) -> None:
        require(self.train_steps >= 1, "run.train_steps", "an integer >= 1", self.train_steps)
        require(self.collective_timeout_s > 0, "run.collective_timeout_s", "a positive number of seconds",
                self.collective_timeout_s)
        require(self.hang_timeout_s >= 0, "run.hang_timeout_s", "a number of seconds >= 0 (0: no watchdog)",
                self.hang_timeout_s)
        require(bool(self.name) and "/" not in self.name, "run.name", "a non-empty name without '/'", self.name)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclass
class RopeScalingSection:
    """RoPE frequency scaling, as Hugging Face's `rope_scaling` / `rope_parameters` describe it. `llama3` (Llama
    3.1 / 3.2): wavelengths longer than `original_max_position_embeddings / low_freq_factor` are divided by
    `factor`, shorter than `... / high_freq_factor` kept, smoothly interpolated between (transformers'
    `_compute_llama3_parameters`, megatron-core's `RotaryEmbedding._apply_scaling`). `linear`: positions divided by
    `factor` (megatron's `seq_len_interpolation_factor`)."""
    type: Literal["llama3", "linear"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def validate(self) -> None:
        require(self.factor > 0, "model.rope_scaling.factor", "a positive float", self.factor)
        if self.type == "llama3":
            require(0 < self.low_freq_factor < self.high_freq_factor, "model.rope_scaling.high_freq_factor",
                    f"a float > model.rope_scaling.low_freq_factor={self.low_freq_factor} > 0", self.high_freq_factor)
            require(self.original_max_position_embeddings >= 1, "model.rope_scaling.original_max_position_embeddings",
                    "an integer >= 1", self.original_max_position_embeddings)


@dataclass
class ModelSection:
    """The student: a megatron-core GPTModel (Llama/Qwen style by default)."""
    preset: Optional[str] = None
    # A Hugging Face checkpoint directory (Llama / Qwen2 / Qwen3): its config.json fills in every architecture key
    # when the config is read (config/hf.py; an explicit key that contradicts it is an error), and a run that does
    # not resume its own checkpoint starts from its weights.
    from_hf: Optional[str] = None
    from_hf_layers: Optional[list[int]] = None  # keep only these decoder layers of from_hf (layer-pruned start)
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None   # GQA: None means multi-head attention (= num_attention_heads)
    kv_channels: Optional[int] = None        # head dim; None means hidden_size / num_attention_heads
    vocab_size: int = 512                    # the tokenizer's true size; padded to a multiple of tp internally
    max_position_embeddings: int = 256
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    norm_epsilon: float = 1e-5
    activation: Literal["swiglu", "gelu"] = "swiglu"
    position_embedding: Literal["rope", "learned_absolute"] = "rope"
    rotary_base: int = 10000
    rope_scaling: Optional[RopeScalingSection] = None
    # The embedding's row count when it is larger than the tokenizer (Qwen: 151,936 rows for 151,665 tokens), so that
    # a Hugging Face checkpoint loads and exports with its shape; rows at or past vocab_size carry no mass.
    checkpoint_vocab_size: Optional[int] = None
    tie_embeddings: bool = False
    add_bias_linear: bool = False
    add_qkv_bias: bool = False               # bias on Q/K/V only (Qwen2); implied by add_bias_linear
    qk_layernorm: bool = False
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16 are GPU paths
    # Mixture of experts (megatron-core's MoELayer in place of the MLP of every layer); None: a dense model.
    num_moe_experts: Optional[int] = None
    moe_router_topk: int = 2                 # experts per token
    moe_ffn_hidden_size: Optional[int] = None  # each expert's ffn width; None: ffn_hidden_size

    def validate(self) -> None:
        if self.preset is not None:
            check_preset(self.preset, "model")
        for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size",
                    "max_position_embeddings"):
            require(getattr(self, key) >= 1, f"model.{key}", "an integer >= 1", getattr(self, key))
        groups = self.query_groups
        require(self.num_attention_heads % groups == 0, "model.num_query_groups",
                 f"a divisor of model.num_attention_heads={self.num_attention_heads}", groups)
        if self.kv_channels is None:
            require(self.hidden_size % self.num_attention_heads == 0, "model.hidden_size",
                     f"a multiple of model.num_attention_heads={self.num_attention_heads} (or set model.kv_channels)",
                     self.hidden_size)
        require(self.norm_epsilon > 0, "model.norm_epsilon", "a positive float", self.norm_epsilon)
        require(self.init_method_std > 0, "model.init_method_std", "a positive float", self.init_method_std)
        if self.checkpoint_vocab_size is not None:
            require(self.checkpoint_vocab_size >= self.vocab_size, "model.checkpoint_vocab_size",
                    f"null or an integer >= model.vocab_size={self.vocab_size}", self.checkpoint_vocab_size)
        if self.from_hf_layers is not None:
            require(self.from_hf is not None, "model.from_hf_layers", "null unless model.from_hf is set",
                    self.from_hf_layers)
        if self.rope_scaling is not None:
            require(self.position_embedding == "rope", "model.rope_scaling",
                    "null unless model.position_embedding is rope", self.rope_scaling)
            self.rope_scaling.validate()
        for key in ("hidden_dropout", "attention_dropout"):
            require(0.0 <= getattr(self, key) < 1.0, f"model.{key}", "a float in [0, 1)", getattr(self, key))
        if self.num_moe_experts is not None:
            require(self.num_moe_experts >= 1, "model.num_moe_experts", "null or an integer >= 1",
                     self.num_moe_experts)
            require(1 <= self.moe_router_topk <= self.num_moe_experts, "model.moe_router_topk",
                     f"an integer in [1, model.num_moe_experts={self.num_moe_experts}]", self.moe_router_topk)

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def embedding_rows(self) -> int:
        """Rows the embedding must hold before TP padding: the checkpoint's, or the tokenizer's size."""
        return self.checkpoint_vocab_size or self.vocab_size


@dataclass
class ParallelSection:
    """Parallel layout. dp is derived: world_size / (tp * pp)."""
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    micro_batch_size: int = 4
    global_batch_size: int = 16
    ep: int = 1                     # expert parallel (MoE): experts split over ep ranks of the data-parallel group

    def validate(self) -> None:
        for key in ("tp", "pp", "micro_batch_size", "global_batch_size"):
            require(getattr(self, key) >= 1, f"parallel.{key}", "an integer >= 1", getattr(self, key))
        require(self.ep >= 1, "parallel.ep", "an integer >= 1", self.ep)
        require(self.global_batch_size % self.micro_batch_size == 0, "parallel.global_batch_size",
                 f"a multiple of parallel.micro_batch_size={self.micro_batch_size}", self.global_batch_size)
        if self.sequence_parallel:
            require(self.tp > 1, "parallel.sequence_parallel", "false when parallel.tp == 1", True)

    def dp(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp)

    def num_microbatches(self, world_size: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp(world_size))


@dataclass
class BlendCorpusSection:
    """One corpus of `data.blend`: an indexed dataset's prefix and its weight (normalised over the blend)."""
    path: str = ""
    weight: float = 1.0


@dataclass
class DataSection:
    """Training data. `jsonl`: one JSON object a line, with `prompt`+`response` (loss on the response) or `text`
    (loss on every token). `indexed`: megatron-core `.bin/.idx` written by `opd-megatron preprocess`, one corpus
    (`path`) or a weighted blend (`blend`), cut into fixed windows of packed documents (data/indexed.py)."""
    format: Literal["jsonl", "indexed"] = "jsonl"
    path: str = ""                  # a .jsonl file, or the prefix of an indexed dataset (without .bin/.idx)
    # indexed only, instead of `path`: [{path: /data/web, weight: 0.7}, {path: /data/code, weight: 0.3}]; each
    # sample comes from one corpus with probability weight / sum(weights), in an order fixed by run.seed.
    blend: list[BlendCorpusSection] = field(default_factory=list)
    # indexed only: documents packed into one window (megatron GPTDataset's options, same meaning). eod_mask_loss:
    # the label that opens the next document (predicted from the previous one) does not train; reset_position_ids:
    # positions restart at each document (read by learned_absolute embeddings; RoPE is relative); reset_attention_mask:
    # a token attends only to its own document (megatron-core's local layer spec; refused with TransformerEngine's).
    eod_mask_loss: bool = True
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    tokenizer: str = "byte"         # "byte" (built-in byte-level), or a directory / tokenizer.json of an HF tokenizer
    seq_length: int = 128
    prompt_key: str = "prompt"
    response_key: str = "response"
    text_key: str = "text"
    apply_chat_template: bool = False
    skip_malformed: bool = False    # False: a malformed line is an error; True: skipped and counted
    shuffle: bool = True

    def validate(self) -> None:
        require(self.seq_length >= 2, "data.seq_length", "an integer >= 2", self.seq_length)
        if self.blend:
            require(self.format == "indexed", "data.blend", "empty unless data.format is indexed", self.blend)
            require(not self.path, "data.path", "empty when data.blend is set (the blend names its corpora)",
                    self.path)
            for i, corpus in enumerate(self.blend):
                require(bool(corpus.path), f"data.blend[{i}].path",
                        "the prefix of an indexed dataset (without .bin/.idx)", corpus.path)
                require(math.isfinite(corpus.weight) and corpus.weight > 0, f"data.blend[{i}].weight",
                        "a positive finite number", corpus.weight)


@dataclass
class OptimSection:
    """Optimizer (megatron-core's get_megatron_optimizer) and learning-rate schedule."""
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.9
    clip_grad: float = 1.0          # 0 disables clipping
    warmup_steps: int = 0
    decay_style: Literal["constant", "linear", "cosine"] = "cosine"
    decay_steps: Optional[int] = None  # None: run.train_steps
    use_distributed_optimizer: bool = False  # GPU only (megatron's sharded optimizer state)

    def validate(self) -> None:
        require(self.lr > 0 and math.isfinite(self.lr), "optim.lr", "a positive finite float", self.lr)
        require(0 <= self.min_lr <= self.lr, "optim.min_lr", f"a float in [0, optim.lr={self.lr}]", self.min_lr)
        require(self.weight_decay >= 0, "optim.weight_decay", "a float >= 0", self.weight_decay)
        for key in ("adam_beta1", "adam_beta2"):
            require(0 <= getattr(self, key) < 1, f"optim.{key}", "a float in [0, 1)", getattr(self, key))
        require(self.adam_eps > 0, "optim.adam_eps", "a positive float", self.adam_eps)
        require(self.clip_grad >= 0, "optim.clip_grad", "a float >= 0 (0 disables clipping)", self.clip_grad)
        require(self.warmup_steps >= 0, "optim.warmup_steps", "an integer >= 0", self.warmup_steps)
        if self.decay_steps is not None:
            require(self.decay_steps >= 1, "optim.decay_steps", "an integer >= 1 or null", self.decay_steps)


@dataclass
class CheckpointSection:
    """megatron-core dist_checkpointing checkpoints under <run_dir>/checkpoints/iter_XXXXXXX."""
    save_interval: int = 0          # 0: save only at the end (and on SIGTERM)
    load: Optional[str] = None      # a checkpoint directory, or a run's checkpoints/ (takes the latest)
    resume: bool = True             # resume from <run_dir>/checkpoints if it has a checkpoint
    load_optimizer: bool = True     # False: weights only (e.g. start a new run from a trained model)
    keep_last: int = 2              # older checkpoints are deleted; 0 keeps all
    save_at_end: bool = True
    # At the end of the run, the final checkpoint also as a Hugging Face checkpoint in <run_dir>/hf (safetensors,
    # config.json, tokenizer and chat template; `opd-megatron export-hf` does the same for any checkpoint later).
    export_hf: bool = False
    # Every checkpoint has a manifest of its files' sizes, checked before a load (a truncated or missing file is
    # named). checksums: also the sha256 of every file, each rank hashing its own shards at save and a share of the
    # files at load (one extra read of the checkpoint each way; a flipped byte is named too).
    checksums: bool = False
    # A corrupt checkpoint of a checkpoints directory (the run's own, or checkpoint.load naming one): load the
    # newest older one that verifies instead of stopping (the corrupt one is renamed to iter_X.corrupt).
    fallback_to_previous: bool = False

    def validate(self) -> None:
        require(self.save_interval >= 0, "checkpoint.save_interval", "an integer >= 0", self.save_interval)
        require(self.keep_last >= 0, "checkpoint.keep_last", "an integer >= 0", self.keep_last)


@dataclass
class LoggingSection:
    log_interval: int = 1
    tensorboard: bool = True
    progress_bar: bool = True
    # OPD: the first `rollouts` rows of every data-parallel rank's batch, every step, to <run_dir>/rollouts.jsonl
    # (step, dp_rank, prompt, response, reward, per-token student / teacher / behaviour log-probs); 0 = off.
    rollouts: int = 0

    def validate(self) -> None:
        require(self.log_interval >= 1, "logging.log_interval", "an integer >= 1", self.log_interval)
        require(self.rollouts >= 0, "logging.rollouts", "an integer >= 0 (rows per data-parallel rank)",
                 self.rollouts)


@dataclass
class RolloutSection:
    """Where OPD prompts come from and how the student samples (algorithm: opd).

    source `task`: prompts of a synthetic task (`opd_megatron/tasks`), with its verifier as the outcome reward;
    `jsonl`: prompts from `path` (key `prompt_key`), optional chat template. Each step samples
    `prompts_per_step` prompts x `samples_per_prompt` responses = the global batch (parallel.global_batch_size)."""
    source: Literal["task", "jsonl", "corpus"] = "task"
    task: str = "sort_digits"
    task_options: dict[str, int] = field(default_factory=dict)   # e.g. {length: 8} for sort_digits
    path: str = ""
    # corpus: prompts are the first prefix_tokens tokens of the samples of the indexed corpus in `data` (cut back
    # to one document), continued by the student for max_new_tokens; the corpus's own continuation is the
    # reference (the fixed-dataset share of opd.mixtures.on_policy_fraction); eval.path: a held-out corpus prefix.
    prefix_tokens: int = 32
    prompt_key: str = "prompt"
    answer_key: str = "response"        # jsonl: the reference response (fixed-dataset rows of on_policy_fraction)
    apply_chat_template: bool = False
    domain_key: str = ""                # jsonl: a row's domain tag (multi-teacher routing); tasks: the task name
    privileged_key: str = ""            # jsonl: privileged context for a self-teacher; tasks: the reference answer
    prompts_per_step: int = 16
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    stop_at_eos: bool = True
    # The RolloutEngine: `megatron` samples from the training student in-process (the embedded default); `vllm` /
    # `sglang` from servers holding a copy of its weights, synced every `sync_interval` updates (rollout/served.py:
    # vLLM runs with VLLM_SERVER_DEV_MODE=1, --logprobs-mode processed_logprobs and --generation-config vllm;
    # rollout/served_sglang.py: SGLang with --enable-deterministic-inference).
    engine: Literal["megatron", "vllm", "sglang"] = "megatron"
    server: "RolloutServerSection" = field(default_factory=lambda: RolloutServerSection())
    sync_interval: int = 1
    # Served engines: rollouts of up to this many later steps are generated while a step trains (0: none; each row
    # then trains at most max_staleness updates after the weights that sampled it: loop/rollouts_ahead.py).
    max_staleness: int = 0
    # Before the first update the trainer's log-probs of the engine's first batch, under the distribution the engine
    # sampled from, are compared with the engine's: a mean |log pi_train - log mu| above this is an error (wrong
    # weights, tokenizer, logprobs mode or padded vocabulary), never a run that trains on it.
    max_initial_mismatch: float = 0.02

    def validate(self) -> None:
        require(self.sync_interval >= 1, "rollout.sync_interval", "an integer >= 1 (updates between weight syncs)",
                self.sync_interval)
        require(self.max_initial_mismatch > 0, "rollout.max_initial_mismatch", "a positive number (nats)",
                self.max_initial_mismatch)
        require(self.max_staleness >= 0, "rollout.max_staleness", "an integer >= 0", self.max_staleness)
        if self.engine != "megatron":
            self.server.validate("rollout.server.")
        elif self.max_staleness:
            raise ConfigError(f"rollout.max_staleness={self.max_staleness} needs a served engine (rollout.engine: "
                              f"vllm or sglang): the in-process sampler shares the student's weights, so it cannot sample "
                              f"ahead while they train")
        for key in ("prompts_per_step", "samples_per_prompt", "max_new_tokens"):
            require(getattr(self, key) >= 1, f"rollout.{key}", "an integer >= 1", getattr(self, key))
        require(self.temperature > 0 and math.isfinite(self.temperature), "rollout.temperature",
                 "a positive number (greedy rollouts are not on-policy samples)", self.temperature)
        require(0.0 < self.top_p <= 1.0, "rollout.top_p", "a float in (0, 1]", self.top_p)
        require(self.top_k >= 0, "rollout.top_k", "an integer >= 0 (0 = off)", self.top_k)
        if self.source == "jsonl":
            require(bool(self.path), "rollout.path", "a JSONL prompt file with rollout.source=jsonl", self.path)
        elif self.source == "corpus":
            require(self.prefix_tokens >= 1, "rollout.prefix_tokens", "an integer >= 1", self.prefix_tokens)
        else:
            from opd_megatron.tasks import TASKS
            if self.task not in TASKS:
                raise ConfigError(f"rollout.task: unknown task {self.task!r}; expected one of {sorted(TASKS)}"
                                  f"{did_you_mean(self.task, TASKS)}")


@dataclass
class ServerSection:
    """A served model (a teacher or the rollout servers; SGLang, vLLM): where it is, what it serves, and the
    transport knobs."""
    urls: list[str] = field(default_factory=list)  # base URLs, e.g. ["http://10.0.0.5:30000"]; a router is one URL
    model: str = ""                  # served model name (vLLM's "model"; checked against the server's identity)
    vocab_size: int = 0              # the tokenizer's true size (not a padded embedding's, e.g. 151936 not 152064)
    max_topk: Optional[int] = None   # cap on top-k (vLLM: the server's --max-logprobs, 20 by default)
    max_extra_ids: int = 256         # SGLang: bound on the distinct extra ids (student top-k) sent per row
    timeout_s: float = 120.0         # per request (read/write/pool)
    connect_timeout_s: float = 5.0
    max_retries: int = 4             # retries after the first attempt
    backoff_s: float = 0.5           # first retry waits ~backoff_s, doubling, jittered in [0.5, 1] x
    backoff_max_s: float = 10.0
    max_retry_time_s: float = 300.0  # a request gives up once this much time has passed since its first attempt
    max_inflight: int = 8            # concurrent requests, all servers together
    max_tokens_per_request: int = 32768  # rows are packed into one request up to this many tokens
    max_rows_per_request: int = 64
    balance: Literal["least_inflight", "round_robin"] = "least_inflight"
    # The API key (sent as a Bearer header) comes from the environment or a file, never from the config itself:
    api_key_env: Optional[str] = None    # NAME of the environment variable holding it (e.g. OPD_TEACHER_API_KEY)
    api_key_file: Optional[str] = None   # or a file holding it (its first line; e.g. a mounted secret)
    check_on_start: bool = True      # health + identity of every URL at construction
    reply_retries: int = 2           # a batch whose reply is rejected (malformed, non-finite, out of range, another
    #                                  model) is asked again this many times before the run stops; never trained on

    def validate(self, prefix: str = "teacher.server.") -> None:
        urls = self.urls
        require(isinstance(urls, (list, tuple)) and len(urls) > 0
                and all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in urls),
                f"{prefix}urls", "a non-empty list of http(s):// base URLs", urls)
        require(isinstance(self.vocab_size, int) and self.vocab_size >= 1, f"{prefix}vocab_size",
                "the teacher tokenizer's true vocabulary size (an integer >= 1)", self.vocab_size)
        require(self.max_topk is None or self.max_topk >= 0, f"{prefix}max_topk", "None or an integer >= 0",
                self.max_topk)
        for key in ("max_extra_ids", "max_inflight", "max_tokens_per_request", "max_rows_per_request"):
            require(getattr(self, key) >= 1, f"{prefix}{key}", "an integer >= 1", getattr(self, key))
        require(self.max_retries >= 0, f"{prefix}max_retries", "an integer >= 0", self.max_retries)
        for key in ("timeout_s", "connect_timeout_s", "backoff_max_s", "max_retry_time_s"):
            require(getattr(self, key) > 0, f"{prefix}{key}", "a positive number of seconds", getattr(self, key))
        require(self.backoff_s >= 0, f"{prefix}backoff_s", "a number of seconds >= 0", self.backoff_s)
        require(self.reply_retries >= 0, f"{prefix}reply_retries", "an integer >= 0", self.reply_retries)
        # The value is never echoed: a key pasted here by mistake must not reach a log or an error message.
        if self.api_key_env is not None and not re.fullmatch(r"[A-Z_][A-Z0-9_]{0,127}", str(self.api_key_env)):
            raise ConfigError(f"{prefix}api_key_env: expected the NAME of an environment variable (upper-case "
                              f"letters, digits and _, e.g. OPD_TEACHER_API_KEY), got a value that is not one (not "
                              f"shown: it may be the key itself). Put the key in that variable, or in a file named "
                              f"by {prefix}api_key_file; a key is never written in the config")
        if self.api_key_file is not None and not (isinstance(self.api_key_file, str) and "/" in self.api_key_file):
            raise ConfigError(f"{prefix}api_key_file: expected the path of a file holding the API key, with a '/' "
                              f"(e.g. /run/secrets/teacher_key or ./teacher.key), got a value that is not one (not "
                              f"shown: it may be the key itself)")
        require(self.api_key_env is None or self.api_key_file is None, f"{prefix}api_key_env",
                f"at most one of {prefix}api_key_env and {prefix}api_key_file", "both")


@dataclass
class RolloutServerSection(ServerSection):
    """The rollout servers of a served engine (rollout.engine vllm): the client knobs of a served teacher's
    `server` section (urls, model, retries, balancing; `vocab_size` 0 = the student's), plus where the weights are
    published for them to reload."""
    # A rollout request lasts as long as its whole generation (64 rows x 128 tokens of a 100M model: up to 218 s on
    # 2 CPU cores, benchmarks/rollout_engines.py); a teacher's 120 s would time it out and generate it again.
    timeout_s: float = 1800.0
    # How the weights reach the servers: `disk` (an HF export each server reloads: works everywhere), `nccl` (vLLM's
    # weight-transfer engine, GPUs, parallel.pp 1: rollout/nccl_sync.py), `auto` (nccl on a GPU at pp 1, else disk).
    sync: Literal["auto", "disk", "nccl"] = "auto"
    bucket_mb: int = 1024           # nccl: the bytes of one broadcast
    weights_dir: str = ""           # disk: a directory every server can read; "" = <run_dir>/rollout-weights
    keep_versions: int = 2          # disk: published versions kept (a restarted server reloads the newest)

    def validate(self, prefix: str = "rollout.server.") -> None:
        require(self.vocab_size >= 0, f"{prefix}vocab_size", "0 (the student's) or the student's true vocabulary "
                "size", self.vocab_size)
        # The shared checks, with 0 standing for the student's vocabulary (known when the engine is built).
        ServerSection.validate(replace(self, vocab_size=self.vocab_size or 1), prefix)
        require(self.keep_versions >= 1, f"{prefix}keep_versions", "an integer >= 1", self.keep_versions)
        require(self.bucket_mb >= 1, f"{prefix}bucket_mb", "an integer >= 1 (MiB per broadcast)", self.bucket_mb)


@dataclass
class EvalSection:
    """Held-out evaluation (task score and per-token reverse KL to the teacher): before, every `interval` steps
    (0 = only before and after) and after training, on `prompts` prompts training never samples. A task evaluates
    on its eval split; rollout.source=jsonl on the first `prompts` records of `path` (a JSONL file read with the
    rollout keys) or, without it, on `prompts` records held out of rollout.path by a hash of their text
    (rollout/prompts.py)."""
    prompts: int = 200
    path: str = ""
    interval: int = 0
    max_new_tokens: Optional[int] = None   # default: rollout.max_new_tokens
    batch_size: int = 100

    def validate(self) -> None:
        require(self.prompts >= 1 and self.batch_size >= 1, "eval.prompts", "integers >= 1 (eval.prompts, "
                 "eval.batch_size)", (self.prompts, self.batch_size))
        require(self.interval >= 0, "eval.interval", "an integer >= 0", self.interval)


@dataclass
class QuickstartSection:
    """`opd-megatron quickstart` only: how the teacher is made (SFT on the task's reference answers, cached by
    its settings under `teacher_cache`) and the student's short SFT warm-up before OPD. Defaults from a feasibility
    run measured on 2 CPU cores (teacher 100% after 500 SFT steps in 80 s; warm-up of ~130 steps)."""
    train_examples: int = 20000
    teacher_steps: int = 500
    teacher_lr: float = 1e-3
    teacher_batch_size: int = 128
    teacher_cache: str = "~/.cache/opd-megatron/quickstart-teachers"
    warmup_steps: int = 130
    warmup_lr: float = 1e-3
    warmup_batch_size: int = 64

    def validate(self) -> None:
        for key in ("train_examples", "teacher_steps", "teacher_batch_size", "warmup_batch_size"):
            require(getattr(self, key) >= 1, f"quickstart.{key}", "an integer >= 1", getattr(self, key))
        require(self.warmup_steps >= 0, "quickstart.warmup_steps", "an integer >= 0", self.warmup_steps)
