"""configs/paper/*.yaml carry the released settings, and `real train --config FILE --print-config` prints the
resolved TrainConfig as JSON and exits."""
import json
from pathlib import Path

import pytest

from real.loop.config import FIELD_NAMES, flat_settings
from real.loop.train_cli import main

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "paper"
# The released REAL optimizer keeps AdamW's framework defaults (betas (0.9, 0.999), weight decay 0.01): the
# scripts' weight_decay=0.1 is the unused PPO actor's.
RELEASED_REAL = dict(method="real", temperature=1.0, top_p=0.9, max_prompt_tokens=2048, max_cot_tokens=1024,
                     prompts_per_step=256, epochs_per_batch=3, weight_decay=0.01, adam_betas=[0.9, 0.999],
                     grad_clip=1.0, prob_bonus=1.0, beta=0.0, adv_norm="advantage-std", adv_clip=1.0,
                     group_filter="partial", loss_agg="token-mean", kl_coef=0.0, schedule="constant", warmup_steps=0,
                     score_phrase="released")


def _printed(capsys, *argv):
    """The printed configuration, its method's own section merged in (``flat_settings``)."""
    assert main(list(argv)) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == list(FIELD_NAMES) + [printed["method"]]  # the file layout: common, then the section
    return flat_settings(printed)


@pytest.mark.parametrize("name, model, lr, lora_rank", [
    ("qwen3-8b", "Qwen/Qwen3-8B", 1e-6, 0),
    ("qwen3-32b", "Qwen/Qwen3-32B", 1e-6, 0),  # the release's final 32B run: full fine-tuning
    ("qwen3-32b", "Qwen/Qwen3-32B", 1e-5, 128),  # its one-node LoRA variant: LoRA lr = 10 x full fine-tuning's 1e-6
    ("mistral-7b", "mistralai/Mistral-7B-Instruct-v0.2", 5e-8, 0),
])
def test_real_presets_print_the_released_settings(capsys, name, model, lr, lora_rank):
    preset = f"{name}-real" + ("-lora" if lora_rank else "")
    config = _printed(capsys, "--config", str(PRESETS / f"{preset}.yaml"), "--print-config")
    assert {k: config[k] for k in RELEASED_REAL} == RELEASED_REAL
    assert config["model"] == model and config["lr"] == lr and config["lora_rank"] == lora_rank
    # from a warm-up that writes CoTs (TRACT), with the same LoRA choice, never from a no-CoT RAFT run
    warm_up = _printed(capsys, "--config", str(PRESETS / (preset.replace("-real", "-tract") + ".yaml")),
                       "--print-config")
    assert warm_up["method"] == "tract" and warm_up["lora_rank"] == lora_rank
    assert config["init_from"] == f"{warm_up['output_dir']}/checkpoint-{warm_up['steps']}"


@pytest.mark.parametrize("name", ["qwen3-8b", "qwen3-32b", "mistral-7b"])
@pytest.mark.parametrize("method, steps", [("tract", 1170), ("raft", 1950)])
def test_warm_up_presets(capsys, name, method, steps):
    config = _printed(capsys, "--config", str(PRESETS / f"{name}-{method}.yaml"), "--print-config")
    assert config["method"] == method and config["steps"] == steps and config["prompts_per_step"] == 256
    assert config["output_dir"] == f"runs/{name}-{method}"
    # verl's SFT optimizer (sft_trainer.yaml): lr 1e-5, betas (0.9, 0.95), weight decay 0.01, 10% warm-up, cosine,
    # full fine-tuning as sft.sh
    assert (config["lr"], config["adam_betas"], config["weight_decay"]) == (1e-5, [0.9, 0.95], 0.01)
    assert (config["warmup_steps"], config["schedule"], config["min_lr_ratio"]) == (steps // 10, "cosine", 0.0)
    assert config["lora_rank"] == 0 and config["score_phrase"] == "released"
    if method == "tract":  # its held-out evaluation writes CoTs as long as the released ones (1024 tokens)
        assert config["max_new_tokens"] == config["max_cot_tokens"] == 1024


def test_the_one_node_32b_chain_is_lora_and_says_what_it_changes():
    for preset in ("qwen3-32b-tract-lora.yaml", "qwen3-32b-real-lora.yaml"):
        header = (PRESETS / preset).read_text().split("\nmethod:")[0]
        assert "one-node variant" in header and "LoRA" in header and "8 GPUs" in header


def test_the_grpo_preset_has_the_released_grpo_path_settings(capsys):
    config = _printed(capsys, "--config", str(PRESETS / "qwen3-8b-grpo.yaml"), "--print-config")
    released = dict(method="grpo", kl_coef=0.01, clip_ratio=0.2, loss_agg="token-mean", weight_decay=0.1,
                    adam_betas=[0.9, 0.999], grad_clip=1.0, warmup_steps=0, schedule="constant", temperature=1.0,
                    top_p=0.9, prompts_per_step=256, max_prompt_tokens=2048, max_cot_tokens=1024,
                    score_phrase="released", init_from="runs/qwen3-8b-tract/checkpoint-1170")
    assert {k: config[k] for k in released} == released


def test_flags_override_the_preset_in_the_printed_config(capsys):
    config = _printed(capsys, "--config", str(PRESETS / "qwen3-8b-real.yaml"), "--lr", "2e-6", "--print-config")
    assert config["lr"] == 2e-6 and config["prompts_per_step"] == 256


@pytest.mark.parametrize("preset", sorted(p.name for p in PRESETS.glob("*.yaml")))
def test_full_fine_tuning_presets_keep_fp32_weights_and_compute_in_bf16(capsys, preset):
    """The released actor holds fp32 weights and AdamW states (verl builds it in fp32) and computes in bf16
    (fsdp_workers.py: MixedPrecision(param_dtype=bf16, reduce_dtype=fp32)); bf16 weights would drop most
    updates at the presets' learning rates (below).  LoRA presets keep bf16 weights (their adapters are fp32)
    and compute in them (compute_dtype auto)."""
    config = _printed(capsys, "--config", str(PRESETS / preset), "--print-config")
    assert config["dtype"] == ("auto" if config["lora_rank"] else "float32")
    assert config["compute_dtype"] == ("auto" if config["lora_rank"] else "bfloat16")


def test_bf16_weights_drop_updates_at_the_released_learning_rates():
    import torch

    torch.manual_seed(0)
    start = torch.randn(100_000) * 0.02  # the scale of a transformer's weights
    changed = {}
    for dtype in (torch.bfloat16, torch.float32):
        weights = torch.nn.Parameter(start.to(dtype).clone())
        optimizer = torch.optim.AdamW([weights], lr=1e-6, weight_decay=0.01)
        for _ in range(10):
            weights.grad = torch.randn_like(weights)
            optimizer.step()
        changed[dtype] = (weights.detach() != start.to(dtype)).float().mean().item()
    assert changed[torch.float32] > 0.99 and changed[torch.bfloat16] < 0.05
