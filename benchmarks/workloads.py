"""The operations the suite times, and the inputs they run on.

An operation turns (provider, inputs) into a zero-argument ``step`` that does
the work once and drops the results, so that timing and peak-memory
measurement can call it repeatedly:

- ``logprobs-fwd``: per-token log-probs under ``torch.no_grad()`` (reference or
  old-policy log-probs in RL);
- ``logprobs-fwdbwd``: the policy-gradient scalar ``sum(adv * logprobs)``
  (``Provider.advantage_loss``), then its gradients w.r.t. hidden and weight,
  for random per-token advantages of either sign (for an autograd provider the
  same gradient as log-probs with ``adv`` as the upstream gradient; the loss
  mode provider gets the loss itself and forms the gradients in its forward);
- ``judge-fwdbwd``: the full judge head (CoT log-probs, score-token softmax,
  expected score, squared error), then gradients of ``sum(g * logprobs) +
  sum(sq_error)``.

Inputs look like a teacher-forced judge batch: sequences of ``SEQ_LEN`` rows,
each ending in one score row whose next token is the true score token.
Hidden states are N(0, 1) and the weight N(0, (LOGIT_STD / sqrt(H))^2), so
logits have a standard deviation of about ``LOGIT_STD``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict

import torch

from .providers import IGNORE_INDEX, HeadInputs, Provider
from .shapes import Shape

SEQ_LEN = 256  # rows per sequence: one score row every SEQ_LEN rows
LOGIT_STD = 2.0
SCORE_VALUES = (1.0, 2.0, 3.0, 4.0, 5.0)
FIRST_SCORE_ID = 16  # Qwen tokenizers put the digits "1".."5" at ids 16..20


@dataclass(frozen=True)
class Op:
    name: str
    kernel: str  # CSV "kernel" column
    mode: str  # CSV "mode" column, Liger's names: "forward" or "full" (forward + backward)
    flops_per_nhv: int  # 2 N H V for a forward GEMM, 6 N H V with both backward GEMMs
    description: str

    def flops(self, shape: Shape) -> float:
        return float(self.flops_per_nhv) * shape.n * shape.hidden * shape.vocab


OPS: Dict[str, Op] = {
    op.name: op
    for op in (
        Op("logprobs-fwd", "linear_logprobs", "forward", 2, "per-token log-probs, no grad"),
        Op("logprobs-fwdbwd", "linear_logprobs", "full", 6, "per-token log-probs, forward + backward"),
        Op("judge-fwdbwd", "judge_head", "full", 6, "judge head (log-probs + score softmax + squared error), fwd + bwd"),
    )
}


def get_op(name: str) -> Op:
    if name not in OPS:
        raise ValueError(f"unknown operation {name!r}; choose from {sorted(OPS)}")
    return OPS[name]


def score_token_ids(vocab: int):
    """Five distinct score ids: the Qwen digit ids when the vocabulary is big enough, else the first ids."""
    m = min(len(SCORE_VALUES), vocab)
    first = FIRST_SCORE_ID if vocab >= FIRST_SCORE_ID + m else 0
    return list(range(first, first + m))


def make_inputs(shape: Shape, device: str, seed: int = 0) -> HeadInputs:
    """Random inputs for one shape, generated on the device (no host copy of a large weight)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n, h, v = shape.n, shape.hidden, shape.vocab

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=gen, device=device) * scale).to(shape.torch_dtype)

    hidden = randn(n, h).requires_grad_(True)
    weight = randn(v, h, scale=LOGIT_STD / math.sqrt(h)).requires_grad_(True)
    ids = score_token_ids(v)
    m = len(ids)
    score_ids = torch.tensor(ids, dtype=torch.long, device=device)
    score_values = torch.tensor(SCORE_VALUES[:m], dtype=torch.float32, device=device)

    # the last row of every full sequence; a batch shorter than one sequence still gets one score row
    score_rows = torch.tensor(list(range(SEQ_LEN - 1, n, SEQ_LEN)) or [n - 1], dtype=torch.long, device=device)
    b = score_rows.numel()
    score_targets = 1.0 + (m - 1) * torch.rand(b, generator=gen, device=device)
    true_score_token = score_ids[(score_targets.round().long() - 1).clamp(0, m - 1)]

    next_tokens = torch.randint(0, v, (n,), generator=gen, device=device)
    next_tokens[score_rows] = true_score_token
    score_mask = torch.zeros(n, dtype=torch.bool, device=device)
    score_mask[score_rows] = True
    cot_targets = torch.where(score_mask, IGNORE_INDEX, next_tokens)
    score_targets_full = torch.zeros(n, dtype=torch.float32, device=device)
    score_targets_full[score_rows] = score_targets
    grad_logprobs = torch.randn(n, generator=gen, device=device)
    return HeadInputs(
        hidden=hidden, weight=weight, next_tokens=next_tokens, cot_targets=cot_targets, score_ids=score_ids,
        score_values=score_values, score_rows=score_rows, score_mask=score_mask, score_targets=score_targets,
        score_targets_full=score_targets_full, grad_logprobs=grad_logprobs,
    )


def make_step(provider: Provider, op_name: str, inputs: HeadInputs) -> Callable[[], None]:
    """A closure doing one ``op_name`` with ``provider``; its results are dropped on return."""
    op = get_op(op_name)
    leaves = (inputs.hidden, inputs.weight)
    if op.name == "logprobs-fwd":
        hidden, weight = inputs.hidden.detach(), inputs.weight.detach()

        def step():
            with torch.no_grad():
                provider.logprobs(hidden, weight, inputs.next_tokens)

    elif op.name == "logprobs-fwdbwd":

        def step():
            loss = provider.advantage_loss(inputs.hidden, inputs.weight, inputs.next_tokens, inputs.grad_logprobs)
            torch.autograd.grad(loss, leaves)

    else:

        def step():
            torch.autograd.grad(provider.judge(inputs), leaves)

    return step
