"""The files of a saved checkpoint folder, and how to read the ones a model or an evaluation needs.

``real.loop.checkpoint`` writes ``OUTPUT_DIR/checkpoint-STEP/`` (atomically, with the optimizer, scheduler and
RNG state a resume needs).  Code below the loop reads such a folder too: ``real.model.loading`` loads its
weights or LoRA adapter (``--init-from``), ``real.judge.evaluate`` reads the config it was trained with.  This
module holds that reading side, so neither has to import the training loop, and the loop imports the file
names from here, so writer and reader share one definition of them:

- ``trainer_state.json`` (``STATE_FILE``): written last, so its presence marks a complete checkpoint;
- ``train_config.json`` (``CONFIG_FILE``): the training config, as JSON;
- ``model*.safetensors`` (``MODEL_WEIGHTS_PATTERN``) or, with LoRA, ``adapter_model.safetensors``
  (``ADAPTER_FILE``): the weights, as ``save_pretrained`` writes them.

It imports nothing of ``real`` and, at import time, nothing heavier than the standard library (torch,
safetensors and peft are imported when weights are loaded), so ``real eval --predictions`` does without them.
"""
from __future__ import annotations

import glob
import json
import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional

if TYPE_CHECKING:  # annotations only
    import torch

STATE_FILE = "trainer_state.json"
CONFIG_FILE = "train_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
MODEL_WEIGHTS_PATTERN = "model*.safetensors"


class DamagedCheckpoint(ValueError):
    """A checkpoint file that is missing, truncated or unreadable; the message names it."""


def is_checkpoint(folder: str) -> bool:
    """Whether ``folder`` is a complete checkpoint (it has ``trainer_state.json``, which is written last)."""
    return os.path.isfile(os.path.join(folder, STATE_FILE))


def holds_adapter(folder: str) -> bool:
    """Whether ``folder`` holds a LoRA adapter (``adapter_model.safetensors``) rather than full weights."""
    return os.path.isfile(os.path.join(folder, ADAPTER_FILE))


def model_weight_files(folder: str) -> List[str]:
    """The full model's ``model*.safetensors`` files in ``folder`` (one, or the shards), sorted."""
    return sorted(glob.glob(os.path.join(folder, MODEL_WEIGHTS_PATTERN)))


def read_trainer_state(folder: str) -> Dict[str, Any]:
    """A complete checkpoint's ``trainer_state.json`` (step, data position, ...)."""
    state_path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(state_path):
        raise ValueError(f"{folder!r} is not a complete checkpoint (no {STATE_FILE})")
    state = _read_json(state_path)
    if not isinstance(state.get("step"), int):
        raise DamagedCheckpoint(f"{state_path} is damaged (no integer 'step')")
    return state


def read_saved_config(folder: str) -> Optional[Dict[str, Any]]:
    """The ``train_config.json`` a checkpoint was written with (None for checkpoints from before it was saved)."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    return _read_json(path)


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def load_model_weights(model, folder: str) -> None:
    """Load the weights a checkpoint holds into ``model`` in place (full model or LoRA adapter)."""
    if is_peft_model(model):
        path = os.path.join(folder, ADAPTER_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"checkpoint {folder!r} has no {ADAPTER_FILE}, but the model being trained "
                             "is a LoRA model (was the checkpoint written without --lora-rank?)")
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, _load_safetensors(path, model))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"checkpoint {folder!r}: adapter weights do not match the model: {unexpected[:5]}")
        return
    files = model_weight_files(folder)
    if not files:
        if holds_adapter(folder):
            raise ValueError(f"checkpoint {folder!r} holds a LoRA adapter; pass the same --lora-rank to load it")
        raise ValueError(f"checkpoint {folder!r} has no {MODEL_WEIGHTS_PATTERN} weights")
    state: Dict[str, torch.Tensor] = {}
    for path in files:
        state.update(_load_safetensors(path, model))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes differ: another model (e.g. --tiny-config hidden_size)
        mismatches = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise ValueError(f"checkpoint {folder!r} does not fit the model: "
                         f"{'; '.join(mismatches[:3]) or exc} (was it written for another --model / --tiny-config?)"
                         ) from None
    tied = _tied_names(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder!r} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def _load_safetensors(path: str, model) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device=str(next(model.parameters()).device))
    except (SafetensorError, OSError) as exc:
        raise DamagedCheckpoint(f"{path} is truncated or damaged ({exc})") from None


def _tied_names(model) -> set:
    """Parameter names that share storage with another parameter (save_pretrained writes one of them)."""
    seen: Dict[int, str] = {}
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = tensor.data_ptr()
        if key in seen:
            tied.update({name, seen[key]})
        else:
            seen[key] = name
    return tied


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedCheckpoint(f"{path} is damaged ({exc})") from None
    if not isinstance(value, dict):
        raise DamagedCheckpoint(f"{path} is damaged (a JSON object was expected)")
    return value
