"""Configuration of `real train`: one dataclass, read from YAML/TOML and/or flags.

Every setting is declared once, in ``TrainConfig``, with its help text; the
argument parser and the file loader are generated from it, so a flag, a config
key and its ``--help`` line can never drift apart.  Precedence: built-in
default < config file < command-line flag.  A key in a file that is not a field
is an error (with a did-you-mean), never silently ignored.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional

from real.multi_gpu.parallel import PARALLEL_MODES
from real.methods import METHODS
from real.methods.objectives import ADVANTAGE_NORMS, AGGREGATIONS, check_aggregation
from real.judge.prompts import score_phrase

SCHEDULES = ("constant", "cosine")
ROLLOUT_ENGINES = ("hf", "vllm-colocate", "vllm-server", "vllm")  # vllm = vllm-colocate (real.loop.vllm_rollout)
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")  # transformers' attn_implementation
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _opt(default, help_: str, choices=None, group: str = "training"):
    meta = {"help": help_, "choices": choices, "group": group}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- what to train, on what --------------------------------------------------
    method: str = _opt("real", "objective: " + ", ".join(f"{name} ({cls.description})" for name, cls in METHODS.items()),
                       tuple(METHODS), "run")
    model: str = _opt("tiny", "a local model folder, a Hugging Face Hub name (e.g. Qwen/Qwen3-8B: the local cache "
                      "first, else downloaded), or 'tiny' (a small random Qwen3 and a tokenizer built on the spot; "
                      "runs offline)", group="run")
    data: List[str] = _opt(["synthetic"], "training data files (Prometheus / Feedback-Collection .json/.jsonl), "
                           "or 'synthetic' for the built-in synthetic judge task", group="run")
    eval_data: List[str] = _opt([], "held-out data files; default: the synthetic held-out split for "
                                "--data synthetic, else the last --eval-fraction of --data", group="run")
    eval_fraction: float = _opt(0.1, "share of the training files held out for evaluation when --eval-data "
                                "is not given", group="run")
    output_dir: str = _opt("runs/real", "where metrics.jsonl and checkpoint-STEP/ folders go", group="run")
    init_from: Optional[str] = _opt(None, "start from the model weights of this checkpoint folder (e.g. a "
                                    "TRACT warm-up) instead of the --model weights", group="run")
    resume: bool = _opt(False, "continue from the newest complete checkpoint in --output-dir", group="run")
    overwrite: bool = _opt(False, "start afresh in an --output-dir that holds an earlier run (its checkpoints and "
                           "metrics are deleted)", group="run")
    allow_config_change: bool = _opt(False, "with --resume, continue even where a setting that makes it another run "
                                     "(method, seed, data, model, objective, optimiser) differs from the "
                                     "checkpoint's; the new values are used and recorded", group="run")
    seed: int = _opt(0, "seed for data order, sampling and initialisation", group="run")
    steps: int = _opt(100, "number of training steps (one rollout batch each)", group="run")
    chat_template: bool = _opt(True, "lay each prompt out as a user turn of the tokenizer's chat template, when "
                               "it has one (the released code does: its prompts are chat messages); "
                               "--no-chat-template feeds the raw Prometheus prompt", group="run")
    score_phrase: str = _opt("prometheus", "the phrase the judge writes before its score, in training, inference "
                             "and parsing: prometheus ('[RESULT] N'), released ('So the overall score is N', the "
                             "released code's delimiter), or the phrase itself", group="run")
    skip_malformed: bool = _opt(False, "skip malformed data rows (with a count) instead of failing", group="run")

    # --- batch shape ---------------------------------------------------------------
    prompts_per_step: int = _opt(8, "prompts per step (B)", group="batch")
    group_size: int = _opt(8, "sampled CoTs per prompt (G) for real/grpo", group="batch")
    epochs_per_batch: int = _opt(1, "optimizer updates over each rollout batch (>1 uses PPO ratio clipping)",
                                 group="batch")
    mini_batch_size: int = _opt(0, "sequences (rollouts) per optimizer update, over all ranks: every epoch over a "
                                "step's batch takes one update per mini-batch, PPO-clipped after the first (the "
                                "released REAL: real_mini_batch_size_per_gpu=128 responses x its GPUs); 0 = the "
                                "whole batch, one update per epoch", group="batch")
    micro_batch_tokens: int = _opt(16384, "token budget of one micro-batch (rows x padded length); larger "
                                   "batches are split and their gradients accumulated", group="batch")
    max_prompt_tokens: int = _opt(2048, "prompts longer than this are truncated (with a warning)", group="batch")
    max_cot_tokens: int = _opt(1024, "CoTs longer than this are truncated (with a warning)", group="batch")

    # --- rollouts ------------------------------------------------------------------
    rollout: str = _opt("hf", "rollout engine: hf (transformers generate through the trained model), "
                        "vllm-colocate (a vLLM engine in every training process, asleep while it trains, weights "
                        "pushed before every rollout; 'vllm' is the same) or vllm-server (a separate `trl "
                        "vllm-serve` process that rank 0 pushes the weights to); the vLLM ones need CUDA and "
                        "pip install 'real-kernels[vllm]'", ROLLOUT_ENGINES, "rollout")
    vllm_gpu_memory_utilization: float = _opt(0.3, "vllm-colocate: share of each GPU's memory the engine may take "
                                              "while it samples (weights + KV cache)", group="rollout")
    vllm_tensor_parallel_size: int = _opt(1, "vllm-colocate: GPUs one engine spans (must divide the ranks)",
                                          group="rollout")
    vllm_sleep: bool = _opt(True, "vllm-colocate: release the engine's weights and KV cache while training "
                            "(vLLM sleep mode, level 2)", group="rollout")
    vllm_server_host: str = _opt("127.0.0.1", "vllm-server: host of `trl vllm-serve`", group="rollout")
    vllm_server_port: int = _opt(8000, "vllm-server: its HTTP port", group="rollout")
    vllm_group_port: int = _opt(51216, "vllm-server: port of its weight-update group", group="rollout")
    vllm_server_timeout: float = _opt(240.0, "vllm-server: seconds to wait for the server to answer at the start",
                                      group="rollout")
    temperature: float = _opt(1.0, "sampling temperature of rollouts", group="rollout")
    top_p: float = _opt(0.9, "nucleus sampling top-p of rollouts", group="rollout")
    max_new_tokens: int = _opt(256, "longest generated CoT (tokens; 32 with --data synthetic); generation stops at "
                               "the score marker",
                               group="rollout")
    unsharded_rollouts: bool = _opt(False, "under --parallel fsdp, keep every layer gathered for the whole rollout "
                                    "(one all-gather per layer instead of one per layer per new token; needs "
                                    "the whole model in each GPU's memory)", group="rollout")
    rollout_batch_size: int = _opt(64, "sequences per generate call", group="rollout")

    # --- objective -----------------------------------------------------------------
    beta: float = _opt(1.0, "weight of the regression (prediction) term: REAL's differentiable -r term, TRACT's "
                       "squared error (raft's loss is the squared error alone)", group="objective")
    lam: float = _opt(0.0, "REAL's reward weight of log pi(k*), the log-probability of the true score token "
                      "(real only)", group="objective")
    mu: float = _opt(0.0, "REAL's reward weight of pi(k*) inside r (differentiated in both terms; real only). "
                     "Not the released code's probability bonus: that is --prob-bonus", group="objective")
    tract_cots: str = _opt("reference", "the CoTs tract trains on: reference (the data's feedback texts; TRACT's "
                           "first stage) or own (TRACT's second stage: CoTs the model samples itself, one per prompt "
                           "per step at --temperature / --top-p; start it from the first stage with --init-from, and "
                           "use --group-size 1 so that no extra CoTs are sampled)", ("reference", "own"), "objective")
    prob_bonus: float = _opt(0.0, "the released code's probability-bonus advantage (its beta_supp): the "
                             "leave-one-out advantages of pi(k*), normalised (--adv-norm) and clipped on their own, "
                             "times this weight, added to the advantages; moves the CoT term only (real only)",
                             group="objective")
    adv_clip: float = _opt(1.0, "clip advantages to [-adv_clip, adv_clip]; <= 0 disables", group="objective")
    adv_norm: str = _opt("reward-std", "scaling of the leave-one-out advantages within a group: reward-std "
                         "(divide by the std of the group's rewards), advantage-std (by the std of the advantages "
                         "themselves, as the released code: G/(G-1) times smaller) or none", ADVANTAGE_NORMS,
                         "objective")
    group_filter: str = _opt("all", "which prompt groups REAL trains on: all, or partial (the released "
                             "real_data_type='partial': rollouts also write their score, and only groups whose "
                             "written scores are neither all right nor all wrong against round(y*) are kept)",
                             ("all", "partial"), "objective")
    max_fill_rounds: int = _opt(10, "with --group-filter partial, rollout rounds of --prompts-per-step prompts at "
                                "most to fill the step's batch with --prompts-per-step partial groups (the released "
                                "code keeps generating until it holds them); a step that reaches the cap trains on "
                                "the groups it has (metrics fill_rounds, prompts_trained)", group="objective")
    clip_ratio: float = _opt(0.2, "PPO ratio clip epsilon when a rollout batch is reused", group="objective")
    kl_coef: float = _opt(0.0, "weight of the k3 KL penalty to the initial policy (0 = off, no reference "
                          "model kept)", group="objective")
    loss_agg: str = _opt("seq-mean-token-mean", "aggregation of the CoT term, named as verl names it: token-mean "
                         "(every CoT token of the step's batch weighs the same; the released code's), "
                         "seq-mean-token-sum (sum per sequence, mean over sequences), seq-mean-token-mean (mean "
                         "per sequence, mean over sequences); one of " + ", ".join(AGGREGATIONS),
                         group="objective")
    normalize_scores: bool = _opt(False, "renormalise the score softmax over the score tokens only",
                                  group="objective")

    # --- optimiser -----------------------------------------------------------------
    lr: float = _opt(1e-5, "AdamW learning rate", group="optim")
    weight_decay: float = _opt(0.0, "AdamW weight decay", group="optim")
    adam_betas: List[float] = _opt([0.9, 0.999], "AdamW betas", group="optim")
    schedule: str = _opt("constant", "learning-rate schedule after warm-up", SCHEDULES, "optim")
    warmup_steps: int = _opt(0, "linear learning-rate warm-up (optimizer updates)", group="optim")
    min_lr_ratio: float = _opt(0.0, "cosine floor as a fraction of --lr", group="optim")
    grad_clip: float = _opt(1.0, "clip the global gradient norm (<= 0 disables)", group="optim")

    # --- model ---------------------------------------------------------------------
    lora_rank: int = _opt(0, "train a LoRA adapter of this rank through peft (0 = full fine-tuning)",
                          group="model")
    lora_alpha: float = _opt(0.0, "LoRA alpha (0 = 2 x rank)", group="model")
    lora_dropout: float = _opt(0.0, "LoRA dropout", group="model")
    lora_target_modules: List[str] = _opt(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"], "modules that get LoRA adapters", group="model")
    gradient_checkpointing: bool = _opt(False, "recompute decoder activations in backward to save memory",
                                        group="model")
    attn_implementation: str = _opt("auto", "attention kernel; auto = flash_attention_2 when flash-attn is "
                                    "installed and the model is on CUDA, else sdpa", ATTN_IMPLEMENTATIONS, "model")
    dtype: str = _opt("auto", "parameter dtype; auto = bfloat16 on CUDA, float32 on CPU", DTYPES, "model")
    compute_dtype: str = _opt("auto", "mixed precision: the dtype forward and backward compute in, while the "
                              "parameters, their gradients and the AdamW states stay in --dtype (e.g. --dtype "
                              "float32 --compute-dtype bfloat16, as the released code trains: fp32 weights, FSDP "
                              "MixedPrecision param_dtype=bf16, reduce_dtype=fp32). Under --parallel fsdp through "
                              "FSDP's MixedPrecisionPolicy, else through torch.autocast; rollouts with --rollout hf "
                              "and evaluation too. auto = --dtype (no mixed precision)", DTYPES, "model")
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto (cuda when available)", group="model")
    parallel: str = _opt("fsdp", "how the processes of a torchrun launch share the work: fsdp (FSDP2 "
                         "fully_shard: weights, gradients and AdamW states sharded over the ranks), ddp (a full "
                         "replica per rank, gradients all-reduced) or none; a plain one-process run ignores it",
                         PARALLEL_MODES, "model")
    collective_timeout: float = _opt(1800.0, "under torchrun, seconds a collective waits for the other ranks; then "
                                     "the run stops with an error that names the late rank", group="model")
    threads: int = _opt(0, "torch CPU threads; 0 = auto: 1 for --model tiny on the CPU (its ops are too small to "
                        "split, and one thread does not stall on a shared CPU), else torch's default", group="model")
    head_backend: str = _opt("auto", "judge_head backend: auto, triton, torch or reference", group="model")
    tiny_config: Dict[str, Any] = _opt({}, "overrides of the tiny model's Qwen3Config, KEY=VALUE (only with "
                                       "--model tiny)", group="model")

    # --- evaluation, logging, checkpoints ------------------------------------------
    eval_every: int = _opt(0, "evaluate held-out Pearson/Spearman/Kendall every N steps (0 = only at the "
                           "end)", group="eval")
    eval_size: int = _opt(256, "held-out examples per evaluation (0 = all)", group="eval")
    eval_batch_size: int = _opt(64, "prompts per generate call during evaluation", group="eval")
    eval_max_new_tokens: int = _opt(0, "longest CoT at evaluation (0 = --max-new-tokens)", group="eval")
    save_every: int = _opt(0, "write a checkpoint every N steps (0 = only at the end)", group="eval")
    keep_checkpoints: int = _opt(0, "keep only the newest N checkpoints (0 = keep all)", group="eval")
    progress: bool = _opt(True, "show progress bars", group="eval")

    # --- the synthetic task --------------------------------------------------------
    synthetic_train_size: int = _opt(4096, "training examples of --data synthetic", group="synthetic")
    synthetic_eval_size: int = _opt(256, "held-out examples of --data synthetic", group="synthetic")
    synthetic_items: int = _opt(6, "questions per synthetic example (see real.judge.synthetic)", group="synthetic")

    def validate(self) -> "TrainConfig":
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}; got {value!r}")
        positive = ("steps", "prompts_per_step", "group_size", "epochs_per_batch", "micro_batch_tokens",
                    "max_fill_rounds", "max_prompt_tokens", "max_cot_tokens", "max_new_tokens", "rollout_batch_size",
                    "eval_batch_size", "synthetic_train_size", "synthetic_items")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)!r}")
        non_negative = ("threads", "eval_every", "save_every", "keep_checkpoints", "warmup_steps", "lora_rank",
                        "mini_batch_size",
                        "eval_size", "eval_max_new_tokens", "lr", "weight_decay", "kl_coef", "lora_dropout")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)!r}")
        for f in fields(self):  # inf / nan (e.g. --lr inf) would train on until the weights are NaN
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number; got {value!r}")
        if self.collective_timeout <= 0:
            raise ValueError(f"collective_timeout must be > 0 seconds; got {self.collective_timeout!r}")
        check_aggregation(self.loss_agg)
        score_phrase(self.score_phrase)
        METHODS[self.method].check_config(self)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1); got {self.eval_fraction}")
        if len(self.adam_betas) != 2:
            raise ValueError(f"adam_betas must be two numbers; got {self.adam_betas!r}")
        if not self.data:
            raise ValueError("data must name at least one file or 'synthetic'")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue a run, or start it afresh")
        if not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1]; got {self.vllm_gpu_memory_utilization}")
        if self.vllm_tensor_parallel_size < 1:
            raise ValueError(f"vllm_tensor_parallel_size must be >= 1; got {self.vllm_tensor_parallel_size}")
        if self.compute_dtype == "float32" and self.dtype in ("bfloat16", "float16"):
            raise ValueError(f"compute_dtype float32 is wider than dtype {self.dtype}: mixed precision computes in "
                             "a lower precision than the parameters (e.g. --dtype float32 --compute-dtype bfloat16)")
        if self.tiny_config and self.model != "tiny":
            raise ValueError("tiny_config only applies to --model tiny")
        if self.mini_batch_size % self.rows_per_prompt:
            raise ValueError(f"mini_batch_size must be a multiple of group_size {self.rows_per_prompt} (whole prompt "
                             f"groups per update); got {self.mini_batch_size}")
        return self

    @property
    def rows_per_prompt(self) -> int:
        """Sequences per prompt in a step's batch: G rollouts for real / grpo, one for raft / tract."""
        return self.group_size if self.method in ("real", "grpo") else 1

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per step: epochs x mini-batches of a full step's batch."""
        rows = self.prompts_per_step * self.rows_per_prompt
        per_epoch = -(-rows // self.mini_batch_size) if self.mini_batch_size else 1
        return self.epochs_per_batch * per_epoch

    @property
    def advantage_clip(self) -> Optional[float]:
        """``adv_clip`` as real.methods.objectives takes it: None when clipping is off."""
        return self.adv_clip if self.adv_clip > 0 else None

    def lr_factor(self, update: int) -> float:
        """The learning rate of optimizer update ``update`` as a fraction of ``lr``: linear warm-up, then
        constant or cosine down to ``min_lr_ratio``."""
        if self.warmup_steps and update < self.warmup_steps:
            return (update + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        total = max(self.steps * self.updates_per_step - self.warmup_steps, 1)
        progress = min(max(update - self.warmup_steps, 0) / total, 1.0)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def check_for_ranks(self, world: int) -> None:
        """Settings that cannot work on ``world`` > 1 ranks (a torchrun launch) are errors."""
        if self.prompts_per_step % world:
            raise ValueError(f"--prompts-per-step {self.prompts_per_step} cannot be split evenly over {world} "
                             f"ranks; make it a multiple of {world} (each rank takes whole prompt groups)")
        if self.mini_batch_size % (world * self.rows_per_prompt):
            raise ValueError(f"--mini-batch-size {self.mini_batch_size} cannot be split evenly over {world} ranks "
                             f"in whole groups of {self.rows_per_prompt}; make it a multiple of "
                             f"{world * self.rows_per_prompt}")
        if self.rollout in ("vllm", "vllm-colocate") and world % self.vllm_tensor_parallel_size:
            raise ValueError(f"--vllm-tensor-parallel-size {self.vllm_tensor_parallel_size} must divide the {world} "
                             "ranks (each group of that many ranks shares one engine)")
        if self.parallel == "none":
            raise ValueError(f"--parallel none under torchrun would train {world} unsynchronised copies; "
                             "use --parallel fsdp or ddp")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))


def _field_type(f) -> Any:
    hints = typing.get_type_hints(TrainConfig)
    return hints[f.name]


def _coerce(name: str, value: Any, tp: Any, source: str) -> Any:
    """Check/convert one value to its field type; errors name the key and the source."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union and type(None) in args:  # Optional[X]
        if value is None:
            return None
        return _coerce(name, value, next(a for a in args if a is not type(None)), source)
    if origin in (list, List):
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{source}: {name} must be a list; got {value!r}")
        return [_coerce(name, v, args[0], source) for v in value]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ValueError(f"{source}: {name} must be a mapping; got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"{source}: {name} must be true or false; got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, float)):
            raise ValueError(f"{source}: {name} must be an integer; got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{source}: {name} must be an integer; got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{source}: {name} must be a number; got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: {name} must be a number; got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{source}: {name} must be a string; got {value!r}")
        return value
    return value


def _unknown_key_error(key: str, source: str) -> ValueError:
    close = difflib.get_close_matches(key.replace("-", "_"), FIELD_NAMES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"{source}: unknown config key {key!r}{hint}; known keys: {', '.join(FIELD_NAMES)}")


def load_config_file(path: str) -> Dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file into a dict of checked values."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext in (".yaml", ".yml"):
            import yaml

            with open(path, encoding="utf-8") as fh:
                raw = yaml.safe_load(fh)
        elif ext == ".toml":
            import tomllib

            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        elif ext == ".json":
            with open(path, encoding="utf-8") as fh:
                raw = json.load(fh)
        else:
            raise ValueError(f"config file {path!r}: unknown extension {ext!r} (use .yaml, .yml, .toml or .json)")
    except ValueError:
        raise
    except Exception as exc:  # yaml.YAMLError, tomllib.TOMLDecodeError
        raise ValueError(f"config file {path!r} could not be parsed: {exc}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of keys to values, got {type(raw).__name__}")
    by_name = {f.name: f for f in fields(TrainConfig)}
    out: Dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in by_name:
            raise _unknown_key_error(str(key), f"config file {path!r}")
        out[name] = _coerce(name, value, _field_type(by_name[name]), f"config file {path!r}")
    return out


def _parse_key_values(items: List[str]) -> Dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--tiny-config expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def build_parser(prog: str = "real train", description: Optional[str] = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per TrainConfig field; unset flags stay absent (SUPPRESS)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, argument_default=argparse.SUPPRESS,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="YAML or TOML file of settings (flags override it)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration (defaults < --config file < flags) as JSON, with "
                             "TrainConfig's field names, and exit without loading anything")
    groups: Dict[str, argparse._ArgumentGroup] = {}
    for f in fields(TrainConfig):
        group_name = f.metadata["group"]
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        group = groups[group_name]
        flag = "--" + f.name.replace("_", "-")
        tp = _field_type(f)
        default = f.default if f.default is not MISSING else f.default_factory()
        help_ = f.metadata["help"] + f" (default: {default!r})"
        kwargs: Dict[str, Any] = {"dest": f.name, "help": help_}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        origin = typing.get_origin(tp)
        if origin in (list, List):
            elem = typing.get_args(tp)[0]
            group.add_argument(flag, nargs="+", type=elem, metavar=f.name.upper(), **kwargs)
        elif origin in (dict, Dict):
            group.add_argument(flag, nargs="+", metavar="KEY=VALUE", **kwargs)
        elif typing.get_origin(tp) is typing.Union:
            inner = next(a for a in typing.get_args(tp) if a is not type(None))
            group.add_argument(flag, type=inner, metavar=f.name.upper(), **kwargs)
        elif "choices" in kwargs:
            group.add_argument(flag, type=tp, metavar="{" + ",".join(kwargs["choices"]) + "}", **kwargs)
        else:
            group.add_argument(flag, type=tp, metavar=f.name.upper(), **kwargs)
    # argparse's own "(default: ...)" would print SUPPRESS; the help strings carry the real default.
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def config_from_args(args: argparse.Namespace, base: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """Defaults < ``base`` (e.g. a caller's defaults) < --config file < flags."""
    values: Dict[str, Any] = dict(base or {})
    ns = vars(args)
    if ns.get("config"):
        values.update(load_config_file(ns["config"]))
    for name in FIELD_NAMES:
        if name in ns:
            value = ns[name]
            if name == "tiny_config":
                value = _parse_key_values(value)
            values[name] = value
    return make_config(**values)


def config_json(config: TrainConfig) -> str:
    """The resolved configuration as ``--print-config`` prints it: JSON, keys = TrainConfig's field names."""
    return json.dumps(config.to_dict(), indent=2)


def make_config(**values: Any) -> TrainConfig:
    """Build and validate a TrainConfig from keyword values (unknown keys are errors)."""
    by_name = {f.name: f for f in fields(TrainConfig)}
    checked = {}
    for key, value in values.items():
        if key not in by_name:
            raise _unknown_key_error(key, "config")
        checked[key] = _coerce(key, value, _field_type(by_name[key]), "config")
    return TrainConfig(**checked).validate()


def parse_train_args(argv: List[str], base: Optional[Dict[str, Any]] = None) -> TrainConfig:
    parser = build_parser()
    return config_from_args(parser.parse_args(argv), base)
