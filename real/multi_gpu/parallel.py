"""FSDP2 (``fully_shard``) or DDP around the judge model: ``wrap_model`` and what the loop does with it.

The trap this module exists for: the fused loss head takes the LM-head
*weight* (``real_kernels.hf.lm_head_weight``) instead of calling the LM-head
module, and runs the decoder body (``model.model``) instead of the model's own
``forward``.  Under FSDP the embeddings, final norm and LM head live in the
root unit, whose parameters are gathered only inside the root module's forward
and whose gradients are reduce-scattered by hooks that forward installs.
Reaching around it reads a sharded ``[V / world, H]`` shard (or fails on a
DTensor) and never reduce-scatters the head's gradient: the same trap as
with ZeRO-3.

The fix is structural: the root that FSDP/DDP wrap is ``DistributedJudge``,
whose ``forward(fn, *args)`` simply runs ``fn(model, *args)``.  Anything the
training loop does with the model, the decoder pass, the fused head, the loss,
even ``generate`` for rollouts, goes through ``wrapped(fn, ...)``, so every
parameter is gathered by FSDP's own pre-forward hook, every gradient (the
tied or untied LM-head weight's included) flows back through the autograd
graph to the unsharded parameter and is reduce-scattered by FSDP's own
post-backward, and DDP's reducer sees the whole step.  Decoder layers are
their own FSDP units (``_no_split_modules``), so only the root unit and one or
two layers are unsharded at a time; peft/LoRA models and transformers'
gradient checkpointing compose with it.

What the training loop calls (single process included, where it all degrades
to plain PyTorch; the process group and collectives are ``real.multi_gpu.distributed``, full state
dicts ``real.loop.full_state``):

    env = setup_distributed()                        # reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK
    model = model.to(env.device)
    wrapped = wrap_model(model, "fsdp", env)         # or "ddp"; "none" for one process
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=...)   # after wrapping (FSDP shards params)
    my_prompts = shard_for_rank(prompts, env)        # whole prompt groups per rank
    cots = wrapped(generate_cots, tokenizer, my_prompts, n=G, ...)   # under torch.no_grad()
                                                     # (inside unsharded_for_generation(wrapped) if it fits)
    loss, terms = wrapped(step_fn, batch)            # step_fn(model, batch) -> (loss, terms)
    loss.backward(); clip_grad_norm(wrapped, 1.0); optimizer.step(); optimizer.zero_grad()
    terms = all_reduce_metrics(terms, env)           # mean over ranks
    if env.is_main: log(terms)
    state = full_model_state_dict(wrapped)           # collective; full tensors on rank 0, {} elsewhere
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from real.multi_gpu.distributed import DistEnv, current_env, max_over_ranks
from real_kernels.hf_model import unwrap_peft

PARALLEL_MODES = ("fsdp", "ddp", "none")


class DistributedJudge(nn.Module):
    """The root module FSDP/DDP wrap: ``forward(fn, *args, **kwargs)`` returns ``fn(model, *args, **kwargs)``.

    Running the whole step (decoder, fused head on the LM-head weight, loss) or
    ``generate`` inside this forward puts every parameter access under the
    wrapper's hooks.  Single-process runs use it too, so the code path and the
    state-dict keys are the same whatever the number of ranks.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        # Mixed precision outside FSDP (see wrap_model): (device type, compute dtype) of torch.autocast, or None.
        self.autocast: Optional[Tuple[str, torch.dtype]] = None

    def forward(self, fn: Callable[..., Any], *args, **kwargs):
        if not callable(fn):
            raise TypeError(f"DistributedJudge is called as wrapped(fn, *args); got a {type(fn).__name__} "
                            "as fn (pass a function taking the model first)")
        if self.autocast is None:
            return fn(self.model, *args, **kwargs)
        device_type, dtype = self.autocast
        with torch.autocast(device_type, dtype=dtype):
            return fn(self.model, *args, **kwargs)


def decoder_layers(model: nn.Module) -> List[nn.Module]:
    """The decoder layers of a transformers causal LM (peft-wrapped or not): the FSDP units."""
    base = unwrap_peft(model)
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        for name, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks"):
                layers = list(module)
                break
    if not layers:
        raise ValueError(f"cannot find the decoder layers of {type(base).__name__} to shard "
                         "(no _no_split_modules and no 'layers' ModuleList)")
    return layers


def _mixed_precision(model: nn.Module, compute_dtype: Optional[torch.dtype] = None):
    """FSDP's MixedPrecisionPolicy.  ``compute_dtype`` (e.g. bf16 on fp32 parameters, the released code's
    ``MixedPrecision(param_dtype=bf16, reduce_dtype=fp32)``): every unit is all-gathered in it, forward and
    backward run in it, gradients are reduce-scattered in fp32 onto the parameters' shards.  None: FSDP needs
    one dtype per unit, and peft keeps fp32 adapters on a bf16 model, so gather everything in the lowest
    floating dtype present, keep fp32 shards, reduce gradients in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if compute_dtype is not None and dtypes != {compute_dtype}:
        return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    if len(dtypes) <= 1:
        return MixedPrecisionPolicy(cast_forward_inputs=False)
    low = min(dtypes, key=lambda d: torch.finfo(d).bits)
    return MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32, cast_forward_inputs=False)


def wrap_model(model: nn.Module, parallel: str = "fsdp", env: Optional[DistEnv] = None, *,
               reshard_after_forward: bool = True, compute_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Wrap ``model`` (already on ``env.device``) for ``parallel`` in fsdp | ddp | none.

    Returns a module to call as ``wrapped(fn, *args)``; build the optimizer
    from ``wrapped.parameters()`` afterwards.  In a one-process environment
    every mode is ``none`` (nothing to shard or synchronise).

    ``compute_dtype`` (None: the parameters' dtype): mixed precision, the
    parameters, their gradients and the optimizer states stay in their dtype
    (e.g. fp32), forward and backward compute in ``compute_dtype`` (e.g. bf16).
    Under FSDP through its MixedPrecisionPolicy (units gathered in the compute
    dtype, gradients reduce-scattered in fp32); under DDP and in one process
    through ``torch.autocast(compute_dtype)`` around every ``wrapped(fn, ...)``
    call (it composes with DDP's reducer, gradient checkpointing's recompute,
    which restores the autocast state, peft and ``generate``; FSDP on a one-rank
    mesh would need a process group and DTensor checkpoints in every plain
    run).  The two differ a little: autocast runs the matmuls and attention in
    the compute dtype but keeps the residual stream, norms and softmaxes in the
    parameters' fp32, where FSDP runs the whole layer in bf16.  The fused head
    follows the autocast dtype (``real_kernels.hf`` casts its hidden rows and
    LM-head weight to it).
    """
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {', '.join(PARALLEL_MODES)}, got {parallel!r}")
    if compute_dtype is not None and not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point):
        raise ValueError(f"compute_dtype must be a floating torch.dtype or None, got {compute_dtype!r}")
    env = env or current_env()
    root = DistributedJudge(model)
    fsdp = env.is_distributed and parallel == "fsdp"
    param_dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if compute_dtype is not None and not fsdp and param_dtypes != {compute_dtype}:
        if torch.finfo(compute_dtype).bits > min(torch.finfo(d).bits for d in param_dtypes):
            raise ValueError(f"compute_dtype {compute_dtype} is wider than the parameters' "
                             f"{sorted(map(str, param_dtypes))}: autocast only lowers precision")
        root.autocast = (env.device.type, compute_dtype)
    if not env.is_distributed or parallel == "none":
        return root
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(root, device_ids=device_ids, gradient_as_bucket_view=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    mp_policy = _mixed_precision(model, compute_dtype)
    # transformers' generate then runs with synced_gpus: a rank whose sequences are all finished keeps
    # stepping (and joining the all-gathers) until every rank is done, instead of leaving the others hanging.
    for module in {id(m): m for m in (model, unwrap_peft(model))}.values():
        module._is_fsdp_managed_module = True
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy)
    # The root unit: embeddings, final norm, LM head (tied or not) and anything else outside the layers.
    fully_shard(root, mesh=mesh, mp_policy=mp_policy)
    root.layer_reshard_after_forward = reshard_after_forward
    return root


def unwrap_model(wrapped: nn.Module) -> nn.Module:
    """The model inside (peft or transformers); under FSDP its root parameters are shards outside ``wrapped(...)``."""
    inner = getattr(wrapped, "module", wrapped)  # DDP
    if not isinstance(inner, DistributedJudge):
        raise TypeError(f"expected a module made by wrap_model, got {type(wrapped).__name__}")
    return inner.model


def parallel_mode(wrapped: nn.Module) -> str:
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return "ddp"
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        return "none"
    return "fsdp" if isinstance(wrapped, FSDPModule) else "none"


@contextlib.contextmanager
def unsharded_for_generation(wrapped: nn.Module) -> Iterator[None]:
    """Keep every FSDP unit gathered while generating: one all-gather per layer for the whole ``generate``
    instead of one per layer per new token.  Needs the whole model in each GPU's memory; without it,
    ``wrapped(generate_cots, ...)`` still works, gathering layer by layer.  No-op outside FSDP."""
    if parallel_mode(wrapped) != "fsdp":
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in wrapped.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            if unit is not wrapped:  # the root never reshards after forward in training
                unit.set_reshard_after_forward(getattr(wrapped, "layer_reshard_after_forward", True), recurse=False)
            unit.reshard()


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter for micro-batches before the last one (accumulation)."""
    mode = parallel_mode(wrapped)
    if enabled or mode == "none":
        yield
    elif mode == "ddp":
        with wrapped.no_sync():
            yield
    else:
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)


def clip_grad_norm(wrapped: nn.Module, max_norm: float) -> float:
    """Global gradient norm over all ranks (FSDP: shards summed; DDP: already identical); clip when max_norm > 0."""
    grads = [p.grad for p in wrapped.parameters() if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float64, device=_grad_device(grads))
    for g in grads:
        local = (g.to_local() if hasattr(g, "to_local") else g).detach().reshape(-1)
        for chunk in local.split(1 << 24):  # fp64 sums, one bounded temporary (not a copy of a 152k x H gradient)
            sq += chunk.double().pow(2).sum()
    if parallel_mode(wrapped) == "fsdp":
        dist.all_reduce(sq)
    norm = float(sq.sqrt())
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for g in grads:
            g.mul_(coef)
    return norm


def parameters_finite(wrapped: nn.Module, env: Optional[DistEnv] = None) -> bool:
    """Whether every parameter holds finite values (this rank's shards under FSDP), on every rank (collective)."""
    local = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
                for p in wrapped.parameters())
    return not max_over_ranks(int(not local), env)


def _grad_device(grads: Sequence[torch.Tensor]) -> torch.device:
    if grads:
        g = grads[0]
        return (g.to_local() if hasattr(g, "to_local") else g).device
    return current_env().device
