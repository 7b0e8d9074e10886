"""Several GPUs and nodes with PyTorch's own stack: torchrun's process group and the collectives the loop uses.

Three modules, one job each:

- ``real.multi_gpu.distributed`` (this one): join and leave the process group torchrun
  describes (``setup_distributed`` / ``cleanup_distributed``), where this
  process sits (``DistEnv``), and the few collectives the loop needs (scalars,
  metrics, pickled objects, each rank's share of the prompts);
- ``real.multi_gpu.parallel``: FSDP2 / DDP around the judge model (``wrap_model``) and
  what the loop does with the wrapped model (gradient sync, clipping, unsharded
  generation); its docstring explains why everything runs as ``wrapped(fn, ...)``;
- ``real.loop.full_state``: full, world-size independent state dicts for checkpoints.

Rollouts and advantages: each rank takes a contiguous, equal share of the
step's prompts and samples all G CoTs of each of its prompts, so every RLOO
group is complete on one rank and advantages need no communication.  With
per-sequence loss aggregation (token-mean, sequence-sum) the mean of the
ranks' losses is the global loss, and DDP/FSDP average gradients, so K ranks
with B/K prompts each take the same step as one process with B prompts (the
tests check losses and updated weights).  A loss normalised by the batch's
total token count (batch-token-mean) is normalised per rank instead.
Sampling uses ``rank_seed(seed, env)`` so ranks draw different CoTs.

A late rank (stopped, hung, on an unreachable node) makes its peers wait in a
collective for ``timeout_s`` (``--collective-timeout``); then
``late_rank_report`` says which rank it is: every rank beats a heartbeat into
torchrun's store from a small thread (a stopped process's beat stops with it)
and notes where it is in the loop (``note_progress``).

Teardown (``cleanup_distributed``): the caller first drops every holder of the
group (the wrapped model, the optimizer); this then empties DTensor's caches
(their sharding specs hold FSDP's device mesh, and the mesh the group), collects
garbage, destroys the group and checks that gloo's threads are gone.  A process
that leaves with gloo threads running can die in interpreter finalisation
(``terminate called without an active exception``): should a PyTorch version
keep some alive anyway, ``exit_process`` ends the process without finalisation,
once everything is flushed.
"""
from __future__ import annotations

import datetime
import gc
import logging
import os
import sys
import threading
import time
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
        _STATE.timeout_s = timeout_s
    elif dist.is_initialized():
        backend = dist.get_backend()
        world, rank = dist.get_world_size(), dist.get_rank()
    _ENV = DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev,
                   backend=backend if world > 1 else None)
    if world > 1:
        logger.info("rank %d/%d on %s (%s)", rank, world, dev, backend)
        _STATE.used_group = True
        if _STATE.heartbeat is None:
            _STATE.heartbeat = _Heartbeat(rank)
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


def cleanup_distributed(broken: bool = False) -> List[str]:
    """Leave the process group (at the end of a run; drop the wrapped model, optimizer and mesh first).

    Returns the names of the gloo threads still running afterwards (see the module docstring).  ``broken``:
    a collective failed (a late rank), so the group is not destroyed (that could wait on the late rank too).
    """
    global _ENV
    _ENV = None
    if _STATE.heartbeat is not None:
        _STATE.heartbeat.stop()
        _STATE.heartbeat = None
    if broken or not (dist.is_available() and dist.is_initialized()):
        return gloo_threads()
    _drop_dtensor_caches()
    gc.collect()  # holders of the group in reference cycles go before it does
    dist.destroy_process_group()
    gc.collect()
    left = gloo_threads()
    for _ in range(20):  # the threads are joined as the group's C++ object goes: give it a moment
        if not left:
            break
        time.sleep(0.05)
        left = gloo_threads()
    if left:
        logger.debug("gloo threads still running after the process group was destroyed: %s", left)
    return left


def _drop_dtensor_caches() -> None:
    """Empty the caches of ``torch.distributed.tensor`` (functools caches, the sharding propagator's, the C++
    one, the redistribute planner's): their specs hold FSDP's device mesh, which holds the process group."""
    if "torch.distributed.tensor" not in sys.modules:
        return
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("torch.distributed.tensor"):
            continue
        for value in list(vars(module).values()):
            for item in [value, *(vars(value).values() if isinstance(value, type) else ())]:
                clear = getattr(getattr(item, "__func__", item), "cache_clear", None)
                if callable(clear):
                    try:
                        clear()
                    except TypeError:  # a cache_clear that is not functools' (needs arguments)
                        pass
    try:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._redistribute import clear_redistribute_planner_cache

        propagator = DTensor._op_dispatcher.sharding_propagator
        propagator.propagate_op_sharding.cache_clear()  # per-thread: the instance's, not the class's
        propagator._propagate_tensor_meta_cached.cache_clear()
        torch._C._clear_DTensor_sharding_propagator_cache()
        clear_redistribute_planner_cache()
    except (ImportError, AttributeError):  # another PyTorch version: gloo_threads() tells what is left
        pass


def gloo_threads() -> List[str]:
    """The names of this process's gloo threads (Linux; an empty list elsewhere)."""
    names = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return names
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm", encoding="utf-8") as fh:
                name = fh.read().strip()
        except OSError:
            continue
        if "gloo" in name:
            names.append(name)
    return sorted(names)


def exit_process(code: int) -> None:
    """Leave the process with ``code``: normally, or, while gloo threads are still running (a holder of the
    group outlived ``cleanup_distributed``), without interpreter finalisation, which they could abort; everything
    is flushed first."""
    if not _STATE.used_group or not gloo_threads():
        sys.exit(code)
    logger.warning("leaving without interpreter finalisation: gloo threads still running (%s)", gloo_threads())
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


# ----------------------------------------------------------------------------------------------
# A late rank: timeouts, heartbeats, progress notes


class CollectiveTimeout(RuntimeError):
    """A collective failed or gave up waiting (``--collective-timeout``); the message names the late rank(s)."""


class _State:
    def __init__(self) -> None:
        self.heartbeat: Optional["_Heartbeat"] = None
        self.timeout_s: Optional[float] = None
        self.used_group = False


_STATE = _State()
_HEARTBEAT_S = 1.0


def _store():
    return dist.distributed_c10d._get_default_store()


class _Heartbeat:
    """A daemon thread that counts this rank's beats into the store every ``_HEARTBEAT_S`` seconds."""

    def __init__(self, rank: int):
        self.key, self._stop = f"real/heartbeat/{rank}", threading.Event()
        try:
            self.store = _store()
        except (RuntimeError, ValueError):  # no default store (a group made another way): no heartbeat
            self._thread = None
            return
        self._thread = threading.Thread(target=self._run, name="real-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        beats = 0
        while True:
            try:
                self.store.set(self.key, str(beats))
            except Exception:  # the store is gone (its server rank left): nothing left to tell
                return
            beats += 1
            if self._stop.wait(_HEARTBEAT_S):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def note_progress(what: str, env: Optional[DistEnv] = None) -> None:
    """Tell the other ranks where this one is (e.g. ``"step 3"``), for ``late_rank_report``."""
    env = env or current_env()
    if env.is_distributed and _STATE.heartbeat is not None and _STATE.heartbeat._thread is not None:
        _STATE.heartbeat.store.set(f"real/progress/{env.rank}", what)


def _read_keys(store, prefix: str, world: int) -> Dict[int, Optional[str]]:
    out: Dict[int, Optional[str]] = {}
    for rank in range(world):
        key = f"{prefix}/{rank}"
        try:
            out[rank] = store.get(key).decode() if store.check([key]) else None
        except Exception:  # the store itself is unreachable
            out[rank] = None
    return out


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed or timed out (gloo or NCCL), rather than a bug of ours."""
    backend_error = getattr(dist, "DistBackendError", ())
    text = str(exc)
    return isinstance(exc, backend_error) or any(s in text for s in (
        "Timed out", "timed out", "Connection closed by peer", "Connection reset by peer", "NCCL", "gloo"))


def late_rank_report(exc: BaseException, env: Optional[DistEnv] = None) -> str:
    """Which rank the others waited for: the ranks whose heartbeat stopped (a stopped or hung process), else
    the ranks whose last progress note differs from this rank's.  Takes a few heartbeats to tell."""
    env = env or current_env()
    waited = f"--collective-timeout {_STATE.timeout_s:g} s" if _STATE.timeout_s else "the collective timeout"
    head = f"rank {env.rank}: a collective failed after waiting up to {waited} for the other ranks"
    cause = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    if _STATE.heartbeat is None or _STATE.heartbeat._thread is None:
        return f"{head} ({cause})"
    store = _STATE.heartbeat.store
    first = _read_keys(store, "real/heartbeat", env.world_size)
    time.sleep(3 * _HEARTBEAT_S)
    second = _read_keys(store, "real/heartbeat", env.world_size)
    progress = _read_keys(store, "real/progress", env.world_size)
    others = [r for r in range(env.world_size) if r != env.rank]
    silent = [r for r in others if first[r] == second[r]]
    behind = [r for r in others if r not in silent and progress[r] != progress[env.rank]]
    where = lambda r: progress[r] or "not started"  # noqa: E731
    if silent:
        late = "; ".join(f"rank {r} has stopped answering (stopped, hung, or its node is gone; last at "
                         f"{where(r)})" for r in silent)
    elif behind:
        late = "; ".join(f"rank {r} is late: it is at {where(r)}" for r in behind)
    else:
        late = "no other rank looks stopped or behind: " + ", ".join(f"rank {r} at {where(r)}" for r in others)
    return f"{head}: {late}; this rank is at {where(env.rank)} ({cause})"


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
