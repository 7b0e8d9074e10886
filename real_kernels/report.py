"""``python -m real_kernels.report``: a short correctness-and-memory report of the fused head.

For each backend and input dtype it runs the judge head forward and backward on
an odd shape and prints the largest error against an fp64 computation (outputs
and gradients, relative to each tensor's scale); then it times forward+backward
of the per-token log-probs for the chunked torch backend against the naive
computation (materialised logits) and reports their peak memory.  On the CPU
the Triton kernels run under the interpreter (TRITON_INTERPRET=1), which checks
them but says nothing about their speed.
"""
from __future__ import annotations

import argparse
import gc
import os
import time

import torch
from real_kernels import judge_head, linear_logprobs
from real_kernels.core import reference

OUTPUT_NAMES = ("logprobs", "score_logprobs", "expected_score", "sq_error", "entropy")


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _case(n, h, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) / h ** 0.25).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h ** 0.25).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::7] = -100
    ids = sorted({0, 127, 128, v // 2, v - 1})
    values = [float(i + 1) for i in range(len(ids))]
    y = torch.rand(n, generator=g) * (len(ids) - 1) + 1
    grads = [torch.randn(n, generator=g), torch.randn(n, len(ids), generator=g), torch.randn(n, generator=g),
             torch.randn(n, generator=g), torch.randn(n, generator=g)]
    return hidden, weight, targets, ids, values, y, grads


def _run(backend, hidden, weight, targets, ids, values, y, grads, compute_dtype=None):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    kw = dict(score_targets=y, normalize=True, temperature=0.7, return_entropy=True)
    if compute_dtype is not None:  # the fp64 truth
        h, w = (hidden.detach().to(compute_dtype).requires_grad_(True), weight.detach().to(compute_dtype).requires_grad_(True))
        outs = reference.judge_head(h, w, targets, torch.tensor(ids), torch.tensor(values, dtype=compute_dtype),
                                    compute_dtype=compute_dtype, **{**kw, "score_targets": y.to(compute_dtype)})
    else:
        o = judge_head(h, w, targets, ids, values, backend=backend, **kw)
        outs = (o.logprobs, o.score_logprobs, o.expected_score, o.sq_error, o.entropy)
    loss = sum((a.double() * b.double()).sum() for a, b in zip(outs, grads))
    dh, dw = torch.autograd.grad(loss, (h, w))
    return list(outs) + [dh, dw]


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def accuracy_table(n=64, h=96, v=4099, backends=("reference", "torch", "triton")):
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        case = _case(n, h, v, dtype)
        truth = _run(None, *case, compute_dtype=torch.float64)
        for backend in backends:
            got = _run(backend, *case)
            errs = [_rel(a, b) for a, b in zip(got, truth)]
            rows.append((backend, str(dtype).replace("torch.", ""), max(errs[:5]), errs[5], errs[6]))
    return rows


def memory_and_time(n, h, v, repeats=2):
    """fwd+bwd of per-token log-probs: chunked torch backend vs naive (materialised logits)."""
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(n, h, generator=g) * 0.1).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) * 0.1).requires_grad_(True)
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g)

    def naive():
        return torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, targets[:, None]).squeeze(1)

    def fused():
        return linear_logprobs(hidden, weight, targets, backend="torch").logprobs

    results = {}
    for name, fn in (("naive", naive), ("torch", fused)):
        times, peaks = [], []
        for _ in range(repeats):
            hidden.grad = weight.grad = None
            gc.collect()
            can_reset = _reset_peak()
            base = _rss_mib("VmRSS")
            t0 = time.perf_counter()
            (fn() * upstream).sum().backward()
            times.append(time.perf_counter() - t0)
            peaks.append(_rss_mib("VmHWM") - base if can_reset else float("nan"))
        results[name] = (min(times), max(peaks))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m real_kernels.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024, help="N of the time/memory comparison (default 1024)")
    parser.add_argument("--hidden", type=int, default=512, help="H of the time/memory comparison (default 512)")
    parser.add_argument("--vocab", type=int, default=151_936, help="V of the time/memory comparison (default 151,936)")
    parser.add_argument("--skip-triton", action="store_true", help="do not run the Triton kernels (interpreter on CPU)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    backends = ("reference", "torch") if args.skip_triton else ("reference", "torch", "triton")
    print("Accuracy against fp64 (max error / max |truth|), judge head N=64 H=96 V=4099, "
          "normalize, temperature 0.7, entropy, random upstream grads on every output")
    print(f"{'backend':<10} {'dtype':<9} {'outputs':>9} {'d hidden':>9} {'d weight':>9}")
    for backend, dtype, e_out, e_dh, e_dw in accuracy_table(backends=backends):
        print(f"{backend:<10} {dtype:<9} {e_out:9.1e} {e_dh:9.1e} {e_dw:9.1e}")
    print("(bf16/fp16 gradients are returned in the input dtype, so their error is that dtype's rounding)")

    n, h, v = args.tokens, args.hidden, args.vocab
    print(f"\nLog-probs forward+backward, N={n} H={h} V={v} fp32, on {torch.get_num_threads()} CPU threads")
    res = memory_and_time(n, h, v)
    (t_naive, m_naive), (t_ours, m_ours) = res["naive"], res["torch"]
    print(f"{'provider':<10} {'time s':>8} {'peak MiB':>9}")
    print(f"{'naive':<10} {t_naive:8.2f} {m_naive:9.0f}")
    print(f"{'torch':<10} {t_ours:8.2f} {m_ours:9.0f}   ({t_ours / t_naive:.2f}x time, {m_ours / m_naive:.3f}x memory)")
    print(f"the naive logits alone are {n * v * 4 / 2**20:.0f} MiB; the fused head never builds them")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
