"""Run a transformers causal LM to hidden states, never to logits, and apply the fused head.

A plain trainer calls ``model(input_ids).logits`` and pays ``[B, T, V]`` fp32
memory (and as much again for its gradient).  Here the decoder body runs alone
(``model.get_decoder()``, through a peft/LoRA wrapper if there is one), the LM
head module is never called, and its weight goes to ``linear_logprobs`` /
``judge_head`` with only the rows that are needed: every next-token row for
``token_logprobs`` (or the ones a mask keeps), the CoT rows plus one score row
per sequence for ``judge_outputs``.  Works with tied embeddings (the output
embedding *is* the input embedding then) and under ``torch.no_grad()`` for
reference / old-policy log-probs.

This module must not import ``real`` (the algorithm layer sits on top of it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .functional import judge_head, linear_logprobs
from .outputs import LinearLogprobsOutput

IGNORE_INDEX = -100


def _unwrap_peft(model):
    """The transformers model inside a peft wrapper (LoRA layers stay injected in it), else the model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _decoder(model):
    base = _unwrap_peft(model)
    get_decoder = getattr(base, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or decoder is base:
        decoder = getattr(base, "base_model", None)
    if decoder is None or decoder is base:
        raise ValueError(
            f"cannot find the decoder body of {type(base).__name__}: expected a transformers causal LM with "
            "get_decoder() or base_model"
        )
    return decoder


def _effective_temperature(model, temperature: float) -> float:
    """Fold a model's logit scaling into the temperature; refuse what cannot be folded."""
    config = getattr(_unwrap_peft(model), "config", None)
    if getattr(config, "final_logit_softcapping", None) is not None:
        raise ValueError(
            f"{type(_unwrap_peft(model)).__name__} applies final_logit_softcapping to its logits, which the fused "
            "head does not implement; the log-probs would be wrong"
        )
    scale = getattr(config, "logit_scale", None)
    if scale is not None and scale != 1:
        return float(temperature) / float(scale)  # logits = scale * W h, so divide by (tau / scale)
    return float(temperature)


def lm_head_weight(model) -> torch.Tensor:
    """The LM-head weight ``[V, H]`` (the input embedding when the two are tied)."""
    head = _unwrap_peft(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(_unwrap_peft(model)).__name__} has no output embeddings (LM head)")
    if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
        raise ValueError(
            "the LM head is wrapped by an adapter (e.g. LoRA on lm_head); its delta would be ignored by the fused "
            "head: leave lm_head out of the adapter's target_modules, or merge the adapter first"
        )
    return head.weight


def decoder_hidden_states(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Final hidden states ``[B, T, H]`` (after the last norm) from the decoder body alone.

    With an ``attention_mask`` the position ids count only real tokens, so left
    and right padding give the same hidden states as the unpadded sequence.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, T] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    kwargs = {}
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
            )
        kwargs["attention_mask"] = attention_mask
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = _decoder(model)(input_ids=input_ids, use_cache=False, **kwargs)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    token_mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
) -> LinearLogprobsOutput:
    """``log p(input_ids[:, t+1] | input_ids[:, :t+1])`` for every t: ``.logprobs`` ``[B, T-1]`` fp32.

    ``token_mask`` ``[B, T-1]`` bool (default: ``attention_mask[:, 1:]``, else
    all) selects the rows sent to the head; the others are 0 in ``.logprobs``
    and ``.entropy`` (``[B, T-1]`` when ``return_entropy``).
    """
    b, t = input_ids.shape
    if t < 2:
        raise ValueError(f"input_ids needs at least 2 tokens per row to have a next token, got shape {(b, t)}")
    if token_mask is None:
        token_mask = attention_mask[:, 1:].bool() if attention_mask is not None else torch.ones(
            b, t - 1, dtype=torch.bool, device=input_ids.device)
    elif token_mask.shape != (b, t - 1):
        raise ValueError(f"token_mask must have shape {(b, t - 1)}, got {tuple(token_mask.shape)}")
    hidden = decoder_hidden_states(model, input_ids, attention_mask)[:, :-1]
    rows = token_mask.reshape(-1).nonzero().squeeze(1)
    out = linear_logprobs(
        hidden.reshape(b * (t - 1), -1).index_select(0, rows),
        lm_head_weight(model),
        input_ids[:, 1:].reshape(-1).index_select(0, rows),
        temperature=_effective_temperature(model, temperature),
        return_entropy=return_entropy,
        backend=backend,
    )
    logprobs = _scatter_rows(out.logprobs, rows, b, t - 1)
    entropy = _scatter_rows(out.entropy, rows, b, t - 1) if return_entropy else None
    return LinearLogprobsOutput(logprobs=logprobs, entropy=entropy)


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor, b: int, t: int) -> torch.Tensor:
    full = values.new_zeros(b * t)
    return full.index_put((rows,), values).view(b, t)


@dataclass(frozen=True)
class HFJudgeOutput:
    """Judge-head outputs of a teacher-forced batch, laid out per sequence."""

    cot_logprobs: torch.Tensor  # [B, T] fp32: log p(input_ids[:, t+1]) where cot_mask, else 0
    score_logprobs: torch.Tensor  # [B, m] fp32 at score_pos (renormalised over K if normalize)
    expected_score: torch.Tensor  # [B] fp32 at score_pos
    sq_error: torch.Tensor  # [B] fp32 (expected_score - targets)^2, 0 without targets
    cot_entropy: Optional[torch.Tensor] = None  # [B, T] fp32 where cot_mask, else 0; when asked for


def judge_outputs(
    model,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    targets: Optional[torch.Tensor],
    score_token_ids,
    score_values,
    *,
    score_pos: torch.Tensor,
    cot_mask: Optional[torch.Tensor] = None,
    normalize: bool = False,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
) -> HFJudgeOutput:
    """One decoder pass and one fused-head pass over the CoT rows and the score rows.

    ``targets`` ``[B]`` float ground-truth scores (or None), ``score_pos`` ``[B]``
    the position whose next token is the score token (its logits give the score
    distribution), ``cot_mask`` ``[B, T]`` bool, True at positions whose next
    token is a CoT token (None: no CoT rows, e.g. RAIL or RAFT).
    """
    b, t = input_ids.shape
    device = input_ids.device
    score_pos = torch.as_tensor(score_pos, device=device).long()
    if score_pos.shape != (b,):
        raise ValueError(f"score_pos must have shape [{b}], got {tuple(score_pos.shape)}")
    if bool(((score_pos < 0) | (score_pos >= t)).any()):
        raise ValueError(f"score_pos must lie in [0, {t}), got {score_pos.tolist()}")
    if targets is not None:
        targets = torch.as_tensor(targets, device=device).float()
        if targets.shape != (b,):
            raise ValueError(f"targets must have shape [{b}], got {tuple(targets.shape)}")
    if cot_mask is None:
        cot_mask = torch.zeros(b, t, dtype=torch.bool, device=device)
    elif cot_mask.shape != (b, t):
        raise ValueError(f"cot_mask must have shape {(b, t)}, got {tuple(cot_mask.shape)}")
    if bool(cot_mask[:, -1].any()):
        raise ValueError("cot_mask is True at the last position, which has no next token")

    hidden = decoder_hidden_states(model, input_ids, attention_mask)
    flat_hidden = hidden.reshape(b * t, -1)
    next_tokens = torch.cat([input_ids[:, 1:], input_ids.new_full((b, 1), IGNORE_INDEX)], dim=1).reshape(-1)

    cot_rows = cot_mask.reshape(-1).nonzero().squeeze(1)
    score_rows = torch.arange(b, device=device) * t + score_pos
    rows = torch.cat([cot_rows, score_rows])
    n_cot = cot_rows.numel()
    is_score_row = torch.zeros(rows.numel(), dtype=torch.bool, device=device)
    is_score_row[n_cot:] = True
    row_targets = next_tokens.index_select(0, rows)
    row_targets[n_cot:] = IGNORE_INDEX  # the score token is not part of the CoT log-probs
    score_targets = None
    if targets is not None:
        score_targets = torch.zeros(rows.numel(), dtype=torch.float32, device=device)
        score_targets[n_cot:] = targets

    out = judge_head(
        flat_hidden.index_select(0, rows),
        lm_head_weight(model),
        row_targets,
        score_token_ids,
        score_values,
        score_targets=score_targets,
        score_mask=is_score_row if targets is not None else None,
        normalize=normalize,
        temperature=_effective_temperature(model, temperature),
        return_entropy=return_entropy,
        backend=backend,
    )
    cot_logprobs = _scatter_rows(out.logprobs[:n_cot], cot_rows, b, t)
    cot_entropy = _scatter_rows(out.entropy[:n_cot], cot_rows, b, t) if return_entropy else None
    return HFJudgeOutput(
        cot_logprobs=cot_logprobs,
        score_logprobs=out.score_logprobs[n_cot:],
        expected_score=out.expected_score[n_cot:],
        sq_error=out.sq_error[n_cot:],
        cot_entropy=cot_entropy,
    )
