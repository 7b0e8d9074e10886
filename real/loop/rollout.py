"""Rollouts: G sampled CoTs per prompt, for REAL and GRPO.

The training loop asks for ``G`` CoTs per prompt and gets them back flat and
grouped (rows ``b*G .. b*G+G-1`` belong to prompt ``b``, the layout
``real.methods.objectives`` expects).  Two engines:

- ``HFRollout`` (default): transformers ``generate`` through
  ``real.judge.inference.generate_cots`` (left padding, stop at the score marker).
  Sampling is seeded per call inside ``torch.random.fork_rng``, so a step's
  rollouts depend only on (seed, step) and the weights: a resumed run samples
  exactly what an uninterrupted one would have, and the caller's RNG stream is
  left untouched.
- ``--rollout vllm-colocate`` (``vllm`` is the same) and ``vllm-server``: vLLM,
  colocated in every training process or in a separate ``trl vllm-serve``
  process, the trained weights pushed to it before every rollout
  (``real.loop.vllm_rollout``; works under torchrun).

REAL only needs the CoT (the batch builder appends the marker and the true
score).  GRPO rewards the score the policy itself wrote, so with
``with_score=True`` generation continues past the marker until the score and
``decoded_scores`` holds it (None when missing or not a score value).
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence

import torch

from real.judge.inference import generate_cots
from real.loop.nonfinite import NonFiniteStep
from real.judge.prompts import SCORE_MARKER
from real.loop import vllm_rollout
from real.loop.rollout_groups import Rollouts, group_rollouts

logger = logging.getLogger(__name__)



def _sample_cots(*args, **kwargs) -> List[List[str]]:
    """``generate_cots``; a policy with non-finite probabilities (NaN weights) is a ``NonFiniteStep``."""
    try:
        return generate_cots(*args, **kwargs)
    except RuntimeError as exc:
        if "probability tensor contains" not in str(exc):  # torch.multinomial's message
            raise
        raise NonFiniteStep("the policy's next-token probabilities are not finite (sampling rollouts)") from None


class HFRollout:
    """Sampling with transformers ``generate`` on the training model itself."""

    name = "hf"

    def __init__(self, tokenizer, *, temperature: float, top_p: float, max_new_tokens: int, batch_size: int,
                 score_values: Sequence[float], progress: bool = False, marker: str = SCORE_MARKER,
                 max_prompt_tokens: Optional[int] = None):
        self.tokenizer = tokenizer
        self.marker = marker
        self.max_prompt_tokens = max_prompt_tokens  # longer prompts keep their last tokens, as in training
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.score_values = list(score_values)
        self.progress = progress

    def generate(self, model, prompts: Sequence[str], group_size: int, *, seed: int,
                 with_score: bool = False) -> Rollouts:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                counted: List[int] = []
                per_prompt = _sample_cots(
                    model, self.tokenizer, list(prompts), n=group_size, greedy=False,
                    temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                    batch_size=max(self.batch_size, group_size), stop_at_marker=not with_score,
                    progress=self.progress, marker=self.marker, max_prompt_tokens=self.max_prompt_tokens,
                    token_count=counted,
                )
        finally:
            model.train(was_training)
        return group_rollouts(prompts, per_prompt, group_size, with_score, self.score_values, self.marker,
                              sampled_tokens=sum(counted))

    def close(self) -> None:
        pass


def make_rollout_engine(name: str, model, tokenizer, *, temperature: float, top_p: float, max_new_tokens: int,
                        batch_size: int, score_values: Sequence[float], progress: bool = False,
                        marker: str = SCORE_MARKER, max_prompt_tokens: Optional[int] = None, env=None,
                        vllm: Optional[dict] = None):
    """``max_prompt_tokens``: generation sees at most this many prompt tokens (the last ones).  ``vllm``: the
    keyword settings of the vLLM engines (``real.loop.vllm_rollout``); ``env``: the run's ``DistEnv``."""
    if name == "hf":
        return HFRollout(tokenizer, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, score_values=score_values, progress=progress, marker=marker,
                         max_prompt_tokens=max_prompt_tokens)
    sampling = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, score_values=score_values,
                    marker=marker, max_prompt_tokens=max_prompt_tokens)
    settings = dict(vllm or {})
    if name in ("vllm", "vllm-colocate"):
        return vllm_rollout.VLLMColocateRollout(model, tokenizer, env=env, **_only(settings, COLOCATE_SETTINGS),
                                                **sampling)
    if name == "vllm-server":
        return vllm_rollout.VLLMServerRollout(model, tokenizer, env=env, **_only(settings, SERVER_SETTINGS),
                                              **sampling)
    raise ValueError(f"rollout must be one of hf, vllm-colocate (or vllm), vllm-server; got {name!r}")


COLOCATE_SETTINGS = ("gpu_memory_utilization", "tensor_parallel_size", "sleep")
SERVER_SETTINGS = ("host", "port", "group_port", "timeout")


def _only(settings: dict, names) -> dict:
    return {k: v for k, v in settings.items() if k in names}


def vllm_settings(cfg) -> dict:
    """The vLLM engines' settings from a ``TrainConfig`` (its ``vllm_*`` fields)."""
    return dict(gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                tensor_parallel_size=cfg.vllm_tensor_parallel_size, sleep=cfg.vllm_sleep,
                host=cfg.vllm_server_host, port=cfg.vllm_server_port, group_port=cfg.vllm_group_port,
                timeout=cfg.vllm_server_timeout)


SCORE_ROOM = 4  # tokens GRPO's rollouts may write past --max-cot-tokens: the score after the marker


def rollout_engine_for(cfg, model, tokenizer, scale, *, with_score: bool, env=None):
    """The rollout engine of a training run, from its ``TrainConfig`` and score scale."""
    extra = SCORE_ROOM if with_score else 0
    return make_rollout_engine(
        cfg.rollout, model, tokenizer, temperature=cfg.temperature, top_p=cfg.top_p,
        max_new_tokens=min(cfg.max_new_tokens, cfg.max_cot_tokens + extra), batch_size=cfg.rollout_batch_size,
        score_values=scale.values, marker=scale.marker, max_prompt_tokens=cfg.max_prompt_tokens, env=env,
        vllm=vllm_settings(cfg))
