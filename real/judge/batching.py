"""Teacher-forced judge batches: prompt + CoT + marker + the true score token, and their masks.

Every objective (REAL, RAFT, TRACT, GRPO) and RAIL inference scores a sequence
laid out the same way::

    [prompt tokens][CoT tokens ... marker][score token k*][padding]
                  ^ cot_mask covers the positions that predict a CoT token
                                       ^ score_pos predicts the score token

A sampled CoT is cut at its own score marker (what it wrote after the marker,
its own score, is dropped) and the marker plus the *true* score token are
appended, as the released REAL code does, so the score position always sits
right after the marker whatever the policy wrote.  Padding is on the right.
Over-long prompts keep their end (the rubric and the ``###Feedback:`` cue) and
over-long CoTs keep their start; both warn.

A step's batch is trained in mini-batches (one optimizer update each,
``mini_batch_plan``) of micro-batches: ``micro_batch_ranges`` cuts rows into
contiguous ranges under a token budget (whole prompt groups where the loss needs
them), ``slice_batch`` cuts one range out.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import List, Optional, Sequence, Tuple, Union

import torch

from real.judge.prompts import SCORE_MARKER


@dataclass
class TeacherForcedBatch:
    """Right-padded token ids and the positions the judge losses read."""

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long, 1 on real tokens
    cot_mask: torch.Tensor  # [B, T] bool, True at t when token t+1 is a CoT token (score token excluded)
    score_pos: torch.Tensor  # [B] long, position whose next token is the score token
    score_token: torch.Tensor  # [B] long, id of the true score token k* (-100 without targets)
    score_index: torch.Tensor  # [B] long, index of k* in score_token_ids (-100 without targets)
    targets: torch.Tensor  # [B] float ground truth (NaN without targets)
    prompt_lengths: torch.Tensor  # [B] long, prompt tokens after truncation

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "TeacherForcedBatch":
        return TeacherForcedBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def cot_lengths(self) -> torch.Tensor:
        """[B] number of CoT tokens (marker included, score token excluded)."""
        return self.cot_mask.sum(dim=1)


def score_indices(targets, score_values: Sequence[float]) -> List[int]:
    """Index of k* for each target: the score value nearest to round(target) (halves round up)."""
    values = [float(v) for v in score_values]
    if not values:
        raise ValueError("score_values must not be empty")
    out = []
    for i, target in enumerate(targets):
        target = float(target)
        if not math.isfinite(target):
            raise ValueError(f"targets[{i}] is {target}: ground-truth scores must be finite")
        rounded = math.floor(target + 0.5)
        out.append(min(range(len(values)), key=lambda j: (abs(values[j] - rounded), j)))
    return out


def _encode(tokenizer, text: str, special: bool) -> List[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def cut_at_marker(cot: str, marker: str = SCORE_MARKER) -> str:
    """The CoT before its first marker, trailing whitespace removed."""
    if not isinstance(cot, str):
        raise ValueError(f"a CoT must be a string, got {type(cot).__name__}")
    return cot.split(marker, 1)[0].rstrip()


def _score_suffix(tokenizer, score_token: int, body_empty: bool, marker: str) -> List[int]:
    """Tokens between the CoT body and the score token: the marker (and a space token if the
    tokenizer keeps spaces apart), read in context so the score token follows as it would in text."""
    value_text = tokenizer.decode([score_token]).strip()
    lead = "" if body_empty else " "
    context = _encode(tokenizer, f"{lead}{marker} {value_text}", special=False)
    if context and context[-1] == score_token:
        return context[:-1]
    return _encode(tokenizer, f"{lead}{marker}", special=False)


def truncate_prompt_ids(ids: List[int], limit: int, bos_id: Optional[int]) -> List[int]:
    """The last ``limit`` tokens of a prompt (its rubric and the feedback cue), keeping a leading BOS."""
    if bos_id is not None and ids and ids[0] == bos_id and limit > 1:
        return ids[:1] + ids[len(ids) - (limit - 1):]
    return ids[len(ids) - limit:]


def build_teacher_forced_batch(
    tokenizer,
    prompts: Sequence[str],
    cots: Optional[Sequence[Optional[str]]],
    targets: Optional[Sequence[float]],
    score_token_ids: Sequence[int],
    score_values: Sequence[float],
    *,
    max_prompt_tokens: int = 2048,
    max_cot_tokens: int = 1024,
    marker: str = SCORE_MARKER,
    device: Union[str, torch.device] = "cpu",
) -> TeacherForcedBatch:
    """Tokenise prompt + CoT (cut at its marker) + marker + true score token, right-padded.

    ``cots`` None (or a None entry) means no CoT and no marker: the score is
    predicted right after the prompt (RAFT).  ``targets`` None builds the
    sequences without a score token (RAIL inference): ``score_pos`` is then the
    last real position, ``score_token``/``score_index`` are -100 and
    ``targets`` NaN.  ``max_cot_tokens`` counts the CoT with its marker.
    """
    prompts = list(prompts)
    n = len(prompts)
    if n == 0:
        raise ValueError("prompts is empty")
    cots = [None] * n if cots is None else list(cots)
    if len(cots) != n:
        raise ValueError(f"cots has {len(cots)} entries but prompts has {n}")
    if targets is not None:
        targets = [float(t) for t in targets]
        if len(targets) != n:
            raise ValueError(f"targets has {len(targets)} entries but prompts has {n}")
    score_token_ids = [int(i) for i in score_token_ids]
    if len(score_token_ids) != len(score_values):
        raise ValueError(f"score_token_ids has {len(score_token_ids)} ids but score_values has {len(score_values)}")
    if max_prompt_tokens < 1 or max_cot_tokens < 1:
        raise ValueError(f"max_prompt_tokens and max_cot_tokens must be >= 1, got {max_prompt_tokens}, {max_cot_tokens}")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad_token_id; set tokenizer.pad_token (e.g. to the eos token)")
    indices = score_indices(targets, score_values) if targets is not None else [None] * n

    rows, prompt_lengths, cot_lengths = [], [], []
    cut_prompts, cut_cots = 0, 0
    for i, (prompt, cot, index) in enumerate(zip(prompts, cots, indices)):
        if not isinstance(prompt, str):
            raise ValueError(f"prompts[{i}] must be a string, got {type(prompt).__name__}")
        prompt_ids = _encode(tokenizer, prompt, special=True)
        if len(prompt_ids) > max_prompt_tokens:
            prompt_ids = truncate_prompt_ids(prompt_ids, max_prompt_tokens, tokenizer.bos_token_id)
            cut_prompts += 1
        if not prompt_ids:
            raise ValueError(f"prompts[{i}] tokenises to no tokens")
        score_token = score_token_ids[index] if index is not None else None
        cot_ids: List[int] = []
        if cot is not None:
            body = cut_at_marker(cot, marker)
            if score_token is not None:
                suffix = _score_suffix(tokenizer, score_token, body == "", marker)
            else:
                suffix = _encode(tokenizer, f"{' ' if body else ''}{marker}", special=False)
            body_ids = _encode(tokenizer, body, special=False) if body else []
            room = max(max_cot_tokens - len(suffix), 0)
            if len(body_ids) > room:
                body_ids = body_ids[:room]
                cut_cots += 1
            cot_ids = body_ids + suffix
        ids = prompt_ids + cot_ids + ([score_token] if score_token is not None else [])
        rows.append(ids)
        prompt_lengths.append(len(prompt_ids))
        cot_lengths.append(len(cot_ids))
    if cut_prompts:
        warnings.warn(
            f"{cut_prompts} of {n} prompts were longer than max_prompt_tokens={max_prompt_tokens} tokens and were "
            "cut to their last tokens", stacklevel=2)
    if cut_cots:
        warnings.warn(
            f"{cut_cots} of {n} CoTs were longer than max_cot_tokens={max_cot_tokens} tokens (marker included) and "
            "were cut before the marker", stacklevel=2)

    width = max(len(r) for r in rows)
    input_ids = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    cot_mask = torch.zeros((n, width), dtype=torch.bool)
    score_pos = torch.empty(n, dtype=torch.long)
    for b, (ids, p, c) in enumerate(zip(rows, prompt_lengths, cot_lengths)):
        input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, : len(ids)] = 1
        cot_mask[b, p - 1 : p - 1 + c] = True  # positions p-1 .. p+c-2 predict CoT tokens p .. p+c-1
        score_pos[b] = p + c - 1
    no_target = targets is None
    return TeacherForcedBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        cot_mask=cot_mask,
        score_pos=score_pos,
        score_token=torch.tensor([-100 if no_target else score_token_ids[j] for j in indices], dtype=torch.long),
        score_index=torch.tensor([-100 if no_target else j for j in indices], dtype=torch.long),
        targets=torch.tensor([math.nan] * n if no_target else targets, dtype=torch.float32),
        prompt_lengths=torch.tensor(prompt_lengths, dtype=torch.long),
    ).to(device)


# --- micro-batches -----------------------------------------------------------------------

def micro_batch_ranges(lengths: Sequence[int], group_size: int, token_budget: int,
                       split_groups: bool) -> List[Tuple[int, int]]:
    """Contiguous row ranges ``[start, end)`` whose rows x longest length fit ``token_budget``.

    Whole groups stay together (the losses normalise within a group); a group
    too big for the budget is split into rows only when ``split_groups`` (its
    advantages are then computed beforehand).  A single sequence longer than
    the budget cannot be trained at all: that is an error.
    """
    lengths = [int(x) for x in lengths]
    longest = max(lengths)
    if longest > token_budget:
        raise ValueError(
            f"a sequence of {longest} tokens does not fit --micro-batch-tokens {token_budget}; raise the budget or "
            "lower --max-prompt-tokens / --max-cot-tokens / --max-new-tokens")
    units = [(s, s + group_size) for s in range(0, len(lengths), group_size)]
    expanded: List[Tuple[int, int]] = []
    for s, e in units:
        if (e - s) * max(lengths[s:e]) > token_budget:
            if not split_groups:
                raise ValueError(
                    f"a group of {e - s} sequences of up to {max(lengths[s:e])} tokens does not fit "
                    f"--micro-batch-tokens {token_budget} and this method needs whole groups per micro-batch; "
                    "raise the budget, lower --group-size, or shorten the sequences")
            expanded.extend((r, r + 1) for r in range(s, e))
        else:
            expanded.append((s, e))
    ranges: List[Tuple[int, int]] = []
    start, end, width = expanded[0][0], expanded[0][0], 0
    for s, e in expanded:
        new_width = max(width, max(lengths[s:e]))
        if end > start and (e - start) * new_width > token_budget:
            ranges.append((start, end))
            start, width = s, max(lengths[s:e])
        else:
            width = new_width
        end = e
    ranges.append((start, end))
    return ranges


def mini_batch_plan(lengths: Sequence[int], group_size: int, token_budget: int, split_groups: bool,
                    rows_per_update: int = 0) -> List[List[Tuple[int, int]]]:
    """The micro-batch ranges of each optimizer update's mini-batch: consecutive runs of
    ``rows_per_update`` rows (0: all rows, one mini-batch), each cut by ``micro_batch_ranges``."""
    if isinstance(rows_per_update, bool) or not isinstance(rows_per_update, int) or rows_per_update < 0:
        raise ValueError(f"rows_per_update must be an int >= 0, got {rows_per_update!r}")
    n = len(lengths)
    size = rows_per_update or n
    if size % group_size:
        raise ValueError(f"rows_per_update={rows_per_update} is not a whole number of groups of {group_size}")
    plan = []
    for start in range(0, n, size):
        end = min(n, start + size)
        ranges = micro_batch_ranges(lengths[start:end], group_size, token_budget, split_groups)
        plan.append([(start + s, start + e) for s, e in ranges])
    return plan


def slice_batch(batch: TeacherForcedBatch, start: int, end: int) -> TeacherForcedBatch:
    """Rows ``[start, end)``, columns cut to the longest of them (right padding)."""
    width = int(batch.attention_mask[start:end].sum(1).max())
    two_d = {"input_ids", "attention_mask", "cot_mask"}
    kwargs = {}
    for name in batch.__dataclass_fields__:
        value = getattr(batch, name)[start:end]
        kwargs[name] = value[:, :width] if name in two_d else value
    return TeacherForcedBatch(**kwargs)
