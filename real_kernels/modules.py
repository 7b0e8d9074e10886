"""``JudgeHead`` and ``JudgeLoss``: the fused head as ``torch.nn.Module``s, for code built from modules.

Training code written around ``nn.Module`` losses (as Liger's
``LigerFusedLinearCrossEntropyLoss`` or ``torch.nn.CrossEntropyLoss``) wants
the head's configuration fixed once and the per-batch tensors passed to
``forward``.  These modules do that over ``judge_head`` / ``judge_loss``: the
score token ids and values, ``normalize``, ``temperature``, ``ignore_index``,
``return_entropy`` and ``backend`` are checked when the module is built (a bad
one is a ``TypeError`` / ``ValueError`` naming the argument, at construction,
not at the first batch); ``forward`` takes ``hidden [N, H]``, the LM-head
``weight [V, H]`` and ``targets [N]`` (plus the score targets and mask).  The
modules hold no parameters and no buffers: the LM-head weight stays owned by
the model, and the score ids go to whatever device ``hidden`` is on.
"""
from __future__ import annotations

import math
import operator
from typing import Callable, Optional, Tuple

import torch

from .functional import judge_head
from .loss import judge_loss
from .core.outputs import JudgeHeadOutput
from .core.validation import BACKENDS, IdsLike, ValuesLike

LossFn = Callable[[JudgeHeadOutput, slice], torch.Tensor]


def _score_ids(score_token_ids) -> Tuple[int, ...]:
    if isinstance(score_token_ids, torch.Tensor):
        if score_token_ids.dtype.is_floating_point or score_token_ids.dtype == torch.bool:
            raise TypeError(f"score_token_ids must be integers, got a {score_token_ids.dtype} tensor")
        if score_token_ids.dim() != 1:
            raise ValueError(f"score_token_ids must be 1-D, got shape {tuple(score_token_ids.shape)}")
        score_token_ids = score_token_ids.tolist()
    if isinstance(score_token_ids, (str, bytes)):
        raise TypeError(f"score_token_ids must be a sequence of ints, got the string {score_token_ids!r}")
    try:
        items = list(score_token_ids)
    except TypeError:
        raise TypeError(f"score_token_ids must be a sequence of ints, got {type(score_token_ids).__name__}") from None
    ids = []
    for i in items:
        if isinstance(i, bool):
            raise TypeError(f"score_token_ids must be a sequence of ints, got the bool {i}")
        try:
            ids.append(operator.index(i))
        except TypeError:
            raise TypeError(f"score_token_ids must be a sequence of ints, got {i!r} ({type(i).__name__})") from None
    if not ids:
        raise ValueError("score_token_ids is empty: give at least one score token id")
    if len(set(ids)) != len(ids):
        raise ValueError(f"score_token_ids has duplicate ids: {ids}")
    negative = [i for i in ids if i < 0]
    if negative:
        raise ValueError(f"score_token_ids must be vocabulary ids >= 0, got {negative}")
    return tuple(ids)


def _score_values(score_values, count: int) -> Tuple[float, ...]:
    if isinstance(score_values, torch.Tensor):
        if score_values.dim() != 1:
            raise ValueError(f"score_values must be 1-D, got shape {tuple(score_values.shape)}")
        score_values = score_values.tolist()
    if isinstance(score_values, (str, bytes)):
        raise TypeError(f"score_values must be a sequence of numbers, got the string {score_values!r}")
    try:
        values = tuple(float(v) for v in score_values)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"score_values must be a sequence of numbers: {exc}") from None
    if len(values) != count:
        raise ValueError(f"score_values has {len(values)} entries but score_token_ids has {count}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"score_values must be finite, got {list(values)}")
    return values


def _check_options(temperature, ignore_index, backend, chunk_size=None) -> Tuple[float, int]:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return float(temperature), int(ignore_index)


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


class JudgeHead(torch.nn.Module):
    """``judge_head`` as a module: ``JudgeHead(ids, values)(hidden, weight, targets) -> JudgeHeadOutput``.

    Differentiable w.r.t. ``hidden`` and ``weight`` for any upstream gradient
    (its backward computes the logits again); see ``real_kernels.judge_head``.
    """

    def __init__(
        self,
        score_token_ids: IdsLike,
        score_values: ValuesLike,
        *,
        normalize: bool = False,
        temperature: float = 1.0,
        ignore_index: int = -100,
        return_entropy: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.score_token_ids = _score_ids(score_token_ids)
        self.score_values = _score_values(score_values, len(self.score_token_ids))
        self.normalize = _check_flag("normalize", normalize)
        self.return_entropy = _check_flag("return_entropy", return_entropy)
        self.temperature, self.ignore_index = _check_options(temperature, ignore_index, backend)
        self.backend = backend

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        score_targets: Optional[torch.Tensor] = None,
        score_mask: Optional[torch.Tensor] = None,
    ) -> JudgeHeadOutput:
        return judge_head(
            hidden, weight, targets, self.score_token_ids, self.score_values, score_targets=score_targets,
            score_mask=score_mask, normalize=self.normalize, temperature=self.temperature,
            ignore_index=self.ignore_index, return_entropy=self.return_entropy, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"score_token_ids={list(self.score_token_ids)}, score_values={list(self.score_values)}, "
                f"normalize={self.normalize}, temperature={self.temperature}, ignore_index={self.ignore_index}, "
                f"return_entropy={self.return_entropy}, backend={self.backend!r}")


def token_mean_cross_entropy(targets: torch.Tensor, ignore_index: int) -> LossFn:
    """The causal-LM loss as a ``judge_loss`` loss_fn: ``-sum(log p(target)) / #targets != ignore_index``.

    (``torch.nn.CrossEntropyLoss()``'s mean; 0 when every target is ignored,
    where ``cross_entropy`` would give 0/0 = NaN.)
    """
    count = int((targets != ignore_index).sum())
    return lambda out, rows: -out.logprobs.sum() / max(count, 1)


class JudgeLoss(torch.nn.Module):
    """``judge_loss`` as a module: ``JudgeLoss(loss_fn, ...)(hidden, weight, targets) -> (loss, outputs)``.

    ``loss_fn(chunk_out, rows)`` is a sum of per-row terms (see
    ``real_kernels.judge_loss``); it may be given per call to ``forward``
    instead (a closure over this batch's advantages), which then takes
    precedence.  With neither, the loss is the token-mean cross-entropy of
    ``targets`` (what ``torch.nn.CrossEntropyLoss`` on the logits gives, with 0
    instead of NaN when every target is ignored).  The gradient is formed in
    the forward; ``loss.backward()`` hands it to ``hidden`` and ``weight``.
    Without ``score_token_ids`` the head computes no score outputs.
    """

    def __init__(
        self,
        loss_fn: Optional[LossFn] = None,
        *,
        score_token_ids: Optional[IdsLike] = None,
        score_values: Optional[ValuesLike] = None,
        normalize: bool = False,
        temperature: float = 1.0,
        ignore_index: int = -100,
        return_entropy: bool = False,
        chunk_size: Optional[int] = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(chunk_out, rows), got {type(loss_fn).__name__}")
        if (score_token_ids is None) != (score_values is None):
            given, missing = ("score_token_ids", "score_values") if score_values is None else (
                "score_values", "score_token_ids")
            raise ValueError(f"{given} was given without {missing}: give both or neither")
        self.loss_fn = loss_fn
        self.score_token_ids = None if score_token_ids is None else _score_ids(score_token_ids)
        self.score_values = None if score_values is None else _score_values(score_values, len(self.score_token_ids))
        self.normalize = _check_flag("normalize", normalize)
        self.return_entropy = _check_flag("return_entropy", return_entropy)
        self.temperature, self.ignore_index = _check_options(temperature, ignore_index, backend, chunk_size)
        self.chunk_size = chunk_size
        self.backend = backend

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        score_targets: Optional[torch.Tensor] = None,
        score_mask: Optional[torch.Tensor] = None,
        *,
        loss_fn: Optional[LossFn] = None,
    ) -> Tuple[torch.Tensor, JudgeHeadOutput]:
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(chunk_out, rows), got {type(loss_fn).__name__}")
        loss_fn = loss_fn or self.loss_fn
        if loss_fn is None:
            if not isinstance(targets, torch.Tensor):
                raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
            loss_fn = token_mean_cross_entropy(targets, self.ignore_index)
        return judge_loss(
            hidden, weight, targets, loss_fn, score_token_ids=self.score_token_ids, score_values=self.score_values,
            score_targets=score_targets, score_mask=score_mask, normalize=self.normalize,
            temperature=self.temperature, ignore_index=self.ignore_index, return_entropy=self.return_entropy,
            chunk_size=self.chunk_size, backend=self.backend,
        )

    def extra_repr(self) -> str:
        loss = "token-mean cross-entropy" if self.loss_fn is None else getattr(self.loss_fn, "__name__", "custom")
        scores = "" if self.score_token_ids is None else (
            f"score_token_ids={list(self.score_token_ids)}, score_values={list(self.score_values)}, ")
        return (f"loss_fn={loss}, {scores}normalize={self.normalize}, temperature={self.temperature}, "
                f"ignore_index={self.ignore_index}, return_entropy={self.return_entropy}, "
                f"chunk_size={self.chunk_size}, backend={self.backend!r}")
