"""``patch(model)``: a transformers causal LM whose ``labels=`` loss comes from ``judge_loss``, without logits.

The one-line route for existing training code (transformers' ``Trainer``, a
hand-written loop): after ``patch(model)``, ``model(input_ids,
attention_mask=..., labels=labels)`` returns the usual causal-LM loss
(transformers' ``ForCausalLMLoss``: labels shifted left inside, ``-100``
ignored, the mean over the kept tokens, or their sum divided by
``num_items_in_batch`` when the caller passes it) computed by ``judge_loss``
from the decoder's hidden states and the LM-head weight.  The
``[tokens x vocab]`` logits are never built: the output's ``logits`` is
``None`` whenever ``labels`` (or ``shift_labels``) is given.  Without labels
the model's own forward runs unchanged (logits and all), so generation and
evaluation code keep working.  The gradient is formed in the forward
(``judge_loss``'s loss mode) and handed to the hidden states and the LM-head
weight by ``loss.backward()``.

This is what Cut Cross-Entropy's ``cce_patch`` and Liger's
``apply_liger_kernel_to_*`` do for their kernels; here one generic forward
serves the architectures whose forward is ``lm_head(hidden)`` (optionally
times ``logit_scale``) followed by ``ForCausalLMLoss`` (``SUPPORTED_MODEL_TYPES``),
and anything else is refused with a clear error rather than silently computing
a different loss.  The patch sits on the model instance (not its class), goes
through a peft wrapper to the transformers model inside, works with tied
embeddings, is idempotent, and ``unpatch(model)`` undoes it.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from typing import Any, Callable, Dict, Optional, Union

import torch

from .hf_model import decoder_of, effective_temperature, unwrap_peft, lm_head_weight
from .loss import judge_loss
from .core.validation import BACKENDS

# model types whose ForCausalLM.forward is `logits = lm_head(hidden)` (cohere: times logit_scale; granite: divided by
# logits_scaling; both folded into the temperature) then `self.loss_function(logits, labels, ...)`, checked against
# transformers' own loss in the tests
SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama", "mistral", "gemma", "phi3", "olmo2", "cohere", "granite")
_STATE = "_real_kernels_patch"  # attribute on the patched transformers model


@dataclasses.dataclass
class _PatchState:
    previous_forward: Optional[Callable]  # the instance's own `forward` attribute before patching; None: the class's
    signature: inspect.Signature  # of the class's forward, without self, to bind positional arguments by name
    backend: str
    chunk_size: Optional[int]


def _check_patchable(base) -> None:
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"patch supports transformers causal LMs of model_type {SUPPORTED_MODEL_TYPES}; got "
            f"{type(base).__name__} (model_type {model_type!r}), whose forward may compute its loss differently"
        )
    effective_temperature(base, 1.0)  # refuses final_logit_softcapping
    for flag in ("output_router_logits",):
        if getattr(base.config, flag, False):
            raise ValueError(f"patch does not add MoE router losses; {type(base).__name__} has config.{flag}=True")
    head = base.get_output_embeddings()
    lm_head_weight(base)  # refuses a LoRA-wrapped lm_head
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(base).__name__}'s LM head has a bias, which judge_loss does not add to the logits")
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING
    except ImportError:  # pragma: no cover - older transformers without the loss registry
        return
    if base.loss_function is not LOSS_MAPPING.get("ForCausalLM"):
        raise ValueError(
            f"{type(base).__name__} has a custom loss_function ({getattr(base.loss_function, '__name__', '?')}); "
            "patch computes ForCausalLMLoss and would silently replace it"
        )


def patch(model, *, backend: str = "auto", chunk_size: Optional[int] = None):
    """Route ``model(..., labels=labels)``'s loss through ``judge_loss``; returns ``model``.

    ``model`` is a transformers causal LM or a peft wrapper of one (patch
    before or after ``get_peft_model``: the patch sits on the transformers
    model either way).  ``backend`` / ``chunk_size`` are ``judge_loss``'s.
    Patching a patched model only updates those two settings.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    _check_model(model)
    base = unwrap_peft(model)
    _check_patchable(base)
    state = base.__dict__.get(_STATE)
    if state is not None:
        state.backend, state.chunk_size = backend, chunk_size
        return model
    class_forward = type(base).forward
    signature = inspect.signature(class_forward)
    signature = signature.replace(parameters=list(signature.parameters.values())[1:])  # drop self
    state = _PatchState(base.__dict__.get("forward"), signature, backend, chunk_size)
    # keep the class forward's signature visible: generate() validates its kwargs against it
    fused = functools.wraps(class_forward)(_fused_loss_forward)
    object.__setattr__(base, _STATE, state)
    object.__setattr__(base, "forward", types.MethodType(fused, base))
    return model


def _check_model(model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a transformers causal LM (a torch.nn.Module), got {type(model).__name__}")


def unpatch(model):
    """Undo ``patch``: the model's forward is what it was before; returns ``model`` (a no-op if not patched)."""
    _check_model(model)
    base = unwrap_peft(model)
    state = base.__dict__.pop(_STATE, None)
    if state is None:
        return model
    if state.previous_forward is None:
        base.__dict__.pop("forward", None)
    else:
        object.__setattr__(base, "forward", state.previous_forward)
    return model


def is_patched(model) -> bool:
    _check_model(model)
    return _STATE in unwrap_peft(model).__dict__


def _call_arguments(signature: inspect.Signature, args, kwargs) -> Dict[str, Any]:
    """The call's arguments by name (positional ones named by the forward's signature, **kwargs flattened)."""
    bound = signature.bind(*args, **kwargs)
    named: Dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"patched forward: unexpected extra positional arguments {len(value)}")
        else:
            named[name] = value
    return named


def _fused_loss_forward(self, *args, **kwargs):
    state: _PatchState = self.__dict__[_STATE]
    previous = state.previous_forward or functools.partial(type(self).forward, self)
    try:
        call = _call_arguments(state.signature, args, kwargs)
    except TypeError:
        return previous(*args, **kwargs)  # the model's own forward reports its own argument error
    labels, shift_labels = call.pop("labels", None), call.pop("shift_labels", None)
    if labels is None and shift_labels is None:
        return previous(*args, **kwargs)
    num_items_in_batch = call.pop("num_items_in_batch", None)
    ignore_index = call.pop("ignore_index", -100)
    return_dict = call.pop("return_dict", None)
    logits_to_keep = call.pop("logits_to_keep", 0)
    if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        raise ValueError(
            f"logits_to_keep={logits_to_keep!r} with labels: the patched forward computes the loss over every "
            "labelled position and returns no logits; drop logits_to_keep (or pass no labels to get logits)"
        )
    if call.get("output_router_logits"):
        raise ValueError("output_router_logits=True: the patched forward does not add MoE router losses")

    decoder_out = decoder_of(self)(**call)
    hidden = decoder_out[0] if isinstance(decoder_out, tuple) else decoder_out.last_hidden_state
    loss = causal_lm_loss(
        hidden, lm_head_weight(self), labels=labels, shift_labels=shift_labels,
        num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
        temperature=effective_temperature(self, 1.0), chunk_size=state.chunk_size, backend=state.backend,
    )
    return _causal_lm_output(loss, decoder_out, return_dict)


def _causal_lm_output(loss: torch.Tensor, decoder_out, return_dict: Optional[bool]):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if isinstance(decoder_out, tuple):
        return (loss,) + tuple(decoder_out[1:])
    fields = {f.name: getattr(decoder_out, f.name, None) for f in dataclasses.fields(CausalLMOutputWithPast)}
    fields.update(loss=loss, logits=None)
    out = CausalLMOutputWithPast(**fields)
    return out.to_tuple() if return_dict is False else out


def _check_labels(name: str, labels, shape: torch.Size, vocab: int, ignore_index: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.shape != shape:
        raise ValueError(f"{name} must have the input's shape {tuple(shape)}, got {tuple(labels.shape)}")
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        raise ValueError(f"{name} contains {int(labels[bad][0])}, outside [0, {vocab}) and not ignore_index "
                         f"({ignore_index})")
    return labels


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    labels: Optional[torch.Tensor] = None,
    shift_labels: Optional[torch.Tensor] = None,
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` on ``hidden [B, T, H] @ weight.T``, by ``judge_loss``, without logits.

    ``labels [B, T]`` are shifted left (position t predicts ``labels[:, t+1]``),
    or ``shift_labels [B, T]`` are used as they are.  Only the positions whose
    label is not ``ignore_index`` go to the head.  The loss is the sum of
    ``-log p(label)`` divided by ``num_items_in_batch`` if given, else by the
    number of kept labels (0, not ForCausalLMLoss's NaN, when there are none).
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden must be a [B, T, H] tensor, got {getattr(hidden, 'shape', type(hidden).__name__)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        got = getattr(weight, "shape", type(weight).__name__)
        raise ValueError(f"weight must be the [V, H] LM-head weight, got {got}")
    vocab = weight.shape[0]
    if shift_labels is None:
        if labels is None:
            raise ValueError("give labels or shift_labels")
        labels = _check_labels("labels", labels, hidden.shape[:2], vocab, ignore_index)
        targets = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[:, 1:]
    else:
        targets = _check_labels("shift_labels", shift_labels, hidden.shape[:2], vocab, ignore_index)
    denominator = _denominator(num_items_in_batch)
    targets = targets.reshape(-1).to(weight.device)
    rows = (targets != ignore_index).nonzero().squeeze(1)
    kept = hidden.reshape(-1, hidden.shape[-1]).to(weight.device).index_select(0, rows)
    if kept.dtype != weight.dtype:  # e.g. fp32 hidden states under autocast with a bf16 head
        kept = kept.to(weight.dtype)
    if denominator is None:
        denominator = max(rows.numel(), 1)
    elif isinstance(denominator, torch.Tensor):
        denominator = denominator.to(weight.device)
    loss, _ = judge_loss(kept, weight, targets.index_select(0, rows),
                         lambda out, _rows: -out.logprobs.sum() / denominator,
                         temperature=temperature, chunk_size=chunk_size, backend=backend)
    return loss


def _denominator(num_items_in_batch):
    if num_items_in_batch is None:
        return None
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a scalar, got shape {tuple(num_items_in_batch.shape)}")
        return num_items_in_batch.reshape(())
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
        raise TypeError(f"num_items_in_batch must be a number or a scalar tensor, got "
                        f"{type(num_items_in_batch).__name__}")
    return num_items_in_batch
