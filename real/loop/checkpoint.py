"""Checkpoints that are either complete or absent, and that resume a run exactly.

``OUTPUT_DIR/checkpoint-STEP/`` holds everything a run needs to continue as if
it had never stopped:

- ``model.safetensors`` + ``config.json`` (``save_pretrained``; with LoRA the
  adapter only: ``adapter_model.safetensors`` + ``adapter_config.json``) and the
  tokenizer, so the folder also loads with ``from_pretrained`` / ``--model``;
- ``optimizer.pt``, ``scheduler.pt``: their ``state_dict``s;
- ``rng_state.pt``: the torch (CPU and CUDA), Python and NumPy generators;
- ``trainer_state.json``: step, data position, and anything the loop adds.

It is written into a hidden temporary folder next to the final one and renamed
into place (a rename is atomic on one filesystem), and ``trainer_state.json`` is
written last, so a crash leaves either the old state or a complete checkpoint,
never half of one; ``latest_checkpoint`` ignores anything without that file.

A checkpoint damaged afterwards (a truncated copy, a full disk, a bad
``trainer_state.json``) is a ``DamagedCheckpoint`` naming the file
(``verify_checkpoint`` checks one cheaply; ``real.loop.resume`` falls back past it).

The files a model or an evaluation reads back (their names, ``trainer_state.json``,
``train_config.json``, the weights or adapter) are defined and read in
``real.model.checkpoint_files``, below the loop; this module writes them with those names.
"""
from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import tempfile
import zipfile
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from real.loop import full_state
from real.model.checkpoint_files import (ADAPTER_FILE, CONFIG_FILE, DamagedCheckpoint, holds_adapter, is_checkpoint,
                                         is_peft_model, load_model_weights, MODEL_WEIGHTS_PATTERN, model_weight_files,
                                         read_trainer_state, STATE_FILE)
from real.multi_gpu import distributed as dist_utils

PREFIX = "checkpoint-"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.pt"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"{PREFIX}{step}")


def list_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """Complete checkpoints ``(step, path)`` in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _NAME.match(name)
        path = os.path.join(output_dir, name)
        if match and is_checkpoint(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def verify_checkpoint(folder: str) -> None:
    """Raise ``DamagedCheckpoint`` naming the first file of ``folder`` that is missing, truncated or unreadable.

    Cheap: it reads ``trainer_state.json``, the safetensors headers (and checks that each file holds every byte
    its header promises) and the zip directories of the ``torch.save`` files (CRCs too for the small ones), not
    the tensors themselves.
    """
    read_trainer_state(folder)
    weights = model_weight_files(folder)
    if holds_adapter(folder):
        weights = sorted(weights + [os.path.join(folder, ADAPTER_FILE)])
    if not weights:
        raise DamagedCheckpoint(f"{folder}: no {MODEL_WEIGHTS_PATTERN} or {ADAPTER_FILE}")
    for path in weights:
        _check_safetensors(path)
    for name in (OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE):
        _check_torch_file(os.path.join(folder, name))


def _check_safetensors(path: str) -> None:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 + n:
                raise ValueError(f"{size} bytes, but the header alone needs {8 + n}")
            header = json.loads(fh.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if size != 8 + n + end:
            raise ValueError(f"{size} bytes, but its header describes {8 + n + end}")
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise DamagedCheckpoint(f"{path} is truncated or damaged ({exc})") from None


_CRC_CHECK_BYTES = 64 << 20  # torch.save files up to this size get their CRCs checked too


def _check_torch_file(path: str) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip() if os.path.getsize(path) <= _CRC_CHECK_BYTES else None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DamagedCheckpoint(f"{path} is missing, truncated or damaged ({exc})") from None
    if bad is not None:
        raise DamagedCheckpoint(f"{path} is damaged (a CRC check failed in {bad})")


# --- model weights --------------------------------------------------------------------

def save_model(model, tokenizer, folder: str, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Model (or LoRA adapter) as safetensors plus the tokenizer, loadable with from_pretrained.

    ``state_dict``: the full weights to write instead of the model's own (under
    FSDP the model holds shards; ``real.loop.full_state.full_model_state_dict``
    gathers them); keyed like ``model.state_dict()``.
    """
    if state_dict is not None:
        model.save_pretrained(folder, safe_serialization=True, state_dict=_without_tied_head(model, state_dict))
    else:
        model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _without_tied_head(model, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A gathered state dict holds a tied LM head as a separate copy; write it the way ``save_pretrained`` writes
    the model's own (the embeddings only), so both kinds of checkpoint have the same keys."""
    config = getattr(model, "config", None)
    if is_peft_model(model) or not getattr(config, "tie_word_embeddings", False):
        return state_dict
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    head_key, embed_key = f"{names.get(id(head))}.weight", f"{names.get(id(embed))}.weight"
    if head_key in state_dict and embed_key in state_dict and head_key != embed_key:
        return {k: v for k, v in state_dict.items() if k != head_key}
    return state_dict


# --- whole checkpoints ----------------------------------------------------------------

def save_checkpoint(output_dir: str, step: int, *, model, tokenizer, optimizer, scheduler,
                    trainer_state: Dict[str, Any], config: Optional[Dict[str, Any]] = None,
                    model_state: Optional[Dict[str, torch.Tensor]] = None,
                    optimizer_state: Optional[Dict[str, Any]] = None) -> str:
    """Write ``checkpoint-STEP`` atomically (temp folder + rename); returns its path.

    ``model_state`` / ``optimizer_state``: full state dicts to write instead of
    ``model`` / ``optimizer``'s own (the training loop passes the gathered,
    parameter-name keyed ones of ``real.loop.full_state``, which load on any
    number of ranks).  An existing checkpoint of the same step is replaced
    only once the new one is complete.
    """
    os.makedirs(output_dir, exist_ok=True)
    final = checkpoint_path(output_dir, step)
    tmp = tempfile.mkdtemp(prefix=f".{PREFIX}{step}.tmp-", dir=output_dir)
    try:
        save_model(model, tokenizer, tmp, state_dict=model_state)
        torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state,
                   os.path.join(tmp, OPTIMIZER_FILE))
        torch.save(scheduler.state_dict(), os.path.join(tmp, SCHEDULER_FILE))
        torch.save(capture_rng_state(), os.path.join(tmp, RNG_FILE))
        if config is not None:
            _write_json(os.path.join(tmp, CONFIG_FILE), config)
        _write_json(os.path.join(tmp, STATE_FILE), dict(trainer_state, step=step))  # last: marks completeness
        _fsync_dir(tmp)
        if os.path.exists(final):
            trash = tempfile.mkdtemp(prefix=f".{PREFIX}{step}.old-", dir=output_dir)
            os.rename(final, os.path.join(trash, "old"))
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_checkpoint(folder: str, *, model, optimizer=None, scheduler=None, restore_rng: bool = True) -> Dict[str, Any]:
    """Load a complete checkpoint into the given objects (one process); returns its trainer state."""
    state = read_trainer_state(folder)
    load_model_weights(model, folder)
    if optimizer is not None:
        # either format: load_state_dict pairs saved entries with parameters by position, not by key
        optimizer.load_state_dict(read_optimizer_state(folder))
    if scheduler is not None:
        scheduler.load_state_dict(read_scheduler_state(folder))
    if restore_rng:
        restore_rng_state(read_rng_state(folder))
    return state


# --- RNG ------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Seed the Python, NumPy and torch generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():  # as many GPUs as this machine has (resume on fewer)
        for index, gpu_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(gpu_state, index)


def _torch_load(folder: str, name: str, **kwargs) -> Any:
    path = os.path.join(folder, name)
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{path} is missing") from None
    except Exception as exc:  # truncated zip, bad pickle, short read: torch raises several kinds
        raise DamagedCheckpoint(f"{path} cannot be read: truncated or damaged ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def read_optimizer_state(folder: str) -> Dict[str, Any]:
    return _torch_load(folder, OPTIMIZER_FILE, map_location="cpu")


def read_scheduler_state(folder: str) -> Dict[str, Any]:
    return _torch_load(folder, SCHEDULER_FILE)


def read_rng_state(folder: str) -> Dict[str, Any]:
    return _torch_load(folder, RNG_FILE)


def prune_checkpoints(output_dir: str, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (keep <= 0: keep all) and stale temp folders."""
    for stale in glob.glob(os.path.join(output_dir, f".{PREFIX}*")):
        shutil.rmtree(stale, ignore_errors=True)
    if keep <= 0:
        return
    for _, path in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def _write_json(path: str, payload: Dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- a training run's checkpoints (collective under torchrun) ---------------------------

def save_training_checkpoint(output_dir: str, step: int, *, env, wrapped, model, tokenizer, optimizer, scheduler,
                             trainer_state: Dict[str, Any], config: Dict[str, Any], keep: int = 0) -> str:
    """A checkpoint of full, parameter-name keyed states (collective: every rank calls it; rank 0 writes).

    Full states do not depend on the number of ranks: a run saved on K ranks resumes on any number.
    ``wrapped`` is the ``real.multi_gpu.parallel.wrap_model`` wrapper of ``model``.
    """
    model_state = full_state.full_model_state_dict(wrapped) if env.is_distributed else None
    optimizer_state = full_state.full_optimizer_state_dict(wrapped, optimizer)
    path = checkpoint_path(output_dir, step)
    if env.is_main:
        path = save_checkpoint(output_dir, step, model=model, tokenizer=tokenizer, optimizer=optimizer,
                               scheduler=scheduler, trainer_state=trainer_state, config=config,
                               model_state=model_state, optimizer_state=optimizer_state)
        prune_checkpoints(output_dir, keep)
    dist_utils.barrier()
    return path


def load_training_state(folder: str, *, env, wrapped, optimizer, scheduler) -> Dict[str, Any]:
    """Optimizer, schedule and RNG of a checkpoint (the weights are already in); returns its trainer state."""
    optimizer_state = read_optimizer_state(folder) if env.is_main else None
    full_state.load_full_optimizer_state(wrapped, optimizer, optimizer_state)
    scheduler.load_state_dict(read_scheduler_state(folder))
    restore_rng_state(read_rng_state(folder))
    return read_trainer_state(folder)
