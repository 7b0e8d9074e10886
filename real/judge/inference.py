"""Judge inference: sampling CoTs, RAIL (expected score) and standard decoding (parse the score).

- :func:`generate_cots` runs ``model.generate`` on left-padded batches and
  stops each row at the score marker (RAIL, REAL rollouts) or once a score
  has been written after it (standard decoding).
- :func:`rail_scores` is RAIL's read-out, the one implementation training,
  evaluation and ``real eval`` share: the prompt, the CoT and the marker are
  teacher-forced through the decoder (``real_kernels.hf``), laid out as the
  training losses read them, and the fused judge head gives the expected score
  ``sum_j pi_j v_j`` at the position that predicts the score token (after the
  marker, and after the space token where the tokenizer keeps it apart from the
  digit, as Qwen's do), without logits for the whole sequence; :func:`score_cots`
  is its form with score ids and values.
- :func:`predict_rail` = generate (greedy, or n sampled CoTs) + score_cots,
  averaged over the CoTs; :func:`predict_decode` = generate + a decoding rule
  (:data:`DECODING_RULES`: ``parse``, the score read by ``parse_score``, or
  ``released``, the released validation's: the output's last character if it
  is a digit, else 0).
- :func:`rail_predictions` is the training loop's held-out evaluation: RAIL
  with a greedy CoT (or none, for RAFT) on batches laid out exactly as in training.

Prompts are processed longest-first so a batch holds prompts of similar length;
results come back in the caller's order.
"""
from __future__ import annotations

import math
import re
import sys
from contextlib import contextmanager
from typing import List, Optional, Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from real.judge.batching import build_teacher_forced_batch, cut_at_marker, truncate_prompt_ids
from real.model.head import score_forward
from real.judge.prompts import SCORE_MARKER, ScoreScale, parse_score

_UNLIMITED = sys.maxsize
# How a generated judgement becomes a score (standard decoding): parse (``real.judge.prompts.parse_score``: the score
# after the marker or another score statement, None when there is none or it is out of range) or released (the
# released validation's "sampled" score, github.com/YasminZhang/REAL verl/trainer/ppo/ray_trainer.py,
# _validate_single_dataloader: the generation runs to its end and scores its last character when that is a
# digit, else 0).
DECODING_RULES = ("parse", "released")


def decoded_score(text: str, rule: str = "parse", *, low: float = 1, high: float = 5,
                  marker: str = SCORE_MARKER) -> Optional[float]:
    """The score a generated judgement gives under decoding rule ``rule`` (:data:`DECODING_RULES`)."""
    if rule == "parse":
        return parse_score(text, low=low, high=high, marker=marker)
    if rule == "released":
        return float(text[-1]) if text and text[-1] in "0123456789" else 0.0
    raise ValueError(f"rule must be one of {', '.join(DECODING_RULES)}, got {rule!r}")


class StopAtMarker(StoppingCriteria):
    """Per-row stop: when the marker has been generated, or (``need_score``) once a number follows it.

    Only the last ``window`` generated tokens are decoded at each step, so the
    check stays cheap for long CoTs.
    """

    def __init__(self, tokenizer, prompt_width: int, marker: str = SCORE_MARKER, need_score: bool = False,
                 window: int = 24):
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.marker = marker
        self.window = window
        # after the marker: optional opener, a number, then a character that ends it
        self.score_re = re.compile(re.escape(marker) + r"\s*[:=]?\s*[(\[*\"']*\s*\d+(?:\.\d+)?(?:[^\d.]|\.[^\d])")
        self.need_score = need_score

    def done(self, text: str) -> bool:
        if self.need_score:
            return self.score_re.search(text) is not None
        return self.marker in text

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        tail = input_ids[:, self.prompt_width:][:, -self.window:]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        return torch.tensor([self.done(t) for t in texts], dtype=torch.bool, device=input_ids.device)


@contextmanager
def _left_padding(tokenizer):
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _longest_first(tokenizer, prompts: Sequence[str]) -> List[int]:
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    return sorted(range(len(prompts)), key=lambda i: -lengths[i])


def _check_common(prompts, batch_size: int, n: int = 1) -> List[str]:
    prompts = list(prompts)
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompts[{i}] must be a string, got {type(p).__name__}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of CoTs per prompt must be an int >= 1, got {n!r}")
    return prompts


def _encode_prompts(tokenizer, prompts: List[str], max_prompt_tokens: Optional[int]):
    """Padded ``input_ids`` / ``attention_mask`` of ``prompts``, each cut to its last ``max_prompt_tokens``."""
    if max_prompt_tokens is None:
        return tokenizer(prompts, return_tensors="pt", padding=True)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    ids = [truncate_prompt_ids(x, max_prompt_tokens, tokenizer.bos_token_id) if len(x) > max_prompt_tokens else x
           for x in ids]
    return tokenizer.pad({"input_ids": ids}, return_tensors="pt")


def generate_cots(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    n: int = 1,
    greedy: bool = False,
    temperature: float = 1.0,
    top_p: float = 0.9,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    stop_at_marker: bool = True,
    progress: bool = True,
    marker: str = SCORE_MARKER,
    max_prompt_tokens: Optional[int] = None,
    stop_at_score: bool = True,
    token_count: Optional[List[int]] = None,
) -> List[List[str]]:
    """``n`` generated continuations per prompt (``result[i][k]``), as text.

    ``stop_at_marker``: each row stops once it writes the marker, anything
    after it is dropped and the marker is appended where the model never wrote
    it (e.g. cut by ``max_new_tokens``), so every CoT ends with the marker.
    Otherwise a row runs until eos, ``max_new_tokens``, or (``stop_at_score``) a
    score written after the marker, and the text is returned as generated.  ``batch_size`` counts
    sequences (prompts x n) per ``generate`` call.  ``max_prompt_tokens``: a
    longer prompt keeps its last tokens, as the training batch does
    (``real.judge.batching.truncate_prompt_ids``).  ``token_count``: a list that
    gets the number of tokens generated, all rows together (the text after a
    marker that is dropped included; the padding after a row ends excluded).
    """
    prompts = _check_common(prompts, batch_size, n)
    if greedy and n > 1:
        raise ValueError("greedy decoding gives the same CoT n times; use n=1 or sampling (greedy=False)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy and (temperature <= 0 or not 0 < top_p <= 1):
        raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad_token_id; set tokenizer.pad_token (e.g. to the eos token)")
    sampling = {} if greedy else dict(temperature=float(temperature), top_p=float(top_p), top_k=0)
    config = GenerationConfig(
        max_new_tokens=int(max_new_tokens), do_sample=not greedy, num_return_sequences=n,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sampling,
    )
    per_call = max(1, batch_size // n)
    device = _model_device(model)
    results: List[Optional[List[str]]] = [None] * len(prompts)
    order = _longest_first(tokenizer, prompts)
    bar = tqdm(total=len(prompts) * n, desc="generating CoTs", unit="cot", disable=not progress)
    with _left_padding(tokenizer), torch.no_grad():
        for start in range(0, len(order), per_call):
            chunk = order[start:start + per_call]
            enc = _encode_prompts(tokenizer, [prompts[i] for i in chunk], max_prompt_tokens).to(device)
            width = enc["input_ids"].shape[1]
            stops = [] if not (stop_at_marker or stop_at_score) else [
                StopAtMarker(tokenizer, width, marker=marker, need_score=not stop_at_marker)]
            out = model.generate(**enc, generation_config=config, stopping_criteria=StoppingCriteriaList(stops))
            texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            if token_count is not None:
                token_count.append(generated_tokens(out[:, width:], tokenizer.pad_token_id, tokenizer.eos_token_id))
            for j, i in enumerate(chunk):
                mine = texts[j * n:(j + 1) * n]
                results[i] = [_end_at_marker(t, marker) for t in mine] if stop_at_marker else mine
            bar.update(len(chunk) * n)
    bar.close()
    return results  # type: ignore[return-value]


def generated_tokens(new: torch.Tensor, pad_id: int, eos_id: Optional[int]) -> int:
    """Tokens generated in ``new`` ``[rows, steps]``: each row up to its end (an eos counts, once), without the
    padding ``generate`` puts after a finished row (which is the eos where the tokenizer pads with it)."""
    ended = new == pad_id
    if eos_id is not None:
        ended = ended | (new == eos_id)
    # a row's length: up to its first pad / eos, plus that eos where it is one
    first = torch.where(ended.any(1), ended.float().argmax(1), torch.full_like(new[:, 0], new.shape[1]))
    at = first.clamp(max=new.shape[1] - 1)
    counted_eos = ended.any(1) & (eos_id is not None) & (new.gather(1, at[:, None])[:, 0] == eos_id)
    return int((first + counted_eos.long()).sum())


def _end_at_marker(text: str, marker: str = SCORE_MARKER) -> str:
    body = cut_at_marker(text, marker)
    return f"{body} {marker}" if body else marker


def rail_scores(model, tokenizer, prompts: Sequence[str], cots: Sequence[Optional[str]], scale: ScoreScale, *,
                batch_size: int = 8, normalize: bool = False, backend: str = "auto",
                max_prompt_tokens: Optional[int] = None, max_cot_tokens: Optional[int] = None,
                progress: bool = False) -> List[float]:
    """RAIL's read-out, the one implementation training, evaluation and ``real eval`` share.

    The expected score ``sum_j pi_j v_j`` at the position that predicts the score token, in a batch
    laid out exactly as the training losses read it (``build_teacher_forced_batch`` with targets):
    prompt + CoT (cut at its marker) + the marker + whatever the tokenizer writes between the marker
    and a score (the space token, for tokenizers that keep it apart from the digit, as Qwen's do).
    A placeholder target only fixes that layout: the score token it appends comes after the score
    position and, the model being causal, cannot change the prediction read there.  A ``None`` CoT
    reads the score right after the prompt (RAFT).  Prompts go longest first; results come back in
    the caller's order.
    """
    prompts = _check_common(prompts, batch_size)
    cots = list(cots)
    if len(cots) != len(prompts):
        raise ValueError(f"cots has {len(cots)} entries but prompts has {len(prompts)}")
    device = _model_device(model)
    placeholder = float(scale.values[0])
    out: List[Optional[float]] = [None] * len(prompts)
    order = _longest_first(tokenizer, prompts)
    bar = tqdm(total=len(prompts), desc="RAIL scoring", unit="cot", disable=not progress)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = build_teacher_forced_batch(
                tokenizer, [prompts[i] for i in chunk], [cots[i] for i in chunk], [placeholder] * len(chunk),
                scale.token_ids, scale.values, max_prompt_tokens=max_prompt_tokens or _UNLIMITED,
                max_cot_tokens=max_cot_tokens or _UNLIMITED, marker=scale.marker, device=device)
            head = score_forward(model, batch, scale.token_ids, scale.values, normalize=normalize, backend=backend)
            for j, i in enumerate(chunk):
                out[i] = float(head.expected_score[j])
            bar.update(len(chunk))
    bar.close()
    return out  # type: ignore[return-value]


def score_cots(
    model,
    tokenizer,
    prompts: Sequence[str],
    cots: Sequence[str],
    *,
    score_token_ids: Sequence[int],
    score_values: Sequence[float],
    batch_size: int = 8,
    normalize: bool = False,
    max_prompt_tokens: Optional[int] = None,
    max_cot_tokens: Optional[int] = None,
    backend: str = "auto",
    progress: bool = True,
    marker: str = SCORE_MARKER,
) -> List[float]:
    """RAIL read-out of given CoTs (:func:`rail_scores`): the expected score at the score position.

    ``normalize`` renormalises the score-token probabilities over the score
    tokens (the paper's RAIL uses the full-vocabulary softmax: off).
    """
    scale = ScoreScale(tuple(int(i) for i in score_token_ids), tuple(score_values), marker)
    if len(scale.token_ids) != len(scale.values):
        raise ValueError(f"score_token_ids has {len(scale.token_ids)} ids but score_values has {len(scale.values)}")
    return rail_scores(model, tokenizer, prompts, cots, scale, batch_size=batch_size, normalize=normalize,
                       backend=backend, max_prompt_tokens=max_prompt_tokens, max_cot_tokens=max_cot_tokens,
                       progress=progress)


def predict_rail(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    score_token_ids: Sequence[int],
    score_values: Sequence[float],
    n_samples: int = 1,
    greedy: bool = True,
    temperature: float = 1.0,
    top_p: float = 0.9,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    normalize: bool = False,
    backend: str = "auto",
    progress: bool = True,
    marker: str = SCORE_MARKER,
) -> List[float]:
    """RAIL prediction per prompt: expected score after a greedy CoT, or the mean over ``n_samples`` sampled CoTs."""
    prompts = _check_common(prompts, batch_size, n_samples)
    if greedy and n_samples > 1:
        raise ValueError("greedy=True gives one CoT; use greedy=False to average over n_samples sampled CoTs")
    if not prompts:
        return []
    cots = generate_cots(model, tokenizer, prompts, n=n_samples, greedy=greedy, temperature=temperature,
                         top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size, stop_at_marker=True,
                         progress=progress, marker=marker)
    flat_prompts = [p for p in prompts for _ in range(n_samples)]
    flat_cots = [c for per_prompt in cots for c in per_prompt]
    scores = score_cots(model, tokenizer, flat_prompts, flat_cots, score_token_ids=score_token_ids,
                        score_values=score_values, batch_size=batch_size, normalize=normalize, backend=backend,
                        progress=progress, marker=marker)
    return [math.fsum(scores[i * n_samples:(i + 1) * n_samples]) / n_samples for i in range(len(prompts))]


def rail_predictions(model, tokenizer, prompts: Sequence[str], scale: ScoreScale, *,
                     max_new_tokens: int, batch_size: int, normalize: bool = False, backend: str = "auto",
                     max_prompt_tokens: int = 2048, max_cot_tokens: int = 1024,
                     with_cot: bool = True) -> List[float]:
    """The training loop's held-out evaluation: RAIL (:func:`rail_scores`) after a greedy CoT.

    ``with_cot=False`` reads the score right after the prompt instead (how a RAFT judge, trained
    without a CoT, is meant to be used).
    """
    prompts = list(prompts)
    if with_cot:
        cots = [c[0] for c in generate_cots(model, tokenizer, prompts, n=1, greedy=True,
                                             max_new_tokens=min(max_new_tokens, max_cot_tokens),
                                             batch_size=batch_size, stop_at_marker=True, progress=False,
                                             marker=scale.marker, max_prompt_tokens=max_prompt_tokens)]
    else:
        cots = [None] * len(prompts)
    return rail_scores(model, tokenizer, prompts, cots, scale, batch_size=batch_size, normalize=normalize,
                       backend=backend, max_prompt_tokens=max_prompt_tokens, max_cot_tokens=max_cot_tokens)


def predict_decode(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    top_p: float = 0.9,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    low: float = 1,
    high: float = 5,
    progress: bool = True,
    marker: str = SCORE_MARKER,
    rule: str = "parse",
) -> List[Optional[float]]:
    """Standard decoding: generate a judgement and read its score by ``rule`` (:func:`decoded_score`).

    ``parse``: generation stops once a score follows the marker; None when unreadable or out of range.
    ``released``: generation runs to eos or ``max_new_tokens``, as the released validation's, and a
    judgement that does not end in a digit scores 0.
    """
    prompts = _check_common(prompts, batch_size)
    if rule not in DECODING_RULES:
        raise ValueError(f"rule must be one of {', '.join(DECODING_RULES)}, got {rule!r}")
    if not prompts:
        return []
    texts = generate_cots(model, tokenizer, prompts, n=1, greedy=greedy, temperature=temperature, top_p=top_p,
                          max_new_tokens=max_new_tokens, batch_size=batch_size, stop_at_marker=False,
                          progress=progress, marker=marker, stop_at_score=rule == "parse")
    return [decoded_score(t[0], rule, low=low, high=high, marker=marker) for t in texts]
