"""How accurate each fused LM head's per-token log-probs and gradients are on bf16 inputs, against fp64.

Why this exists: loss mode (``real_kernels.judge_loss``) writes each chunk's
logits in fp32 even for bf16 inputs (``grad_gemms.logits_fp32``), while
Liger-Kernel rounds its logits chunk to bf16 before the softmax and most
trainers do ``hidden @ weight.T`` in bf16.  This script measures what that
buys, on the CPU, with numbers rather than claims:

    python -m benchmarks.precision [--n 256 --hidden 256 --vocab 4099,32003] [--out precision.json]

Problem (gpu_check's): bf16 hidden ``N(0, 1)`` and bf16 weight
``N(0, (2 / sqrt(H))^2)`` (logits of std about 2), random targets, temperature
1.  Truth: fp64 log-softmax of the same bf16 inputs upcast to fp64.  Each
implementation gives per-token log-probs (``-cross_entropy`` with
``reduction='none'`` for the peers) and the gradients of
``sum(-logprob * a)`` (a random per-token weight ``a``) w.r.t. hidden and
weight; reported: max and mean ``|logprob - truth|`` and, for each gradient,
``max|g - g64| / max|g64|``.  The ``bf16 floor`` row is the fp64 truth itself
rounded to the outputs' dtypes (fp32 log-probs, bf16 gradients): no
implementation that returns bf16 gradients can beat it.

The Triton kernels run on the CPU interpreter: ``TRITON_INTERPRET=1`` is set
here before anything imports triton (set it to 0 yourself to run on CUDA,
which this script does not do).  An implementation that is not installed or
cannot run here gives a row that says why.  Cut Cross-Entropy's Triton
``impl='cce'`` is one (25.1.1: its lse kernel's ``libdevice.log1p`` has no
interpreter implementation); from its source, its lse comes from fp32
``tl.dot`` accumulators, but its target logit (``indexed_dot``) sums
bf16-rounded elementwise products ``e * c`` in fp32, so its log-probs are not
fp32-accurate either.  ``impl='torch_compile'`` is ``e @ c.T`` in bf16, as
naive.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported (by real_kernels or a peer)

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Callable, Dict, List, Optional, Sequence, Tuple  # noqa: E402

import torch  # noqa: E402

LOGIT_STD = 2.0
Result = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (logprobs [N], dh [N, H], dW [V, H])


@dataclass
class Problem:
    hidden: torch.Tensor  # [N, H] bf16
    weight: torch.Tensor  # [V, H] bf16
    targets: torch.Tensor  # [N] int64
    coef: torch.Tensor  # [N] fp32: the loss is sum(-logprob * coef)


def make_problem(n: int, hidden: int, vocab: int, seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen).bfloat16()
    w = (torch.randn(vocab, hidden, generator=gen) * (LOGIT_STD / math.sqrt(hidden))).bfloat16()
    targets = torch.randint(0, vocab, (n,), generator=gen)
    coef = torch.randn(n, generator=gen)
    return Problem(h, w, targets, coef)


def _leaves(p: Problem, dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    h = p.hidden.detach().clone() if dtype is None else p.hidden.detach().to(dtype)
    w = p.weight.detach().clone() if dtype is None else p.weight.detach().to(dtype)
    return h.requires_grad_(True), w.requires_grad_(True)


def _autograd(p: Problem, logprobs_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              dtype: Optional[torch.dtype] = None) -> Result:
    """logprobs_of(h, w) on fresh leaves, then the gradients of sum(-logprob * coef)."""
    h, w = _leaves(p, dtype)
    logprobs = logprobs_of(h, w)
    (-(logprobs * p.coef.to(logprobs.dtype)).sum()).backward()
    return logprobs.detach(), h.grad, w.grad


def truth(p: Problem) -> Result:
    """fp64 log-softmax of the bf16 inputs upcast to fp64, and its gradients."""
    return _autograd(p, lambda h, w: torch.log_softmax(h @ w.T, -1).gather(1, p.targets[:, None]).squeeze(1),
                     dtype=torch.float64)


# ---- implementations: each returns (logprobs, dh, dW) or raises Unavailable -----------------------------------------

class Unavailable(RuntimeError):
    """The implementation cannot run here; the message is the row's reason."""


def naive_bf16(p: Problem) -> Result:
    return _autograd(p, lambda h, w: torch.log_softmax((h @ w.T).float(), -1).gather(1, p.targets[:, None]).squeeze(1))


def _judge_loss(backend: str) -> Callable[[Problem], Result]:
    def run(p: Problem) -> Result:
        from real_kernels import judge_loss

        h, w = _leaves(p)
        loss, out = judge_loss(h, w, p.targets, lambda o, rows: -(p.coef[rows] * o.logprobs).sum(), backend=backend)
        loss.backward()
        return out.logprobs.detach(), h.grad, w.grad

    return run


def _judge_head(backend: str, memory: str) -> Callable[[Problem], Result]:
    def run(p: Problem) -> Result:
        from real_kernels import judge_head

        vocab = p.weight.shape[0]
        return _autograd(p, lambda h, w: judge_head(h, w, p.targets, [0, vocab - 1], [1.0, 2.0], backend=backend,
                                                    memory=memory).logprobs)

    return run


def _need(module: str, dist: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise Unavailable(f"not installed: pip install {dist}")


def _liger(accum_dtype: Optional[torch.dtype]) -> Callable[[Problem], Result]:
    def run(p: Problem) -> Result:
        _need("liger_kernel", "liger-kernel")
        import inspect

        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        kwargs = {"reduction": "none"}
        if accum_dtype is not None:
            if "accum_dtype" not in inspect.signature(LigerFusedLinearCrossEntropyLoss).parameters:
                raise Unavailable("this liger-kernel has no accum_dtype argument (added in 0.6.2)")
            kwargs["accum_dtype"] = accum_dtype
        loss_fn = LigerFusedLinearCrossEntropyLoss(**kwargs)
        return _autograd(p, lambda h, w: -loss_fn(w, h, p.targets).float())

    return run


def _cce(impl: str) -> Callable[[Problem], Result]:
    def run(p: Problem) -> Result:
        _need("cut_cross_entropy", "cut-cross-entropy")
        from cut_cross_entropy import linear_cross_entropy

        result = _autograd(p, lambda h, w: -linear_cross_entropy(h, w, p.targets, reduction="none", impl=impl).float())
        if not all(bool(torch.isfinite(t).all()) for t in result):
            raise Unavailable(f"impl={impl!r} returned non-finite values here")
        return result

    return run


@dataclass(frozen=True)
class Impl:
    name: str
    what: str
    run: Callable[[Problem], Result]
    ours: bool  # real_kernels (always available) rather than a peer or the naive baseline


IMPLS: Tuple[Impl, ...] = (
    Impl("naive-bf16", "hidden @ weight.T in bf16 (bf16 logits), float log_softmax, autograd", naive_bf16, False),
    Impl("loss-torch", "real_kernels.judge_loss, backend='torch' (fp32 chunk logits)", _judge_loss("torch"), True),
    Impl("loss-triton", "real_kernels.judge_loss, backend='triton' (interpreter; fp32 chunk logits)",
         _judge_loss("triton"), True),
    Impl("head-triton-low", "real_kernels.judge_head, backend='triton', memory='low' (fused kernel, interpreter)",
         _judge_head("triton", "low"), True),
    Impl("head-triton-high", "real_kernels.judge_head, backend='triton', memory='high' (interpreter)",
         _judge_head("triton", "high"), True),
    Impl("head-torch", "real_kernels.judge_head, backend='torch'", _judge_head("torch", "auto"), True),
    Impl("liger", "LigerFusedLinearCrossEntropyLoss(reduction='none') (interpreter)", _liger(None), False),
    Impl("liger-fp32", "the same with accum_dtype=torch.float32 (interpreter)", _liger(torch.float32), False),
    Impl("cce-torch_compile", "cut_cross_entropy.linear_cross_entropy(impl='torch_compile')",
         _cce("torch_compile"), False),
    Impl("cce", "cut_cross_entropy.linear_cross_entropy(impl='cce') (Triton, interpreter)", _cce("cce"), False),
)
IMPL_NAMES = tuple(i.name for i in IMPLS)
OUR_IMPLS = tuple(i.name for i in IMPLS if i.ours)


@dataclass
class Row:
    vocab: int
    impl: str
    what: str
    status: str  # "ok" or "unavailable"
    reason: str = ""
    logprob_max_abs: Optional[float] = None
    logprob_mean_abs: Optional[float] = None
    dh_rel: Optional[float] = None  # max|dh - dh64| / max|dh64|
    dw_rel: Optional[float] = None
    seconds: Optional[float] = None
    extra: Dict[str, str] = field(default_factory=dict)


def _errors(got: Result, want: Result) -> Dict[str, float]:
    lp, dh, dw = (t.double() for t in got)
    lp64, dh64, dw64 = want
    err = (lp - lp64).abs()
    return {
        "logprob_max_abs": float(err.max()),
        "logprob_mean_abs": float(err.mean()),
        "dh_rel": float((dh - dh64).abs().max() / dh64.abs().max()),
        "dw_rel": float((dw - dw64).abs().max() / dw64.abs().max()),
    }


def floor_row(vocab: int, want: Result, hidden_dtype: torch.dtype) -> Row:
    """The truth rounded to the outputs' dtypes: fp32 log-probs, gradients in the inputs' dtype."""
    lp64, dh64, dw64 = want
    rounded = (lp64.float(), dh64.to(hidden_dtype), dw64.to(hidden_dtype))
    return Row(vocab, "bf16 floor", "fp64 truth rounded to fp32 log-probs and bf16 gradients", "ok",
               **_errors(rounded, want))


def run_problem(p: Problem, impls: Sequence[str], log: Callable[[str], None] = lambda s: None) -> List[Row]:
    vocab = p.weight.shape[0]
    want = truth(p)
    rows = [floor_row(vocab, want, p.hidden.dtype)]
    by_name = {i.name: i for i in IMPLS}
    for name in impls:
        impl = by_name[name]
        log(f"[V={vocab}] {name}: running ...")
        start = time.perf_counter()
        try:
            got = impl.run(p)
            row = Row(vocab, name, impl.what, "ok", **_errors(got, want))
        except Unavailable as exc:
            row = Row(vocab, name, impl.what, "unavailable", reason=str(exc))
        except Exception as exc:  # a peer that cannot run here is a row that says why, not a crash
            if impl.ours:
                raise
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            where = ("its Triton kernels fail under the CPU interpreter (TRITON_INTERPRET=1)"
                     if type(exc).__name__ == "InterpreterError" else "cannot run here")
            row = Row(vocab, name, impl.what, "unavailable", reason=f"{where}: {type(exc).__name__}: {first}")
            log("".join(traceback.format_exception_only(type(exc), exc)).strip()[:500])
        row.seconds = round(time.perf_counter() - start, 2)
        log(f"[V={vocab}] {name}: {row.status} in {row.seconds:.1f} s"
            + (f" (max |logprob err| {row.logprob_max_abs:.2e})" if row.status == "ok" else f" ({row.reason})"))
        rows.append(row)
    return rows


def _fmt(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.2e}"


def markdown(rows: Sequence[Row], n: int, hidden: int) -> str:
    lines = []
    for vocab in sorted({r.vocab for r in rows}):
        lines += [f"N={n}, H={hidden}, V={vocab}, bf16 inputs, logits std {LOGIT_STD:g}, temperature 1; "
                  f"errors against fp64 of the same bf16 inputs", "",
                  "| implementation | max abs logprob err | mean abs logprob err | dh rel err | dW rel err | note |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            if r.vocab != vocab:
                continue
            note = (r.reason if r.status != "ok" else r.what).replace("|", "\\|")
            lines.append(f"| {r.impl} | {_fmt(r.logprob_max_abs)} | {_fmt(r.logprob_mean_abs)} | {_fmt(r.dh_rel)} | "
                         f"{_fmt(r.dw_rel)} | {note} |")
        lines.append("")
    lines.append("dh / dW rel err: max|g - g64| / max|g64| for the loss sum(-logprob * a), a random per token.")
    return "\n".join(lines)


def _int_list(text: str) -> List[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _impl_list(text: str) -> List[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in IMPL_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown implementation(s) {unknown}; choose from {list(IMPL_NAMES)}")
    return names


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="tokens (rows), default 256")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size H, default 256")
    parser.add_argument("--vocab", type=_int_list, default=[4099], help="vocabulary sizes, comma-separated "
                        "(default 4099; 32003 takes minutes on the interpreter)")
    parser.add_argument("--impls", type=_impl_list, default=list(IMPL_NAMES),
                        help=f"comma-separated, default all: {','.join(IMPL_NAMES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    if args.n < 1 or args.hidden < 1:
        parser.error("--n and --hidden must be positive")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    rows: List[Row] = []
    for vocab in args.vocab:
        rows += run_problem(make_problem(args.n, args.hidden, vocab, args.seed), args.impls, log)
    print(markdown(rows, args.n, args.hidden))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"n": args.n, "hidden": args.hidden, "seed": args.seed, "torch": torch.__version__,
                       "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
