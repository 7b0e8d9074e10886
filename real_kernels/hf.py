"""Run a transformers causal LM to hidden states, never to logits, and apply the fused head.

A plain trainer calls ``model(input_ids).logits`` and pays ``[B, T, V]`` fp32
memory (and as much again for its gradient).  Here the decoder body runs alone
(``model.get_decoder()``, through a peft/LoRA wrapper if there is one), the LM
head module is never called, and its weight goes to ``linear_logprobs`` /
``judge_head`` with only the rows that are needed: every next-token row for
``token_logprobs`` (or the ones a mask keeps), the CoT rows plus one score row
per sequence for ``judge_outputs``.  Works with tied embeddings (the output
embedding *is* the input embedding then) and under ``torch.no_grad()`` for
reference / old-policy log-probs.  ``hf.patch(model)`` (in ``hf_patch``, imported
here) makes the model's own ``model(..., labels=labels)`` loss go the same way.

This module must not import ``real`` (the algorithm layer sits on top of it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from .functional import judge_head, linear_logprobs
from .core.outputs import LinearLogprobsOutput
from .core.sizing import default_chunk_size, plan_chunks
from .hf_model import decoder_of, effective_temperature, lm_head_weight
from .hf_patch import SUPPORTED_MODEL_TYPES, causal_lm_loss, is_patched, patch, unpatch  # noqa: F401 (hf.patch & co.)
from . import loss as loss_mode  # called as loss_mode.judge_loss, so a patch of real_kernels.loss reaches it

IGNORE_INDEX = -100


def head_inputs(hidden: torch.Tensor, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The hidden rows and LM-head weight as the head should take them: under ``torch.autocast`` (mixed
    precision: e.g. fp32 parameters, bf16 compute) both cast to the autocast dtype, since the fused head
    disables autocast and runs its GEMMs in its inputs' dtype (its dW comes back in that dtype, accumulated
    in fp32, and the cast's backward hands it to the fp32 weight); else as they are."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight
    dtype = torch.get_autocast_dtype(device_type)
    return hidden.to(dtype), weight.to(dtype)


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
    out = decoder_of(model)(input_ids=input_ids, use_cache=False, **kwargs)
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
    head_hidden, weight = head_inputs(hidden.reshape(b * (t - 1), -1).index_select(0, rows), lm_head_weight(model))
    out = linear_logprobs(
        head_hidden,
        weight,
        input_ids[:, 1:].reshape(-1).index_select(0, rows),
        temperature=effective_temperature(model, temperature),
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
    rows = _judge_rows(model, input_ids, attention_mask, targets, score_pos, cot_mask, score_first=False)
    hidden, weight = head_inputs(rows.hidden, lm_head_weight(model))
    out = judge_head(
        hidden, weight, rows.targets, score_token_ids, score_values,
        score_targets=rows.score_targets, score_mask=rows.score_mask, normalize=normalize,
        temperature=effective_temperature(model, temperature), return_entropy=return_entropy, backend=backend,
    )
    return rows.per_sequence(out, return_entropy)


@dataclass
class _JudgeRows:
    """The head's rows of a teacher-forced batch: the CoT rows and one score row per sequence."""

    hidden: torch.Tensor  # [R, H], differentiable into the decoder
    targets: torch.Tensor  # [R] next token on CoT rows, IGNORE_INDEX on score rows
    score_targets: Optional[torch.Tensor]  # [R] y* on score rows, 0 elsewhere; None without targets
    score_mask: Optional[torch.Tensor]  # [R] True on score rows; None without targets
    cot_rows: torch.Tensor  # flat [B * T] positions of the CoT rows
    score_slice: slice  # where the score rows sit among the R rows
    cot_slice: slice
    shape: tuple  # (B, T)

    def per_sequence(self, out, return_entropy: bool) -> HFJudgeOutput:
        b, t = self.shape
        return HFJudgeOutput(
            cot_logprobs=_scatter_rows(out.logprobs[self.cot_slice], self.cot_rows, b, t),
            score_logprobs=out.score_logprobs[self.score_slice],
            expected_score=out.expected_score[self.score_slice],
            sq_error=out.sq_error[self.score_slice],
            cot_entropy=_scatter_rows(out.entropy[self.cot_slice], self.cot_rows, b, t) if return_entropy else None,
        )


def _judge_rows(model, input_ids, attention_mask, targets, score_pos, cot_mask, score_first: bool = False,
                chunks: Optional[list] = None) -> _JudgeRows:
    """The head's rows of a batch: all CoT rows then all score rows (``score_first``: the other way round),
    or with ``chunks`` (``(first sequence, end sequence, first CoT row, end CoT row)`` each, covering the
    batch in order) chunk by chunk, each chunk's score rows then its CoT rows (``score_slice`` and
    ``cot_slice`` are then None)."""
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
    next_tokens = torch.cat([input_ids[:, 1:], input_ids.new_full((b, 1), IGNORE_INDEX)], dim=1).reshape(-1)
    cot_rows = cot_mask.reshape(-1).nonzero().squeeze(1)
    score_rows = torch.arange(b, device=device) * t + score_pos
    n_cot = cot_rows.numel()
    is_score_row = torch.zeros(b + n_cot, dtype=torch.bool, device=device)
    if chunks is None:
        if score_first:
            rows = torch.cat([score_rows, cot_rows])
            score_slice, cot_slice = slice(0, b), slice(b, b + n_cot)
        else:
            rows = torch.cat([cot_rows, score_rows])
            score_slice, cot_slice = slice(n_cot, n_cot + b), slice(0, n_cot)
        is_score_row[score_slice] = True
    else:
        pieces, start = [], 0
        for s0, s1, c0, c1 in chunks:
            pieces += [score_rows[s0:s1], cot_rows[c0:c1]]
            is_score_row[start:start + s1 - s0] = True
            start += s1 - s0 + c1 - c0
        rows = torch.cat(pieces)
        score_slice = cot_slice = None
    row_targets = torch.where(is_score_row, IGNORE_INDEX, next_tokens.index_select(0, rows))
    score_targets = None
    if targets is not None:  # the score token is not part of the CoT log-probs (IGNORE_INDEX above)
        score_targets = torch.zeros(rows.numel(), dtype=torch.float32, device=device)
        score_targets[is_score_row] = targets
    return _JudgeRows(
        hidden=hidden.reshape(b * t, -1).index_select(0, rows), targets=row_targets, score_targets=score_targets,
        score_mask=is_score_row if targets is not None else None, cot_rows=cot_rows, score_slice=score_slice,
        cot_slice=cot_slice, shape=(b, t),
    )


def judge_loss_outputs(
    model,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    targets: Optional[torch.Tensor],
    score_token_ids,
    score_values,
    loss_fn: Callable[[HFJudgeOutput, slice], torch.Tensor],
    *,
    score_pos: torch.Tensor,
    cot_mask: Optional[torch.Tensor] = None,
    normalize: bool = False,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    sequence_group: int = 1,
    backend: str = "auto",
) -> Tuple[torch.Tensor, HFJudgeOutput]:
    """``judge_outputs`` in loss mode (``real_kernels.judge_loss``): gradients formed in the forward.

    The head's chunks hold whole sequences (whole runs of ``sequence_group``
    consecutive sequences, e.g. a prompt's group of rollouts; a run larger than
    the chunk size gets a chunk of its own), so ``loss_fn(view, seqs)`` runs
    once per chunk on the per-sequence outputs of the chunk's sequences
    ``seqs`` (a slice of the batch's rows): ``view`` holds ``[S, T]`` CoT
    log-probs and ``[S]`` / ``[S, m]`` score outputs, all differentiable.  The
    loss must be a sum over its sequences (normalised by batch constants), so
    that the chunks' losses add up to the batch loss.  Returns ``(loss,
    outputs)``: ``loss`` the sum of the chunks' losses (its ``backward()``
    hands back the gradients formed in the forward), ``outputs`` the detached
    per-sequence outputs of the whole batch.  Per chunk nothing is read back
    to the host; the plan is made once, before the chunk loop.
    """
    b, t = input_ids.shape
    if b == 0:
        raise ValueError("input_ids holds no sequences: loss mode needs at least one")
    if isinstance(sequence_group, bool) or not isinstance(sequence_group, int) or sequence_group < 1:
        raise ValueError(f"sequence_group must be a positive int, got {sequence_group!r}")
    if b % sequence_group:
        raise ValueError(f"sequence_group={sequence_group} does not divide the batch's {b} sequences")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if cot_mask is not None and tuple(cot_mask.shape) != (b, t):
        raise ValueError(f"cot_mask must have shape {(b, t)}, got {tuple(cot_mask.shape)}")
    cot_counts = [0] * b if cot_mask is None else [int(c) for c in cot_mask.sum(1).tolist()]
    group_rows = [sum(cot_counts[g:g + sequence_group]) + sequence_group for g in range(0, b, sequence_group)]
    weight = lm_head_weight(model)
    mixed = torch.is_autocast_enabled(input_ids.device.type)  # mixed precision: the head in the compute dtype
    if mixed:
        weight = weight.to(torch.get_autocast_dtype(input_ids.device.type))
    device, vocab, n = input_ids.device, weight.shape[0], sum(group_rows)
    size = chunk_size or default_chunk_size(n, vocab, device, weight.dtype)
    plan = plan_chunks(n, vocab, device, weight.dtype, row_groups=group_rows, chunk_size=size)
    chunks, row_start, seq, cot = [], 0, 0, 0  # (s0, s1, c0, c1) of each planned chunk
    for rows in plan:
        s0, c0 = seq, cot
        while row_start < rows.stop:
            end = seq + sequence_group
            row_start += sum(cot_counts[seq:end]) + sequence_group
            cot += sum(cot_counts[seq:end])
            seq = end
        chunks.append((s0, seq, c0, cot))
    head_rows = _judge_rows(model, input_ids, attention_mask, targets, score_pos, cot_mask, chunks=chunks)
    by_start = {rows.start: (rows, chunk) for rows, chunk in zip(plan, chunks)}
    cot_rows = head_rows.cot_rows
    views = []

    def chunk_loss(out, rows: slice) -> torch.Tensor:
        planned, (s0, s1, c0, c1) = by_start.get(rows.start, (None, (0, 0, 0, 0)))
        if planned != rows:
            raise RuntimeError(f"judge_loss ran the rows {rows}, which are not a planned chunk of whole sequences")
        n_seq = s1 - s0
        at = cot_rows[c0:c1] - s0 * t  # the chunk's CoT rows in its [S, T] layout

        def per_sequence(values):
            return values.new_zeros(n_seq * t).index_put((at,), values[n_seq:]).view(n_seq, t)

        view = HFJudgeOutput(
            cot_logprobs=per_sequence(out.logprobs), score_logprobs=out.score_logprobs[:n_seq],
            expected_score=out.expected_score[:n_seq], sq_error=out.sq_error[:n_seq],
            cot_entropy=per_sequence(out.entropy) if out.entropy is not None else None,
        )
        views.append(HFJudgeOutput(*(None if v is None else v.detach() for v in (
            view.cot_logprobs, view.score_logprobs, view.expected_score, view.sq_error, view.cot_entropy))))
        return loss_fn(view, slice(s0, s1))

    loss, _ = loss_mode.judge_loss(
        head_rows.hidden.to(weight.dtype) if mixed else head_rows.hidden, weight, head_rows.targets, chunk_loss, score_token_ids=score_token_ids,
        score_values=score_values, score_targets=head_rows.score_targets, score_mask=head_rows.score_mask,
        normalize=normalize, temperature=effective_temperature(model, temperature), return_entropy=return_entropy,
        chunk_size=size, row_groups=[rows.stop - rows.start for rows in plan], backend=backend,
    )
    names = ("cot_logprobs", "score_logprobs", "expected_score", "sq_error", "cot_entropy")
    whole = {k: None if getattr(views[0], k) is None else torch.cat([getattr(v, k) for v in views]) for k in names}
    return loss, HFJudgeOutput(**whole)
