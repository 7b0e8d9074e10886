"""Argument checks shared by every backend.

The kernels index memory with the targets and score ids, so a bad id must be
caught here, as a ValueError naming the argument, before it can become a silent
NaN or a CUDA illegal-address error.  The kernels also index the per-row
tensors (targets, score targets, score mask) as dense arrays: they leave here
contiguous, in the dtype the kernels read, whatever strides, offset or integer
width they came with.  ``hidden`` and ``weight`` keep their layout (the kernels
take their row strides; see ``unit_column_stride``).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("auto", "triton", "torch", "reference")
MEMORY_MODES = ("auto", "low", "high")  # the Triton head's forward (ops/fused_head.py)

IdsLike = Union[torch.Tensor, Sequence[int]]
ValuesLike = Union[torch.Tensor, Sequence[float]]


@dataclass
class HeadArgs:
    """Validated, normalised arguments of one head call (every index / per-row tensor contiguous)."""

    hidden: torch.Tensor  # [N, H], any strides
    weight: torch.Tensor  # [V, H], any strides
    targets: torch.Tensor  # int64 [N], contiguous
    score_ids: torch.Tensor  # int64 [m] (m may be 0 for linear_logprobs), contiguous
    score_values: torch.Tensor  # fp32 [m], contiguous
    score_targets: Optional[torch.Tensor]  # fp32 [N], contiguous, detached
    score_mask: Optional[torch.Tensor]  # bool [N], contiguous
    normalize: bool
    temperature: float
    ignore_index: int
    return_entropy: bool


def _check_tensor(name: str, x, ndim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(x.shape)}")
    return x


def _check_device(name: str, x: torch.Tensor, device: torch.device) -> None:
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but hidden is on {device}: all tensors must share a device")


def validate_head_args(
    hidden,
    weight,
    targets,
    score_token_ids: Optional[IdsLike] = None,
    score_values: Optional[ValuesLike] = None,
    *,
    score_targets=None,
    score_mask=None,
    normalize: bool = False,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    need_scores: bool = True,
) -> HeadArgs:
    hidden = _check_tensor("hidden", hidden, 2)
    weight = _check_tensor("weight", weight, 2)
    targets = _check_tensor("targets", targets, 1)
    device = hidden.device
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match hidden dtype {hidden.dtype}")
    _check_device("weight", weight, device)
    _check_device("targets", targets, device)
    n, h = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != h:
        raise ValueError(f"weight must be [V, H] with H = {h} (hidden's last dim), got shape {tuple(weight.shape)}")
    if v == 0 or h == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")
    if targets.shape[0] != n:
        raise ValueError(f"targets must have shape [{n}] to match hidden, got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    targets = targets.to(torch.long).contiguous()
    if n > 0:
        bad = ((targets < 0) | (targets >= v)) & (targets != ignore_index)
        if bool(bad.any()):
            first = int(targets[bad][0])
            raise ValueError(f"targets contains {first}, outside [0, {v}) and not ignore_index ({ignore_index})")

    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")

    if need_scores:
        ids, values = _validate_scores(score_token_ids, score_values, v, device)
    else:
        ids = torch.empty(0, dtype=torch.long, device=device)
        values = torch.empty(0, dtype=torch.float32, device=device)

    if score_targets is not None:
        score_targets = _check_tensor("score_targets", score_targets, 1)
        _check_device("score_targets", score_targets, device)
        if score_targets.shape[0] != n:
            raise ValueError(f"score_targets must have shape [{n}], got {tuple(score_targets.shape)}")
        score_targets = score_targets.detach().to(torch.float32).contiguous()
    if score_mask is not None:
        score_mask = _check_tensor("score_mask", score_mask, 1)
        _check_device("score_mask", score_mask, device)
        if score_mask.shape[0] != n:
            raise ValueError(f"score_mask must have shape [{n}], got {tuple(score_mask.shape)}")
        if score_mask.dtype != torch.bool:
            raise TypeError(f"score_mask must be a bool tensor, got {score_mask.dtype}")
        if score_targets is None:
            raise ValueError("score_mask was given without score_targets")
        score_mask = score_mask.contiguous()
    return HeadArgs(
        hidden, weight, targets, ids, values, score_targets, score_mask,
        bool(normalize), float(temperature), int(ignore_index), bool(return_entropy),
    )


def _validate_scores(score_token_ids, score_values, vocab: int, device: torch.device):
    if score_token_ids is None:
        raise ValueError("score_token_ids is required")
    if score_values is None:
        raise ValueError("score_values is required")
    if isinstance(score_token_ids, torch.Tensor):
        if score_token_ids.dtype.is_floating_point or score_token_ids.dtype == torch.bool:
            raise TypeError(f"score_token_ids must be integers, got {score_token_ids.dtype}")
        if score_token_ids.dim() != 1:
            raise ValueError(f"score_token_ids must be 1-D, got shape {tuple(score_token_ids.shape)}")
        _check_device("score_token_ids", score_token_ids, device)
        ids_list = [int(i) for i in score_token_ids.tolist()]
    else:
        try:
            ids_list = [_token_id(i) for i in score_token_ids]
        except TypeError as exc:
            raise TypeError(f"score_token_ids must be a sequence of ints: {exc}") from None
    if len(ids_list) == 0:
        raise ValueError("score_token_ids is empty: give at least one score token id")
    if len(set(ids_list)) != len(ids_list):
        raise ValueError(f"score_token_ids has duplicate ids: {ids_list}")
    out_of_range = [i for i in ids_list if i < 0 or i >= vocab]
    if out_of_range:
        raise ValueError(f"score_token_ids {out_of_range} are outside [0, {vocab})")

    if isinstance(score_values, torch.Tensor):
        if score_values.dim() != 1:
            raise ValueError(f"score_values must be 1-D, got shape {tuple(score_values.shape)}")
        _check_device("score_values", score_values, device)
        vals_list = [float(x) for x in score_values.tolist()]
    else:
        try:
            vals_list = [float(x) for x in score_values]
        except (TypeError, ValueError) as exc:
            raise TypeError(f"score_values must be a sequence of numbers: {exc}") from None
    if len(vals_list) != len(ids_list):
        raise ValueError(f"score_values has {len(vals_list)} entries but score_token_ids has {len(ids_list)}")
    if not all(math.isfinite(x) for x in vals_list):
        raise ValueError(f"score_values must be finite, got {vals_list}")
    ids = torch.tensor(ids_list, dtype=torch.long, device=device)
    values = torch.tensor(vals_list, dtype=torch.float32, device=device)
    return ids, values


def _token_id(i) -> int:
    """An integer id; a float (even 10.0, as a float tensor is refused), bool or string is refused, not truncated."""
    if isinstance(i, bool) or (isinstance(i, torch.Tensor) and i.dtype == torch.bool):
        raise TypeError(f"got the bool {i}")
    try:
        return operator.index(i)
    except TypeError:
        raise TypeError(f"got {i!r} ({type(i).__name__})") from None


def unit_column_stride(x: torch.Tensor) -> torch.Tensor:
    """x itself when its columns are adjacent in memory (what kernels taking a row stride need), else a copy.

    A weight that is a row range of a larger table (tied embeddings) or a column slice of a wider
    matrix is read in place; only a column-major layout costs a copy.
    """
    return x if x.stride(1) == 1 or x.shape[1] <= 1 else x.contiguous()


def first_order_only(backend: str) -> None:
    """Call first in a fused backward: it computes gradients without a graph of its own, so
    ``create_graph=True`` (grad mode is on in backward only then) would silently lose the second order."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"backend={backend!r} supports first-order gradients only: its backward is a fused pass with no "
            "graph of its own, so create_graph=True (double backward, Hessian-vector products, gradient "
            "penalties) cannot go through it; use backend='reference' for higher-order gradients"
        )


def check_memory(memory) -> None:
    if not isinstance(memory, str) or memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")


def resolve_backend(backend: str, hidden: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if hidden.is_cuda else "torch"
    return backend
