"""TRL's ``GRPOTrainer`` with ``real_kernels`` computing the per-token log-probs.

Install TRL next to this project (it brings ``datasets`` and ``accelerate``):

    pip install torch==2.13.0 -e ".[examples]"   # CPU machines: keep the torch pin, or pip pulls a CUDA build
    pip install -e ".[examples]"                 # CUDA machines

TRL's trainers (GRPO, RLOO, DPO, KTO, SFT) get every per-token log-prob they
need (the policy's with gradients, the old policy's and the reference
model's without) by calling the model as ``model(..., labels=labels,
fused_lm_head=True)``, a forward that TRL's public ``trl.trainer.add_fused_lm_head``
installs and documents: it returns a ``FusedCausalLMOutput`` whose
``log_probs`` / ``entropy`` are ``[batch, seq_len - 1]``, zero where the next
label is -100.  ``add_real_kernels_lm_head`` below installs a forward that
keeps that contract and computes it with ``real_kernels.hf.token_logprobs``
(the decoder runs to hidden states, the kept rows go with the LM-head weight
through the fused head: Triton on CUDA, chunked PyTorch on the CPU), with
TRL's temperature.  ``RealKernelsGRPOTrainer`` calls it on the policy (and the
reference model, when there is one) right after ``GRPOTrainer.__init__`` has
installed TRL's own head, so nothing private of TRL is overridden and the
trainer calls the model it prepared (under DDP the wrapped model, so the
gradients are all-reduced).  The rest (sampling, rewards, advantages,
clipping, KL, logging) is TRL's own.  Written against trl 1.16 (the contract
appeared with ``add_fused_lm_head``); ``pyproject.toml``'s ``examples`` extra
asks for ``trl>=1.16,<2``.  Text-only models; vision inputs, MoE router
losses and ``cast_lm_head_to_fp32`` are refused with a clear error.

The demo trains the built-in tiny random judge for a step.  Its default
reward is REAL's regression reward computed by the judge itself through the
fused judge head (``RegressionReward``); ``--reward exact`` uses the paper's
"standard RL" reward instead (1 when the score parsed from the completion
equals the rounded ground truth; sparse on an untrained model):

    python examples/trl_grpo.py --max-steps 1
"""
from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import types
from typing import List, Optional, Sequence

import torch

from real_kernels.hf import token_logprobs

try:
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import FusedCausalLMOutput
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError('examples/trl_grpo.py needs TRL 1.16 or later: pip install torch==2.13.0 -e ".[examples]" '
                      "(keep the torch pin on CPU)") from exc

_HEAD = "_real_kernels_lm_head"  # the forward the head replaced, kept on the model to undo it
_FIELDS = ("log_probs", "entropy")  # the FusedCausalLMOutput fields this head computes


def add_real_kernels_lm_head(model, temperature: float = 1.0, outputs: Sequence[str] = ("log_probs",),
                             backend: str = "auto") -> None:
    """``trl.trainer.add_fused_lm_head``'s contract, served by ``real_kernels``: see the module docstring.

    ``model`` is the transformers model (for a peft model, its ``get_base_model()``,
    as TRL does).  ``model(..., labels=labels, fused_lm_head=True)`` then returns
    ``FusedCausalLMOutput(loss, log_probs, entropy, label_mask)``; without
    ``fused_lm_head`` the forward found on the model runs.  Undo with
    ``remove_real_kernels_lm_head``.
    """
    unknown = sorted(set(outputs) - set(_FIELDS))
    if unknown:
        raise ValueError(f"outputs {unknown} are not computed by the real_kernels head; it computes {_FIELDS}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if backend not in ("auto", "triton", "torch", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton', 'torch' or 'reference', got {backend!r}")
    if getattr(model.config, "output_router_logits", False):
        raise ValueError("the real_kernels head does not compute MoE router losses (config.output_router_logits)")
    previous = model.__dict__.get(_HEAD, (model.forward,))[0]  # adding twice replaces, never stacks
    want_entropy = "entropy" in outputs

    @functools.wraps(type(model).forward)  # generate() validates its kwargs against the forward's signature
    def forward(self, input_ids=None, attention_mask=None, *args, fused_lm_head=False, labels=None,
                shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {k: v for k, v in (("labels", labels), ("shift_labels", shift_labels),
                                       ("num_items_in_batch", num_items_in_batch)) if v is not None}
            return previous(input_ids, attention_mask, *args, **kwargs, **extra)
        given = sorted(k for k, v in kwargs.items() if v is not None and k not in ("use_cache", "return_dict"))
        if args or given or shift_labels is not None:
            raise ValueError(f"the real_kernels head handles text-only models without context parallelism; got "
                             f"{given + (['shift_labels'] if shift_labels is not None else [])}"
                             f"{' and positional arguments' if args else ''}")
        if labels is None:
            raise ValueError("fused_lm_head=True needs labels (the next-token targets, -100 where not scored)")
        scored = labels[:, 1:] != -100
        if not torch.equal(labels[:, 1:][scored], input_ids[:, 1:][scored]):
            raise ValueError("labels differ from input_ids where they are kept: this head scores the input's "
                             "own next tokens (as TRL's trainers ask it to)")
        out = token_logprobs(self, input_ids, attention_mask, token_mask=scored, temperature=temperature,
                             return_entropy=want_entropy, backend=backend)
        count = scored.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-out.logprobs.sum() / count, log_probs=out.logprobs, entropy=out.entropy,
                                   label_mask=scored)

    model.__dict__[_HEAD] = (previous,)
    model.forward = types.MethodType(forward, model)


def remove_real_kernels_lm_head(model) -> None:
    """Put back the forward ``add_real_kernels_lm_head`` found (TRL's own fused head inside a trainer)."""
    previous = model.__dict__.pop(_HEAD, None)
    if previous is not None:
        model.forward = previous[0]


class RealKernelsGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose per-token log-probs and entropies come from the real_kernels fused head."""

    def __init__(self, *args, real_kernels_backend: str = "auto", **kwargs):
        training_args = kwargs.get("args")
        if getattr(training_args, "cast_lm_head_to_fp32", False):
            raise ValueError("cast_lm_head_to_fp32=True: the real_kernels head already computes its softmax "
                             "statistics in fp32 from the model's own weights; leave it False")
        super().__init__(*args, **kwargs)
        self.real_kernels_backend = real_kernels_backend
        policy = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        add_real_kernels_lm_head(policy, self.temperature, outputs=_FIELDS, backend=real_kernels_backend)
        if self.ref_model is not None:
            add_real_kernels_lm_head(self.accelerator.unwrap_model(self.ref_model), self.temperature,
                                     backend=real_kernels_backend)


class RegressionReward:
    """REAL's regression reward (lambda = 0) from the judge being trained: ``-(expected score - target)^2``.

    Appends the score marker to prompt + completion and reads the expected
    score at the marker through ``real_kernels.hf.judge_outputs`` (fused head,
    no logits, no gradient), with the score distribution renormalised over the
    score tokens.  Dense, so GRPO gets a signal even from an untrained judge.
    """

    __name__ = "regression_reward"  # TRL names the reward's metrics after it

    def __init__(self, model, tokenizer, score_values=(1.0, 2.0, 3.0, 4.0, 5.0)):
        from real.judge.prompts import SCORE_MARKER, resolve_score_token_ids

        self.model, self.tokenizer = model, tokenizer
        self.score_ids = resolve_score_token_ids(tokenizer)
        self.score_values = list(score_values)
        self.marker_ids = tokenizer(SCORE_MARKER, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def __call__(self, prompts, completions, completion_ids, target, **_) -> List[float]:
        from real_kernels.hf import judge_outputs

        drop = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        rows = [self.tokenizer(p, add_special_tokens=False)["input_ids"] + [t for t in c if t not in drop]
                + self.marker_ids for p, c in zip(prompts, completion_ids)]
        device = next(self.model.parameters()).device
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, device=device)
            mask[i, : len(r)] = 1
        out = judge_outputs(self.model, ids, mask, torch.tensor(target, dtype=torch.float32, device=device),
                            self.score_ids, self.score_values, score_pos=mask.sum(1) - 1, normalize=True)
        return (-out.sq_error).tolist()


def exact_score_reward(completions, target, **_) -> List[float]:
    """Standard-RL reward of the paper: 1[parsed score == round(target)] (sparse on an untrained model)."""
    from real.judge.prompts import parse_score

    rewards = []
    for text, y in zip(completions, target):
        score = parse_score(text if isinstance(text, str) else text[-1]["content"])
        rewards.append(1.0 if score is not None and round(score) == round(float(y)) else 0.0)
    return rewards


def build_trainer(*, model_name: str = "tiny", output_dir: str, max_steps: int = 1, num_generations: int = 4,
                  max_completion_length: int = 12, learning_rate: float = 1e-5, seed: int = 0,
                  backend: str = "auto", reward: str = "regression") -> RealKernelsGRPOTrainer:
    from datasets import Dataset

    from real.judge.prompts import render_prompt
    from real.model.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_name, device="cuda" if torch.cuda.is_available() else "cpu")
    items = [
        ("Explain why the sky is blue.", "Rayleigh scattering of sunlight by air molecules.", 4.33),
        ("Give the capital of Australia.", "Sydney is the capital of Australia.", 1.67),
    ]
    dataset = Dataset.from_dict({
        "prompt": [render_prompt(q, a, "Is the response correct, clear and complete?") for q, a, _ in items],
        "target": [t for _, _, t in items],
    })
    args = GRPOConfig(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=num_generations,
        num_generations=num_generations, max_completion_length=max_completion_length, learning_rate=learning_rate,
        logging_steps=1, report_to="none", save_strategy="no", seed=seed, beta=0.0, temperature=1.0,
        use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(),
    )
    if reward not in ("regression", "exact"):
        raise ValueError(f"reward must be 'regression' or 'exact', got {reward!r}")
    reward_func = RegressionReward(model, tokenizer) if reward == "regression" else exact_score_reward
    trainer = RealKernelsGRPOTrainer(model=model, reward_funcs=reward_func, args=args, train_dataset=dataset,
                                     processing_class=tokenizer, real_kernels_backend=backend)
    return trainer


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="TRL GRPOTrainer with real_kernels as the log-prob backend.")
    parser.add_argument("--model", default="tiny", help="'tiny' (random, built on the spot) or a local model folder")
    parser.add_argument("--max-steps", type=int, default=1, help="optimizer steps (default 1)")
    parser.add_argument("--num-generations", type=int, default=4, help="completions per prompt (default 4)")
    parser.add_argument("--max-completion-length", type=int, default=12, help="completion tokens (default 12)")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "reference"),
                        help="real_kernels backend (default auto)")
    parser.add_argument("--reward", default="regression", choices=("regression", "exact"),
                        help="regression: -(expected score - target)^2 from the judge itself (default); "
                             "exact: 1[parsed score == round(target)], the paper's standard-RL reward")
    parser.add_argument("--output-dir", help="trainer output folder (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(model_name=args.model, output_dir=args.output_dir or tmp, max_steps=args.max_steps,
                                num_generations=args.num_generations,
                                max_completion_length=args.max_completion_length, backend=args.backend,
                                reward=args.reward)
        result = trainer.train()
    print(f"trained {result.global_step} step(s), loss {result.training_loss:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
