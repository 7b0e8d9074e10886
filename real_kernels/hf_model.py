"""The parts of a transformers causal LM that the fused head needs: the model inside a peft wrapper,
its decoder body, its LM-head weight, its logit scaling folded into the temperature.

Its own module so that ``hf`` (run the model with the fused head) and ``hf_patch`` (make the
model's own loss use it; ``hf`` offers ``hf.patch``) both import it without an import circle.
"""
from __future__ import annotations

import torch


def unwrap_peft(model):
    """The transformers model inside a peft wrapper (LoRA layers stay injected in it), else the model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_of(model):
    base = unwrap_peft(model)
    get_decoder = getattr(base, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or decoder is base:
        decoder = getattr(base, "base_model", None)
    if decoder is None or decoder is base:
        raise ValueError(
            f"cannot find the decoder body of {type(base).__name__}: expected a transformers causal LM with "
            "get_decoder() or base_model"
        )
    return decoder


def effective_temperature(model, temperature: float) -> float:
    """Fold a model's logit scaling into the temperature; refuse what cannot be folded."""
    config = getattr(unwrap_peft(model), "config", None)
    if getattr(config, "final_logit_softcapping", None) is not None:
        raise ValueError(
            f"{type(unwrap_peft(model)).__name__} applies final_logit_softcapping to its logits, which the fused "
            "head does not implement; the log-probs would be wrong"
        )
    temperature = float(temperature)
    scale = getattr(config, "logit_scale", None)  # Cohere: logits = scale * W h
    if scale is not None and scale != 1:
        temperature /= float(scale)
    divisor = getattr(config, "logits_scaling", None)  # Granite: logits = W h / divisor
    if divisor is not None and divisor != 1:
        temperature *= float(divisor)
    return temperature


def lm_head_weight(model) -> torch.Tensor:
    """The LM-head weight ``[V, H]`` (the input embedding when the two are tied)."""
    head = unwrap_peft(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(unwrap_peft(model)).__name__} has no output embeddings (LM head)")
    if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
        raise ValueError(
            "the LM head is wrapped by an adapter (e.g. LoRA on lm_head); its delta would be ignored by the fused "
            "head: leave lm_head out of the adapter's target_modules, or merge the adapter first"
        )
    return head.weight
