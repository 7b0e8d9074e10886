"""Test setup: run the Triton kernels on the CPU interpreter; mark the slow tests.

TRITON_INTERPRET must be set before triton is first imported, which is why it
is done here, at collection time, before any test module imports real_kernels.

``python -m pytest -q -m "not slow" tests`` is the fast lane (under 90 s on 2 cores): it leaves out
the end-to-end modules (``SLOW_MODULES``: they train, run the demo, spawn processes or torchrun) and
the heaviest checks of the others (``SLOW_TESTS``: the kernels against fp64 at many shapes under the
Triton interpreter, every model type through hf.patch...), each of which keeps cheaper tests of the
same code in the fast lane.  The default run (the README's command) runs everything.  The lists
live here, in one place, rather than as decorators spread over the files; a test renamed here
without its entry simply joins the fast lane.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

SLOW_MODULES = {  # end to end: every test of these modules is slow
    "test_benchmarks", "test_demo", "test_distributed", "test_evaluate_cli", "test_examples", "test_gpu_suite",
    "test_kernels_compile", "test_models_by_name", "test_paper_presets", "test_reproduction_smoke", "test_train",
    "test_train_distributed", "test_train_robustness", "test_vllm_rollout",
}
SLOW_TESTS = {  # module -> its slow test functions (every parametrization)
    "test_head_chunked_forward": (
        "test_chunked_forward_matches_fp64",
    ),
    "test_head_correctness": (
        "test_backend_matches_fp64_and_reference",
        "test_gradient_on_some_outputs_only",
        "test_triton_default_launch_config",
    ),
    "test_head_edge_cases": (
        "test_edge_case_matches_fp64",
        "test_extreme_logits_match_fp64",
        "test_linear_logprobs_temperature_matches_fp64",
    ),
    "test_head_extremes": (
        "test_extreme_logits_stay_finite_and_valid",
        "test_qwen3_vocabulary",
    ),
    "test_head_loss_mode": (
        "test_loss_mode_equals_the_head_and_autograd",
        "test_the_loss_runs_once_per_chunk_on_whole_sequences",
    ),
    "test_head_low_precision": (
        "test_low_precision_no_worse_than_naive",
    ),
    "test_head_robustness": (
        "test_one_non_finite_row_leaves_the_rest_exact",
        "test_strided_arguments_match_contiguous",
    ),
    "test_hf": (
        "test_judge_outputs_match_model_logits",
        "test_lora_wrapped_model_logprobs_and_gradients",
        "test_token_logprob_gradients_match_model_logits",
    ),
    "test_hf_patch": (
        "test_every_supported_model_type_gives_its_own_loss",
        "test_patched_forward_takes_positional_arguments_shift_labels_and_chunks",
        "test_patched_peft_lora_model_gives_the_same_loss_and_gradients",
        "test_patched_qwen3_gives_the_same_loss_and_gradients",
        "test_transformers_trainer_takes_the_same_steps_patched",
    ),
    "test_judge_loss": (
        "test_loss_mode_matches_head_and_autograd_fp32",
        "test_low_precision_no_worse_than_naive",
    ),
    "test_layout": (
        "test_every_module_imports_in_a_fresh_interpreter",
    ),
    "test_loss_precision": (
        "test_bf16_loss_mode_is_fp32_accurate",
    ),
    "test_objectives": (
        "test_real_estimator_is_unbiased_and_rloo_reduces_variance",
    ),
    "test_synthetic": (
        "test_expected_target_matches_the_label_mean",
    ),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if getattr(item, "module", None) else ""
        function = getattr(item, "originalname", None) or item.name.split("[")[0]
        if module in SLOW_MODULES or function in SLOW_TESTS.get(module, ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny shapes: one intra-op thread is as fast, and immune to a busy machine's second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
