"""Public ops: validate once, dispatch to a backend (docs/design.md section 4).

``backend="auto"`` picks the Triton kernels for CUDA tensors and the chunked
PyTorch backend otherwise.  ``"triton"`` also runs on CPU tensors when
``TRITON_INTERPRET=1`` is set before Triton is imported (that is how the tests
exercise the kernels without a GPU).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch

from .core import reference
from . import torch_backend
from .core.outputs import JudgeHeadOutput, LinearLogprobsOutput
from .core.validation import HeadArgs, check_memory, resolve_backend, validate_head_args


def _reference_backend(args: HeadArgs, memory: str):
    return reference.judge_head(
        args.hidden, args.weight, args.targets, args.score_ids, args.score_values,
        score_targets=args.score_targets, score_mask=args.score_mask, normalize=args.normalize,
        temperature=args.temperature, ignore_index=args.ignore_index, return_entropy=args.return_entropy,
    )


def _triton_backend(args: HeadArgs, memory: str):
    if not args.hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before importing triton "
            "to run the kernels on the CPU interpreter; use backend='torch' on the CPU"
        )
    try:
        from .ops import fused_head  # here, not at the top: triton is optional (CPU torch builds lack it)
    except ImportError as exc:  # pragma: no cover - CUDA torch builds bring triton
        raise ImportError(f"backend='triton' needs the triton package: {exc}") from exc
    return fused_head.judge_head(args, memory=memory)


def _torch_backend(args: HeadArgs, memory: str):
    return torch_backend.judge_head(args)  # streams tiles of logits whatever ``memory`` says


_BACKENDS = {"reference": _reference_backend, "torch": _torch_backend, "triton": _triton_backend}


def _run(args: HeadArgs, backend: str, memory: str):
    check_memory(memory)
    name = resolve_backend(backend, args.hidden)
    if args.hidden.shape[0] == 0:
        name = "reference"  # nothing to stream; the reference handles empty batches exactly
    device_type = args.hidden.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        # the contract is fp32 outputs computed in fp32: autocast would run the reference's logits
        # and the score epilogue's matmul in bf16 / fp16
        with torch.autocast(device_type, enabled=False):
            return _BACKENDS[name](args, memory)
    return _BACKENDS[name](args, memory)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
    memory: str = "auto",
) -> LinearLogprobsOutput:
    """Per-token ``log softmax(hidden @ weight.T / temperature)[targets]`` without ``[N, V]`` logits.

    hidden ``[N, H]``, weight ``[V, H]`` (the LM head), targets ``[N]`` int.
    Returns ``.logprobs`` ``[N]`` fp32 (0 where ``targets == ignore_index``) and
    ``.entropy`` ``[N]`` fp32 when ``return_entropy``.  Differentiable w.r.t.
    hidden and weight for any upstream gradient.  ``memory`` as for ``judge_head``.
    """
    args = validate_head_args(
        hidden, weight, targets, temperature=temperature, ignore_index=ignore_index,
        return_entropy=return_entropy, need_scores=False,
    )
    logprobs, _, _, _, entropy = _run(args, backend, memory)
    return LinearLogprobsOutput(logprobs=logprobs, entropy=entropy)


def judge_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    score_token_ids: Union[Sequence[int], torch.Tensor],
    score_values: Union[Sequence[float], torch.Tensor],
    *,
    score_targets: Optional[torch.Tensor] = None,
    score_mask: Optional[torch.Tensor] = None,
    normalize: bool = False,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
    memory: str = "auto",
) -> JudgeHeadOutput:
    """CoT log-probs, score-token softmax, expected score and its squared error, in one pass.

    ``score_token_ids`` ``[m]`` are the vocabulary ids of the score tokens,
    ``score_values`` ``[m]`` their numeric values.  ``score_logprobs`` are
    full-vocabulary log-probs of the score tokens (renormalised over them when
    ``normalize``); ``expected_score = sum_j p_j v_j``; ``sq_error`` is
    ``(expected_score - score_targets)^2`` on ``score_mask`` rows (all rows by
    default) and 0 elsewhere or without ``score_targets``.

    ``memory`` (the Triton backend's forward): ``"low"`` streams vocabulary
    tiles through the fused kernel (O(N) extra memory); ``"high"`` runs loss
    mode's chunks (cuBLAS logits into one fp32 ``[chunk, V]`` buffer, the size
    the backward needs anyway; faster); ``"auto"`` takes ``"high"`` on CUDA when
    that buffer fits in a quarter of the free memory, else ``"low"``.
    """
    args = validate_head_args(
        hidden, weight, targets, score_token_ids, score_values, score_targets=score_targets,
        score_mask=score_mask, normalize=normalize, temperature=temperature, ignore_index=ignore_index,
        return_entropy=return_entropy,
    )
    logprobs, score_logp, expected, sq_error, entropy = _run(args, backend, memory)
    return JudgeHeadOutput(logprobs, score_logp, expected, sq_error, entropy)
