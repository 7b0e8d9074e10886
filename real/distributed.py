"""Several GPUs and nodes with PyTorch's own stack: torchrun's process group and the collectives the loop uses.

Three modules, one job each:

- ``real.distributed`` (this one): join and leave the process group torchrun
  describes (``setup_distributed`` / ``cleanup_distributed``), where this
  process sits (``DistEnv``), and the few collectives the loop needs (scalars,
  metrics, pickled objects, each rank's share of the prompts);
- ``real.parallel``: FSDP2 / DDP around the judge model (``wrap_model``) and
  what the loop does with the wrapped model (gradient sync, clipping, unsharded
  generation); its docstring explains why everything runs as ``wrapped(fn, ...)``;
- ``real.full_state``: full, world-size independent state dicts for checkpoints.

Rollouts and advantages: each rank takes a contiguous, equal share of the
step's prompts and samples all G CoTs of each of its prompts, so every RLOO
group is complete on one rank and advantages need no communication.  With
per-sequence loss aggregation (token-mean, sequence-sum) the mean of the
ranks' losses is the global loss, and DDP/FSDP average gradients, so K ranks
with B/K prompts each take the same step as one process with B prompts (the
tests check losses and updated weights).  A loss normalised by the batch's
total token count (batch-token-mean) is normalised per rank instead.
Sampling uses ``rank_seed(seed, env)`` so ranks draw different CoTs.
"""
from __future__ import annotations

import datetime
import logging
import os
import zlib
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


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
