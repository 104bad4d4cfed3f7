"""The dry run's arithmetic held against megatron-core: parameter counts against real GPTModels (one process, and
tp=2 x pp=2 on four gloo processes), the rank table against megatron's process groups, and the memory estimate
against the published formula it adapts."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from megatron.core import parallel_state

from opd_megatron.config import ConfigError, load_config
from opd_megatron.tools.dry_run import (MEGATRON_RANK_ORDER, estimate_memory, format_report, layer_activation_bytes,
                                        parameter_counts, rank_layout, run_dry_run)
from opd_megatron.student.distributed import destroy_parallel, init_parallel
from opd_megatron.student.model import build_student
from tests.harness import run_distributed

REPO = Path(__file__).resolve().parents[2]

TINY = ["model.preset=tiny"]
# Every option that changes the parameter shapes, one config each, then all together.
SHAPE_CASES = {
    "default": [],
    "tiny_gqa": TINY,
    "tied": TINY + ["model.tie_embeddings=true"],
    "layernorm_gelu_bias": TINY + ["model.normalization=LayerNorm", "model.activation=gelu",
                                   "model.add_bias_linear=true"],
    "qk_layernorm_kv_channels": TINY + ["model.qk_layernorm=true", "model.kv_channels=32"],
    "learned_absolute": TINY + ["model.position_embedding=learned_absolute"],
    "padded_vocab": TINY + ["model.vocab_size=500"],
    # an HF checkpoint's embedding (checkpoint_vocab_size rows) larger than its tokenizer (vocab_size ids)
    "checkpoint_rows": TINY + ["model.vocab_size=300", "model.checkpoint_vocab_size=700"],
    "moe": TINY + ["model.num_moe_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=32"],
    "moe_bias_gelu": TINY + ["model.num_moe_experts=3", "model.moe_router_topk=1", "model.activation=gelu",
                             "model.add_bias_linear=true"],
    "everything": TINY + ["model.tie_embeddings=true", "model.normalization=LayerNorm", "model.activation=gelu",
                          "model.add_bias_linear=true", "model.qk_layernorm=true", "model.kv_channels=32",
                          "model.position_embedding=learned_absolute", "model.vocab_size=500"],
}


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(SHAPE_CASES))
def test_parameter_count_equals_megatron_gptmodel(case):
    cfg = load_config(None, SHAPE_CASES[case])
    init_parallel(cfg)
    try:
        module = build_student(cfg.model, cfg.parallel, torch.device("cpu")).module
        built = sum(p.numel() for p in module.parameters())
    finally:
        destroy_parallel()
    counts = parameter_counts(cfg)
    assert counts.total == built
    assert counts.stages[0].count.per_rank(1) == built


def test_llama3_8b_has_8_030_261_248_parameters():
    counts = parameter_counts(load_config(None, ["model.preset=llama3-8b"]))
    assert counts.padded_vocab_size == 128256  # already a multiple of 128: no padding
    assert counts.total == 8_030_261_248


def test_qwen3_8b_matches_the_published_count():
    # Qwen3-8B model card: 8.2B parameters, 6.95B without embeddings; its safetensors hold 8,190,735,360.
    # The vocabulary 151936 = 1187 x 128 needs no padding, so megatron's model is the same size.
    counts = parameter_counts(load_config(None, ["model.preset=qwen3-8b"]))
    assert counts.padded_vocab_size == 151936
    assert counts.total == 8_190_735_360
    embeddings = 2 * 151936 * 4096  # untied: input embedding and output layer
    assert round((counts.total - embeddings) / 1e9, 2) == 6.95


def test_tp_splits_only_the_sharded_parameters():
    one = parameter_counts(load_config(None, ["model.preset=llama3-8b"]))
    eight = parameter_counts(load_config(None, ["model.preset=llama3-8b", "parallel.tp=8"]))
    assert eight.total == one.total
    norms = 32 * 2 * 4096 + 4096  # two RMSNorms per layer and the final norm: replicated on every tp rank
    assert eight.stages[0].count.per_rank(8) == (one.total - norms) // 8 + norms


# ---------------------------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tp,pp,world_size", [(1, 1, 1), (2, 2, 8), (8, 2, 64), (4, 1, 12), (8, 4, 512)])
def test_rank_layout_follows_megatron_rank_generator(tp, pp, world_size):
    assert inspect.signature(parallel_state.initialize_model_parallel).parameters["order"].default \
        == MEGATRON_RANK_ORDER
    dp = world_size // (tp * pp)
    generator = parallel_state.RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order=MEGATRON_RANK_ORDER)
    layout = rank_layout(tp, pp, world_size)
    assert [c.rank for c in layout] == list(range(world_size))
    for token, coordinate, others in (("tp", "tp_rank", ("pp_rank", "dp_rank")),
                                      ("dp", "dp_rank", ("tp_rank", "pp_rank")),
                                      ("pp", "pp_rank", ("tp_rank", "dp_rank"))):
        for group in generator.get_ranks(token):
            members = [layout[r] for r in group]
            assert [getattr(c, coordinate) for c in members] == list(range(len(group)))
            for other in others:
                assert len({getattr(c, other) for c in members}) == 1


# The four-process body: for each layout, megatron's own coordinates of this rank, and the parameters it holds.
DISTRIBUTED_CASES = [
    (2, 2, TINY),
    (2, 2, SHAPE_CASES["everything"]),   # tied embeddings keep a copy on the last stage
    (2, 1, TINY + ["model.vocab_size=500"]),
    (1, 2, TINY + ["model.tie_embeddings=true"]),
]


def layout_worker():
    out = []
    for tp, pp, overrides in DISTRIBUTED_CASES:
        cfg = load_config(None, overrides + [f"parallel.tp={tp}", f"parallel.pp={pp}"])
        ctx = init_parallel(cfg)
        module = build_student(cfg.model, cfg.parallel, torch.device("cpu")).module
        out.append(dict(rank=ctx.rank,
                        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
                        dp_rank=parallel_state.get_data_parallel_rank(),
                        params=sum(p.numel() for p in module.parameters())))
        parallel_state.destroy_model_parallel()
    return out


def test_layout_and_counts_equal_megatron_on_four_processes():
    world_size = 4
    results = run_distributed(layout_worker, world_size=world_size, timeout_s=150)
    for i, (tp, pp, overrides) in enumerate(DISTRIBUTED_CASES):
        cfg = load_config(None, overrides + [f"parallel.tp={tp}", f"parallel.pp={pp}"])
        layout = rank_layout(tp, pp, world_size)
        stages = parameter_counts(cfg).stages
        for rank, per_case in enumerate(results):
            got = per_case[i]
            expected = layout[rank]
            assert (got["rank"], got["tp_rank"], got["pp_rank"], got["dp_rank"]) == \
                (expected.rank, expected.tp_rank, expected.pp_rank, expected.dp_rank), (tp, pp, overrides)
            assert got["params"] == stages[expected.pp_rank].count.per_rank(tp), (tp, pp, overrides, rank)


def test_tied_embeddings_with_pp_count_the_last_stage_copy_once():
    counts = parameter_counts(load_config(None, TINY + ["model.tie_embeddings=true", "parallel.pp=2"]))
    first, last = counts.stages
    assert last.output_is_tied_copy and last.output_layer.total == first.embedding.total == 512 * 64
    assert counts.stored == counts.total + 512 * 64
    assert counts.total == parameter_counts(load_config(None, TINY + ["model.tie_embeddings=true"])).total


# ---------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------

GPT_STYLE = ["model.activation=gelu", "model.normalization=LayerNorm", "model.num_layers=4", "model.hidden_size=512",
             "model.ffn_hidden_size=2048", "model.num_attention_heads=8", "model.hidden_dropout=0.1",
             "model.attention_dropout=0.1", "model.dtype=bf16", "model.max_position_embeddings=1024",
             "data.seq_length=1024", "parallel.micro_batch_size=2"]


@pytest.mark.parametrize("tp,sequence_parallel", [(1, False), (4, False), (4, True)])
def test_activations_reduce_to_korthikanti_table_2(tp, sequence_parallel):
    cfg = load_config(None, GPT_STYLE + [f"parallel.tp={tp}", f"parallel.sequence_parallel={str(sequence_parallel)}"])
    s, b, h, a, t = 1024, 2, 512, 8, tp
    if sequence_parallel:
        paper = s * b * h / t * (34 + 5 * a * s / h)
    else:
        paper = s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    total, scores = layer_activation_bytes(cfg)
    assert total == paper
    assert scores == 5 * a * s * s * b / t


def test_1f1b_micro_batches_in_flight():
    cfg = load_config(None, TINY + ["parallel.pp=2", "parallel.micro_batch_size=1", "parallel.global_batch_size=8",
                                    "model.num_layers=4"])
    assert [s.microbatches_in_flight for s in estimate_memory(cfg, 2).stages] == [2, 1]
    cfg = load_config(None, TINY + ["parallel.pp=4", "parallel.micro_batch_size=4", "parallel.global_batch_size=8",
                                    "model.num_layers=4"])
    assert [s.microbatches_in_flight for s in estimate_memory(cfg, 4).stages] == [2, 2, 2, 1]


LLAMA_TP8_BF16 = ["model.preset=llama3-8b", "parallel.tp=8", "model.dtype=bf16", "optim.use_distributed_optimizer=true"]


def test_llama3_8b_fits_80gb_at_tp8_bf16_and_not_at_tp1_fp32():
    estimate = estimate_memory(load_config(None, LLAMA_TP8_BF16), 8)
    stage = estimate.worst
    params = parameter_counts(load_config(None, LLAMA_TP8_BF16)).stages[0].count.per_rank(8)
    assert (stage.weights, stage.gradients, stage.optimizer) == (2 * params, 4 * params, 12 * params)
    assert estimate.per_gpu < 0.9 * 80 * 2 ** 30
    fp32 = estimate_memory(load_config(None, ["model.preset=llama3-8b"]), 1)
    assert fp32.worst.weights + fp32.worst.gradients + fp32.worst.optimizer == 8_030_261_248 * (4 + 4 + 8)
    assert fp32.per_gpu > 80 * 2 ** 30


def test_distributed_optimizer_divides_optimizer_state_by_dp():
    plain = estimate_memory(load_config(None, ["model.preset=llama3-8b", "model.dtype=bf16", "parallel.tp=8"]), 16)
    sharded = estimate_memory(load_config(None, LLAMA_TP8_BF16), 16)
    assert sharded.dp == 2 and sharded.worst.optimizer * 2 == plain.worst.optimizer


def test_report_shows_layout_counts_and_verdict():
    fits = run_dry_run(None, LLAMA_TP8_BF16)
    assert "   rank  tp_rank  pp_rank  dp_rank" in fits and "      7        7        0        0" in fits
    assert "total 8,030,261,248" in fits and "FITS:" in fits and "DOES NOT FIT" not in fits
    too_big = run_dry_run(None, ["model.preset=llama3-8b"], world_size=2, gpu_memory_gb=80)
    assert "DOES NOT FIT" in too_big
    assert "optim.use_distributed_optimizer=true" in too_big and "model.dtype=bf16" in too_big
    tied_pp = format_report(load_config(None, TINY + ["model.tie_embeddings=true", "parallel.pp=2"]), 2)
    assert "keeps a copy of the embedding" in tied_pp


def test_large_world_prints_a_summary_not_every_rank():
    report = run_dry_run(None, LLAMA_TP8_BF16 + ["parallel.global_batch_size=256"], world_size=512)
    assert "world size 512 = tp 8 x pp 1 x dp 64" in report
    assert "(496 ranks not shown" in report and "    511        7        0       63" in report
    assert report.count("\n") < 60


def test_bad_world_size_is_a_config_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: llama3-8b\nparallel:\n  tp: 8\n")
    with pytest.raises(ConfigError, match="not a multiple of parallel.tp x parallel.pp"):
        run_dry_run(path, [], world_size=12)


# ---------------------------------------------------------------------------------------------------------------
# MoE and OPD
# ---------------------------------------------------------------------------------------------------------------

def test_qwen3_30b_a3b_has_its_published_30_5b_total_and_3_3b_active():
    cfg = load_config(None, ["model.preset=qwen3-30b-a3b"])
    counts = parameter_counts(cfg)
    assert abs(counts.total - 30.5e9) < 0.1e9        # Qwen3 report: 30.5B total, 3.3B activated
    experts = sum(s.count.expert for s in counts.stages)
    active = counts.total - experts + experts * 8 // 128
    assert abs(active - 3.3e9) < 0.1e9


def test_expert_parallelism_divides_only_the_expert_weights():
    base = ["model.preset=tiny", "model.num_moe_experts=8", "model.moe_ffn_hidden_size=32", "parallel.tp=2"]
    one = parameter_counts(load_config(None, base)).stages[0].count
    assert one.per_rank(2, 4) == one.sharded // 2 + one.replicated + one.expert // 8
    cfg = load_config(None, base + ["parallel.ep=4", "parallel.global_batch_size=32"])
    assert estimate_memory(cfg, 16).stages[0].params == one.per_rank(2, 4)
    with pytest.raises(ConfigError, match="data-parallel size 2"):
        estimate_memory(cfg, 4)


def _opd(*extra):
    return load_config(None, ["run.algorithm=opd", "model.preset=tiny", "teacher.colocated.path=x",
                              "teacher.colocated.model.preset=small", "teacher.colocated.model.vocab_size=512",
                              "parallel.micro_batch_size=2", "parallel.global_batch_size=8",
                              "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2", "data.seq_length=64",
                              *extra])


def test_colocated_teacher_weights_sit_on_the_last_stage_only():
    cfg = _opd("parallel.pp=2")
    est = estimate_memory(cfg, 2)
    small = parameter_counts(load_config(None, ["model.preset=small", "model.vocab_size=512"])).total
    assert est.stages[0].teacher == 0 and est.stages[1].teacher == small * 4   # fp32, whole, tp 1
    assert est.stages[1].teacher_logits == 2 * 64 * 512 * (4 + 4)
    assert est.stages[1].opd_loss == 2 * 4 * 2 * 64 * 512                      # full-support reverse KL
    served = _opd("teacher.kind=sglang", "teacher.topk=16", "opd.route_a.support=teacher_topk",
                  "teacher.server={urls: [http://h:1], model: t, vocab_size: 512}")
    assert estimate_memory(served, 1).stages[0].teacher == 0
    assert estimate_memory(served, 1).stages[0].teacher_logits == 0


def test_rollout_kv_cache_counts_every_row_of_the_dp_rank():
    cfg = _opd()
    est = estimate_memory(cfg, 2)                                              # dp 2: 4 rows each
    # 2 layers x K and V x 64 positions x 4 rows x 2 query groups x head dim 16 x fp32
    assert est.stages[0].kv_cache == 2 * 2 * 64 * 4 * 2 * 16 * 4
    offline = estimate_memory(_opd("opd.mixtures.on_policy_fraction=0"), 2)
    assert offline.stages[0].kv_cache == 0 and offline.stages[0].rollout == 0
    assert est.per_gpu == max(est.stages[0].training, est.stages[0].rollout)


def test_served_rollouts_move_the_kv_cache_to_the_rollout_servers():
    from opd_megatron.tools.dry_run import format_opd_notes

    cfg = _opd("rollout.engine=vllm", "rollout.server={urls: [http://a:1, http://b:1], model: s}")
    est = estimate_memory(cfg, 2)
    assert est.stages[0].kv_cache == 0 and est.stages[0].rollout == 0 and est.per_gpu == est.stages[0].training
    notes = "\n".join(format_opd_notes(cfg, est))
    # 8 rows of the global batch over 2 servers: 4 each, x 2 layers x K and V x 64 positions x 2 groups x 16 x fp32
    assert "served by vllm (2 server(s)" in notes and "its 4 rows of a step x 64 positions" in notes, notes
    assert f"{2 * 2 * 64 * 4 * 2 * 16 * 4 / 2**30:.2f} GiB of KV cache" in notes, notes


def test_a_corpus_run_reports_the_teacher_cache_it_would_read():
    from opd_megatron.data.teacher_cache import cache_bytes
    from opd_megatron.tools.dry_run import format_opd_notes

    cfg = _opd("rollout.source=corpus", "data.format=indexed", "data.path=/c", "eval.path=/h", "teacher.topk=8",
               "rollout.prefix_tokens=8", "opd.mixtures.on_policy_fraction=0.25", "run.train_steps=10")
    notes = "\n".join(format_opd_notes(cfg, estimate_memory(cfg, 1)))
    tokens = 10 * 8 * 64 * 3 // 4            # steps x global batch x seq_length x the offline share
    size = cache_bytes(tokens, 8, cfg.model.vocab_size, 64)
    assert f"top-8 of {tokens:.3g} corpus tokens" in notes and f"{size / 1e12:.3g} TB" in notes, notes


@pytest.mark.parametrize("fraction", ["0.5", "0.01"])
def test_a_partly_on_policy_run_still_samples_whole_batches(fraction):
    """The on-policy fraction picks whole batches (GKD's per-batch coin, `math/mixtures.py::OnPolicyMixture`), so an
    on-policy step samples every row of the rank: the KV cache the estimate must hold is the full one, not the
    fraction's share (the bug: `ceil(rows * fraction)` rows, 2 of 4 at 0.5)."""
    full = estimate_memory(_opd(), 2).stages[0]
    mixed = estimate_memory(_opd(f"opd.mixtures.on_policy_fraction={fraction}"), 2).stages[0]
    assert mixed.kv_cache == full.kv_cache and mixed.rollout == full.rollout


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "configs" / "recipes").glob("*.yaml")
                                          if p.name != "cpu_twins.yaml"))
def test_every_recipe_fits_at_its_scale(recipe):
    """Each recipe names its world size and GPU memory on a `# dry-run:` line; the dry-run at that scale fits."""
    path = REPO / "configs" / "recipes" / recipe
    line = next(l for l in path.read_text().splitlines() if l.startswith("# dry-run:"))
    args = line.split()
    world, gpu = int(args[args.index("--world-size") + 1]), float(args[args.index("--gpu-memory-gb") + 1])
    report = run_dry_run(path, world_size=world, gpu_memory_gb=gpu)
    assert "\nFITS:" in report, report[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# Colocated teachers: layout checks that name the model, and HF teachers counted from their config.json
# ---------------------------------------------------------------------------------------------------------------

def _hf_dir(root: Path, name: str, heads: int = 4, kv_heads: int = 2, vocab: int = 512, hidden: int = 128,
            ffn: int = 256) -> Path:
    """An HF Llama checkpoint directory with its config.json only (what the dry run reads)."""
    import json
    path = root / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 3, "hidden_size": hidden,
        "intermediate_size": ffn, "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": 32,
        "vocab_size": vocab, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False}))
    return path


def _opd_hf(teacher: Path, *extra):
    return ["run.algorithm=opd", "model.preset=tiny", f"teacher.colocated.path={teacher}",
            "parallel.micro_batch_size=2", "parallel.global_batch_size=8", "rollout.prompts_per_step=4",
            "rollout.samples_per_prompt=2", "data.seq_length=64", *extra]


def _members(*members: tuple[str, Path]) -> list[str]:
    listed = ", ".join(f"{{name: {name}, kind: colocated, colocated: {{path: {path}}}}}" for name, path in members)
    return ["teacher.kind=multi", f"teacher.multi.members=[{listed}]", "teacher.multi.mixture=geometric"]


def test_dry_run_counts_an_hf_colocated_teacher_from_its_config_json(tmp_path):
    teacher = _hf_dir(tmp_path, "teacher")
    report = run_dry_run(None, _opd_hf(teacher))
    assert "shape not in the config" not in report
    # The same shape given as config keys: the same bytes.
    given = _opd("teacher.colocated.model.preset=null", "teacher.colocated.model.num_layers=3",
                 "teacher.colocated.model.hidden_size=128", "teacher.colocated.model.ffn_hidden_size=256",
                 "teacher.colocated.model.num_attention_heads=4", "teacher.colocated.model.num_query_groups=2",
                 "teacher.colocated.model.kv_channels=32", "teacher.colocated.model.max_position_embeddings=256")
    hf = load_config(None, _opd_hf(teacher))
    assert estimate_memory(hf, 1).stages[0].teacher == estimate_memory(given, 1).stages[0].teacher > 0
    assert f"teacher colocated: custom fp32 (config.json of teacher.colocated.path={teacher})" in report, report


def test_dry_run_counts_each_hf_member_of_a_multi_teacher(tmp_path):
    small, big = _hf_dir(tmp_path, "small"), _hf_dir(tmp_path, "big", hidden=256, ffn=512)
    report = run_dry_run(None, _opd_hf(small, *_members(("small", small), ("big", big))))
    assert "shape not in the config" not in report
    assert "teacher small:" in report and "teacher big:" in report


@pytest.mark.parametrize("case", ["heads", "query_groups", "ffn", "member", "vocab", "config_model", "student"])
def test_a_teacher_that_does_not_fit_the_layout_is_named_before_anything_is_built(tmp_path, case):
    """Megatron says `num_attention_heads (9) must be a multiple of tensor_model_parallel_size (2)` only when the
    teacher is built, after the student, without saying which model: the config check names it and its key."""
    fits = _hf_dir(tmp_path, "fits")
    odd = {"heads": 9, "kv_heads": 3, "hidden": 288}
    overrides, expected = {
        "heads": (lambda: _opd_hf(_hf_dir(tmp_path, "t", **odd), "parallel.tp=2"),
                  r"the teacher: num_attention_heads=9 \(config.json of teacher.colocated.path=.*/t\) is not a "
                  r"multiple of parallel.tp=2"),
        "query_groups": (lambda: _opd_hf(_hf_dir(tmp_path, "t", heads=4, kv_heads=1), "parallel.tp=2"),
                         r"the teacher: num_key_value_heads=1 \(config.json of teacher.colocated.path=.*\) is not a "
                         r"multiple of parallel.tp=2"),
        "ffn": (lambda: _opd_hf(_hf_dir(tmp_path, "t", kv_heads=4, ffn=250), "parallel.tp=4",
                                "model.num_query_groups=4"),
                r"the teacher: intermediate_size=250 \(config.json of .*\) is not a multiple of parallel.tp=4"),
        "member": (lambda: _opd_hf(fits, "parallel.tp=2", *_members(("fits", fits), ("odd", _hf_dir(tmp_path, "o",
                                                                                                  **odd)))),
                   r"teacher.multi.members\[odd\]: num_attention_heads=9 \(config.json of "
                   r"teacher.multi.members\[1\].colocated.path=.*/o\) is not a multiple of parallel.tp=2"),
        "vocab": (lambda: _opd_hf(_hf_dir(tmp_path, "t", vocab=1000)),
                  r"the teacher: an embedding of 1000 rows \(config.json of teacher.colocated.path=.*\); the "
                  r"student's has 512"),
        "config_model": (lambda: ["run.algorithm=opd", "model.preset=tiny", "teacher.colocated.path=x",
                                  "teacher.colocated.model.preset=tiny", "teacher.colocated.model.num_query_groups=1",
                                  "parallel.tp=2", "parallel.micro_batch_size=2", "parallel.global_batch_size=8",
                                  "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2"],
                         r"the teacher: teacher.colocated.model.num_query_groups=1 is not a multiple of "
                         r"parallel.tp=2"),
        "student": (lambda: ["model.preset=null", f"model.from_hf={_hf_dir(tmp_path, 's', **odd)}", "parallel.tp=2"],
                    r"parallel.tp: expected a divisor of model.num_attention_heads=9 \(the student's, from the "
                    r"config.json of model.from_hf=.*/s\)"),
    }[case]
    with pytest.raises(ConfigError, match=expected):
        run_dry_run(None, overrides())
