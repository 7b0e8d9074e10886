"""What ``--resume`` checks before it continues a run, and what it applies.

- ``latest_intact_checkpoint``: the newest checkpoint whose files are whole; a damaged newer one (a truncated
  copy, a full disk) is named and skipped, so a run resumes from the last good state instead of dying in a
  ``load_state_dict`` traceback;
- ``check_resumed_config``: the checkpoint's settings against this run's.  A change that makes it another run
  (method, seed, data, model, objective, optimiser) is refused, naming the fields, unless
  ``--allow-config-change``; then the new values are used (``apply_optimizer_settings`` puts a new ``--lr``,
  weight decay or betas into the restored optimizer and schedule) and recorded in the next checkpoint, so a
  checkpoint's ``train_config.json`` always says what was used.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Optional

from real.loop import checkpoint as ckpt
from real.loop.config import TrainConfig, flat_settings
from real.model.checkpoint_files import DamagedCheckpoint, read_saved_config


def latest_intact_checkpoint(output_dir: str, log: Callable[[str], None] = print) -> Optional[str]:
    """The newest complete checkpoint whose files are whole (``real.loop.checkpoint.verify_checkpoint``); damaged newer ones are
    reported through ``log`` and skipped.  None when there is no complete checkpoint; an error when every one is
    damaged (starting afresh would silently throw the run away)."""
    found = ckpt.list_checkpoints(output_dir)
    damaged = []
    for _, path in reversed(found):
        try:
            ckpt.verify_checkpoint(path)
        except DamagedCheckpoint as exc:
            damaged.append(path)
            log(f"--resume: skipping a damaged checkpoint: {exc}")
            continue
        if damaged:
            log(f"--resume: resuming from {path}, the newest intact checkpoint, instead of "
                f"{', '.join(damaged)}")
        return path
    if damaged:
        raise DamagedCheckpoint(f"every checkpoint in {output_dir!r} is damaged ({', '.join(damaged)}); move them "
                                "away to start afresh, or repair one")
    return None


# Settings a resumed run may change freely: how the run is computed, logged, saved and stopped, not what it
# computes.  Every other field (method, seed, data, model, objective, optimiser, ...; a field added later
# too) makes it another run: ``--resume`` refuses a change there unless ``--allow-config-change``.
RESUMABLE_CHANGES = frozenset({
    "output_dir", "resume", "overwrite", "allow_config_change", "steps", "skip_malformed", "micro_batch_tokens",
    "rollout_batch_size", "unsharded_rollouts", "gradient_checkpointing", "attn_implementation", "device",
    "parallel", "threads", "head_backend", "collective_timeout", "eval_every", "eval_size", "eval_batch_size",
    "eval_max_new_tokens", "save_every", "keep_checkpoints", "progress",
})


def config_changes(saved: Dict[str, Any], current: Dict[str, Any],
                   defaults: Optional[Dict[str, Any]] = None) -> List[str]:
    """``"name: saved -> current"`` for each setting outside ``RESUMABLE_CHANGES`` that differs.  A field the
    saved configuration lacks (it was added later) counts as having had its default (``defaults``).  Each
    configuration may be in the file layout (the method's own settings under its name) or flat: settings are
    compared by name (``flat_settings``)."""
    saved, current, defaults = flat_settings(saved), flat_settings(current), flat_settings(defaults or {})
    changes = []
    for name, value in current.items():
        if name in RESUMABLE_CHANGES:
            continue
        before = saved.get(name, defaults.get(name, value))
        if _comparable(before) != _comparable(value):
            changes.append(f"{name}: {before!r} -> {value!r}")
    return changes


def _comparable(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def check_resumed_config(folder: str, config, *, allow: bool, log: Callable[[str], None]) -> None:
    """Refuse to continue ``folder`` with a ``config`` (a ``TrainConfig``) that makes it another run."""
    saved = read_saved_config(folder)
    if saved is None:
        log(f"--resume: {folder} records no configuration (an older checkpoint); its settings are not checked")
        return
    changes = config_changes(saved, config.to_dict(), TrainConfig(method=config.method).to_dict())
    if not changes:
        return
    if not allow:
        raise ValueError(f"--resume: {folder} was trained with other settings ({'; '.join(changes)}); continuing "
                         "would make it another run. Resume with the checkpoint's settings, start in another "
                         "--output-dir, or pass --allow-config-change to continue with the new ones")
    log(f"--resume: continuing {folder} with changed settings (--allow-config-change): {'; '.join(changes)}")


def apply_optimizer_settings(optimizer, scheduler, config) -> None:
    """Put ``config``'s learning rate, weight decay and betas into a restored optimizer and ``LambdaLR`` schedule
    (a checkpoint restores its own; the same values leave everything bit for bit as it was)."""
    scheduler.base_lrs = [config.lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["initial_lr"] = config.lr
        group["weight_decay"] = config.weight_decay
        group["betas"] = tuple(config.adam_betas)
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
