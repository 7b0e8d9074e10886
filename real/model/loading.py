"""Loading a judge: the device, the dtype, the attention kernel, and the (model, tokenizer) pair.

``load_model_and_tokenizer`` is what every command calls: ``"tiny"`` builds the
random tiny pair of ``real.model.tiny`` on the spot; a local ``from_pretrained``
folder loads as it is; a Hugging Face Hub name (``Qwen/Qwen3-8B``) loads from
the local cache first, else from the Hub, with a clear error when neither works.  ``resolve_device`` turns
``--device auto|cpu|cuda[:N]`` into a ``torch.device``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Union

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from real.model.checkpoint_files import holds_adapter, is_peft_model, load_model_weights
from real.model.tiny import TINY_NAME, build_tiny_model, build_tiny_tokenizer

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` is cuda when available, else cpu; asking for cuda without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return device


def _flash_attn_importable() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


def choose_attn_implementation(device: Union[str, torch.device], requested: Optional[str] = None) -> str:
    """``requested`` if given, else flash_attention_2 when flash-attn imports and the device is CUDA, else sdpa."""
    if requested:
        return requested
    if torch.device(device).type == "cuda" and _flash_attn_importable():
        return "flash_attention_2"
    return "sdpa"


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """None: bf16 on CUDA, fp32 on the CPU; else a torch.dtype or one of its names (float32, bf16, ...)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")
    return _DTYPES[dtype]


def load_model_and_tokenizer(
    name_or_path: str,
    *,
    device: Union[str, torch.device] = "cpu",
    dtype=None,
    attn_implementation: Optional[str] = None,
    seed: int = 0,
    tiny_config: Optional[Dict[str, Any]] = None,
):
    """Return ``(model, tokenizer)`` in eval mode on ``device``.

    ``"tiny"`` builds the random tiny pair (``seed`` and ``tiny_config``, overrides
    of its Qwen3Config, apply to it only); else a local directory holding a
    transformers causal LM and its tokenizer, or a Hub name (cache first).  dtype defaults to bf16 on CUDA and fp32 on the CPU.  The
    tokenizer gets a pad token (eos) if it has none.
    """
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    attn = choose_attn_implementation(device, attn_implementation)
    if name_or_path == TINY_NAME:
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(tokenizer, seed=seed, attn_implementation=attn, **(tiny_config or {}))
        logger.info("built the tiny random judge: vocab %d, attention %s, dtype %s", len(tokenizer), attn, torch_dtype)
        return model.to(device=device, dtype=torch_dtype).eval(), tokenizer
    if tiny_config:
        raise ValueError("tiny_config only applies to the tiny model")
    path = os.fspath(name_or_path)
    if os.path.exists(path):
        if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"model path {path!r} is not a transformers model directory (no config.json in it)")
    elif not _looks_like_hub_id(path):
        raise FileNotFoundError(
            f"model path {path!r} does not exist (give a local directory saved with save_pretrained, a Hugging Face "
            "Hub name such as Qwen/Qwen3-8B, or 'tiny')")
    tokenizer = _from_pretrained(AutoTokenizer, path)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer in {path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    model = _from_pretrained(AutoModelForCausalLM, path, dtype=torch_dtype, attn_implementation=attn)
    logger.info("loaded %s: attention %s, dtype %s, device %s", path, attn, torch_dtype, device)
    return model.to(device).eval(), tokenizer


def _looks_like_hub_id(name: str) -> bool:
    """``owner/name`` (one slash, no leading dot or slash): a Hugging Face Hub repository id."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def _from_pretrained(loader, name: str, **kwargs):
    """``loader.from_pretrained(name)``: a local folder as it is; a Hub id from the local cache first, then
    from the Hub; a clear error when it is in neither (e.g. offline)."""
    if os.path.isdir(name):
        return loader.from_pretrained(name, local_files_only=True, **kwargs)
    try:
        return loader.from_pretrained(name, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass  # not (wholly) in the cache: fetch it
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        raise FileNotFoundError(
            f"cannot load {name!r}: it is not in the Hugging Face cache ({_hf_cache()}) and could not be fetched "
            f"from the Hub{' (HF_HUB_OFFLINE is set)' if offline else ' (no network, or no such repository?)'}. "
            f"On a machine with a network run `huggingface-cli download {name}` (or pass a local folder saved "
            f"with save_pretrained). Cause: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None


def _hf_cache() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        return HF_HUB_CACHE
    except ImportError:  # pragma: no cover
        return "~/.cache/huggingface/hub"


def init_weights_from(model, folder: str, *, lora_rank: int, log=lambda msg: None) -> Optional[str]:
    """``--init-from``: load a checkpoint's weights into ``model`` now, or return the folder when it holds a
    LoRA adapter (``prepare_for_training(adapter_from=...)`` loads it once the LoRA wrapper exists)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--init-from {folder!r} does not exist")
    if holds_adapter(folder):
        if not lora_rank:
            raise ValueError(f"--init-from {folder!r} holds a LoRA adapter; pass --lora-rank to train it further")
        return folder
    load_model_weights(model, folder)
    log(f"initialised the weights from {folder}")
    return None


def prepare_for_training(model, cfg, device: torch.device, *, adapter_from: Optional[str] = None,
                         log=lambda msg: None):
    """Gradient checkpointing and LoRA (``cfg``: a ``TrainConfig``) on ``model``; ``adapter_from``: a
    checkpoint folder whose LoRA adapter to load.  Returns ``(model, attention implementation)``."""
    if cfg.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if cfg.lora_rank:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ValueError("--lora-rank needs the peft package (pip install peft)") from None
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank,
                          lora_dropout=cfg.lora_dropout, target_modules=list(cfg.lora_target_modules),
                          task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        if adapter_from:
            load_model_weights(model, adapter_from)
            log(f"initialised the LoRA adapter from {adapter_from}")
    model = model.to(device)
    base = is_peft_model(model) and model.get_base_model() or model
    attn_implementation = getattr(base.config, "_attn_implementation", None) or "default"
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dtype = next(model.parameters()).dtype
    log(f"model {cfg.model}: {type(base).__name__}, {n_params / 1e6:.2f}M parameters "
        f"({n_train / 1e6:.2f}M trainable{', LoRA r=%d' % cfg.lora_rank if cfg.lora_rank else ''}), "
        f"attention {attn_implementation}, dtype {str(dtype).replace('torch.', '')}, "
        f"device {device}, gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}")
    return model, attn_implementation


def compute_dtype_for(name: str, model, device: torch.device, *, log=lambda msg: None) -> Optional[torch.dtype]:
    """``--compute-dtype``: None for ``auto`` or when it is the parameters' dtype already (nothing to mix),
    else the torch.dtype forward and backward compute in while the parameters stay as they are."""
    if name == "auto":
        return None
    dtype = resolve_dtype(name, device)
    params = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if params == {dtype}:
        return None
    log(f"mixed precision: parameters, gradients and optimizer states in "
        f"{', '.join(sorted(str(d).replace('torch.', '') for d in params))}, compute in "
        f"{str(dtype).replace('torch.', '')}")
    return dtype


def frozen_copy(model):
    """A copy of ``model`` in eval mode with no trainable parameter (the KL term's reference policy)."""
    import copy

    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref
