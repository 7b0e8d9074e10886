"""Configuration of `real train`: a common dataclass plus the method's own section, read from YAML/TOML/JSON
and/or flags.

``TrainConfig`` holds what every method reads (the run, the batch, rollouts,
the optimiser, the model, evaluation); ``TrainConfig.method_config`` holds the
settings of the chosen method alone, an instance of that method's
``config_class`` (``RealConfig``, ``GRPOConfig``, ``TRACTConfig``,
``RAFTConfig`` in ``real/methods/``).  Every setting is declared once, with its
help text (``real.methods.settings.setting``); the argument parser and the file
loader are generated from the declarations, so a flag, a config key and its
``--help`` line can never drift apart.  Flags are one flat namespace
(``--lam``); in a file a method's settings go in a section named after it::

    method: real
    lr: 1.0e-6
    real:
      lam: 0.0
      kl_coef: 0.0

(or at the top level, as the flags are).  Precedence: built-in default <
config file < command-line flag.  A key that is no setting, a setting of
another method than the run's, or a section of another method, is an error
that names it, never silently ignored.  ``--print-config`` prints the resolved
configuration in the file layout.
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
from real.methods.settings import MethodConfig, check_fields, setting
from real.judge.prompts import score_phrase

SCHEDULES = ("constant", "cosine")
ROLLOUT_ENGINES = ("hf", "vllm-colocate", "vllm-server", "vllm")  # vllm = vllm-colocate (real.loop.vllm_rollout)
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")  # transformers' attn_implementation
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class TrainConfig:
    # --- what to train, on what --------------------------------------------------
    method: str = setting("real", "objective: " + ", ".join(f"{name} ({cls.description})"
                                                            for name, cls in METHODS.items()),
                          tuple(METHODS), "run")
    model: str = setting("tiny", "a local model folder, a Hugging Face Hub name (e.g. Qwen/Qwen3-8B: the local cache "
                         "first, else downloaded), or 'tiny' (a small random Qwen3 and a tokenizer built on the spot; "
                         "runs offline)", group="run")
    data: List[str] = setting(["synthetic"], "training data files (Prometheus / Feedback-Collection .json/.jsonl), "
                              "or 'synthetic' for the built-in synthetic judge task", group="run")
    eval_data: List[str] = setting([], "held-out data files; default: the synthetic held-out split for "
                                   "--data synthetic, else the last --eval-fraction of --data", group="run")
    eval_fraction: float = setting(0.1, "share of the training files held out for evaluation when --eval-data "
                                   "is not given", group="run")
    output_dir: str = setting("runs/real", "where metrics.jsonl and checkpoint-STEP/ folders go", group="run")
    init_from: Optional[str] = setting(None, "start from the model weights of this checkpoint folder (e.g. a "
                                       "TRACT warm-up) instead of the --model weights", group="run")
    resume: bool = setting(False, "continue from the newest complete checkpoint in --output-dir", group="run")
    overwrite: bool = setting(False, "start afresh in an --output-dir that holds an earlier run (its checkpoints and "
                              "metrics are deleted)", group="run")
    allow_config_change: bool = setting(False, "with --resume, continue even where a setting that makes it another run "
                                        "(method, seed, data, model, objective, optimiser) differs from the "
                                        "checkpoint's; the new values are used and recorded", group="run")
    seed: int = setting(0, "seed for data order, sampling and initialisation", group="run")
    steps: int = setting(100, "number of training steps (one rollout batch each)", group="run")
    chat_template: bool = setting(True, "lay each prompt out as a user turn of the tokenizer's chat template, when "
                                  "it has one (the released code does: its prompts are chat messages); "
                                  "--no-chat-template feeds the raw Prometheus prompt", group="run")
    score_phrase: str = setting("prometheus", "the phrase the judge writes before its score, in training, inference "
                                "and parsing: prometheus ('[RESULT] N'), released ('So the overall score is N', the "
                                "released code's delimiter), or the phrase itself", group="run")
    skip_malformed: bool = setting(False, "skip malformed data rows (with a count) instead of failing", group="run")

    # --- batch shape ---------------------------------------------------------------
    prompts_per_step: int = setting(8, "prompts per step (B)", group="batch")
    group_size: int = setting(8, "sampled CoTs per prompt (G): the group of real and grpo; tract with --tract-cots "
                                 "own samples this many and keeps the first (use 1); raft samples none", group="batch")
    epochs_per_batch: int = setting(1, "optimizer updates over each rollout batch (>1 uses PPO ratio clipping)",
                                    group="batch")
    mini_batch_size: int = setting(0, "sequences (rollouts) per optimizer update, over all ranks: every epoch over a "
                                   "step's batch takes one update per mini-batch, PPO-clipped after the first (the "
                                   "released REAL: real_mini_batch_size_per_gpu=128 responses x its GPUs); 0 = the "
                                   "whole batch, one update per epoch", group="batch")
    micro_batch_tokens: int = setting(16384, "token budget of one micro-batch (rows x padded length); larger "
                                      "batches are split and their gradients accumulated", group="batch")
    max_prompt_tokens: int = setting(2048, "prompts longer than this are truncated (with a warning)", group="batch")
    max_cot_tokens: int = setting(1024, "CoTs longer than this are truncated (with a warning)", group="batch")

    # --- rollouts ------------------------------------------------------------------
    rollout: str = setting("hf", "rollout engine: hf (transformers generate through the trained model), "
                           "vllm-colocate (a vLLM engine in every training process, asleep while it trains, weights "
                           "pushed before every rollout; 'vllm' is the same) or vllm-server (a separate `trl "
                           "vllm-serve` process that rank 0 pushes the weights to); the vLLM ones need CUDA and "
                           "pip install 'real-kernels[vllm]'", ROLLOUT_ENGINES, "rollout")
    vllm_gpu_memory_utilization: float = setting(0.3, "vllm-colocate: share of each GPU's memory the engine may take "
                                                 "while it samples (weights + KV cache)", group="rollout")
    vllm_tensor_parallel_size: int = setting(1, "vllm-colocate: GPUs one engine spans (must divide the ranks)",
                                             group="rollout")
    vllm_sleep: bool = setting(True, "vllm-colocate: release the engine's weights and KV cache while training "
                               "(vLLM sleep mode, level 2)", group="rollout")
    vllm_server_host: str = setting("127.0.0.1", "vllm-server: host of `trl vllm-serve`", group="rollout")
    vllm_server_port: int = setting(8000, "vllm-server: its HTTP port", group="rollout")
    vllm_group_port: int = setting(51216, "vllm-server: port of its weight-update group", group="rollout")
    vllm_server_timeout: float = setting(240.0, "vllm-server: seconds to wait for the server to answer at the start",
                                         group="rollout")
    temperature: float = setting(1.0, "sampling temperature of rollouts", group="rollout")
    top_p: float = setting(0.9, "nucleus sampling top-p of rollouts", group="rollout")
    max_new_tokens: int = setting(256, "longest generated CoT (tokens; 32 with --data synthetic); generation stops at "
                                  "the score marker",
                                  group="rollout")
    unsharded_rollouts: bool = setting(False, "under --parallel fsdp, keep every layer gathered for the whole rollout "
                                       "(one all-gather per layer instead of one per layer per new token; needs "
                                       "the whole model in each GPU's memory)", group="rollout")
    rollout_batch_size: int = setting(64, "sequences per generate call", group="rollout")

    # --- objective (the common part; each method's own settings are its section, method_config) -------
    normalize_scores: bool = setting(False, "renormalise the score softmax over the score tokens only",
                                     group="objective")

    # --- optimiser -----------------------------------------------------------------
    lr: float = setting(1e-5, "AdamW learning rate", group="optim")
    weight_decay: float = setting(0.0, "AdamW weight decay", group="optim")
    adam_betas: List[float] = setting([0.9, 0.999], "AdamW betas", group="optim")
    schedule: str = setting("constant", "learning-rate schedule after warm-up", SCHEDULES, "optim")
    warmup_steps: int = setting(0, "linear learning-rate warm-up (optimizer updates)", group="optim")
    min_lr_ratio: float = setting(0.0, "cosine floor as a fraction of --lr", group="optim")
    grad_clip: float = setting(1.0, "clip the global gradient norm (<= 0 disables)", group="optim")

    # --- model ---------------------------------------------------------------------
    lora_rank: int = setting(0, "train a LoRA adapter of this rank through peft (0 = full fine-tuning)",
                             group="model")
    lora_alpha: float = setting(0.0, "LoRA alpha (0 = 2 x rank)", group="model")
    lora_dropout: float = setting(0.0, "LoRA dropout", group="model")
    lora_target_modules: List[str] = setting(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"], "modules that get LoRA adapters", group="model")
    gradient_checkpointing: bool = setting(False, "recompute decoder activations in backward to save memory",
                                           group="model")
    attn_implementation: str = setting("auto", "attention kernel; auto = flash_attention_2 when flash-attn is "
                                       "installed and the model is on CUDA, else sdpa", ATTN_IMPLEMENTATIONS, "model")
    dtype: str = setting("auto", "parameter dtype; auto = bfloat16 on CUDA, float32 on CPU", DTYPES, "model")
    compute_dtype: str = setting("auto", "mixed precision: the dtype forward and backward compute in, while the "
                                 "parameters, their gradients and the AdamW states stay in --dtype (e.g. --dtype "
                                 "float32 --compute-dtype bfloat16, as the released code trains: fp32 weights, FSDP "
                                 "MixedPrecision param_dtype=bf16, reduce_dtype=fp32). Under --parallel fsdp through "
                                 "FSDP's MixedPrecisionPolicy, else through torch.autocast; rollouts with --rollout hf "
                                 "and evaluation too. auto = --dtype (no mixed precision)", DTYPES, "model")
    device: str = setting("auto", "cpu, cuda, cuda:N or auto (cuda when available)", group="model")
    parallel: str = setting("fsdp", "how the processes of a torchrun launch share the work: fsdp (FSDP2 "
                            "fully_shard: weights, gradients and AdamW states sharded over the ranks), ddp (a full "
                            "replica per rank, gradients all-reduced) or none; a plain one-process run ignores it",
                            PARALLEL_MODES, "model")
    collective_timeout: float = setting(1800.0, "under torchrun, seconds a collective waits for the other ranks; then "
                                        "the run stops with an error that names the late rank", group="model")
    threads: int = setting(0, "torch CPU threads; 0 = auto: 1 for --model tiny on the CPU (its ops are too small to "
                           "split, and one thread does not stall on a shared CPU), else torch's default", group="model")
    head_backend: str = setting("auto", "judge_head backend: auto, triton, torch or reference", group="model")
    tiny_config: Dict[str, Any] = setting({}, "overrides of the tiny model's Qwen3Config, KEY=VALUE (only with "
                                          "--model tiny)", group="model")

    # --- evaluation, logging, checkpoints ------------------------------------------
    eval_every: int = setting(0, "evaluate held-out Pearson/Spearman/Kendall every N steps (0 = only at the "
                              "end)", group="eval")
    eval_size: int = setting(256, "held-out examples per evaluation (0 = all)", group="eval")
    eval_batch_size: int = setting(64, "prompts per generate call during evaluation", group="eval")
    eval_max_new_tokens: int = setting(0, "longest CoT at evaluation (0 = --max-new-tokens)", group="eval")
    save_every: int = setting(0, "write a checkpoint every N steps (0 = only at the end)", group="eval")
    keep_checkpoints: int = setting(0, "keep only the newest N checkpoints (0 = keep all)", group="eval")
    progress: bool = setting(True, "show progress bars", group="eval")

    # --- the synthetic task --------------------------------------------------------
    synthetic_train_size: int = setting(4096, "training examples of --data synthetic", group="synthetic")
    synthetic_eval_size: int = setting(256, "held-out examples of --data synthetic", group="synthetic")
    synthetic_items: int = setting(6, "questions per synthetic example (see real.judge.synthetic)", group="synthetic")

    # --- the method's own settings: an instance of METHODS[method].config_class ----------
    method_config: Optional[MethodConfig] = field(default=None, metadata={"section": True})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            return  # validate() names the bad method
        if self.method_config is None:
            self.method_config = METHODS[self.method].config_class()
        self._check_method_config()  # e.g. dataclasses.replace(cfg, method=...) kept the old method's section

    def _check_method_config(self) -> None:
        section = METHODS[self.method].config_class
        if type(self.method_config) is not section:
            raise ValueError(f"method_config must hold method {self.method}'s settings ({section.__name__}); got "
                             f"{type(self.method_config).__name__} (pass method_config={section.__name__}(...) "
                             "along with the new method)")

    def validate(self) -> "TrainConfig":
        positive = ("steps", "prompts_per_step", "group_size", "epochs_per_batch", "micro_batch_tokens",
                    "max_prompt_tokens", "max_cot_tokens", "max_new_tokens", "rollout_batch_size",
                    "eval_batch_size", "synthetic_train_size", "synthetic_items")
        non_negative = ("threads", "eval_every", "save_every", "keep_checkpoints", "warmup_steps", "lora_rank",
                        "mini_batch_size", "eval_size", "eval_max_new_tokens", "lr", "weight_decay", "lora_dropout")
        check_fields(self, non_negative, positive)  # choices, finite numbers (--lr inf), signs
        if self.collective_timeout <= 0:
            raise ValueError(f"collective_timeout must be > 0 seconds; got {self.collective_timeout!r}")
        self._check_method_config()  # the method or its section may have been set after construction
        self.method_config.validate()
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
        """The file layout: the common settings, then the method's own under its name (``"real": {...}``)."""
        out = asdict(self)
        out[self.method] = out.pop("method_config")
        return out


COMMON_FIELDS = {f.name: f for f in fields(TrainConfig) if not f.metadata.get("section")}  # all but method_config
FIELD_NAMES = tuple(COMMON_FIELDS)
DEFAULT_METHOD = TrainConfig.method
# each method's own settings, and which methods have a setting of each name
SECTION_FIELDS: Dict[str, Dict[str, Any]] = {
    name: {f.name: f for f in fields(cls.config_class)} for name, cls in METHODS.items()}
METHOD_FIELD_OWNERS: Dict[str, List[str]] = {}
for _method, _section in SECTION_FIELDS.items():
    for _name in _section:
        METHOD_FIELD_OWNERS.setdefault(_name, []).append(_method)
KNOWN_KEYS = FIELD_NAMES + tuple(METHOD_FIELD_OWNERS) + tuple(METHODS)


def _field_type(f) -> Any:
    return typing.get_type_hints(TrainConfig)[f.name]


def _method_field_type(name: str, method: Optional[str] = None) -> Any:
    owner = method or METHOD_FIELD_OWNERS[name][0]
    return typing.get_type_hints(METHODS[owner].config_class)[name]


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
    close = difflib.get_close_matches(key.replace("-", "_"), KNOWN_KEYS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"{source}: unknown config key {key!r}{hint}; known keys: {', '.join(FIELD_NAMES)}; the "
                      f"methods' own: {', '.join(METHOD_FIELD_OWNERS)}; or a method's section: {', '.join(METHODS)}")


def _section_values(method: str, section: Any, source: str) -> Dict[str, Any]:
    """A method's section as given (a mapping of its own settings), checked and converted."""
    if section is None:  # an empty section (``raft:`` with nothing under it)
        section = {}
    if not isinstance(section, dict):
        raise ValueError(f"{source}: {method} must be a mapping of method {method}'s settings; got {section!r}")
    out = {}
    for key, value in section.items():
        name = str(key).replace("-", "_")
        if name not in SECTION_FIELDS[method]:
            own = ", ".join(SECTION_FIELDS[method]) or "none"
            raise ValueError(f"{source}: {method}.{key} is not a setting of method {method} (its settings: {own})")
        out[name] = _coerce(name, value, _method_field_type(name, method), source)
    return out


def load_config_file(path: str) -> Dict[str, Any]:
    """Read a YAML (.yaml/.yml), TOML (.toml) or JSON (.json) file into a dict of checked values (a method's
    section as a dict under the method's name)."""
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
    source = f"config file {path!r}"
    out: Dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name in COMMON_FIELDS:
            out[name] = _coerce(name, value, _field_type(COMMON_FIELDS[name]), source)
        elif name in METHODS:
            out[name] = _section_values(name, value, source)
        elif name in METHOD_FIELD_OWNERS:
            out[name] = _coerce(name, value, _method_field_type(name), source)
        else:
            raise _unknown_key_error(str(key), source)
    for method in METHODS:  # one setting given twice in one file: at the top level and in the method's section
        for name in set(out.get(method, {})) & set(out):
            raise ValueError(f"{source}: {name} is given twice, at the top level and under {method}:")
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


def _add_flag(group, name: str, tp: Any, help_: str, choices) -> None:
    flag = "--" + name.replace("_", "-")
    kwargs: Dict[str, Any] = {"dest": name, "help": help_}
    if choices:
        kwargs["choices"] = choices
    if tp is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        return
    origin = typing.get_origin(tp)
    if origin in (list, List):
        group.add_argument(flag, nargs="+", type=typing.get_args(tp)[0], metavar=name.upper(), **kwargs)
    elif origin in (dict, Dict):
        group.add_argument(flag, nargs="+", metavar="KEY=VALUE", **kwargs)
    elif origin is typing.Union:
        inner = next(a for a in typing.get_args(tp) if a is not type(None))
        group.add_argument(flag, type=inner, metavar=name.upper(), **kwargs)
    elif choices:
        group.add_argument(flag, type=tp, metavar="{" + ",".join(choices) + "}", **kwargs)
    else:
        group.add_argument(flag, type=tp, metavar=name.upper(), **kwargs)


def _default(f) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()


def build_parser(prog: str = "real train", description: Optional[str] = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per setting, common and methods' own; unset flags stay absent (SUPPRESS).

    A method's own settings are listed under the methods that have them; a flag given for another method than
    the run's is an error when the configuration is built (``make_config``).
    """
    parser = argparse.ArgumentParser(
        prog=prog, description=description, argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the help strings carry the real defaults
    )
    parser.add_argument("--config", metavar="FILE", help="YAML, TOML or JSON file of settings (flags override it); "
                        "a method's own settings go under its name (real:, grpo:, tract:, raft:) or at the top level")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration (defaults < --config file < flags) as JSON, in the "
                             "file layout (the method's own settings under its name), and exit without loading "
                             "anything")
    groups: Dict[str, argparse._ArgumentGroup] = {}
    for f in COMMON_FIELDS.values():
        group_name = f.metadata["group"]
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        _add_flag(groups[group_name], f.name, _field_type(f), f.metadata["help"] + f" (default: {_default(f)!r})",
                  f.metadata.get("choices"))
    for name, owners in METHOD_FIELD_OWNERS.items():
        title = f"settings of method{'s' if len(owners) > 1 else ''} {', '.join(owners)} (--method)"
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        decls = [SECTION_FIELDS[m][name] for m in owners]
        helps = dict.fromkeys(f"{d.metadata['help']} (default: {_default(d)!r})" for d in decls)
        help_ = next(iter(helps)) if len(helps) == 1 else " | ".join(
            f"{m}: {d.metadata['help']} (default: {_default(d)!r})" for m, d in zip(owners, decls))
        _add_flag(groups[title], name, _method_field_type(name), help_, decls[0].metadata.get("choices"))
    return parser


def config_from_args(args: argparse.Namespace, base: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """Defaults < ``base`` (e.g. a caller's defaults) < --config file < flags."""
    values: Dict[str, Any] = dict(base or {})
    ns = vars(args)
    flags: Dict[str, Any] = {}
    for name in FIELD_NAMES + tuple(METHOD_FIELD_OWNERS):
        if name in ns:
            flags[name] = _parse_key_values(ns[name]) if name == "tiny_config" else ns[name]
    if ns.get("config"):
        source = f"config file {ns['config']!r}"
        from_file = load_config_file(ns["config"])
        sections = {m: from_file.pop(m) for m in METHODS if m in from_file}
        method = flags.get("method", from_file.get("method", values.get("method", DEFAULT_METHOD)))
        for section_method, section in sections.items():
            if section_method != method:
                raise ValueError(f"{source}: its {section_method}: section holds settings of method "
                                 f"{section_method}, but the method is {method!r}")
            from_file.update(section)  # the file's section counts as the file's, below the flags
        for name in from_file:
            if name in METHOD_FIELD_OWNERS and name not in SECTION_FIELDS.get(method, {}):
                raise ValueError(f"{source}: {_wrong_method(name, method)}")
        values.update(from_file)
    values.update(flags)
    return make_config(**values)


def config_json(config: TrainConfig) -> str:
    """The resolved configuration as ``--print-config`` prints it: JSON in the file layout (``TrainConfig.to_dict``),
    which ``--config`` reads back."""
    return json.dumps(config.to_dict(), indent=2)


def _wrong_method(name: str, method: str) -> str:
    owners = METHOD_FIELD_OWNERS[name]
    return (f"{name} is a setting of method{'s' if len(owners) > 1 else ''} {', '.join(owners)}, not of {method!r} "
            f"(--method {method}); leave it out")


def make_config(**values: Any) -> TrainConfig:
    """Build and validate a TrainConfig from keyword values: the common settings, the method's own (flat, as
    the flags, or as a mapping under the method's name, as ``to_dict`` writes them); anything else is an error
    that names it."""
    values = dict(values)
    method = values.get("method", DEFAULT_METHOD)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    own: Dict[str, Any] = {}
    for section_method in METHODS:
        if section_method not in values:
            continue
        section = values.pop(section_method)
        if section_method != method:
            raise ValueError(f"config: a {section_method} section (settings of method {section_method}) was given, "
                             f"but the method is {method!r}")
        own = _section_values(method, section, "config")
    checked: Dict[str, Any] = {}
    for key, value in values.items():
        if key in COMMON_FIELDS:
            checked[key] = _coerce(key, value, _field_type(COMMON_FIELDS[key]), "config")
        elif key in SECTION_FIELDS[method]:
            if key in own:
                raise ValueError(f"config: {key} is given twice, flat and in the {method} section")
            own[key] = _coerce(key, value, _method_field_type(key, method), "config")
        elif key in METHOD_FIELD_OWNERS:
            raise ValueError(f"config: {_wrong_method(key, method)}")
        else:
            raise _unknown_key_error(key, "config")
    return TrainConfig(**checked, method_config=METHODS[method].config_class(**own)).validate()


def parse_train_args(argv: List[str], base: Optional[Dict[str, Any]] = None) -> TrainConfig:
    parser = build_parser()
    return config_from_args(parser.parse_args(argv), base)


def flat_settings(config: Dict[str, Any]) -> Dict[str, Any]:
    """A configuration in the file layout (``to_dict``; or a flat one, as older checkpoints saved it) as one
    flat mapping of setting names, the run's method's own settings among the common ones."""
    flat = {k: v for k, v in config.items() if k not in METHODS}
    section = config.get(config.get("method", DEFAULT_METHOD))
    if isinstance(section, dict):
        flat.update(section)
    return flat
