"""TRL's ``GRPOTrainer`` with ``real_kernels`` computing the per-token log-probs.

Install TRL next to this project (it brings ``datasets`` and ``accelerate``):

    pip install torch==2.13.0 trl       # CPU machines: keep the torch pin, or pip pulls a CUDA build
    pip install trl                     # CUDA machines

(tested with trl 1.16).  ``GRPOTrainer`` gets every log-prob it needs (the
policy's with gradients, the old policy's and the reference model's without)
from one method, ``_get_per_token_logps_and_entropies``.  The subclass below
overrides only that method: the decoder runs to hidden states and
``real_kernels.hf.token_logprobs`` sends the completion rows with the LM-head
weight through the fused head (Triton on CUDA, chunked PyTorch on the CPU),
with TRL's temperature; the rest of the trainer (sampling, rewards,
advantages, clipping, KL, logging) is TRL's own.  Text-only models; MoE
auxiliary losses and vision inputs are refused with a clear error.
Single-process training as written: under DDP the unwrapped model is called.

The demo trains the built-in tiny random judge for a step.  Its default
reward is REAL's regression reward computed by the judge itself through the
fused judge head (``RegressionReward``); ``--reward exact`` uses the paper's
"standard RL" reward instead (1 when the score parsed from the completion
equals the rounded ground truth; sparse on an untrained model):

    python examples/trl_grpo.py --max-steps 1
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from typing import List, Optional

import torch

from real_kernels.hf import token_logprobs

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError("examples/trl_grpo.py needs TRL: pip install torch==2.13.0 trl (keep the pin on CPU)") from exc


class RealKernelsGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose per-token log-probs and entropies come from the fused head."""

    real_kernels_backend = "auto"  # "torch", "triton" or "reference" to force one

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **extra_inputs):
        given = sorted(k for k, v in extra_inputs.items() if v is not None)
        if given:
            raise ValueError(f"RealKernelsGRPOTrainer handles text-only models; got {given}")
        if compute_aux_loss:
            raise ValueError("RealKernelsGRPOTrainer does not compute MoE router auxiliary losses")
        model = self.accelerator.unwrap_model(model)
        batch_size = batch_size or input_ids.size(0)
        seq_len = input_ids.size(1)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids = input_ids[start: start + batch_size]
            mask = attention_mask[start: start + batch_size]
            # position t predicts token t+1; TRL scores the last ``logits_to_keep`` tokens that are not padding
            rows = mask[:, 1:].bool().clone()
            rows[:, : seq_len - 1 - logits_to_keep] = False
            with self.accelerator.autocast():
                out = token_logprobs(model, ids, mask, token_mask=rows, temperature=self.temperature,
                                     return_entropy=compute_entropy, backend=self.real_kernels_backend)
            logps.append(out.logprobs[:, -logits_to_keep:])
            if compute_entropy:
                entropies.append(out.entropy[:, -logits_to_keep:])
        return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None


class RegressionReward:
    """REAL's regression reward (lambda = 0) from the judge being trained: ``-(expected score - target)^2``.

    Appends the score marker to prompt + completion and reads the expected
    score at the marker through ``real_kernels.hf.judge_outputs`` (fused head,
    no logits, no gradient), with the score distribution renormalised over the
    score tokens.  Dense, so GRPO gets a signal even from an untrained judge.
    """

    __name__ = "regression_reward"  # TRL names the reward's metrics after it

    def __init__(self, model, tokenizer, score_values=(1.0, 2.0, 3.0, 4.0, 5.0)):
        from real.prompts import SCORE_MARKER, resolve_score_token_ids

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
    from real.prompts import parse_score

    rewards = []
    for text, y in zip(completions, target):
        score = parse_score(text if isinstance(text, str) else text[-1]["content"])
        rewards.append(1.0 if score is not None and round(score) == round(float(y)) else 0.0)
    return rewards


def build_trainer(*, model_name: str = "tiny", output_dir: str, max_steps: int = 1, num_generations: int = 4,
                  max_completion_length: int = 12, learning_rate: float = 1e-5, seed: int = 0,
                  backend: str = "auto", reward: str = "regression") -> RealKernelsGRPOTrainer:
    from datasets import Dataset

    from real.prompts import render_prompt
    from real.models import load_model_and_tokenizer

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
                                     processing_class=tokenizer)
    trainer.real_kernels_backend = backend
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
