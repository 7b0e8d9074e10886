"""The implementations compared by the suite, behind one small interface.

Every provider computes the same two things from ``hidden [N, H]`` and
``weight [V, H]``:

- ``logprobs``: per-token ``log softmax(hidden @ weight.T)[targets]``, fp32,
  differentiable (the quantity a policy-gradient trainer needs);
- ``judge``: the full judge head of REAL (docs/design.md section 1): the CoT
  tokens' log-probs on every row, and on the few score rows the score-token
  log-probs, the expected score and its squared error.

Providers:

- ``naive``: what a plain PyTorch trainer does: ``hidden @ weight.T`` in the
  input dtype (fp32 on the CPU), ``log_softmax`` in fp32, ``gather``.
- ``torch`` / ``triton``: this library (``real_kernels``), one backend each:
  ``linear_logprobs`` / ``judge_head`` under autograd (recomputing backward);
- ``loss``: this library's loss mode, ``real_kernels.judge_loss`` with
  ``backend="auto"`` (torch on the CPU, triton on CUDA): the caller's loss is
  given to the op, which forms the gradients during its forward (3 GEMMs).
- ``triton-low``: ``triton`` with ``memory="low"`` (the fused kernel that
  never holds a logits chunk), where this ``real_kernels`` has that argument;
  skipped with the reason where it does not.
- ``liger``: Liger-Kernel's fused linear cross entropy, ``reduction="none"``.
  With ``reduction="none"`` Liger defers its gradients (the per-token upstream
  gradient is only known in backward): the forward computes the logits chunk
  by chunk for the loss alone (2NHV), the backward computes them again and
  forms dh and dW (6NHV): 8NHV in all; its dW accumulates in the weight's
  dtype (bf16).  Versions that instead form the gradients in the forward and
  scale them per row afterwards get per-token gradients wrong (0.7.0 and
  0.8.0 do; 0.8.3 and later defer): before it is timed, a tiny probe on the
  device compares its per-token gradients with autograd, and a version that
  fails is skipped with the reason.
- ``liger-fp32``: the same with ``accum_dtype=torch.float32`` (dW accumulated
  in an fp32 ``[V, H]`` buffer); ``accum_dtype`` exists since liger-kernel
  0.6.2, and an older version is skipped with the reason.
- ``cce``: Cut Cross-Entropy's ``linear_cross_entropy``, ``reduction="none"``
  (its ``torch_compile`` implementation on the CPU, its Triton ``cce`` one on
  CUDA): the forward computes the log-sum-exp blockwise without logits
  (2NHV); the backward recomputes the logits blockwise and forms dh and dW
  (6NHV): 8NHV in all, with dh and dW accumulated in bf16 through spin-locked
  read-add-writes (so the order of the additions, and the bits, can differ
  between runs), and blocks whose softmax gradient is below bf16 resolution
  skipped (``filter_eps="high"``, its default).

How the peers get the judge head (a fair composition from their own op):
a peer computes one per-token cross entropy over *all* rows, with the true
score token ``k*`` as the target of each score row (that is the token the
teacher-forced batch holds there).  Since ``CE_i = lse_i - z_{i, y_i}``, the
full-vocabulary log-sum-exp of a score row is ``lse_s = CE_s + h_s . W[k*]``:
the peer's own fused pass does the ``O(N V H)`` work, and the score-token
log-probs ``h_s . W[k_j] - lse_s`` cost one ``[B, m]`` matmul on the ``m``
score rows of ``W``.  Gradients flow through the peer's backward (which takes
any per-token upstream gradient) and through that small matmul, so a peer
pays its own fused pass plus ``O(B m H)``, with no second pass over the
vocabulary and no ``[B, V]`` logits.  The CE of the score rows is left out of
the CoT term (as ``ignore_index`` is for ours).  The test suite checks this
composition against the naive judge head, values and gradients.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

IGNORE_INDEX = -100
CPU_TRITON_REASON = "needs CUDA (the CPU interpreter is for tests, not speed)"


class ProviderUnsupported(RuntimeError):
    """This provider cannot compute the asked-for quantity here (a missing argument in the installed version):
    a row reported as skipped with the message, not an error."""


@dataclass
class HeadInputs:
    """One benchmark problem (built by ``workloads.make_inputs``), laid out like a teacher-forced batch.

    ``next_tokens`` is the token that follows each row, as the batch holds it:
    a CoT token, or the true score token ``k*`` on each sequence's score row.
    """

    hidden: torch.Tensor  # [N, H] leaf, requires grad
    weight: torch.Tensor  # [V, H] leaf, requires grad
    next_tokens: torch.Tensor  # [N] int64, every row valid
    cot_targets: torch.Tensor  # [N] next_tokens with IGNORE_INDEX on the score rows
    score_ids: torch.Tensor  # [m] vocabulary ids of the score tokens
    score_values: torch.Tensor  # [m] fp32 their numeric values
    score_rows: torch.Tensor  # [B] row index of each sequence's score position
    score_mask: torch.Tensor  # [N] bool, True on score rows
    score_targets: torch.Tensor  # [B] fp32 ground-truth scores
    score_targets_full: torch.Tensor  # [N] fp32, score_targets on score rows, 0 elsewhere
    grad_logprobs: torch.Tensor  # [N] fp32 per-token upstream gradient (advantages)


def score_epilogue(score_logp: torch.Tensor, score_values: torch.Tensor, score_targets: torch.Tensor) -> torch.Tensor:
    """Squared error of the expected score on the score rows, from their score-token log-probs."""
    expected = score_logp.exp() @ score_values
    return (expected - score_targets) ** 2


def judge_objective(logprobs: torch.Tensor, sq_error: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """The judge-head scalar every provider differentiates: per-token weighted CoT term + regression term.

    ``advantages`` are the per-token weights of ``logprobs`` (``HeadInputs.grad_logprobs``, or a slice of them).
    """
    return (advantages * logprobs).sum() + sq_error.sum()


def _package_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


class Provider:
    """Interface: ``logprobs``, ``advantage_loss`` and ``judge``; ``unavailable_reason`` says why it cannot run here."""

    name = ""
    description = ""

    def unavailable_reason(self, device: str) -> Optional[str]:
        return None

    def release_caches(self) -> None:
        """Drop memory the provider keeps between calls, so that the measured call allocates (and counts) it."""

    def version(self) -> str:
        raise NotImplementedError

    def logprobs(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def advantage_loss(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       advantages: torch.Tensor) -> torch.Tensor:
        """``sum(advantages * logprobs)``: the policy-gradient scalar whose gradient ``logprobs-fwdbwd`` times.

        Its gradient is that of ``logprobs`` with ``advantages`` as the upstream gradient.
        """
        return (advantages * self.logprobs(hidden, weight, targets)).sum()

    def judge(self, inputs: HeadInputs) -> torch.Tensor:
        """The scalar ``judge_objective`` of this provider's judge head."""
        raise NotImplementedError


class NaiveProvider(Provider):
    name = "naive"
    description = "materialised logits in the input dtype, fp32 log_softmax, gather"

    def version(self) -> str:
        return f"torch {torch.__version__}"

    @staticmethod
    def _log_softmax(hidden, weight):
        return torch.log_softmax((hidden @ weight.T).float(), dim=-1)  # [N, V]

    def logprobs(self, hidden, weight, targets):
        return self._log_softmax(hidden, weight).gather(1, targets[:, None]).squeeze(1)

    def judge(self, inputs):
        logp_all = self._log_softmax(inputs.hidden, inputs.weight)
        valid = inputs.cot_targets != IGNORE_INDEX
        picked = logp_all.gather(1, torch.where(valid, inputs.cot_targets, 0)[:, None]).squeeze(1)
        logprobs = torch.where(valid, picked, 0.0)
        score_logp = logp_all[inputs.score_rows][:, inputs.score_ids]
        sq_error = score_epilogue(score_logp, inputs.score_values, inputs.score_targets)
        return judge_objective(logprobs, sq_error, inputs.grad_logprobs)


def accepts_keyword(fn: Callable, name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (how a provider tells an installed version's features)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class RealKernelsProvider(Provider):
    """This library, one backend; ``memory`` is passed on as ``memory=`` where the op takes it."""

    def __init__(self, backend: str, memory: Optional[str] = None, name: Optional[str] = None):
        self.name = name or backend
        self.backend = backend
        self.memory = memory
        self.description = f"real_kernels, backend={backend!r}" + (f", memory={memory!r}" if memory else "")

    def unavailable_reason(self, device):
        if self.backend == "triton" and device != "cuda":
            return CPU_TRITON_REASON
        if self.backend == "triton" and importlib.util.find_spec("triton") is None:
            return "not installed: pip install triton"
        if self.memory is not None:
            from real_kernels import judge_head

            if not accepts_keyword(judge_head, "memory"):
                return "this real_kernels' judge_head has no memory= argument"
        return None

    def version(self):
        import real_kernels

        return f"real-kernels {real_kernels.__version__}"

    def _memory_kwargs(self, fn: Callable) -> Dict[str, str]:
        if self.memory is None:
            return {}
        if not accepts_keyword(fn, "memory"):
            raise ProviderUnsupported(f"this real_kernels' {fn.__name__} has no memory= argument")
        return {"memory": self.memory}

    def logprobs(self, hidden, weight, targets):
        from real_kernels import linear_logprobs

        return linear_logprobs(hidden, weight, targets, backend=self.backend,
                               **self._memory_kwargs(linear_logprobs)).logprobs

    def judge(self, inputs):
        from real_kernels import judge_head

        out = judge_head(
            inputs.hidden, inputs.weight, inputs.cot_targets, inputs.score_ids, inputs.score_values,
            score_targets=inputs.score_targets_full, score_mask=inputs.score_mask, backend=self.backend,
            **self._memory_kwargs(judge_head),
        )
        return judge_objective(out.logprobs, out.sq_error, inputs.grad_logprobs)


class LossProvider(Provider):
    """This library's loss mode: ``judge_loss`` with the caller's loss, gradients formed in the forward."""

    name = "loss"
    description = "real_kernels.judge_loss (loss mode, 3 GEMMs), backend='auto': torch on the CPU, triton on CUDA"

    def release_caches(self):
        from real_kernels.loss_torch import release_workspaces

        release_workspaces()  # the CPU pass keeps its logits buffer between calls: count it in the peak

    def unavailable_reason(self, device):
        if device == "cuda" and importlib.util.find_spec("triton") is None:
            return "not installed: pip install triton"
        return None

    def version(self):
        import real_kernels

        return f"real-kernels {real_kernels.__version__}"

    @staticmethod
    def _judge_loss(hidden, weight, targets, loss_fn, **kwargs):
        from real_kernels import judge_loss

        return judge_loss(hidden, weight, targets, loss_fn, backend="auto", **kwargs)

    def logprobs(self, hidden, weight, targets):
        """Detached log-probs (loss mode has no per-token upstream gradient to take later)."""
        _, out = self._judge_loss(hidden, weight, targets, lambda out, rows: out.logprobs.sum())
        return out.logprobs

    def advantage_loss(self, hidden, weight, targets, advantages):
        loss, _ = self._judge_loss(hidden, weight, targets, lambda out, rows: (advantages[rows] * out.logprobs).sum())
        return loss

    def judge(self, inputs):
        adv = inputs.grad_logprobs
        loss, _ = self._judge_loss(
            inputs.hidden, inputs.weight, inputs.cot_targets,
            lambda out, rows: judge_objective(out.logprobs, out.sq_error, adv[rows]),
            score_token_ids=inputs.score_ids, score_values=inputs.score_values,
            score_targets=inputs.score_targets_full, score_mask=inputs.score_mask,
        )
        return loss


class PeerProvider(Provider):
    """A library that offers a per-token fused linear cross entropy; the judge head is composed from it."""

    module = ""  # import name
    dist = ""  # pip distribution name

    def cross_entropy(self, hidden, weight, targets) -> torch.Tensor:
        """Per-token CE ``lse - z_target`` ``[N]``, no reduction."""
        raise NotImplementedError

    def unavailable_reason(self, device):
        if importlib.util.find_spec(self.module) is None:
            return f"not installed: pip install {self.dist}"
        return None

    def version(self):
        return f"{self.dist} {_package_version(self.dist)}"

    def logprobs(self, hidden, weight, targets):
        return -self.cross_entropy(hidden, weight, targets).float()

    def judge(self, inputs):
        ce = self.cross_entropy(inputs.hidden, inputs.weight, inputs.next_tokens).float()
        logprobs = torch.where(inputs.score_mask, 0.0, -ce)
        h_s = inputs.hidden[inputs.score_rows].float()  # [B, H]
        k_star = inputs.next_tokens[inputs.score_rows]
        lse_s = ce[inputs.score_rows] + (h_s * inputs.weight[k_star].float()).sum(-1)
        score_logp = h_s @ inputs.weight[inputs.score_ids].float().T - lse_s[:, None]  # [B, m]
        sq_error = score_epilogue(score_logp, inputs.score_values, inputs.score_targets)
        return judge_objective(logprobs, sq_error, inputs.grad_logprobs)


def per_token_gradient_error(cross_entropy: Callable, device: str, dtype: torch.dtype = torch.bfloat16,
                             n: int = 48, hidden: int = 32, vocab: int = 1000) -> Optional[str]:
    """Why ``cross_entropy(h, W, targets)`` is unfit as a per-token op, or None when it is fit.

    Fit means: it returns one value per row, and with a different upstream
    gradient on every row (as a policy-gradient loss gives) its ``dh`` and
    ``dW`` match autograd through materialised fp32 logits of the same inputs.
    A tiny problem (a non-power-of-two vocabulary, some ``ignore_index`` rows):
    milliseconds, run once per provider before it is timed.
    """
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, hidden, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=gen) / hidden ** 0.5).to(device=device, dtype=dtype).requires_grad_(True)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[::7] = IGNORE_INDEX
    targets = targets.to(device)
    upstream = torch.randn(n, generator=gen).to(device)
    ce = cross_entropy(h, w, targets)
    if ce.dim() != 1 or ce.shape[0] != n:
        return (f"returns a loss of shape {tuple(ce.shape)} for reduction='none', not one value per row "
                f"({n}): no per-token loss in this version")
    got = torch.autograd.grad((ce.float() * upstream).sum(), (h, w))
    h32, w32 = h.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    want_ce = torch.nn.functional.cross_entropy(h32 @ w32.T, targets, ignore_index=IGNORE_INDEX, reduction="none")
    want = torch.autograd.grad((want_ce * upstream).sum(), (h32, w32))
    for label, g, ref in (("dh", got[0], want[0]), ("dW", got[1], want[1])):
        rel = ((g.float() - ref).norm() / ref.norm()).item()
        if not rel < 5e-2:  # bf16 rounding gives ~1e-2; a gradient not weighted per row is off by O(1)
            return (f"per-token gradients wrong in this version ({label} off by {rel:.2g} relative with a "
                    f"different upstream gradient on each row): it forms them in the forward and scales "
                    f"them afterwards; a version that defers them to backward is needed")
    return None


class LigerProvider(PeerProvider):
    """Liger-Kernel's fused linear CE; ``accum_dtype`` (None: the weight's dtype) is its dW accumulator's dtype."""

    name = "liger"
    description = ("Liger-Kernel fused linear cross entropy, reduction='none': gradients deferred to backward "
                   "(logits formed twice, 8NHV), dW accumulated in the weight's dtype")
    module = "liger_kernel"
    dist = "liger-kernel"
    accum_dtype: Optional[torch.dtype] = None
    _probe_results: Dict[str, Optional[str]] = {}  # by provider name: the device probe's verdict

    def unavailable_reason(self, device):
        reason = super().unavailable_reason(device)
        if reason is None and device != "cuda":
            return "needs CUDA (Liger-Kernel's fused linear cross entropy is Triton-only; no CPU path)"
        if reason is not None:
            return reason
        try:
            fn = self._function()
        except Exception as exc:  # a half-installed peer is a row that says so
            return f"import failed: {type(exc).__name__}: {exc}"
        if self.accum_dtype is not None and not accepts_keyword(fn, "accum_dtype"):
            return (f"{self.version()} has no accum_dtype argument (it exists since liger-kernel 0.6.2): "
                    f"dW accumulates in the weight's dtype only")
        if self.name not in self._probe_results:
            try:
                self._probe_results[self.name] = per_token_gradient_error(self.cross_entropy, device)
            except Exception as exc:
                self._probe_results[self.name] = f"failed a tiny per-token probe: {type(exc).__name__}: {exc}"
        verdict = self._probe_results[self.name]
        return None if verdict is None else f"{self.version()} {verdict}"

    @staticmethod
    def _function():
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy

    def cross_entropy(self, hidden, weight, targets):
        fn = self._function()
        kwargs = {}
        if self.accum_dtype is not None:
            if not accepts_keyword(fn, "accum_dtype"):
                raise ProviderUnsupported(f"{self.version()} has no accum_dtype argument")
            kwargs["accum_dtype"] = self.accum_dtype
        return fn(hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="none", **kwargs)


class LigerFp32AccumProvider(LigerProvider):
    name = "liger-fp32"
    description = ("Liger-Kernel fused linear cross entropy, reduction='none', accum_dtype=torch.float32: "
                   "gradients deferred to backward (8NHV), dW accumulated in an fp32 [V, H] buffer")
    accum_dtype = torch.float32


class CCEProvider(PeerProvider):
    name = "cce"
    description = ("Cut Cross-Entropy linear_cross_entropy, reduction='none' (torch_compile on CPU, cce on CUDA): "
                   "logits formed twice (8NHV), dh and dW accumulated in bf16 under spin locks, "
                   "gradient blocks below bf16 resolution skipped")
    module = "cut_cross_entropy"
    dist = "cut-cross-entropy"

    def cross_entropy(self, hidden, weight, targets):
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if hidden.is_cuda else "torch_compile"
        return linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="none", impl=impl)


PROVIDERS: Dict[str, Callable[[], Provider]] = {
    "naive": NaiveProvider,
    "torch": lambda: RealKernelsProvider("torch"),
    "triton": lambda: RealKernelsProvider("triton"),
    "loss": LossProvider,
    "liger": LigerProvider,
    "cce": CCEProvider,
    # variants, timed by gpu_check's forward/backward section (shapes.VARIANT_PROVIDERS)
    "triton-low": lambda: RealKernelsProvider("triton", memory="low", name="triton-low"),
    "liger-fp32": LigerFp32AccumProvider,
}


def get_provider(name: str) -> Provider:
    if name not in PROVIDERS:
        raise ValueError(f"unknown provider {name!r}; choose from {sorted(PROVIDERS)}")
    return PROVIDERS[name]()
