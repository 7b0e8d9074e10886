"""One-shot GPU check: the kernels against the reference at real shapes, then speed, memory, determinism.

Run on a CUDA machine (it stops starting new work after ``--budget``
seconds, 300 by default; not yet run on a GPU, so no timing is claimed):

    python -m benchmarks.gpu_check --output-dir "$OUT"

1. Correctness: ``judge_head`` (which contains ``linear_logprobs``) with the
   ``triton`` backend, and ``judge_loss`` (``loss``: the same head in loss
   mode, its loss the same weighted sum of every output), against the fp32
   ``reference`` at N = 4096, H = 4096 and 5120, V = 151,936, bf16 inputs, for
   two settings (temperature 1 with entropy; temperature 0.7, ``normalize``,
   ``ignore_index`` rows and a score mask), score ids at the first and last
   vocabulary id, random upstream gradients on every output.  The reference
   runs in row chunks (rows are independent; ``dW`` is summed over chunks in
   fp32), so it never needs the whole ``[N, V]`` fp32 logits at once.
2. ``judge_loss`` phase by phase at the target shape (N = 16,384, H = 5,120,
   V = 151,936, bf16): logits GEMM, stats pass, loss_fn, dlogits pass, dh
   GEMM, dW GEMM(s), accumulation, with CUDA events
   (``benchmarks.loss_phases.phase_breakdown``).
3. Forward and backward timed apart (CUDA events) at N = 16,384 and 16,400
   (a row tail), H = 5,120, V = 151,936, bf16, for two losses (``advantage``:
   ``sum(adv * logprobs)``; ``judge``: that plus the squared error of the
   expected score on the score rows) and the providers (``SPLIT_PROVIDERS``):
   naive PyTorch, ``triton`` (``judge_head`` / ``linear_logprobs`` under
   autograd), ``triton-low`` (the same with ``memory="low"``, where
   ``judge_head`` has that argument), ``loss`` (``judge_loss``), Liger-Kernel
   (``accum_dtype`` default, and ``liger-fp32`` with ``torch.float32``) and
   Cut Cross-Entropy where installed (skipped with the reason where not, or
   where the installed version lacks what the row needs).  The table says
   what each provider does (how many NHV of GEMM work, where dW accumulates).
   Each provider's gradients are computed twice and must be bit-identical
   (ours; peers are reported), and agree with naive's; TFLOP/s is counted
   against 6NHV (logits, dh and dW once: the floor for a loss) and given as
   a share of 790 TFLOP/s (a bf16 GEMM on this H200).
4. Speed and memory: forward and forward+backward of the log-probs and the
   judge head at N = 4096 for every provider (the same machinery as
   ``python -m benchmarks``), unless ``--skip-timing``.

Writes ``gpu_check.md`` (every table), ``gpu_check_correctness.json``,
``gpu_check_phases.json``, ``gpu_check_split.json`` and the timing CSV / JSON
/ plots under ``--output-dir``, all rewritten after every row and every
section (``ReportFiles``): a run killed at its time limit leaves everything
it finished, and the markdown names the section that was running.  Exits 0
when every check passes, 1 when one fails (a peer's failure is reported, not
failed), 2 without CUDA.  ``--device cpu`` with ``--backends torch,loss``
and tiny shapes runs the same code on the CPU (that is how the test suite
exercises it).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .measure import MIB, is_oom
from .output import write_outputs
from .providers import HeadInputs, Provider, ProviderUnsupported, get_provider
from .report import describe_device
from .runner import build_cases, run_cases
from .shapes import (ALL_PROVIDERS, DTYPES, QWEN3_VOCAB, VARIANT_PROVIDERS, Shape, canonical_dtype, parse_choice_list,
                     parse_int_list)
from .workloads import LOGIT_STD, make_inputs

FORWARD_ABS_TOL = 1e-2  # log-probs, score log-probs, expected score, entropy: max |fused - reference|
GRAD_REL_TOL = 2e-2  # dh, dW: ||fused - reference|| / ||reference|| (bf16 gradients round at ~4e-3)
TIMING_OPS = ("logprobs-fwd", "logprobs-fwdbwd", "judge-fwdbwd")
CHECK_BACKENDS = ("triton", "torch", "loss")  # judge_head's backends; loss: judge_loss, backend auto
OUR_PROVIDERS = ("torch", "triton", "triton-low", "loss")
SPLIT_PROVIDERS = ("naive", "triton", "triton-low", "loss", "liger", "liger-fp32", "cce")
SPLIT_LOSSES = ("advantage", "judge")
PEAK_TFLOPS = 790.0  # an 8192^3 bf16 GEMM through PyTorch on this workplace's H200 (random data)
SPLIT_PROVIDER_WORK = {  # what each provider of the forward/backward table does (providers.py has the details)
    "naive": "hidden @ weight.T in the input dtype, fp32 log_softmax, autograd (materialised [N, V] logits; 6NHV)",
    "torch": "real_kernels' chunked PyTorch backend under autograd (backward recomputes the logits: 8NHV)",
    "triton": "judge_head / linear_logprobs (Triton) under autograd (backward recomputes the logits: 8NHV)",
    "triton-low": "the same with memory=\"low\" (the fused kernel, no logits chunk; 8NHV)",
    "loss": "judge_loss: the caller's loss inside the op, gradients formed in the forward (6NHV); its "
            "backward only hands them out",
    "liger": "Liger-Kernel fused linear CE, reduction=\"none\": defers its gradients to backward, which "
             "recomputes the logits (8NHV); dW accumulated in bf16",
    "liger-fp32": "the same with accum_dtype=torch.float32 (dW accumulated in an fp32 [V, H] buffer; 8NHV)",
    "cce": "Cut Cross-Entropy, reduction=\"none\": log-sum-exp forward, backward recomputes the logits "
           "(8NHV); dh and dW accumulated in bf16 under spin locks, gradient blocks below bf16 resolution skipped",
}


@dataclass(frozen=True)
class HeadSetting:
    name: str
    temperature: float
    normalize: bool
    return_entropy: bool
    ignore_fraction: float  # share of rows whose target is ignore_index
    masked_scores: bool  # sq_error only on some rows


SETTINGS = (
    HeadSetting("t=1.0 entropy", 1.0, False, True, 0.0, False),
    HeadSetting("t=0.7 normalize ignore mask", 0.7, True, False, 0.1, True),
)


@dataclass
class CheckRow:
    hidden: int
    setting: str
    backend: str
    quantity: str
    max_abs_err: float
    rel_err: float
    limit: str
    passed: bool


def _score_ids(vocab: int) -> List[int]:
    """First and last vocabulary ids plus three in between (tile edges are covered by V itself)."""
    ids = [0, vocab // 3, vocab // 2, 2 * vocab // 3, vocab - 1]
    return sorted(set(ids)) if vocab >= 5 else list(range(vocab))


def _make_problem(n: int, hidden: int, vocab: int, dtype: torch.dtype, device: str, setting: HeadSetting, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen, device=device).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen, device=device) * (LOGIT_STD / math.sqrt(hidden))).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=gen, device=device)
    if setting.ignore_fraction > 0:
        targets[torch.rand(n, generator=gen, device=device) < setting.ignore_fraction] = -100
    ids = _score_ids(vocab)
    m = len(ids)
    values = torch.arange(1, m + 1, dtype=torch.float32, device=device)
    score_targets = 1 + (m - 1) * torch.rand(n, generator=gen, device=device)
    mask = (torch.rand(n, generator=gen, device=device) < 0.25) if setting.masked_scores else None
    grads = {
        "logprobs": torch.randn(n, generator=gen, device=device),
        "score_logprobs": torch.randn(n, m, generator=gen, device=device),
        "expected_score": torch.randn(n, generator=gen, device=device),
        "sq_error": torch.randn(n, generator=gen, device=device),
        "entropy": torch.randn(n, generator=gen, device=device) if setting.return_entropy else None,
    }
    return h, w, targets, ids, values, score_targets, mask, grads


def _head(h, w, targets, ids, values, score_targets, mask, setting, backend):
    from real_kernels import judge_head

    return judge_head(h, w, targets, ids, values, score_targets=score_targets, score_mask=mask,
                      normalize=setting.normalize, temperature=setting.temperature,
                      return_entropy=setting.return_entropy, backend=backend)


def _outputs_and_grads(h, w, targets, ids, values, score_targets, mask, grads, setting, backend):
    """(outputs, dh, dW) of ``_weighted_sum(outputs, grads)``: judge_head + autograd, or judge_loss for "loss"."""
    if backend == "loss":
        from real_kernels import judge_loss

        def loss_fn(out, rows):
            return _weighted_sum(out, {k: (None if g is None else g[rows]) for k, g in grads.items()})

        loss, out = judge_loss(h, w, targets, loss_fn, score_token_ids=ids, score_values=values,
                               score_targets=score_targets, score_mask=mask, normalize=setting.normalize,
                               temperature=setting.temperature, return_entropy=setting.return_entropy)
    else:
        out = _head(h, w, targets, ids, values, score_targets, mask, setting, backend)
        loss = _weighted_sum(out, grads)
    dh, dw = torch.autograd.grad(loss, (h, w))
    return out, dh, dw


def _weighted_sum(out, grads) -> torch.Tensor:
    total = 0.0
    for name, g in grads.items():
        value = getattr(out, name)
        if g is not None and value is not None:
            total = total + (g * value).sum()
    return total


def _chunked_reference(h, w, targets, ids, values, score_targets, mask, grads, setting, row_chunk):
    """Reference outputs and gradients, row chunk by row chunk, accumulated in fp32."""
    w32 = w.detach().float().requires_grad_(True)
    outs: Dict[str, List[torch.Tensor]] = {k: [] for k in grads}
    dh = torch.empty(h.shape, dtype=torch.float32, device=h.device)
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    for r0 in range(0, h.shape[0], row_chunk):
        rows = slice(r0, min(h.shape[0], r0 + row_chunk))
        hc = h[rows].detach().float().requires_grad_(True)
        out = _head(hc, w32, targets[rows], ids, values, score_targets[rows],
                    None if mask is None else mask[rows], setting, "reference")
        chunk_grads = {k: (None if g is None else g[rows]) for k, g in grads.items()}
        dhc, dwc = torch.autograd.grad(_weighted_sum(out, chunk_grads), (hc, w32))
        dh[rows] = dhc
        dw += dwc
        for k in outs:
            value = getattr(out, k)
            if value is not None:
                outs[k].append(value.detach())
        del out, dhc, dwc
    forward = {k: torch.cat(v) for k, v in outs.items() if v}
    return forward, dh, dw


def _errors(got: torch.Tensor, want: torch.Tensor):
    diff = got.detach().float() - want.float()
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    denom = want.float().norm().item()
    rel = diff.norm().item() / denom if denom > 0 else diff.norm().item()
    return max_abs, rel


def check_against_reference(n: int, hidden: int, vocab: int, *, dtype: torch.dtype, device: str,
                            backends: Sequence[str] = ("triton",), row_chunk: int = 1024,
                            settings: Sequence[HeadSetting] = SETTINGS, seed: int = 0,
                            on_rows: Optional[Callable[[List[CheckRow]], None]] = None) -> List[CheckRow]:
    """Every backend in ``backends`` (``CHECK_BACKENDS``) against the chunked fp32 reference.

    One row per (setting, backend, output or gradient); ``on_rows`` gets each
    (setting, backend)'s rows as soon as they are known (to save them).
    """
    rows: List[CheckRow] = []
    done = 0  # rows already handed to on_rows
    for i, setting in enumerate(settings):
        h, w, targets, ids, values, score_targets, mask, grads = _make_problem(
            n, hidden, vocab, dtype, device, setting, seed + i)
        ref_fwd, ref_dh, ref_dw = _chunked_reference(h, w, targets, ids, values, score_targets, mask, grads,
                                                     setting, row_chunk)
        for backend in backends:
            hl, wl = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
            out, dh, dw = _outputs_and_grads(hl, wl, targets, ids, values, score_targets, mask, grads, setting,
                                             backend)
            for name, want in ref_fwd.items():
                max_abs, rel = _errors(getattr(out, name), want)
                rows.append(CheckRow(hidden, setting.name, backend, name, max_abs, rel,
                                     f"max abs <= {FORWARD_ABS_TOL:g}", max_abs <= FORWARD_ABS_TOL))
            for name, got, want in (("d hidden", dh, ref_dh), ("d weight", dw, ref_dw)):
                max_abs, rel = _errors(got, want)
                rows.append(CheckRow(hidden, setting.name, backend, name, max_abs, rel,
                                     f"rel <= {GRAD_REL_TOL:g}", rel <= GRAD_REL_TOL))
            del out, dh, dw, hl, wl
            if on_rows is not None:
                on_rows(rows[done:])
            done = len(rows)
        del h, w, ref_fwd, ref_dh, ref_dw
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def correctness_markdown(rows: Sequence[CheckRow], n: int, vocab: int, dtype: str) -> str:
    lines = [f"### Fused head against the fp32 reference: N={n:,}, V={vocab:,}, {dtype} inputs", "",
             "| H | setting | backend | output | max abs err | rel err | limit | pass |",
             "|---:|---|---|---|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r.hidden:,} | {r.setting} | {r.backend} | {r.quantity} | {r.max_abs_err:.2e} | "
                     f"{r.rel_err:.2e} | {r.limit} | {'yes' if r.passed else '**NO**'} |")
    return "\n".join(lines)


# ---- forward and backward timed apart, determinism, agreement ------------------------------------------------------

@dataclass
class SplitRow:
    """One (N, loss, provider) of the forward/backward timing."""

    n: int
    hidden: int
    vocab: int
    loss: str  # "advantage" or "judge"
    provider: str
    status: str  # "ok", "skipped", "oom", "error"
    note: str = ""
    forward_ms: Optional[float] = None  # medians over the timed runs
    backward_ms: Optional[float] = None
    total_ms: Optional[float] = None
    tflops: Optional[float] = None  # 6NHV / total
    pct_of_peak: Optional[float] = None  # tflops / PEAK_TFLOPS, CUDA only
    peak_extra_mib: Optional[float] = None  # CUDA: max allocated during one fwd+bwd above what was allocated before
    deterministic: Optional[bool] = None  # two runs gave bit-identical dh and dW
    dh_rel_err: Optional[float] = None  # against naive's gradients in the same run
    dw_rel_err: Optional[float] = None

    @property
    def failed(self) -> bool:
        """A failure of our own providers; a peer's or naive's problems are reported, not failed."""
        if self.provider not in OUR_PROVIDERS or self.status == "skipped":
            return False
        if self.status != "ok" or self.deterministic is False:
            return True
        return any(e is not None and e > GRAD_REL_TOL for e in (self.dh_rel_err, self.dw_rel_err))


class _Clock:
    """CUDA events on the GPU (what the device did between two marks), ``perf_counter`` on the CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


def _loss_closure(provider: Provider, loss: str, inputs: HeadInputs) -> Callable[[], torch.Tensor]:
    if loss == "advantage":
        return lambda: provider.advantage_loss(inputs.hidden, inputs.weight, inputs.next_tokens, inputs.grad_logprobs)
    return lambda: provider.judge(inputs)


def _fwd_bwd(forward: Callable[[], torch.Tensor], leaves, clock: _Clock) -> Tuple[float, float, Tuple[torch.Tensor, ...]]:
    """One forward and one backward: (forward ms, backward ms, gradients)."""
    t0 = clock.mark()
    loss = forward()
    t1 = clock.mark()
    grads = torch.autograd.grad(loss, leaves)
    t2 = clock.mark()
    clock.sync()
    return clock.ms(t0, t1), clock.ms(t1, t2), grads


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def time_forward_backward(provider: Provider, loss: str, inputs: HeadInputs, device: str, repeats: int,
                          reference: Optional[Tuple[torch.Tensor, ...]]):
    """A warm-up, then ``repeats`` (>= 2) timed fwd+bwd runs; the first two also give peak memory and determinism.

    Returns (SplitRow fields as a dict, the first run's gradients).
    """
    clock = _Clock(device)
    forward = _loss_closure(provider, loss, inputs)
    leaves = (inputs.hidden, inputs.weight)
    _fwd_bwd(forward, leaves, clock)  # compiles and autotunes
    peak = None
    if clock.cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    f1, b1, first = _fwd_bwd(forward, leaves, clock)
    if clock.cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / MIB
    f2, b2, second = _fwd_bwd(forward, leaves, clock)
    deterministic = all(torch.equal(a, b) for a, b in zip(first, second))
    del second
    times = [(f1, b1), (f2, b2)]
    for _ in range(max(0, repeats - 2)):
        f, b, _grads = _fwd_bwd(forward, leaves, clock)
        times.append((f, b))
        del _grads
    fields = dict(forward_ms=_median([f for f, _ in times]), backward_ms=_median([b for _, b in times]),
                  total_ms=_median([f + b for f, b in times]), peak_extra_mib=peak, deterministic=deterministic)
    if reference is not None:
        fields["dh_rel_err"] = _errors(first[0], reference[0])[1]
        fields["dw_rel_err"] = _errors(first[1], reference[1])[1]
    return fields, first


def run_split(n_values: Sequence[int], hidden: int, vocab: int, *, dtype: str, device: str,
              providers: Sequence[str], losses: Sequence[str] = SPLIT_LOSSES, repeats: int = 5,
              deadline: Optional[float] = None, seed: int = 0,
              on_row: Optional[Callable[[SplitRow], None]] = None) -> List[SplitRow]:
    """Every (N, loss, provider); naive first when listed, as the reference of the others' gradients.

    ``deadline`` (a ``time.perf_counter()`` value): no run starts after it; the rest are skipped.
    ``on_row`` gets each row once it is finished (measured, skipped or failed), to save it.
    """
    order = sorted(providers, key=lambda p: p != "naive")
    rows: List[SplitRow] = []
    reasons: Dict[str, Optional[str]] = {}  # unavailable_reason once per provider (a peer's probe runs once)
    for n in n_values:
        flops = 6.0 * n * hidden * vocab
        inputs = None
        for loss in losses:
            reference = None
            for name in order:
                row = SplitRow(n, hidden, vocab, loss, name, "ok")
                rows.append(row)
                provider = get_provider(name)
                if name not in reasons:
                    reasons[name] = provider.unavailable_reason(device)
                if reasons[name]:
                    row.status, row.note = "skipped", reasons[name]
                    _finished(row, on_row)
                    continue
                if deadline is not None and time.perf_counter() > deadline:
                    row.status, row.note = "skipped", "time budget spent"
                    _finished(row, on_row)
                    continue
                try:
                    if inputs is None:
                        inputs = make_inputs(Shape(n, hidden, vocab, dtype), device, seed)
                    fields, grads = time_forward_backward(provider, loss, inputs, device, repeats, reference)
                    for key, value in fields.items():
                        setattr(row, key, value)
                    row.tflops = flops / (row.total_ms * 1e-3) / 1e12 if row.total_ms > 0 else None
                    if device == "cuda" and row.tflops is not None:
                        row.pct_of_peak = 100.0 * row.tflops / PEAK_TFLOPS
                    if name == "naive":
                        reference = grads
                    del grads
                except ProviderUnsupported as exc:  # e.g. an installed version without the argument asked for
                    row.status, row.note = "skipped", str(exc)
                except Exception as exc:  # an OOM or a broken peer is a row of the table, not a crash
                    row.status = "oom" if is_oom(exc) else "error"
                    row.note = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                finally:
                    gc.collect()
                    if device == "cuda":
                        torch.cuda.empty_cache()
                _finished(row, on_row)
            del reference
        del inputs
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _finished(row: SplitRow, on_row: Optional[Callable[[SplitRow], None]]) -> None:
    print(f"gpu_check: split N={row.n} {row.loss} {row.provider}: {row.status}"
          + (f", {row.total_ms:.1f} ms" if row.total_ms is not None else "")
          + (f" ({row.note})" if row.status != "ok" and row.note else ""), file=sys.stderr)
    if on_row is not None:
        on_row(row)


def _cell(value: Optional[float], fmt: str = "{:.1f}") -> str:
    return "–" if value is None else fmt.format(value)


def split_markdown(rows: Sequence[SplitRow], dtype: str, device: str) -> str:
    if not rows:
        return ""
    ns = sorted({r.n for r in rows})
    r0 = rows[0]
    lines = [f"### Forward and backward timed apart: N={' and '.join(f'{n:,}' for n in ns)}, H={r0.hidden:,}, "
             f"V={r0.vocab:,}, {dtype}", "",
             "Median of the timed runs "
             + ("(CUDA events)" if device == "cuda" else "(perf_counter)")
             + f"; % of peak: of {PEAK_TFLOPS:.0f} TFLOP/s (bf16 GEMM on this H200); peak extra: "
               "above the inputs during one forward+backward, the returned gradients included; "
               "same grads: two runs bit-identical; rel err: ||g - g_naive|| / ||g_naive||. "
               "Losses: advantage = sum(adv * logprobs); judge = that + squared error of the expected score. "
               "TFLOP/s counts 6NHV for every provider, the floor for a loss; what each one does:", ""]
    lines += [f"- {name}: {SPLIT_PROVIDER_WORK.get(name, get_provider(name).description)}"
              for name in dict.fromkeys(r.provider for r in rows)]
    lines += ["",
             "| N | loss | provider | forward ms | backward ms | total ms | TFLOP/s | % of peak | peak extra MiB | "
             "same grads | dh rel err | dW rel err | status |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        same = "–" if r.deterministic is None else ("yes" if r.deterministic else "**NO**")
        status = r.status if r.status == "ok" else f"{r.status}: {r.note}"
        if r.failed:
            status = f"**FAILED** {status}"
        lines.append(f"| {r.n:,} | {r.loss} | {r.provider} | {_cell(r.forward_ms)} | {_cell(r.backward_ms)} | "
                     f"{_cell(r.total_ms)} | {_cell(r.tflops, '{:.0f}')} | {_cell(r.pct_of_peak, '{:.0f}%')} | "
                     f"{_cell(r.peak_extra_mib, '{:,.0f}')} | {same} | {_cell(r.dh_rel_err, '{:.1e}')} | "
                     f"{_cell(r.dw_rel_err, '{:.1e}')} | {status} |")
    if device == "cuda":
        lines += [""] + target_lines(rows)
    return "\n".join(lines)


LOSS_TARGET_MS = 140.0  # judge_loss forward+backward at N=16,384, H=5,120 (issue 10)
JUDGE_HEAD_RATIO_TARGET = 1.3  # judge_head (triton, default memory) / judge_loss on the judge loss (issue 18)


def target_lines(rows: Sequence[SplitRow]) -> List[str]:
    """The GPU targets at the smallest N, met or not, with the numbers: judge_loss's time and the peers on the
    advantage loss, judge_head against judge_loss on the judge loss (where judge_head is what triton runs)."""
    if not rows:
        return []
    n = min(r.n for r in rows)
    ok = {(r.loss, r.provider): r.total_ms for r in rows if r.n == n and r.status == "ok"}
    loss = ok.get(("advantage", "loss"))
    lines = [f"Targets (N={n:,}):"]
    if loss is None:
        lines.append("- advantage loss: judge_loss not measured")
    else:
        lines.append(f"- judge_loss forward+backward {loss:.1f} ms on the advantage loss (target <= "
                     f"{LOSS_TARGET_MS:.0f} ms): {'met' if loss <= LOSS_TARGET_MS else 'NOT met'}")
        for peer in ("liger", "liger-fp32", "cce"):
            if ("advantage", peer) in ok:
                peer_ms = ok[("advantage", peer)]
                lines.append(f"- faster than {peer} ({peer_ms:.1f} ms): {'yes' if loss < peer_ms else 'NO'}")
            else:
                lines.append(f"- {peer}: not measured")
    judge_loss_ms = ok.get(("judge", "loss"))
    for provider, label in (("triton", "judge_head (triton)"), ("triton-low", 'judge_head (triton, memory="low")')):
        head_ms = ok.get(("judge", provider))
        if judge_loss_ms is None or head_ms is None:
            lines.append(f"- {label} / judge_loss on the judge loss: not measured")
            continue
        ratio = head_ms / judge_loss_ms
        verdict = (f" (target <= {JUDGE_HEAD_RATIO_TARGET}x): {'met' if ratio <= JUDGE_HEAD_RATIO_TARGET else 'NOT met'}"
                   if provider == "triton" else " (the low-memory fallback: reported)")
        lines.append(f"- {label} / judge_loss on the judge loss = {ratio:.2f}x{verdict}")
    return lines


# ---- judge_loss phase by phase -------------------------------------------------------------------------------------

def _phase_breakdown_fn() -> Callable[..., List[Dict[str, float]]]:
    """``benchmarks.loss_phases.phase_breakdown`` (CUDA events per phase of judge_loss's loop)."""
    from .loss_phases import phase_breakdown

    return phase_breakdown


def run_phases(n: int, hidden: int, vocab: int, *, dtype: str, device: str, repeats: int) -> Tuple[List[dict], str]:
    """(rows ``{"phase", "ms", "share"}``, a note): the note says why there are no rows when there are none.

    The phases are ``real_kernels.loss.PHASES`` (logits GEMM, stats pass,
    loss_fn, dlogits pass, dh GEMM, dW GEMM, accumulation).
    """
    try:
        breakdown = _phase_breakdown_fn()
    except ImportError as exc:
        return [], f"not measured: benchmarks.loss_phases is not available ({exc})"
    try:
        rows = breakdown(n, hidden, vocab, dtype=DTYPES[dtype], device=device, repeats=repeats)
    except Exception as exc:  # an OOM or a broken hook is a line of the report, not a crash
        kind = "out of memory" if is_oom(exc) else "failed"
        return [], f"{kind}: " + " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    finally:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return [{"phase": str(r["phase"]), "ms": float(r["ms"]), "share": float(r["share"])} for r in rows], ""


def phases_markdown(rows: Sequence[dict], note: str, n: int, hidden: int, vocab: int, dtype: str, device: str) -> str:
    lines = [f"### judge_loss phase by phase: N={n:,}, H={hidden:,}, V={vocab:,}, {dtype}", ""]
    if not rows:
        return "\n".join(lines + [f"Phase breakdown {note}."])
    clock = ("CUDA events around each phase, so the sum can exceed an untimed call" if device == "cuda"
             else "perf_counter")
    lines += ["One judge_loss call (its gradients formed in the forward) on a REAL-shaped loss: policy gradient "
              "on the log-probs, squared error of the expected score, an entropy bonus, T = 0.7. Each phase "
              f"summed over the chunks, mean over the timed calls after a warm-up ({clock}).", "",
              "| phase | ms | share |", "|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['phase']} | {r['ms']:.2f} | {100.0 * r['share']:.1f}% |")
    lines.append(f"| total | {sum(r['ms'] for r in rows):.2f} | {100.0 * sum(r['share'] for r in rows):.0f}% |")
    return "\n".join(lines)


# ---- the files, rewritten after every row and section -----------------------------------------------------------

class ReportFiles:
    """gpu_check's report, rewritten whole after every row and every section.

    A run killed at its time limit (the device tool's, or gpu_suite.sh's
    ``timeout``) leaves on disk everything it finished; the markdown says
    which section was running.  Each file is written to a temporary name and
    renamed, so a kill during a write leaves the previous version, never a
    torn one.
    """

    def __init__(self, out_dir: Path, device_name: str, command: str, n: int, vocab: int, dtype: str,
                 device: str):
        self.out_dir, self.device_name, self.command = out_dir, device_name, command
        self.n, self.vocab, self.dtype, self.device = n, vocab, dtype, device
        self.start = time.perf_counter()
        self.running = "starting"  # the section in progress; "" once the run is complete
        self.check_rows: List[CheckRow] = []
        self.phase_rows: List[dict] = []
        self.phase_header: Optional[Tuple[int, int, int]] = None  # (N, H, V) once the phase section ran
        self.phase_note = ""
        self.split_rows: List[SplitRow] = []
        self.timing_markdown = ""
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def add_check_rows(self, rows: Sequence[CheckRow]) -> None:
        self.check_rows += rows
        self.save()

    def add_split_row(self, row: SplitRow) -> None:
        self.split_rows.append(row)
        self.save()

    def section(self, name: str) -> None:
        self.running = name
        self.save()

    def markdown(self) -> str:
        elapsed = time.perf_counter() - self.start
        state = (f"Complete in {elapsed:.0f} s." if not self.running else
                 f"**In progress** after {elapsed:.0f} s: {self.running} (a run cut here keeps the rows above).")
        parts = [f"## GPU check on {self.device_name}", "", f"Command: `{self.command}`", "", state, "",
                 correctness_markdown(self.check_rows, self.n, self.vocab, self.dtype), ""]
        if self.phase_header is not None:
            parts += [phases_markdown(self.phase_rows, self.phase_note, *self.phase_header, self.dtype,
                                      self.device), ""]
        if self.split_rows:
            parts += [split_markdown(self.split_rows, self.dtype, self.device), ""]
        if self.timing_markdown:
            parts += [self.timing_markdown, ""]
        return "\n".join(parts)

    def save(self) -> None:
        _write_atomic(self.out_dir / "gpu_check.md", self.markdown())
        _write_atomic(self.out_dir / "gpu_check_correctness.json",
                      json.dumps([asdict(r) for r in self.check_rows], indent=1) + "\n")
        _write_atomic(self.out_dir / "gpu_check_split.json",
                      json.dumps([asdict(r) for r in self.split_rows], indent=1) + "\n")
        _write_atomic(self.out_dir / "gpu_check_phases.json",
                      json.dumps({"shape": self.phase_header, "note": self.phase_note, "rows": self.phase_rows},
                                 indent=1) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description="Check judge_head (triton) and judge_loss against the reference at real shapes on CUDA, time "
                    "forward and backward apart at N=16,384 / 16,400 (H=5,120) with determinism, then time every "
                    "provider at N=4096. Needs a CUDA GPU (--device cpu runs the same code on tiny shapes).",
    )
    parser.add_argument("--output-dir", default="bench_results", help="where the tables go (default bench_results/)")
    parser.add_argument("--n", type=int, default=4096, help="token rows N of the correctness check and the "
                                                            "per-provider timing (default 4096)")
    parser.add_argument("--hidden", default="4096,5120", help="comma-separated hidden sizes (default 4096,5120)")
    parser.add_argument("--vocab", type=int, default=QWEN3_VOCAB, help=f"vocabulary size (default {QWEN3_VOCAB:,})")
    parser.add_argument("--dtype", default="bfloat16", help="input dtype (default bfloat16)")
    parser.add_argument("--backends", default="triton,loss",
                        help="checked against the reference: judge_head backends triton/torch, and loss "
                             "(judge_loss, backend auto) (default triton,loss)")
    parser.add_argument("--providers", default="all", help=f"timed providers, subset of {','.join(ALL_PROVIDERS)}")
    parser.add_argument("--row-chunk", type=int, default=1024, help="reference rows per chunk (default 1024)")
    parser.add_argument("--repeats", type=int, default=5, help="about this many timed calls per case (default 5)")
    parser.add_argument("--split-n", default="16384,16400",
                        help="N of the forward/backward timing (default 16384,16400: the second leaves a row tail)")
    parser.add_argument("--split-hidden", type=int, default=5120, help="H of the forward/backward timing (5120)")
    parser.add_argument("--split-providers", default=",".join(SPLIT_PROVIDERS),
                        help=f"providers of the forward/backward timing (default {','.join(SPLIT_PROVIDERS)}; "
                             "triton-low = judge_head with memory='low', liger-fp32 = Liger with "
                             "accum_dtype=torch.float32)")
    parser.add_argument("--split-losses", default=",".join(SPLIT_LOSSES),
                        help="losses of the forward/backward timing: advantage, judge (default both)")
    parser.add_argument("--split-repeats", type=int, default=5,
                        help="timed forward+backward runs per provider after one warm-up, >= 2 (default 5)")
    parser.add_argument("--skip-split", action="store_true", help="no forward/backward timing")
    parser.add_argument("--phase-n", type=int, default=16384,
                        help="N of judge_loss's phase-by-phase timing, at --split-hidden (default 16384)")
    parser.add_argument("--phase-repeats", type=int, default=3, help="timed calls of the phase timing (default 3)")
    parser.add_argument("--skip-phases", action="store_true", help="no phase-by-phase timing of judge_loss")
    parser.add_argument("--budget", type=float, default=300.0,
                        help="seconds after which no new work is started; what is left is reported as skipped "
                             "(default 300)")
    parser.add_argument("--skip-timing", action="store_true",
                        help="no per-provider timing at N (python -m benchmarks' presets cover it)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default); cpu runs the same code for testing, with --backends torch,loss")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU and torch.cuda.is_available() is False on this machine. "
              "On a CPU-only machine run `python -m benchmarks --preset cpu-quick` instead.", file=sys.stderr)
        return 2
    try:
        dtype = canonical_dtype(args.dtype)
        hiddens = parse_int_list(args.hidden, "--hidden")
        backends = parse_choice_list(args.backends, "--backends", CHECK_BACKENDS)
        providers = parse_choice_list(args.providers, "--providers", ALL_PROVIDERS)
        split_ns = parse_int_list(args.split_n, "--split-n")
        split_providers = parse_choice_list(args.split_providers, "--split-providers",
                                            ALL_PROVIDERS + VARIANT_PROVIDERS)
        split_losses = parse_choice_list(args.split_losses, "--split-losses", SPLIT_LOSSES)
        if min(args.row_chunk, args.n, args.vocab, args.split_hidden, args.phase_n, args.phase_repeats) < 1:
            raise ValueError("--n, --vocab, --row-chunk, --split-hidden, --phase-n and --phase-repeats must be "
                             "positive")
        if args.split_repeats < 2:
            raise ValueError("--split-repeats must be >= 2 (two runs are compared bit for bit)")
    except ValueError as exc:
        parser.error(str(exc))
    if args.device == "cpu" and "triton" in backends:
        parser.error("--device cpu checks the torch backend and loss only: pass --backends torch,loss")
    out_dir = Path(args.output_dir)
    command = shlex.join(["python", "-m", "benchmarks.gpu_check", *argv])
    report = ReportFiles(out_dir, describe_device(args.device), command, args.n, args.vocab, dtype, args.device)
    deadline = report.start + args.budget

    def budget_left(what: str) -> bool:
        if time.perf_counter() < deadline:
            return True
        print(f"gpu_check: time budget of {args.budget:.0f} s spent; {what} not run", file=sys.stderr)
        return False

    for hidden in hiddens:
        if not budget_left(f"correctness at H={hidden}"):
            break
        report.section(f"correctness at H={hidden:,}")
        t0 = time.perf_counter()
        rows = check_against_reference(args.n, hidden, args.vocab, dtype=DTYPES[dtype], device=args.device,
                                       backends=backends, row_chunk=args.row_chunk,
                                       on_rows=report.add_check_rows)
        print(f"gpu_check: H={hidden} correctness {'passed' if all(r.passed for r in rows) else 'FAILED'} "
              f"in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    if not args.skip_phases and budget_left("phase-by-phase timing"):
        report.section(f"judge_loss phase by phase at N={args.phase_n:,}")
        t0 = time.perf_counter()
        report.phase_rows, report.phase_note = run_phases(args.phase_n, args.split_hidden, args.vocab, dtype=dtype,
                                                          device=args.device, repeats=args.phase_repeats)
        report.phase_header = (args.phase_n, args.split_hidden, args.vocab)
        report.save()
        print(f"gpu_check: phase timing {report.phase_note or 'done'} in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)

    if not args.skip_split and budget_left("forward/backward timing"):
        report.section("forward/backward timing")
        t0 = time.perf_counter()
        run_split(split_ns, args.split_hidden, args.vocab, dtype=dtype, device=args.device,
                  providers=split_providers, losses=split_losses, repeats=args.split_repeats, deadline=deadline,
                  on_row=report.add_split_row)
        print(f"gpu_check: forward/backward timing done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    results = []
    for hidden in [] if args.skip_timing else hiddens:
        if not budget_left(f"timing at H={hidden}"):
            break
        report.section(f"speed and memory at N={args.n:,}, H={hidden:,}")
        t0 = time.perf_counter()
        cases = build_cases([Shape(args.n, hidden, args.vocab, dtype)], providers, TIMING_OPS,
                            device=args.device, warmup=1, repeats=args.repeats)
        results += run_cases(cases, isolation="inprocess", progress=True,
                             budget_s=max(0.0, deadline - time.perf_counter()))
        timing = write_outputs(results, output_dir=out_dir, stem="gpu_check_timing",
                               title=f"speed and memory at N={args.n:,}", device_name=report.device_name,
                               command=command, isolation="inprocess")
        report.timing_markdown = timing["markdown"]
        print(f"gpu_check: H={hidden} timing done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    report.running = ""
    report.save()
    print(report.markdown())
    check_rows, split_rows = report.check_rows, report.split_rows
    failed = [r for r in check_rows if not r.passed]
    # a peer that fails is reported in the table; a failure of our own providers fails the check
    errors = [r for r in results if r.status in ("error", "timeout") and r.case.provider in OUR_PROVIDERS]
    split_failed = [r for r in split_rows if r.failed]
    for r in failed:
        print(f"FAILED: H={r.hidden} {r.setting} {r.backend} {r.quantity}: max abs {r.max_abs_err:.3e}, "
              f"rel {r.rel_err:.3e} ({r.limit})", file=sys.stderr)
    for r in split_failed:
        print(f"FAILED: N={r.n} {r.loss} {r.provider}: status {r.status} {r.note}, same grads twice "
              f"{r.deterministic}, rel err dh {r.dh_rel_err}, dW {r.dw_rel_err}", file=sys.stderr)
    return 1 if failed or errors or split_failed or not check_rows else 0


if __name__ == "__main__":
    sys.exit(main())
