"""Which GPU step makes two identical judge_loss calls differ bit for bit.

gpu_check found judge_loss / judge_head gradients not bit-identical across two
runs on an H200 (naive and Liger were).  This probe runs judge_loss twice and
compares each output apart, then the GEMMs of one chunk twice each: the fp32
logits GEMM, the ``dh`` GEMM (on the strided bf16 ``dz`` view and on a
contiguous copy), and the fp32 ``dW`` accumulation (in-place ``addmm`` with
``out_dtype``, and a fresh fp32-output GEMM plus ``add_``), with the time of
each ``dW`` variant.  CUDA only; prints a table and writes JSON.

    python -m benchmarks.determinism [--n 16384] [--hidden 5120] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Dict, List

import torch

from .measure import measure_cuda

QWEN3_VOCAB = 151_936


def _same(a: torch.Tensor, b: torch.Tensor) -> Dict[str, object]:
    diff = (a.float() - b.float()).abs()
    return {"bit_identical": bool(torch.equal(a, b)), "max_abs_diff": float(diff.max()),
            "n_differ": int((a != b).sum())}


def _twice(fn: Callable[[], torch.Tensor]) -> Dict[str, object]:
    first = fn().clone()
    second = fn().clone()
    return _same(first, second)


def probe(n: int, hidden: int, vocab: int, chunk: int) -> List[Dict[str, object]]:
    from real_kernels import judge_loss

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    h = (torch.randn(n, hidden, device=dev, generator=gen) * 0.5).to(torch.bfloat16).requires_grad_(True)
    w = (torch.randn(vocab, hidden, device=dev, generator=gen) * hidden ** -0.5).to(torch.bfloat16)
    w.requires_grad_(True)
    targets = torch.randint(0, vocab, (n,), device=dev, generator=gen)
    adv = torch.randn(n, device=dev, generator=gen)
    rows_out: List[Dict[str, object]] = []

    def call():
        loss, out = judge_loss(h, w, targets, lambda o, rows: (adv[rows] * o.logprobs).sum(), temperature=0.7)
        dh, dw = torch.autograd.grad(loss, (h, w))
        return loss.detach(), out.logprobs, dh, dw

    first = call()
    second = call()
    for name, a, b in zip(("loss", "logprobs", "dh", "dW"), first, second):
        rows_out.append({"what": f"judge_loss {name}", **_same(a, b)})
    del first, second

    hc = h.detach()[:chunk]
    wt = w.detach().T
    logits = torch.empty(chunk, vocab, dtype=torch.float32, device=dev)
    rows_out.append({"what": "logits mm(out_dtype=fp32)",
                     **_twice(lambda: torch.mm(hc, wt, out_dtype=torch.float32, out=logits))})
    dz_view = logits.view(torch.bfloat16)[:, :vocab]  # bf16 dz over the first half of each fp32 row
    dz_view.copy_((torch.randn(chunk, vocab, device=dev, generator=gen) * 1e-3).to(torch.bfloat16))
    dz = dz_view.contiguous()
    wd = w.detach()
    rows_out.append({"what": "dh mm(dz strided view, W)", **_twice(lambda: torch.mm(dz_view, wd))})
    rows_out.append({"what": "dh mm(dz contiguous, W)", **_twice(lambda: torch.mm(dz, wd))})

    chunks = [h.detach()[i:i + chunk] for i in range(0, min(n, 4 * chunk), chunk)]
    dw32 = torch.empty(vocab, hidden, dtype=torch.float32, device=dev)
    tmp = torch.empty_like(dw32)

    def dw_addmm():
        for k, h_c in enumerate(chunks):
            torch.addmm(dw32, dz.T, h_c, beta=0.0 if k == 0 else 1.0, out_dtype=torch.float32, out=dw32)
        return dw32

    def dw_mm_add():
        for k, h_c in enumerate(chunks):
            if k == 0:
                torch.mm(dz.T, h_c, out_dtype=torch.float32, out=dw32)
            else:
                torch.mm(dz.T, h_c, out_dtype=torch.float32, out=tmp)
                dw32.add_(tmp)
        return dw32

    def dw_addmm_view():
        for k, h_c in enumerate(chunks):
            torch.addmm(dw32, dz_view.T, h_c, beta=0.0 if k == 0 else 1.0, out_dtype=torch.float32, out=dw32)
        return dw32

    for name, fn in (("dW addmm(out_dtype=fp32, out=dw32) x4, dz contiguous", dw_addmm),
                     ("dW addmm(out_dtype=fp32, out=dw32) x4, dz strided view", dw_addmm_view),
                     ("dW mm(out_dtype=fp32) + add_ x4", dw_mm_add)):
        (p50, _, _), _ = measure_cuda(fn, warmup=1, repeats=5)
        rows_out.append({"what": name, **_twice(fn), "ms": p50})
    return rows_out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=16384, help="rows (tokens), default 16384")
    parser.add_argument("--hidden", type=int, default=5120, help="hidden size H, default 5120")
    parser.add_argument("--vocab", type=int, default=QWEN3_VOCAB, help="vocabulary V, default 151936")
    parser.add_argument("--chunk", type=int, default=4096, help="rows of one chunk for the GEMM probes")
    parser.add_argument("--json", default=None, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("determinism: needs a CUDA device", file=sys.stderr)
        return 2
    rows = probe(args.n, args.hidden, args.vocab, args.chunk)
    env = os.environ.get("CUBLAS_WORKSPACE_CONFIG", "unset")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, CUBLAS_WORKSPACE_CONFIG={env}")
    print("| what | bit-identical twice | max abs diff | elements differing | ms |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        ms = f"{r['ms']:.2f}" if "ms" in r else ""
        print(f"| {r['what']} | {'yes' if r['bit_identical'] else 'NO'} | {r['max_abs_diff']:.3g} | "
              f"{r['n_differ']:,} | {ms} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cublas_workspace_config": env, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
