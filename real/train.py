"""`real train`: the thin training loop for REAL and its baselines (GRPO, RAFT, TRACT).

One step, readable top to bottom in ``Trainer.train_step``:

1. take the next ``B`` prompts (a seeded permutation per epoch; the position
   is saved in checkpoints);
2. REAL / GRPO: sample ``G`` CoTs per prompt (``real.rollout``, seeded by
   (seed, step)); TRACT: one reference CoT per prompt; RAFT: no CoT;
3. build the teacher-forced batch (prompt + CoT cut at its marker + marker +
   true score token, ``real.batching``);
4. split it into micro-batches under a token budget; for each, run the decoder
   to hidden states and the fused judge head (``real.objectives.judge_forward``
   -> ``real_kernels.hf`` -> ``real_kernels.judge_head``: the LM head module is
   never called, no ``[tokens x vocab]`` logits), the method's loss, backward
   scaled by the micro-batch's share (gradient accumulation);
5. clip the gradient norm, AdamW step, schedule step; repeat 4-5 for
   ``--epochs-per-batch`` epochs (PPO ratio clipping against the first pass's
   log-probs when > 1);
6. one JSON line in ``OUTPUT_DIR/metrics.jsonl``; every ``--eval-every`` steps
   RAIL predictions on held-out prompts and their Pearson/Spearman/Kendall.

Checkpoints (``real.checkpoint``) are atomic and hold everything needed to
continue exactly: a run stopped after step k and resumed logs the same losses
as one that never stopped.  Ctrl-C finishes the current step, saves a
checkpoint and exits (a second Ctrl-C aborts at once); so does creating the file
``OUTPUT_DIR/STOP``, which also works under torchrun, whose launcher does not
pass Ctrl-C on to the ranks and kills them soon after.

Under ``torchrun`` the same loop runs on every rank (``--parallel fsdp|ddp``,
``real.distributed``): each rank takes its share of the step's prompts (whole
groups), every model call runs as ``self.wrapped(fn, ...)`` so FSDP gathers
the LM-head weight the fused head reads, ranks run equally many micro-batches,
metrics are reduced over ranks, and rank 0 alone logs and writes checkpoints
(full states, which resume on any number of ranks).
"""
from __future__ import annotations

import math
import os
import random
import resource
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from real import checkpoint as ckpt
from real import distributed as dist_utils
from real.batching import TeacherForcedBatch, build_teacher_forced_batch, micro_batch_ranges, slice_batch
from real.config import TrainConfig, build_parser, config_from_args
from real.data import JudgeExample, PromptStream, load_judge_data
from real.inference import rail_predictions
from real.metrics import correlations
from real.models import load_model_and_tokenizer, resolve_device
from real.objectives import (
    binary_rewards,
    group_normalized_advantages,
    grpo_loss,
    grpo_token_logprobs,
    judge_forward,
    raft_loss,
    real_advantages,
    real_loss,
    regression_reward,
    rloo_advantages,
    sampled_score_indices,
    tract_loss,
)
from real.prompts import ScoreScale, format_cot
from real.run_dir import METRICS_FILE, RunDir

ROLLOUT_METHODS = ("real", "grpo")
SYNTHETIC_DEFAULTS = {"max_new_tokens": 32}  # defaults for --data synthetic, below config file and flags


# --- small pieces ---------------------------------------------------------------------

def peak_memory_mb(device: torch.device) -> Tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _generate_with(model, engine, *args, **kwargs):
    """``engine.generate`` on ``model``: called as ``wrapped(_generate_with, engine, ...)`` so that under
    FSDP the sampling runs inside the root module's forward, with its parameters gathered."""
    return engine.generate(model, *args, **kwargs)


@dataclass
class TrainResult:
    output_dir: str
    last_step: int
    interrupted: bool
    checkpoint: Optional[str]
    final_eval: Optional[Dict[str, Any]]
    records: List[Dict[str, Any]] = field(default_factory=list)


# --- the trainer ----------------------------------------------------------------------

class Trainer:
    """Holds the model, data, optimiser and rollout engine of one run; ``run()`` trains it."""

    def __init__(self, config: TrainConfig, *, model=None, tokenizer=None,
                 train_examples: Optional[List[JudgeExample]] = None,
                 eval_examples: Optional[List[JudgeExample]] = None, log=None):
        self.config = config
        device = resolve_device(config.device)
        # torchrun: join the process group; one process: a one-rank environment, nothing to join.
        self.env = dist_utils.setup_distributed(device=None if config.device == "auto" else str(device))
        self.device = self.env.device
        self.is_main = self.env.is_main
        self.log = (log or (lambda msg: tqdm.write(msg, file=sys.stderr))) if self.is_main else (lambda msg: None)
        if self.env.is_distributed:
            self._check_distributed()
        if config.threads:
            torch.set_num_threads(config.threads)
        seed_everything(config.seed)
        self.output_dir = config.output_dir
        self.run_dir = RunDir(config.output_dir, self.env, self.log)

        self.model, self.tokenizer = (model, tokenizer) if model is not None else self._load_model()
        if tokenizer is None and model is not None:
            raise ValueError("pass the tokenizer together with the model")
        self.scale = ScoreScale.from_tokenizer(self.tokenizer)
        if train_examples is None:
            train_examples, eval_examples = self._load_data()
        self.train_examples, self.eval_examples = self._check_data(train_examples), list(eval_examples or [])

        if config.init_from:
            self._init_from(config.init_from)
        self._prepare_model()
        self.ref_model = self._reference_model() if config.kl_coef > 0 else None
        self.resume_from = self.run_dir.resume_checkpoint(config.resume)
        if self.resume_from:  # the weights go in before sharding; optimizer etc. after it
            ckpt.load_model_weights(self.model, self.resume_from)
        # Everything the loop does with the model runs as self.wrapped(fn, ...) (real.distributed): under
        # FSDP that gathers the LM-head weight the fused head reads and reduce-scatters its gradient.
        self.wrapped = dist_utils.wrap_model(self.model, config.parallel, self.env)
        # FSDP warns that the root returns views (the head's outputs); the loop never writes into them in place.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        self.ref_wrapped = None
        if self.ref_model is not None:
            self.ref_wrapped = dist_utils.wrap_model(self.ref_model, "fsdp" if config.parallel == "fsdp" else "none",
                                                     self.env)
        self.trainable = [p for p in self.wrapped.parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.lr, weight_decay=config.weight_decay,
                                           betas=tuple(config.adam_betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.engine = None
        if config.method in ROLLOUT_METHODS:
            from real.rollout import make_rollout_engine

            self.engine = make_rollout_engine(
                config.rollout, self.model, self.tokenizer, temperature=config.temperature, top_p=config.top_p,
                max_new_tokens=config.max_new_tokens, batch_size=config.rollout_batch_size,
                score_values=self.scale.values)
        self.step = 0
        self.stream = PromptStream(len(self.train_examples), config.seed)
        self._stop_requested = False
        if self.resume_from:
            self._load_training_state(self.resume_from)

    # --- setup ---------------------------------------------------------------------------

    def _check_distributed(self) -> None:
        cfg, world = self.config, self.env.world_size
        if cfg.prompts_per_step % world:
            raise ValueError(f"--prompts-per-step {cfg.prompts_per_step} cannot be split evenly over {world} ranks; "
                             f"make it a multiple of {world} (each rank takes whole prompt groups)")
        if cfg.rollout == "vllm" and cfg.method in ROLLOUT_METHODS:
            raise ValueError("--rollout vllm runs one engine per process and is not supported under torchrun yet; "
                             "use --rollout hf (it samples through the sharded model)")
        if cfg.parallel == "none":
            raise ValueError(f"--parallel none under torchrun would train {world} unsynchronised copies; "
                             "use --parallel fsdp or ddp")

    def _load_model(self):
        cfg = self.config
        return load_model_and_tokenizer(
            cfg.model, device=self.device, dtype=None if cfg.dtype == "auto" else cfg.dtype,
            attn_implementation=None if cfg.attn_implementation == "auto" else cfg.attn_implementation,
            seed=cfg.seed, tiny_config=cfg.tiny_config)

    def _load_data(self) -> Tuple[List[JudgeExample], List[JudgeExample]]:
        cfg = self.config
        if cfg.data == ["synthetic"]:
            from real.synthetic import SyntheticTask, make_splits

            train, held_out = make_splits(cfg.synthetic_train_size, cfg.synthetic_eval_size, seed=cfg.seed,
                                          task=SyntheticTask(n_items=cfg.synthetic_items))
            if cfg.eval_data:
                held_out = load_judge_data(cfg.eval_data, skip_malformed=cfg.skip_malformed)
            return train, held_out
        if "synthetic" in cfg.data:
            raise ValueError("--data synthetic cannot be mixed with data files")
        examples = load_judge_data(cfg.data, skip_malformed=cfg.skip_malformed)
        if cfg.eval_data:
            return examples, load_judge_data(cfg.eval_data, skip_malformed=cfg.skip_malformed)
        n_eval = int(len(examples) * cfg.eval_fraction)
        if n_eval == 0:
            return examples, []
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        held = set(order[:n_eval])
        return ([e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)])

    def _check_data(self, examples: List[JudgeExample]) -> List[JudgeExample]:
        examples = list(examples)
        if not examples:
            raise ValueError("the training data is empty")
        if self.config.method == "tract":
            usable = [e for e in examples if e.feedback]
            if not usable:
                raise ValueError("--method tract trains on reference CoTs, but no training example has feedback")
            if len(usable) < len(examples):
                warnings.warn(f"tract: {len(examples) - len(usable)} of {len(examples)} examples have no reference "
                              "CoT and are left out", stacklevel=2)
            examples = usable
        return examples

    def _init_from(self, folder: str) -> None:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--init-from {folder!r} does not exist")
        if os.path.isfile(os.path.join(folder, "adapter_model.safetensors")):
            self._pending_adapter = folder  # loaded once the LoRA wrapper exists
            if not self.config.lora_rank:
                raise ValueError(f"--init-from {folder!r} holds a LoRA adapter; pass --lora-rank to train it further")
            return
        ckpt.load_model_weights(self.model, folder)
        self.log(f"initialised the weights from {folder}")

    def _prepare_model(self) -> None:
        cfg = self.config
        model = self.model
        if cfg.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if cfg.lora_rank:
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError:
                raise ValueError("--lora-rank needs the peft package (pip install peft)") from None
            lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank,
                              lora_dropout=cfg.lora_dropout, target_modules=list(cfg.lora_target_modules),
                              task_type="CAUSAL_LM")
            model = get_peft_model(model, lora)
            if cfg.gradient_checkpointing:
                model.enable_input_require_grads()
            pending = getattr(self, "_pending_adapter", None)
            if pending:
                ckpt.load_model_weights(model, pending)
                self.log(f"initialised the LoRA adapter from {pending}")
        self.model = model.to(self.device)
        base = ckpt.is_peft_model(model) and model.get_base_model() or model
        self.attn_implementation = getattr(base.config, "_attn_implementation", None) or "default"
        n_params = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        dtype = next(self.model.parameters()).dtype
        self.log(f"model {cfg.model}: {type(base).__name__}, {n_params / 1e6:.2f}M parameters "
                 f"({n_train / 1e6:.2f}M trainable{', LoRA r=%d' % cfg.lora_rank if cfg.lora_rank else ''}), "
                 f"attention {self.attn_implementation}, dtype {str(dtype).replace('torch.', '')}, "
                 f"device {self.device}, gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}")

    def _reference_model(self):
        if ckpt.is_peft_model(self.model):
            return None  # the adapter is disabled instead (see _ref_forward)
        import copy

        ref = copy.deepcopy(self.model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    def _lr_lambda(self, update: int) -> float:
        cfg = self.config
        if cfg.warmup_steps and update < cfg.warmup_steps:
            return (update + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        total = max(cfg.steps * cfg.epochs_per_batch - cfg.warmup_steps, 1)
        progress = min(max(update - cfg.warmup_steps, 0) / total, 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    # --- output dir, checkpoints ---------------------------------------------------------

    def _load_training_state(self, folder: str) -> None:
        """Optimizer, schedule, RNG and data position of a checkpoint (the weights are already in)."""
        optimizer_state = ckpt.read_optimizer_state(folder) if self.is_main else None
        legacy = dist_utils.broadcast_object(self.is_main and ckpt.is_legacy_optimizer_state(optimizer_state), self.env)
        if legacy:  # checkpoints written before optimizer states were keyed by parameter name
            if self.env.is_distributed:
                raise ValueError(f"{folder!r} holds an optimizer state in the old one-process format; resume it "
                                 "in one process (it is rewritten in the new format at the next checkpoint)")
            self.optimizer.load_state_dict(optimizer_state)
        else:
            dist_utils.load_full_optimizer_state(self.wrapped, self.optimizer, optimizer_state)
        self.scheduler.load_state_dict(ckpt.read_scheduler_state(folder))
        ckpt.restore_rng_state(ckpt.read_rng_state(folder))
        state = ckpt.read_trainer_state(folder)
        self.step = int(state["step"])
        self.stream.position = int(state["data_position"])

    def save(self) -> str:
        """A checkpoint of full, parameter-name keyed states (collective: every rank calls it; rank 0 writes).

        Full states do not depend on the number of ranks: a run saved on K ranks resumes on any number.
        """
        distributed = self.env.is_distributed
        model_state = dist_utils.full_model_state_dict(self.wrapped) if distributed else None
        optimizer_state = dist_utils.full_optimizer_state_dict(self.wrapped, self.optimizer)
        path = ckpt.checkpoint_path(self.output_dir, self.step)
        if self.is_main:
            state = {"data_position": self.stream.position, "method": self.config.method, "seed": self.config.seed,
                     "world_size": self.env.world_size}
            path = ckpt.save_checkpoint(self.output_dir, self.step, model=self.model, tokenizer=self.tokenizer,
                                        optimizer=self.optimizer, scheduler=self.scheduler, trainer_state=state,
                                        config=self.config.to_dict(), model_state=model_state,
                                        optimizer_state=optimizer_state)
            ckpt.prune_checkpoints(self.output_dir, self.config.keep_checkpoints)
        dist_utils.barrier()
        return path

    # --- one step ------------------------------------------------------------------------

    def _step_seed(self, step: int) -> int:
        return self.config.seed * 1_000_003 + step

    def _reference_cot(self, example: JudgeExample, rng: random.Random) -> str:
        j = rng.randrange(len(example.feedback))
        grade = example.grades[j] if len(example.grades) == len(example.feedback) else example.target
        return format_cot(example.feedback[j], grade)

    def _batch(self, step: int, examples: List[JudgeExample]):
        """This rank's teacher-forced batch of the step (all of it in one process) and what the loss needs
        besides it.  ``examples`` are the whole step's prompts; each rank takes its contiguous share."""
        cfg = self.config
        extra: Dict[str, Any] = {"generated_tokens": 0}
        if cfg.method == "tract":  # drawn for the whole step, then shared out: the same CoTs on any number of ranks
            rng = random.Random(self._step_seed(step))
            all_cots = [self._reference_cot(e, rng) for e in examples]
            all_cots = dist_utils.shard_for_rank(all_cots, self.env)
        examples = dist_utils.shard_for_rank(examples, self.env)
        if cfg.method in ROLLOUT_METHODS:
            gathered = dist_utils.unsharded_for_generation(self.wrapped) if cfg.unsharded_rollouts else nullcontext()
            with gathered, torch.no_grad():  # (no grad: DDP would otherwise prepare a gradient all-reduce)
                rollouts = self.wrapped(_generate_with, self.engine, [e.prompt for e in examples], cfg.group_size,
                                        seed=dist_utils.rank_seed(self._step_seed(step), self.env),
                                        with_score=cfg.method == "grpo")
            prompts, cots = rollouts.prompts, rollouts.cots
            targets = [e.target for e in examples for _ in range(cfg.group_size)]
            if cfg.method == "grpo":
                extra["rewards"] = binary_rewards(rollouts.decoded_scores, targets).to(self.device)
                extra["sampled_index"] = sampled_score_indices(rollouts.decoded_scores, self.scale.values).to(
                    self.device)
                extra["decoded_rate"] = sum(d is not None for d in rollouts.decoded_scores) / len(targets)
        elif cfg.method == "tract":
            prompts, cots, targets = [e.prompt for e in examples], all_cots, [e.target for e in examples]
        else:  # raft
            prompts, cots, targets = [e.prompt for e in examples], None, [e.target for e in examples]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if cfg.method in ROLLOUT_METHODS else "default")
            batch = build_teacher_forced_batch(
                self.tokenizer, prompts, cots, targets, self.scale.token_ids, self.scale.values,
                max_prompt_tokens=cfg.max_prompt_tokens, max_cot_tokens=cfg.max_cot_tokens, device=self.device)
        if cfg.method in ROLLOUT_METHODS:
            extra["generated_tokens"] = int(batch.cot_lengths.sum())
        return batch, extra

    def _judge_forward(self, model, mb: TeacherForcedBatch, entropy: bool = True, adapter: bool = True):
        if not adapter:  # the LoRA model's reference policy: its base model
            with model.disable_adapter():
                return self._judge_forward(model, mb, entropy)
        return judge_forward(model, mb, self.scale.token_ids, self.scale.values, normalize=self.config.normalize_scores,
                             return_entropy=entropy, backend=self.config.head_backend)

    def _forward(self, mb: TeacherForcedBatch, entropy: bool = True):
        """Decoder + fused head on the policy, inside the wrapper (see real.distributed)."""
        return self.wrapped(self._judge_forward, mb, entropy)

    def _ref_logprobs(self, mb: TeacherForcedBatch, sampled_index) -> torch.Tensor:
        with torch.no_grad():
            if self.ref_wrapped is not None:
                fwd = self.ref_wrapped(self._judge_forward, mb, False)
            else:
                fwd = self.wrapped(self._judge_forward, mb, False, False)
        if sampled_index is not None:
            return grpo_token_logprobs(fwd, sampled_index)[0]
        return fwd.cot_logprobs

    def _loss(self, fwd, mb_extra: Dict[str, Any]):
        cfg = self.config
        if cfg.method == "real":
            rows = fwd.targets.shape[0]
            # A micro-batch holding part of a group carries precomputed advantages; real_loss then only
            # uses group_size to report the group std, which train_step recomputes over the whole batch.
            group = cfg.group_size if rows % cfg.group_size == 0 else rows
            return real_loss(fwd, group, beta=cfg.beta, lam=cfg.lam, mu=cfg.mu, agg=cfg.loss_agg,
                             normalize_advantages=cfg.normalize_adv, advantage_clip=cfg.advantage_clip,
                             advantages=mb_extra["advantages"], old_logprobs=mb_extra.get("old_logprobs"),
                             ppo_clip=cfg.clip_ratio, ref_logprobs=mb_extra.get("ref_logprobs"),
                             kl_coef=cfg.kl_coef)
        if cfg.method == "grpo":
            return grpo_loss(fwd, mb_extra["rewards"], cfg.group_size, sampled_score_index=mb_extra["sampled_index"],
                             agg=cfg.loss_agg, old_logprobs=mb_extra.get("old_logprobs"), ppo_clip=cfg.clip_ratio,
                             ref_logprobs=mb_extra.get("ref_logprobs"), kl_coef=cfg.kl_coef)
        if cfg.method == "tract":
            return tract_loss(fwd, lam=cfg.beta, tokens_per_row=mb_extra.get("tokens_per_row"))
        return raft_loss(fwd)

    def _dummy_forward(self, batch: TeacherForcedBatch, grad: bool) -> None:
        """A forward (and backward) that changes nothing, on a rank with fewer micro-batches than another:
        under FSDP every forward and backward is a collective, so all ranks must run as many.  The zero
        loss still reaches every parameter, so the gradient reduce-scatter runs too."""
        mb = slice_batch(batch, 0, 1)
        if not grad:
            with torch.no_grad():
                self._forward(mb, entropy=False)
            return
        fwd = self._forward(mb, entropy=False)
        (0.0 * (fwd.expected_score.sum() + fwd.cot_logprobs.sum())).backward()

    def train_step(self, step: int) -> Dict[str, Any]:
        cfg = self.config
        t_start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        examples = [self.train_examples[i] for i in self.stream.take(cfg.prompts_per_step)]
        batch, extra = self._batch(step, examples)  # this rank's share
        t_rollout = time.perf_counter() - t_start

        rl = cfg.method in ROLLOUT_METHODS
        group = cfg.group_size if rl else 1
        lengths = batch.attention_mask.sum(1).tolist()
        plan = micro_batch_ranges(lengths, group, cfg.micro_batch_tokens, split_groups=cfg.method == "real")
        n_slots = dist_utils.max_over_ranks(len(plan), self.env)  # every rank runs as many micro-batches
        n_rows = len(batch)
        split = any((e - s) % group for s, e in plan)
        # Every rank must agree whether the pre-pass (more forwards) runs.
        prepass = rl and (cfg.epochs_per_batch > 1 or cfg.kl_coef > 0
                          or dist_utils.max_over_ranks(int(split), self.env) > 0)

        # Per-micro-batch inputs that must come from the pre-update policy (no grad).
        mb_extras: List[Dict[str, Any]] = [{} for _ in plan]
        if cfg.method == "tract" and (len(plan) > 1 or self.env.is_distributed):
            # TRACT's CE is a mean over all CoT tokens of the step: normalise every micro-batch (and rank) by it
            per_row = (dist_utils.sum_over_ranks(float(batch.cot_mask.sum()), self.env)
                       / dist_utils.sum_over_ranks(float(n_rows), self.env))
            for extra_k in mb_extras:
                extra_k["tokens_per_row"] = per_row
        all_rewards = torch.zeros(n_rows, device=self.device)
        self.model.train()
        for k in range(n_slots if prepass else len(plan)):
            if k >= len(plan):
                self._dummy_forward(batch, grad=False)
                if cfg.kl_coef > 0:  # the reference policy's forward: the same collectives as a real slot
                    self._ref_logprobs(slice_batch(batch, 0, 1), None)
                continue
            s, e = plan[k]
            if cfg.method == "grpo":
                mb_extras[k]["rewards"] = extra["rewards"][s:e]
                mb_extras[k]["sampled_index"] = extra["sampled_index"][s:e]
            if not prepass:
                continue
            mb = slice_batch(batch, s, e)
            sampled = mb_extras[k].get("sampled_index")
            with torch.no_grad():
                fwd = self._forward(mb, entropy=False)
                if cfg.method == "real":
                    all_rewards[s:e] = regression_reward(fwd.expected_score, fwd.targets, fwd.log_pi_star,
                                                         lam=cfg.lam, mu=cfg.mu)
                if cfg.epochs_per_batch > 1:
                    mb_extras[k]["old_logprobs"] = (grpo_token_logprobs(fwd, sampled)[0] if sampled is not None
                                                    else fwd.cot_logprobs).detach()
            if cfg.kl_coef > 0:
                mb_extras[k]["ref_logprobs"] = self._ref_logprobs(mb, sampled)
        if prepass and cfg.method == "real":
            adv = rloo_advantages(all_rewards.view(-1, group), normalize=cfg.normalize_adv,
                                  clip=cfg.advantage_clip).reshape(-1)
            for k, (s, e) in enumerate(plan):
                mb_extras[k]["advantages"] = adv[s:e]

        record: Dict[str, Any] = {}
        grad_norms, last_loss = [], None
        advantages_seen = torch.zeros(n_rows, device=self.device)
        rewards_seen = torch.zeros(n_rows, device=self.device)
        for epoch in range(cfg.epochs_per_batch):
            sums: Dict[str, float] = {}
            for k in range(n_slots):
                # Gradient accumulation: ranks exchange gradients only after the last micro-batch.
                with dist_utils.gradient_sync(self.wrapped, enabled=k == n_slots - 1):
                    if k >= len(plan):
                        self._dummy_forward(batch, grad=True)
                        continue
                    s, e = plan[k]
                    mb = slice_batch(batch, s, e)
                    fwd = self._forward(mb)
                    if cfg.method == "real" and "advantages" not in mb_extras[k]:
                        mb_extras[k]["advantages"] = real_advantages(fwd, group, lam=cfg.lam, mu=cfg.mu,
                                                                     normalize=cfg.normalize_adv,
                                                                     clip=cfg.advantage_clip)
                    loss, terms = self._loss(fwd, mb_extras[k])
                    if "entropy" not in terms and fwd.cot_entropy is not None:  # the SFT losses do not report it
                        mask = fwd.cot_mask
                        terms["entropy"] = float((fwd.cot_entropy.detach() * mask).sum() / mask.sum().clamp(min=1))
                    (loss * ((e - s) / n_rows)).backward()
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + value * (e - s) / n_rows
                if epoch == 0:
                    with torch.no_grad():
                        if cfg.method == "real":
                            advantages_seen[s:e] = mb_extras[k]["advantages"]
                            rewards_seen[s:e] = regression_reward(fwd.expected_score, fwd.targets,
                                                                  fwd.log_pi_star, lam=cfg.lam, mu=cfg.mu)
                        elif cfg.method == "grpo":
                            rewards_seen[s:e] = mb_extras[k]["rewards"]
            grad_norms.append(dist_utils.clip_grad_norm(self.wrapped, cfg.grad_clip))  # <= 0: measured, not clipped
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if epoch == 0:
                record = dict(sums)
            last_loss = sums.get("loss")

        elapsed = time.perf_counter() - t_start
        train_tokens = int(batch.attention_mask.sum()) * (cfg.epochs_per_batch + int(prepass))
        peak, peak_kind = peak_memory_mb(self.device)
        out: Dict[str, Any] = {"type": "train", "step": step, "method": cfg.method}
        out.update(record)
        if cfg.epochs_per_batch > 1:
            out["loss_last_epoch"] = last_loss
        if rl:
            if cfg.method == "grpo":
                rewards_seen = extra["rewards"].float()
                advantages_seen = group_normalized_advantages(rewards_seen.view(-1, group)).reshape(-1)
                out["decoded_rate"] = extra["decoded_rate"]
            out.update({
                "reward_group_std": float(rewards_seen.view(-1, group).std(dim=1, unbiased=False).mean()),
                "reward_mean": float(rewards_seen.mean()),
                "reward_std": float(rewards_seen.std(unbiased=False)),
                "advantage_mean": float(advantages_seen.mean()),
                "advantage_std": float(advantages_seen.std(unbiased=False)),
                "advantage_abs": float(advantages_seen.abs().mean()),
                "advantage_min": float(advantages_seen.min()),
                "advantage_max": float(advantages_seen.max()),
            })
        out.update({
            "mse": record.get("sq_error"),
            "entropy": record.get("entropy"),
            "grad_norm": grad_norms[0] if len(grad_norms) == 1 else float(np.mean(grad_norms)),
            "lr": self.scheduler.get_last_lr()[0],
            "micro_batches": len(plan),
            "sequences": n_rows,
            "train_tokens": train_tokens,
            "generated_tokens": extra["generated_tokens"],
            "rollout_s": t_rollout,
            "step_s": elapsed,
            "tokens_per_s": (train_tokens + extra["generated_tokens"]) / max(elapsed, 1e-9),
            "peak_mem_mb": peak,
            "peak_mem_kind": peak_kind,
            "data_position": self.stream.position,
        })
        if self.env.is_distributed:
            # Means over ranks (each rank's terms are means over its equal share of rows), sums for counts
            # and throughput, maxima for memory and times.
            out = dist_utils.all_reduce_metrics(out, self.env)
            out.update(step=step, data_position=self.stream.position, micro_batches=n_slots,
                       ranks=self.env.world_size)
        return out

    # --- evaluation ----------------------------------------------------------------------

    def evaluate(self, step: int) -> Optional[Dict[str, Any]]:
        """RAIL (greedy CoT, expected score; no CoT for raft) on the held-out prompts: correlations with the targets."""
        cfg = self.config
        if not self.eval_examples:
            return None
        examples = self.eval_examples[: cfg.eval_size] if cfg.eval_size else self.eval_examples
        t0 = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        mine = dist_utils.shard_for_rank([e.prompt for e in examples], self.env, pad=True)  # each rank a share
        try:
            with torch.no_grad():
                predictions = self.wrapped(
                    rail_predictions, self.tokenizer, mine, self.scale,
                    max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens, batch_size=cfg.eval_batch_size,
                    normalize=cfg.normalize_scores, backend=cfg.head_backend,
                    max_prompt_tokens=cfg.max_prompt_tokens, max_cot_tokens=cfg.max_cot_tokens,
                    with_cot=cfg.method != "raft")
        finally:
            self.model.train(was_training)
        predictions = dist_utils.all_gather_list(predictions, self.env, total=len(examples))
        targets = [e.target for e in examples]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            corr = correlations(predictions, targets)
        record = {"type": "eval", "step": step, "method": cfg.method, **corr,
                  "mse": float(np.mean([(p - t) ** 2 for p, t in zip(predictions, targets)])),
                  "prediction_mean": float(np.mean(predictions)), "prediction_std": float(np.std(predictions)),
                  "eval_s": time.perf_counter() - t0}
        if caught:
            record["note"] = "; ".join(str(w.message) for w in caught)
        return record

    # --- the loop ------------------------------------------------------------------------

    def _on_sigint(self, signum, frame):
        if self._stop_requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self._stop_requested = True
        self.log("Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again aborts without saving)")

    def run(self) -> TrainResult:
        cfg = self.config
        self.run_dir.prepare(resume=cfg.resume, overwrite=cfg.overwrite, resumed_from=self.resume_from,
                             step=self.step)
        self.run_dir.write_config(dict(cfg.to_dict(), attn_implementation_used=self.attn_implementation,
                                       world_size=self.env.world_size,
                                       parallel=dist_utils.parallel_mode(self.wrapped)))
        records: List[Dict[str, Any]] = []
        last_saved: Optional[str] = None
        final_eval = None
        handler_installed = False
        try:  # (under torchrun, Ctrl-C reaches every rank: each finishes the step, and the save is collective)
            previous = signal.signal(signal.SIGINT, self._on_sigint)
            handler_installed = True
        except ValueError:  # not the main thread: Ctrl-C cannot reach us anyway
            previous = None
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.method} steps", unit="step",
                   disable=not (cfg.progress and self.is_main), file=sys.stderr)
        interrupted = False
        try:
            while self.step < cfg.steps:
                step = self.step + 1
                record = self.train_step(step)
                self.step = step
                if step == 1 or (cfg.steps and step == cfg.steps):
                    record["attn_implementation"] = self.attn_implementation
                self.run_dir.write(record)
                records.append(record)
                bar.update(1)
                bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "reward_mean", "mse")
                                 if isinstance(record.get(k), float)})
                if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                    final_eval = self.evaluate(step)
                    if final_eval is not None:
                        self.run_dir.write(final_eval)
                        records.append(final_eval)
                        self.log(f"step {step} eval: pearson {final_eval['pearson']:.3f}  spearman "
                                 f"{final_eval['spearman']:.3f}  kendall {final_eval['kendall']:.3f}  "
                                 f"mse {final_eval['mse']:.3f}  (n={final_eval['n']})")
                if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                    last_saved = self.save()
                if self.run_dir.should_stop(self._stop_requested):  # all ranks stop together
                    interrupted = True
                    if last_saved is None or not last_saved.endswith(f"{ckpt.PREFIX}{step}"):
                        last_saved = self.save()
                    self.run_dir.clear_stop()
                    self.log(f"stopped after step {step}; checkpoint {last_saved}; continue with --resume")
                    break
        finally:
            bar.close()
            if handler_installed:
                signal.signal(signal.SIGINT, previous)
            if self.engine is not None:
                self.engine.close()
        dist_utils.barrier()  # no rank leaves (and tears the process group down) while another still needs it
        return TrainResult(self.output_dir, self.step, interrupted, last_saved, final_eval, records)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog="real train", description=(
        "Train an LLM judge with REAL (regression-aware RL) or a baseline (GRPO, RAFT, TRACT). Settings come from "
        "--config FILE (YAML or TOML, keys = the flag names with underscores) and/or flags; flags win. "
        "Ctrl-C, or creating OUTPUT_DIR/STOP (under torchrun), stops after the current step with a checkpoint; "
        "--resume continues. "
        "Example: real train --method real --model tiny --data synthetic --steps 3 --output-dir runs/smoke"))
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        if config.data == ["synthetic"]:  # the synthetic task's CoTs are ~15 tokens: do not sample 256
            config = config_from_args(args, base=SYNTHETIC_DEFAULTS)
        if not config.progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # save_pretrained's shard bars
        if config.threads == 0 and config.model == "tiny" and resolve_device(config.device).type == "cpu":
            torch.set_num_threads(1)  # see --threads: tiny ops do not split well, and one thread never stalls
        result = Trainer(config).run()
    except (ValueError, FileNotFoundError) as exc:
        print(f"real train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("real train: aborted (no checkpoint written for the unfinished step)", file=sys.stderr)
        return 130
    finally:
        dist_utils.cleanup_distributed()
    if result.interrupted:
        return 130
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 speaks for the run
        return 0
    print(f"done: {result.last_step} steps; metrics in {os.path.join(result.output_dir, METRICS_FILE)}; "
          f"checkpoint {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
