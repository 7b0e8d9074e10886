"""`real train`: the method-agnostic training loop for REAL and its baselines (GRPO, RAFT, TRACT).

One step, readable top to bottom in ``Trainer.train_step``; what differs between methods is a
``real.methods`` class, asked at fixed points (docs/design.md section 7):

1. take the next ``B`` prompts (``real.judge.data.PromptStream``, position saved in checkpoints);
2. ``method.collect``: this rank's teacher-forced batch (``real.judge.batching``): G sampled CoTs per
   prompt (REAL, GRPO; ``real.loop.rollout``), a reference CoT (TRACT) or none (RAFT);
3. cut it into micro-batches under a token budget; ``method.prepare`` gives each its loss inputs
   (a pre-pass for old / reference log-probs and group advantages where the method needs one);
4. per micro-batch ``real.model.head.micro_batch_loss``: decoder to hidden states, the fused judge head
   (no ``[tokens x vocab]`` logits), ``method.loss``; backward scaled by the micro-batch's share;
5. clip the gradient norm, AdamW step, schedule step; 4-5 again for ``--epochs-per-batch`` > 1;
6. one JSON line in ``OUTPUT_DIR/metrics.jsonl`` (``real.loop.run_dir``); every ``--eval-every`` steps
   RAIL on held-out prompts and its Pearson/Spearman/Kendall.

Checkpoints (``real.loop.checkpoint``) are atomic and resume exactly (``real.loop.resume``: past damaged ones, never
into another run).  Ctrl-C, SIGTERM, or the file ``OUTPUT_DIR/STOP`` (torchrun does not pass Ctrl-C on),
stops after the current step with a checkpoint; the final one is written before the final evaluation.
A non-finite loss or gradient norm skips the update (``real.loop.nonfinite``).  Under ``torchrun`` every
rank runs this loop on its share of the prompts (whole groups); every model call runs as
``self.wrapped(fn, ...)`` so FSDP gathers the LM-head weight the fused head reads; ranks run equally
many micro-batches; rank 0 alone logs and writes checkpoints.
"""
from __future__ import annotations

import resource
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from real.loop import checkpoint as ckpt
from real.model.checkpoint_files import is_peft_model, load_model_weights
from real.multi_gpu import distributed as dist_utils
from real.multi_gpu import parallel
from real.judge.batching import TeacherForcedBatch, mini_batch_plan, slice_batch
from real.loop.config import TrainConfig
from real.judge.data import JudgeExample, PromptStream, run_examples
from real.model.head import judge_forward, micro_batch_loss
from real.judge.inference import rail_predictions
from real.loop.rollout import rollout_engine_for
from real.methods import method_class
from real.judge.metrics import prediction_report
from real.loop.nonfinite import NonFiniteStep, SkippedSteps, TrainingFailed, finite_on_all_ranks, skipped_record
from real.model.loading import (compute_dtype_for, frozen_copy, init_weights_from, load_model_and_tokenizer,
                         prepare_for_training, resolve_device)
from real.judge.prompts import ScoreScale, score_phrase
from real.loop.resume import apply_optimizer_settings, check_resumed_config
from real.loop.run_dir import RunDir, StopOnSignal

def peak_memory_mb(device: torch.device) -> Tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"


def _generate_with(model, engine, *args, **kwargs):
    """``engine.generate`` on ``model``: called as ``wrapped(_generate_with, engine, ...)`` so that under
    FSDP the sampling runs inside the root module's forward, with its parameters gathered."""
    return engine.generate(model, *args, **kwargs)


FILL_ROUND_SEED_STRIDE = 1_000_000_007  # the sampling seed of a step's later rollout rounds (partial filter)


def _read_terms(sums: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """The step's terms as floats: one read from the device for all of them."""
    if not sums:
        return {}
    values = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in sums.values()]).tolist()
    return dict(zip(sums, values))


def _dummy_loss(fwd, seqs):
    return 0.0 * (fwd.expected_score.sum() + fwd.cot_logprobs.sum()), {}


@dataclass
class TrainResult:
    output_dir: str
    last_step: int
    interrupted: bool
    checkpoint: Optional[str]
    final_eval: Optional[Dict[str, Any]]
    records: List[Dict[str, Any]] = field(default_factory=list)
    stop_signal: Optional[int] = None  # the signal that stopped the run (SIGINT, SIGTERM), if one did


# --- the trainer ----------------------------------------------------------------------

class Trainer:
    """Holds the model, data, optimiser and rollout engine of one run; ``run()`` trains it."""

    def __init__(self, config: TrainConfig, *, model=None, tokenizer=None,
                 train_examples: Optional[List[JudgeExample]] = None,
                 eval_examples: Optional[List[JudgeExample]] = None, log=None):
        self.config = config
        device = resolve_device(config.device)
        # torchrun: join the process group; one process: a one-rank environment, nothing to join.
        self.env = dist_utils.setup_distributed(device=None if config.device == "auto" else str(device),
                                                timeout_s=config.collective_timeout)
        self.device = self.env.device
        self.is_main = self.env.is_main
        self.log = (log or (lambda msg: tqdm.write(msg, file=sys.stderr))) if self.is_main else (lambda msg: None)
        if self.env.is_distributed:
            self._check_distributed()
        if config.threads:
            torch.set_num_threads(config.threads)
        ckpt.seed_everything(config.seed)
        self.output_dir = config.output_dir
        self.run_dir = RunDir(config.output_dir, self.env, self.log)
        self.resume_from = self.run_dir.resume_checkpoint(config.resume)  # the newest intact checkpoint
        if self.resume_from:  # the same run, or --allow-config-change
            check_resumed_config(self.resume_from, config, allow=config.allow_config_change, log=self.log)

        if tokenizer is None and model is not None:
            raise ValueError("pass the tokenizer together with the model")
        self.model, self.tokenizer = (model, tokenizer) if model is not None else load_model_and_tokenizer(
            config.model, device=self.device, dtype=None if config.dtype == "auto" else config.dtype,
            attn_implementation=None if config.attn_implementation == "auto" else config.attn_implementation,
            seed=config.seed, tiny_config=config.tiny_config)
        self.scale = ScoreScale.from_tokenizer(self.tokenizer, marker=score_phrase(config.score_phrase))
        self.method = method_class(config.method)(config, self.scale)
        self.train_examples, self.eval_examples = run_examples(
            config, self.tokenizer, self.method.check_data, self.log, train=train_examples, held_out=eval_examples)

        adapter_from = (init_weights_from(self.model, config.init_from, lora_rank=config.lora_rank, log=self.log)
                        if config.init_from else None)
        self.model, self.attn_implementation = prepare_for_training(self.model, config, self.device,
                                                                    adapter_from=adapter_from, log=self.log)
        # The KL term's reference policy: a frozen copy (a LoRA model disables its adapter instead).
        keep_ref = self.method.needs_reference_model and not is_peft_model(self.model)
        self.ref_model = frozen_copy(self.model) if keep_ref else None
        if self.resume_from:  # the weights go in before sharding; optimizer etc. after it
            load_model_weights(self.model, self.resume_from)
        # Everything the loop does with the model runs as self.wrapped(fn, ...) (real.multi_gpu.parallel): under
        # FSDP that gathers the LM-head weight the fused head reads and reduce-scatters its gradient.
        self.compute_dtype = compute_dtype_for(config.compute_dtype, self.model, self.device, log=self.log)
        self.wrapped = parallel.wrap_model(self.model, config.parallel, self.env, compute_dtype=self.compute_dtype)
        # FSDP warns that the root returns views (the head's outputs); the loop never writes into them in place.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        self.ref_wrapped = None
        if self.ref_model is not None:
            self.ref_wrapped = parallel.wrap_model(self.ref_model, "fsdp" if config.parallel == "fsdp" else "none",
                                                     self.env, compute_dtype=self.compute_dtype)
        self.trainable = [p for p in self.wrapped.parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.lr, weight_decay=config.weight_decay,
                                           betas=tuple(config.adam_betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.engine = rollout_engine_for(config, self.model, self.tokenizer, self.scale,
                                         with_score=getattr(self.method, "with_score", False)
                                         ) if self.method.needs_rollouts else None
        self.step = 0
        self.stream = PromptStream(len(self.train_examples), config.seed)
        if self.resume_from:  # optimizer, schedule, RNG, step and data position
            state = ckpt.load_training_state(self.resume_from, env=self.env, wrapped=self.wrapped,
                                             optimizer=self.optimizer, scheduler=self.scheduler)
            self.step, self.stream.position = int(state["step"]), int(state["data_position"])
            apply_optimizer_settings(self.optimizer, self.scheduler, config)  # what is used is what is recorded

    # --- setup ---------------------------------------------------------------------------

    def _check_distributed(self) -> None:
        self.config.check_for_ranks(self.env.world_size)

    def _lr_lambda(self, update: int) -> float:
        return self.config.lr_factor(update)

    def close(self) -> None:
        """Drop everything that holds the process group (wrapped models, their meshes, optimizer, schedule,
        engine), so that ``real.multi_gpu.distributed.cleanup_distributed`` can take it down."""
        if getattr(self, "engine", None) is not None:
            self.engine.close()
        for name in ("wrapped", "ref_wrapped", "optimizer", "scheduler", "trainable", "engine", "model",
                     "ref_model", "method"):
            setattr(self, name, None)

    # --- checkpoints ---------------------------------------------------------------------

    def save(self) -> str:
        """A checkpoint of this step (collective: every rank calls it; rank 0 writes)."""
        if not parallel.parameters_finite(self.wrapped, self.env):
            raise TrainingFailed(f"step {self.step}: the weights are not finite; no checkpoint written over the good "
                                 f"ones (newest: {ckpt.latest_checkpoint(self.output_dir)}); lower --lr "
                                 f"(now {self.config.lr:g})")
        state = {"data_position": self.stream.position, "method": self.config.method, "seed": self.config.seed,
                 "world_size": self.env.world_size}
        return ckpt.save_training_checkpoint(
            self.output_dir, self.step, env=self.env, wrapped=self.wrapped, model=self.model, tokenizer=self.tokenizer,
            optimizer=self.optimizer, scheduler=self.scheduler, trainer_state=state, config=self.config.to_dict(),
            keep=self.config.keep_checkpoints)

    # --- what the methods call (real.methods.base) ---------------------------------------

    def step_seed(self, step: int) -> int:
        return self.config.seed * 1_000_003 + step

    def next_examples(self) -> List[JudgeExample]:
        """The next ``--prompts-per-step`` training examples of the data stream (its position is checkpointed)."""
        return [self.train_examples[i] for i in self.stream.take(self.config.prompts_per_step)]

    def sample_rollouts(self, prompts: List[str], step: int, *, with_score: bool, fill_round: int = 0):
        """``--group-size`` sampled CoTs per prompt, seeded by (seed, step, rank, fill round), through the
        wrapper (a collective under FSDP: every rank calls it as often)."""
        cfg = self.config
        seed = dist_utils.rank_seed(self.step_seed(step), self.env) + FILL_ROUND_SEED_STRIDE * fill_round
        gathered = parallel.unsharded_for_generation(self.wrapped) if cfg.unsharded_rollouts else nullcontext()
        with gathered, torch.no_grad():  # (no grad: DDP would otherwise prepare a gradient all-reduce)
            return self.wrapped(_generate_with, self.engine, prompts, cfg.group_size, seed=seed,
                                with_score=with_score)

    def _judge_forward(self, model, mb: TeacherForcedBatch, entropy: bool = True, adapter: bool = True):
        if not adapter:  # the LoRA model's reference policy: its base model
            with model.disable_adapter():
                return self._judge_forward(model, mb, entropy)
        return judge_forward(model, mb, self.scale.token_ids, self.scale.values,
                             normalize=self.config.normalize_scores, temperature=self.method.head_temperature,
                             return_entropy=entropy, backend=self.config.head_backend)

    def forward(self, mb: TeacherForcedBatch, entropy: bool = True):
        """Decoder + fused head on the policy, inside the wrapper (see real.multi_gpu.parallel)."""
        return self.wrapped(self._judge_forward, mb, entropy)

    def reference_forward(self, mb: TeacherForcedBatch):
        """The same on the KL term's reference policy (no grad)."""
        with torch.no_grad():
            if self.ref_wrapped is not None:
                return self.ref_wrapped(self._judge_forward, mb, False)
            return self.wrapped(self._judge_forward, mb, False, False)

    def _loss(self, mb: TeacherForcedBatch, loss_fn, entropy: bool = True, sequence_group: int = 1):
        """``(loss, terms, fwd)``: ``loss_fn`` (``method.loss``) on the head pass of one micro-batch, chunk by
        chunk of whole sequences, inside the wrapper."""
        cfg = self.config
        return self.wrapped(micro_batch_loss, mb, self.scale.token_ids, self.scale.values, loss_fn,
                            sequence_group=sequence_group, normalize=cfg.normalize_scores,
                            temperature=self.method.head_temperature, return_entropy=entropy,
                            backend=cfg.head_backend)

    def dummy_forward(self, batch: TeacherForcedBatch, grad: bool) -> None:
        """A forward (and backward) that changes nothing, on a rank with fewer micro-batches than another:
        under FSDP every forward and backward is a collective, so all ranks must run as many.  The zero
        loss still reaches every parameter, so the gradient reduce-scatter runs too."""
        mb = slice_batch(batch, 0, 1)
        if not grad:
            with torch.no_grad():
                self.forward(mb, entropy=False)
            return
        self._loss(mb, _dummy_loss, entropy=False)[0].backward()

    # --- one step ------------------------------------------------------------------------

    def train_step(self, step: int) -> Dict[str, Any]:
        cfg, method = self.config, self.method
        t_start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        step_batch = method.collect(self, step, self.next_examples())  # this rank's share
        batch, n_rows = step_batch.batch, len(step_batch.batch)
        t_rollout = time.perf_counter() - t_start

        # one optimizer update per mini-batch (--mini-batch-size, over all ranks) of micro-batches
        plan = mini_batch_plan(batch.attention_mask.sum(1).tolist(), method.group_size, cfg.micro_batch_tokens,
                               split_groups=method.split_groups,
                               rows_per_update=cfg.mini_batch_size // self.env.world_size)
        n_updates = dist_utils.max_over_ranks(len(plan), self.env)  # every rank takes as many updates
        plan += [[] for _ in range(n_updates - len(plan))]
        slots = [dist_utils.max_over_ranks(len(ranges), self.env) for ranges in plan]  # and micro-batches in each
        self.model.train()
        mini_batches = method.prepare(self, step_batch, plan, slots)  # loss inputs (pre-pass, no grad)

        record: Dict[str, Any] = {}
        grad_norms, last_loss, skipped, forwards = [], None, None, []
        for epoch in range(cfg.epochs_per_batch):
            for micro_batches, n_slots in zip(mini_batches, slots):
                sums, fwds = self._accumulate(step_batch, micro_batches, n_slots)
                grad_norms.append(parallel.clip_grad_norm(self.wrapped, cfg.grad_clip))  # <= 0: measured only
                if finite_on_all_ranks(sums.get("loss", 0.0), grad_norms[-1], self.env):
                    self.optimizer.step()
                else:  # no update from a NaN / inf: the step is logged as skipped (see run())
                    skipped = f"non-finite loss ({sums.get('loss')}) or gradient norm ({grad_norms[-1]})"
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if epoch == 0:  # the first epoch's terms: the mean over the step's rows
                    rows = sum(mb.end - mb.start for mb in micro_batches)
                    for name, value in sums.items():
                        record[name] = record.get(name, 0.0) + value * (rows / n_rows)
                    forwards += fwds
                last_loss = sums.get("loss")

        flat = [mb for micro_batches in mini_batches for mb in micro_batches]
        return self._step_record(step, step_batch, record, last_loss, grad_norms, len(flat), sum(slots), skipped,
                                 t_start, t_rollout, self.method.step_metrics(step_batch, flat, forwards))

    def _accumulate(self, step_batch, micro_batches, n_slots: int):
        """Forward and backward of one update's micro-batches (``n_slots`` on every rank, dummies where this
        rank has fewer), gradients accumulated: ``(terms, forwards)``, the terms as the mean over the
        mini-batch's rows, read from the device once."""
        method, batch = self.method, step_batch.batch
        rows = sum(mb.end - mb.start for mb in micro_batches)
        weight = 1.0 if step_batch.trainable else 0.0  # 0: nothing to learn from on this rank
        sums: Dict[str, torch.Tensor] = {}  # the terms, summed on the device
        forwards = []
        for k in range(n_slots):
            # Gradient accumulation: ranks exchange gradients only after the last micro-batch.
            with parallel.gradient_sync(self.wrapped, enabled=k == n_slots - 1):
                if k >= len(micro_batches):
                    self.dummy_forward(batch, grad=True)
                    continue
                mb = micro_batches[k]
                share = (mb.end - mb.start) / rows
                loss, terms, fwd = self._loss(slice_batch(batch, mb.start, mb.end),
                                              lambda fwd, seqs, mb=mb: method.loss(fwd, mb.inputs(seqs), mb.norms),
                                              sequence_group=method.sequence_group(mb))
                (loss * (share * weight)).backward()
            forwards.append(fwd)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.double() * share
        return _read_terms(sums), forwards

    def _step_record(self, step, step_batch, record, last_loss, grad_norms, n_ranges, n_slots, skipped,
                     t_start, t_rollout, method_metrics) -> Dict[str, Any]:
        """The step's metrics.jsonl line (the method's terms and metrics, throughput, memory; reduced over
        ranks: means for terms, sums for counts and throughput, maxima for memory and times)."""
        cfg, batch = self.config, step_batch.batch
        elapsed = time.perf_counter() - t_start
        train_tokens = int(batch.attention_mask.sum()) * (cfg.epochs_per_batch + int(step_batch.prepass))
        updates = len(grad_norms)
        peak, peak_kind = peak_memory_mb(self.device)
        out: Dict[str, Any] = {"type": "train", "step": step, "method": cfg.method, **record}
        if updates > 1:
            out["loss_last_epoch"] = last_loss  # the last update's (mini-batch's) loss
        out.update(method_metrics)
        out.update(mse=record.get("sq_error"), entropy=record.get("entropy"),
                   grad_norm=grad_norms[0] if len(grad_norms) == 1 else float(np.mean(grad_norms)),
                   lr=self.scheduler.get_last_lr()[0], updates=updates, micro_batches=n_ranges,
                   sequences=len(batch),
                   train_tokens=train_tokens, generated_tokens=step_batch.generated_tokens, rollout_s=t_rollout,
                   step_s=elapsed, tokens_per_s=(train_tokens + step_batch.generated_tokens) / max(elapsed, 1e-9),
                   peak_mem_mb=peak, peak_mem_kind=peak_kind, data_position=self.stream.position)
        if skipped:
            out.update(update_skipped=True, skip_reason=skipped)
        if self.env.is_distributed:
            out = dist_utils.all_reduce_metrics(out, self.env)
            out.update(step=step, data_position=self.stream.position, micro_batches=n_slots,
                       ranks=self.env.world_size)
        return out

    def _train_step_or_skip(self, step: int) -> Dict[str, Any]:
        try:
            return self.train_step(step)
        except NonFiniteStep as exc:  # nothing to train on: the step is skipped like a NaN loss
            for _ in range(self.config.updates_per_step):
                self.scheduler.step()
            return skipped_record(step, self.config.method, str(exc), self.stream.position)

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
                    with_cot=self.method.eval_with_cot)
        finally:
            self.model.train(was_training)
        predictions = dist_utils.all_gather_list(predictions, self.env, total=len(examples))
        report = prediction_report(predictions, [e.target for e in examples])
        note = report.pop("note", None)
        record = {"type": "eval", "step": step, "method": cfg.method, **report, "eval_s": time.perf_counter() - t0}
        if note:
            record["note"] = note
        return record

    # --- the loop ------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg = self.config
        self.run_dir.prepare(resume=cfg.resume, overwrite=cfg.overwrite, resumed_from=self.resume_from,
                             step=self.step)
        self.run_dir.write_config(dict(cfg.to_dict(), attn_implementation_used=self.attn_implementation,
                                       world_size=self.env.world_size,
                                       parallel=parallel.parallel_mode(self.wrapped)))
        records: List[Dict[str, Any]] = []
        last_saved: Optional[str] = None
        final_eval = None
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.method} steps", unit="step",
                   disable=not (cfg.progress and self.is_main), file=sys.stderr)
        interrupted = False
        skipped = SkippedSteps(self.log, lambda: ckpt.latest_checkpoint(self.output_dir), cfg.lr)
        with StopOnSignal(self.log) as stop:  # Ctrl-C or SIGTERM: stop after this step
            try:
                if self.resume_from and self.step >= cfg.steps and not self.run_dir.logged_eval(self.step):
                    final_eval = self._evaluate_and_log(self.step, records)  # it died before (e.g. out of memory)
                while self.step < cfg.steps:
                    step = self.step + 1
                    dist_utils.note_progress(f"step {step}", self.env)
                    record = self._train_step_or_skip(step)
                    self.step = step
                    if step == 1 or (cfg.steps and step == cfg.steps):
                        record["attn_implementation"] = self.attn_implementation
                    self.run_dir.write(record)
                    records.append(record)
                    bar.update(1)
                    bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "reward_mean", "mse")
                                     if isinstance(record.get(k), float)})
                    skipped.observe(record, last_step=step == cfg.steps)  # stops the run after a few in a row
                    good = not skipped.streak  # no checkpoint, no evaluation of a step whose update was skipped
                    if good and ((cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps):
                        last_saved = self.save()  # before the evaluation: one that dies loses no training
                    if good and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                        final_eval = self._evaluate_and_log(step, records)
                    if self.run_dir.should_stop(stop.requested):  # all ranks stop together
                        interrupted = True
                        if good and (last_saved is None or not last_saved.endswith(f"{ckpt.PREFIX}{step}")):
                            last_saved = self.save()
                        self.run_dir.clear_stop()
                        self.log(f"stopped after step {step}; checkpoint {last_saved}; continue with --resume")
                        break
            except RuntimeError as exc:  # a collective that timed out: say which rank was late
                if self.env.is_distributed and dist_utils.is_collective_failure(exc):
                    raise dist_utils.CollectiveTimeout(dist_utils.late_rank_report(exc, self.env)) from exc
                raise
            finally:
                bar.close()
                if self.engine is not None:
                    self.engine.close()
        dist_utils.barrier()  # no rank leaves (and tears the process group down) while another still needs it
        return TrainResult(self.output_dir, self.step, interrupted, last_saved, final_eval, records,
                           stop.signum if interrupted else None)

    def _evaluate_and_log(self, step: int, records: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        dist_utils.note_progress(f"step {step}: evaluation", self.env)
        record = self.evaluate(step)
        if record is not None:
            self.run_dir.write(record)
            records.append(record)
            self.log(f"step {step} eval: pearson {record['pearson']:.3f}  spearman {record['spearman']:.3f}  "
                     f"kendall {record['kendall']:.3f}  mse {record['mse']:.3f}  (n={record['n']})")
        return record

