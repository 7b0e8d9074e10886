"""Several GPUs and nodes with PyTorch's own stack: torchrun, FSDP2 (``fully_shard``) or DDP.

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
to plain PyTorch):

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

Rollouts and advantages: each rank takes a contiguous, equal share of the
step's prompts and samples all G CoTs of each of its prompts, so every RLOO
group is complete on one rank and advantages need no communication.  With
per-sequence loss aggregation (seq-mean-token-mean, seq-mean-token-sum) the
mean of the ranks' losses is the global loss, and DDP/FSDP average gradients,
so K ranks with B/K prompts each take the same step as one process with B
prompts (the tests check losses and updated weights).  A loss normalised by
the batch's total token count (token-mean, TRACT's CE) is divided by the
step's tokens per row over all ranks, so it matches too.
Sampling uses ``rank_seed(seed, env)`` so ranks draw different CoTs.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

PARALLEL_MODES = ("fsdp", "ddp", "none")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size, local rank, its device and the process-group backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_ENV: Optional[DistEnv] = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer (set by torchrun)") from None


def setup_distributed(device: Optional[str] = None, backend: Optional[str] = None,
                      timeout_s: Optional[float] = None) -> DistEnv:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without those variables (a plain ``python`` run) this is a one-process
    environment and no process group is created.  ``device`` defaults to
    ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU; ``backend`` to
    nccl on CUDA and gloo on the CPU; ``timeout_s`` (collectives) to PyTorch's default.
    """
    global _ENV
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent (need 0 <= RANK < WORLD_SIZE)")
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        index = local_rank if dev.index is None else dev.index
        if index >= count:
            raise ValueError(f"LOCAL_RANK={local_rank} needs GPU {index}, but this node has {count} GPU(s); "
                             "use --nproc_per_node <= the number of GPUs")
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        dist.init_process_group(backend=backend, **kwargs)
    elif dist.is_initialized():
        backend = dist.get_backend()
        world, rank = dist.get_world_size(), dist.get_rank()
    _ENV = DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev,
                   backend=backend if world > 1 else None)
    if world > 1:
        logger.info("rank %d/%d on %s (%s)", rank, world, dev, backend)
    return _ENV


def current_env() -> DistEnv:
    """The environment ``setup_distributed`` made, or the one implied by an existing process group."""
    if _ENV is not None:
        return _ENV
    if dist.is_available() and dist.is_initialized():
        return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), backend=dist.get_backend())
    return DistEnv()


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and writes checkpoints."""
    return current_env().is_main


def barrier() -> None:
    if current_env().is_distributed:
        dist.barrier()


def broadcast_object(obj: Any, env: Optional[DistEnv] = None) -> Any:
    """Rank 0's ``obj`` on every rank (pickled); the object itself in one process."""
    env = env or current_env()
    if not env.is_distributed:
        return obj
    box = [obj if env.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _collective_device(env: DistEnv) -> torch.device:
    """Where small tensors for collectives live: the GPU under nccl, the CPU under gloo."""
    return env.device if env.backend == "nccl" else torch.device("cpu")


def _reduce_scalar(value, op, dtype: torch.dtype, env: Optional[DistEnv]) -> float:
    env = env or current_env()
    if not env.is_distributed:
        return value
    device = _collective_device(env)
    t = torch.tensor([value], dtype=dtype, device=device)
    dist.all_reduce(t, op=op)
    return t.item()


def max_over_ranks(value: int, env: Optional[DistEnv] = None) -> int:
    """The largest of the ranks' ``value`` (e.g. micro-batches per step, so every rank runs as many)."""
    return int(_reduce_scalar(int(value), dist.ReduceOp.MAX, torch.int64, env))


def sum_over_ranks(value: float, env: Optional[DistEnv] = None) -> float:
    """The sum of the ranks' ``value`` (e.g. the step's CoT tokens, for a loss normalised by all of them)."""
    return float(_reduce_scalar(float(value), dist.ReduceOp.SUM, torch.float64, env))


def cleanup_distributed() -> None:
    """Leave the process group (at the end of a run)."""
    global _ENV
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _ENV = None


# ----------------------------------------------------------------------------------------------
# Wrapping


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

    def forward(self, fn: Callable[..., Any], *args, **kwargs):
        if not callable(fn):
            raise TypeError(f"DistributedJudge is called as wrapped(fn, *args); got a {type(fn).__name__} "
                            "as fn (pass a function taking the model first)")
        return fn(self.model, *args, **kwargs)


def _unwrap_peft(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layers(model: nn.Module) -> List[nn.Module]:
    """The decoder layers of a transformers causal LM (peft-wrapped or not): the FSDP units."""
    base = _unwrap_peft(model)
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


def _mixed_precision(model: nn.Module):
    """FSDP needs one dtype per unit: peft keeps fp32 adapters on a bf16 model, so gather everything in the
    lowest floating dtype present (compute dtype), keep fp32 shards, reduce gradients in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) <= 1:
        return MixedPrecisionPolicy(cast_forward_inputs=False)
    low = min(dtypes, key=lambda d: torch.finfo(d).bits)
    return MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32, cast_forward_inputs=False)


def wrap_model(model: nn.Module, parallel: str = "fsdp", env: Optional[DistEnv] = None, *,
               reshard_after_forward: bool = True) -> nn.Module:
    """Wrap ``model`` (already on ``env.device``) for ``parallel`` in fsdp | ddp | none.

    Returns a module to call as ``wrapped(fn, *args)``; build the optimizer
    from ``wrapped.parameters()`` afterwards.  In a one-process environment
    every mode is ``none`` (nothing to shard or synchronise).
    """
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {', '.join(PARALLEL_MODES)}, got {parallel!r}")
    env = env or current_env()
    root = DistributedJudge(model)
    if not env.is_distributed or parallel == "none":
        return root
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(root, device_ids=device_ids, gradient_as_bucket_view=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    mp_policy = _mixed_precision(model)
    # transformers' generate then runs with synced_gpus: a rank whose sequences are all finished keeps
    # stepping (and joining the all-gathers) until every rank is done, instead of leaving the others hanging.
    for module in {id(m): m for m in (model, _unwrap_peft(model))}.values():
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


def _grad_device(grads: Sequence[torch.Tensor]) -> torch.device:
    if grads:
        g = grads[0]
        return (g.to_local() if hasattr(g, "to_local") else g).device
    return current_env().device


# ----------------------------------------------------------------------------------------------
# Work split and metrics


def shard_for_rank(items: Sequence, env: Optional[DistEnv] = None, *, pad: bool = False) -> list:
    """This rank's contiguous, equal share of ``items`` (whole prompts: their rollout groups stay rank-local).

    Every rank must get as many items as the others (under FSDP every forward
    is a collective), so an uneven split is an error, or with ``pad=True``
    (evaluation) the shares are rounded up and filled with copies of the last
    item; ``all_gather_list(..., total=len(items))`` drops them again.
    """
    env = env or current_env()
    n = len(items)
    if n % env.world_size and not pad:
        raise ValueError(f"{n} prompts per step cannot be split evenly over {env.world_size} ranks; "
                         "make prompts_per_step a multiple of the number of processes")
    if n == 0:
        return []
    share = -(-n // env.world_size)
    mine = list(items[env.rank * share:(env.rank + 1) * share])
    return mine + [items[-1]] * (share - len(mine))


def rank_seed(seed: int, env: Optional[DistEnv] = None) -> int:
    """A per-rank seed for sampling, so ranks draw different CoTs (the data order uses ``seed`` itself)."""
    env = env or current_env()
    return int(seed) + 1_000_003 * env.rank


SUM_KEYS = ("sequences", "train_tokens", "generated_tokens", "tokens_per_s")
MAX_KEYS = ("peak_mem_mb", "peak_memory_gib", "peak_memory_mb", "advantage_max", "step_s", "rollout_s")
MIN_KEYS = ("advantage_min",)


def all_reduce_metrics(metrics: Dict[str, Any], env: Optional[DistEnv] = None, *,
                       sum_keys: Iterable[str] = SUM_KEYS, max_keys: Iterable[str] = MAX_KEYS,
                       min_keys: Iterable[str] = MIN_KEYS) -> Dict[str, Any]:
    """One metrics record for the whole step: the mean over ranks of every number, except the sum for
    ``sum_keys`` (counts, throughput), the maximum for ``max_keys`` (peak memory, times) and the minimum
    for ``min_keys``.  Non-numeric values (strings, None, booleans) are passed through as given.
    Every rank must pass the same numeric keys (checked)."""
    env = env or current_env()
    if not env.is_distributed:
        return dict(metrics)
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    device = _collective_device(env)
    check = torch.tensor([len(keys), zlib.crc32("\0".join(keys).encode())], dtype=torch.int64, device=device)
    low, high = check.clone(), check.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise ValueError(f"all_reduce_metrics: ranks passed different metric names (rank {env.rank}: {keys})")
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    reduced = {}
    for op in (dist.ReduceOp.SUM, dist.ReduceOp.MAX, dist.ReduceOp.MIN):
        reduced[op] = values.clone()
        dist.all_reduce(reduced[op], op=op)
    out = dict(metrics)
    summed, maxed, minned = set(sum_keys), set(max_keys), set(min_keys)
    for j, k in enumerate(keys):
        if k in summed:
            value = float(reduced[dist.ReduceOp.SUM][j])
        elif k in maxed:
            value = float(reduced[dist.ReduceOp.MAX][j])
        elif k in minned:
            value = float(reduced[dist.ReduceOp.MIN][j])
        else:
            value = float(reduced[dist.ReduceOp.SUM][j]) / env.world_size
        out[k] = int(value) if isinstance(metrics[k], int) and k in summed else value
    return out


def all_gather_list(items: Sequence, env: Optional[DistEnv] = None, total: Optional[int] = None) -> list:
    """Every rank's list, concatenated in rank order, on every rank (e.g. evaluation predictions made on
    each rank's share of the held-out prompts); ``total`` drops the padding of ``shard_for_rank(pad=True)``."""
    env = env or current_env()
    if not env.is_distributed:
        return list(items)[:total]
    gathered: List[Optional[list]] = [None] * env.world_size
    dist.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part][:total]


# ----------------------------------------------------------------------------------------------
# Checkpoints: full (world-size independent) state dicts gathered on rank 0

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
