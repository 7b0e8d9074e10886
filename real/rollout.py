"""Rollouts: G sampled CoTs per prompt, for REAL and GRPO.

The training loop asks for ``G`` CoTs per prompt and gets them back flat and
grouped (rows ``b*G .. b*G+G-1`` belong to prompt ``b``, the layout
``real.objectives`` expects).  Two engines:

- ``HFRollout`` (default): transformers ``generate`` through
  ``real.inference.generate_cots`` (left padding, stop at the score marker).
  Sampling is seeded per call inside ``torch.random.fork_rng``, so a step's
  rollouts depend only on (seed, step) and the weights: a resumed run samples
  exactly what an uninterrupted one would have, and the caller's RNG stream is
  left untouched.
- ``VLLMRollout`` (``--rollout vllm``): a vLLM engine on the same GPU, its
  weights refreshed from the trained model before each batch.  Needs vllm
  installed; never used by the tests.

REAL only needs the CoT (the batch builder appends the marker and the true
score).  GRPO rewards the score the policy itself wrote, so with
``with_score=True`` generation continues past the marker until the score and
``decoded_scores`` holds it (None when missing or not a score value).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from real.inference import generate_cots
from real.nonfinite import NonFiniteStep
from real.prompts import SCORE_MARKER

logger = logging.getLogger(__name__)



@dataclass
class Rollouts:
    """``len(prompts) * group_size`` samples, grouped by prompt."""

    prompts: List[str]  # each prompt repeated group_size times, contiguously
    cots: List[str]  # the generated text of each sample
    decoded_scores: List[Optional[float]]  # the score written after the first marker (with_score), else None
    group_size: int


def _value_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def decoded_score(text: str, score_values: Sequence[float], marker: str = SCORE_MARKER) -> Optional[float]:
    """The score value written right after the first score marker, else None.

    Score values are single tokens, so the score is the value whose text starts
    what follows the marker (the longest one, should "1" and "10" both be
    values): ``"[RESULT] 35"`` reads 3, since the token after the marker is "3"
    and GRPO reinforces that token.  The first marker is where the
    teacher-forced batch puts the score position.
    """
    cut = text.find(marker)
    if cut < 0:
        return None
    rest = text[cut + len(marker):].lstrip()
    for value in sorted(score_values, key=lambda v: -len(_value_text(v))):
        if rest.startswith(_value_text(value)):
            return float(value)
    return None


def _group(prompts: Sequence[str], per_prompt: Sequence[Sequence[str]], group_size: int, with_score: bool,
           score_values: Sequence[float], marker: str = SCORE_MARKER) -> Rollouts:
    flat_prompts = [p for p in prompts for _ in range(group_size)]
    flat = [c for cots in per_prompt for c in cots]
    scores = [decoded_score(c, score_values, marker) if with_score else None for c in flat]
    return Rollouts(prompts=flat_prompts, cots=flat, decoded_scores=scores, group_size=group_size)


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
                per_prompt = _sample_cots(
                    model, self.tokenizer, list(prompts), n=group_size, greedy=False,
                    temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                    batch_size=max(self.batch_size, group_size), stop_at_marker=not with_score,
                    progress=self.progress, marker=self.marker, max_prompt_tokens=self.max_prompt_tokens,
                )
        finally:
            model.train(was_training)
        return _group(prompts, per_prompt, group_size, with_score, self.score_values, self.marker)

    def close(self) -> None:
        pass


class VLLMRollout:
    """Sampling with a vLLM engine whose weights follow the trained model (CUDA only)."""

    name = "vllm"

    def __init__(self, model, tokenizer, *, temperature: float, top_p: float, max_new_tokens: int,
                 score_values: Sequence[float], gpu_memory_utilization: float = 0.3, marker: str = SCORE_MARKER,
                 max_prompt_tokens: Optional[int] = None):
        try:
            import vllm
        except ImportError as exc:
            raise ValueError("--rollout vllm needs the vllm package (pip install vllm); use --rollout hf "
                             f"otherwise ({exc})") from None
        if next(model.parameters()).device.type != "cuda":
            raise ValueError("--rollout vllm needs the model on CUDA; use --rollout hf on the CPU")
        self._vllm = vllm
        self.tokenizer = tokenizer
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.score_values = list(score_values)
        self.marker = marker
        # vLLM loads from a folder: write the starting weights once, then push updates in memory.
        self._folder = tempfile.mkdtemp(prefix="real-vllm-")
        base = _merged_state_model(model)
        base.save_pretrained(self._folder, safe_serialization=True)
        tokenizer.save_pretrained(self._folder)
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        self.llm = vllm.LLM(model=self._folder, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                            enable_prefix_caching=True)

    def _engine_model(self):
        """The torch module inside the engine (its location moved between vLLM versions)."""
        engine = self.llm.llm_engine
        paths = (
            ("model_executor", "driver_worker", "model_runner", "model"),
            ("model_executor", "driver_worker", "worker", "model_runner", "model"),
        )
        for path in paths:
            obj = engine
            try:
                for attr in path:
                    obj = getattr(obj, attr)
            except AttributeError:
                continue
            return obj
        raise RuntimeError(
            "cannot reach the model inside this vLLM version to refresh its weights (the V1 engine runs it in "
            "another process); set VLLM_USE_V1=0 or use --rollout hf")

    def sync_weights(self, model) -> None:
        with torch.no_grad():
            merged = _merged_state_dict(model)
            self._engine_model().load_weights(merged.items())
        self.llm.reset_prefix_cache()

    def generate(self, model, prompts: Sequence[str], group_size: int, *, seed: int,
                 with_score: bool = False) -> Rollouts:
        self.sync_weights(model)
        params = self._vllm.SamplingParams(
            n=group_size, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_new_tokens,
            seed=seed, stop=None if with_score else [self.marker], include_stop_str_in_output=True,
            truncate_prompt_tokens=self.max_prompt_tokens,
        )
        outputs = self.llm.generate(list(prompts), params, use_tqdm=False)
        per_prompt = []
        for out in outputs:
            texts = [c.text for c in out.outputs]
            if not with_score:
                texts = [t if self.marker in t else f"{t.rstrip()} {self.marker}" for t in texts]
            per_prompt.append(texts)
        return _group(prompts, per_prompt, group_size, with_score, self.score_values, self.marker)

    def close(self) -> None:
        shutil.rmtree(self._folder, ignore_errors=True)


def _merged_state_model(model):
    """The plain transformers model (a LoRA adapter merged into a copy)."""
    if hasattr(model, "merge_and_unload"):
        import copy

        return copy.deepcopy(model).merge_and_unload()
    return model


def _merged_state_dict(model):
    if hasattr(model, "merge_adapter"):
        model.merge_adapter()
        try:
            base = model.get_base_model()
            state = {k.replace(".base_layer", ""): v.clone() for k, v in base.state_dict().items()
                     if "lora_" not in k}
        finally:
            model.unmerge_adapter()
        return state
    return model.state_dict()


def make_rollout_engine(name: str, model, tokenizer, *, temperature: float, top_p: float, max_new_tokens: int,
                        batch_size: int, score_values: Sequence[float], progress: bool = False,
                        marker: str = SCORE_MARKER, max_prompt_tokens: Optional[int] = None):
    """``max_prompt_tokens``: generation sees at most this many prompt tokens (the last ones)."""
    if name == "hf":
        return HFRollout(tokenizer, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, score_values=score_values, progress=progress, marker=marker,
                         max_prompt_tokens=max_prompt_tokens)
    if name == "vllm":
        if os.environ.get("VLLM_USE_V1") is None:
            os.environ["VLLM_USE_V1"] = "0"  # in-process engine, so weights can be refreshed in memory
        return VLLMRollout(model, tokenizer, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                           score_values=score_values, marker=marker, max_prompt_tokens=max_prompt_tokens)
    raise ValueError(f"rollout must be 'hf' or 'vllm'; got {name!r}")


SCORE_ROOM = 4  # tokens GRPO's rollouts may write past --max-cot-tokens: the score after the marker


def rollout_engine_for(cfg, model, tokenizer, scale, *, with_score: bool):
    """The rollout engine of a training run, from its ``TrainConfig`` and score scale."""
    extra = SCORE_ROOM if with_score else 0
    return make_rollout_engine(
        cfg.rollout, model, tokenizer, temperature=cfg.temperature, top_p=cfg.top_p,
        max_new_tokens=min(cfg.max_new_tokens, cfg.max_cot_tokens + extra), batch_size=cfg.rollout_batch_size,
        score_values=scale.values, marker=scale.marker, max_prompt_tokens=cfg.max_prompt_tokens)
