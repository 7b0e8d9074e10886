"""Where loss mode's time goes: ``judge_loss``'s loop timed phase by phase.

``real_kernels.loss._Run.execute`` takes an optional phase timer and enters
``phase(name)`` around each of ``real_kernels.loss.PHASES`` for every chunk
(the logits GEMM, the statistics pass, the caller's loss_fn, the dlogits pass,
the dh and dW GEMMs, and the accumulation of the loss, the outputs and the
final casts).  ``phase_breakdown`` runs one REAL-shaped loss (policy gradient
on the log-probs, squared error of the expected score, an entropy bonus) on
random inputs and reports the mean milliseconds per call of each phase and its
share of their sum.  On CUDA each phase is bracketed by CUDA events (read once,
after a synchronize, so the timing adds no host stalls inside the loop); on the
CPU by ``time.perf_counter``.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Dict, Iterator, List, Tuple

import torch

from real_kernels.loss import PHASES, _Run
from real_kernels.core.sizing import plan_chunks
from real_kernels.core.outputs import JudgeHeadOutput
from real_kernels.core.validation import resolve_backend, validate_head_args

SCORE_IDS = (15, 16, 17, 18, 19)  # five score tokens, values 1..5


class PhaseClock:
    """A phase timer for ``_Run.execute``: ``with clock(name): ...`` adds that span to ``name``'s total."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._events: List[Tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds: Dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._seconds[name] += time.perf_counter() - t0

    def milliseconds(self) -> Dict[str, float]:
        """Total milliseconds per phase so far (synchronizes on CUDA)."""
        if self.cuda:
            torch.cuda.synchronize()
        totals = {name: 1e3 * s for name, s in self._seconds.items()}
        for name, start, end in self._events:
            totals[name] = totals.get(name, 0.0) + start.elapsed_time(end)
        return totals


def _problem(n: int, hdim: int, vocab: int, dtype: torch.dtype, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(n, hdim, generator=gen) / hdim ** 0.25).to(device=device, dtype=dtype)
    weight = (torch.randn(vocab, hdim, generator=gen) / hdim ** 0.25).to(device=device, dtype=dtype)
    targets = torch.randint(0, vocab, (n,), generator=gen).to(device)
    score_targets = (torch.rand(n, generator=gen) * 4 + 1).to(device)
    adv = torch.randn(n, generator=gen).to(device)
    ids = [i % vocab for i in SCORE_IDS]
    if len(set(ids)) != len(ids):
        ids = list(range(min(len(SCORE_IDS), vocab)))
    values = [float(j + 1) for j in range(len(ids))]
    args = validate_head_args(hidden, weight, targets, ids, values, score_targets=score_targets,
                              temperature=0.7, return_entropy=True)

    def loss_fn(out: JudgeHeadOutput, rows: slice) -> torch.Tensor:
        return -(adv[rows] * out.logprobs).sum() + out.sq_error.sum() - 0.01 * out.entropy.sum()

    return args, loss_fn


def phase_breakdown(n: int, hdim: int, vocab: int, *, dtype: torch.dtype = torch.bfloat16, device="cuda",
                    repeats: int = 3) -> List[Dict[str, float]]:
    """Rows ``{"phase", "ms", "share"}`` for each of ``PHASES``: mean ms per ``judge_loss`` call, share of the sum."""
    for name, value in (("n", n), ("hdim", hdim), ("vocab", vocab), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    device = torch.device(device)
    args, loss_fn = _problem(n, hdim, vocab, dtype, device)
    plan = plan_chunks(n, vocab, device, dtype)
    run = _Run(args, loss_fn, plan, resolve_backend("auto", args.hidden))
    with torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else contextlib.nullcontext():
        run.execute(True, True)  # warm-up: compilation, autotuning, buffers
        clock = PhaseClock(device)
        for _ in range(repeats):
            run.execute(True, True, phase=clock)
    totals = clock.milliseconds()
    ms = {name: totals.get(name, 0.0) / repeats for name in PHASES}
    whole = sum(ms.values()) or 1.0
    return [{"phase": name, "ms": ms[name], "share": ms[name] / whole} for name in PHASES]


def format_breakdown(rows: List[Dict[str, float]]) -> str:
    """The rows as a small text table (what gpu_check prints)."""
    lines = [f"{'phase':<14} {'ms':>9} {'share':>7}"]
    lines += [f"{r['phase']:<14} {r['ms']:>9.3f} {100 * r['share']:>6.1f}%" for r in rows]
    lines.append(f"{'sum':<14} {sum(r['ms'] for r in rows):>9.3f}")
    return "\n".join(lines)
