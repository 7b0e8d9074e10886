"""Full (world-size independent) state dicts of a ``real.multi_gpu.parallel.wrap_model`` model and its optimizer.

Gathered on rank 0 for a checkpoint, broadcast and resharded on resume, so a run
saved on K ranks resumes on any number (``real.loop.checkpoint`` writes and reads them).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from real.multi_gpu.distributed import current_env
from real.multi_gpu.parallel import parallel_mode, unwrap_model

_ROOT_PREFIX = "model."


def _state_dict_options(full: bool, broadcast: bool = False, strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full, broadcast_from_rank0=broadcast, strict=strict)


def _strip(key: str) -> str:
    return key[len(_ROOT_PREFIX):] if key.startswith(_ROOT_PREFIX) else key


def full_model_state_dict(wrapped: nn.Module) -> Dict[str, torch.Tensor]:
    """The whole model's state dict, keyed like ``unwrap_model(wrapped).state_dict()``, as CPU tensors.

    A collective under FSDP: every rank must call it; rank 0 gets the tensors,
    the others an empty dict.  The result does not depend on the number of
    ranks, so a checkpoint written by K ranks loads on any other number.
    """
    env = current_env()
    if parallel_mode(wrapped) == "none" or not env.is_distributed:
        return {k: v.detach().cpu().clone() for k, v in unwrap_model(wrapped).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(wrapped, options=_state_dict_options(full=True))
    return {_strip(k): v for k, v in state.items()} if env.is_main else {}


def full_optimizer_state_dict(wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """The optimizer's state keyed by parameter names (world-size independent); collective like the model's."""
    env = current_env()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if parallel_mode(wrapped) == "none" or not env.is_distributed:
        state = get_optimizer_state_dict(wrapped, optimizer)
        state = _map_optimizer_keys(state, _strip)
        return _to_cpu(state)
    state = get_optimizer_state_dict(wrapped, optimizer, options=_state_dict_options(full=True))
    return _map_optimizer_keys(state, _strip) if env.is_main else {}


def load_full_state(wrapped: nn.Module, model_state: Optional[Dict[str, torch.Tensor]] = None,
                    optimizer: Optional[torch.optim.Optimizer] = None,
                    optimizer_state: Optional[Dict[str, Any]] = None, *, strict: bool = True) -> None:
    """Load full state dicts (as saved by ``full_*_state_dict``) into a wrapped model and its optimizer.

    Under FSDP/DDP only rank 0 needs the dicts (read them from disk there and
    pass None elsewhere); they are broadcast and resharded for this world
    size.  ``strict=False`` loads a partial model state (e.g. LoRA adapter
    weights only).
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    env = current_env()
    distributed = parallel_mode(wrapped) != "none" and env.is_distributed
    opts = _state_dict_options(full=True, broadcast=True, strict=strict) if distributed else \
        _state_dict_options(full=False, strict=strict)
    if model_state is not None or distributed:
        prefixed = {_ROOT_PREFIX + k: v for k, v in (model_state or {}).items()}
        if distributed and not env.is_main:
            prefixed = {}
        set_model_state_dict(wrapped, prefixed, options=opts)
    if optimizer is not None and (optimizer_state is not None or distributed):
        load_full_optimizer_state(wrapped, optimizer, optimizer_state)


def load_full_optimizer_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer,
                              optimizer_state: Optional[Dict[str, Any]]) -> None:
    """Load an optimizer state saved by ``full_optimizer_state_dict`` (parameter-name keys) for this world size.

    Under FSDP/DDP only rank 0's ``optimizer_state`` is used (broadcast and
    resharded); every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    env = current_env()
    distributed = parallel_mode(wrapped) != "none" and env.is_distributed
    opts = _state_dict_options(full=True, broadcast=True) if distributed else _state_dict_options(full=False)
    state = _map_optimizer_keys(optimizer_state, lambda k: _ROOT_PREFIX + k) if optimizer_state else {}
    if distributed and not env.is_main:
        state = {}
    set_optimizer_state_dict(wrapped, optimizer, state, options=opts)


def _map_optimizer_keys(state: Dict[str, Any], fn: Callable[[str], str]) -> Dict[str, Any]:
    if not state:
        return {}
    groups = [{**g, "params": [fn(k) for k in g["params"]]} for g in state.get("param_groups", [])]
    return {"state": {fn(k): v for k, v in state.get("state", {}).items()}, "param_groups": groups}


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
