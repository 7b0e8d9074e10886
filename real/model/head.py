"""The judge head on a teacher-forced batch: the one place ``real`` calls ``real_kernels``.

One decoder pass to hidden states and one fused-head pass over the rows the
losses read (``real_kernels.hf.judge_outputs`` -> ``real_kernels.judge_head``;
the LM head module is never called, no ``[tokens x vocab]`` logits), laid out
per sequence as a :class:`JudgeForward`, the one result type of a head pass in
``real``:

- :func:`judge_forward`: CoT rows and score rows of a batch built with targets
  (every training loss, old / reference log-probs);
- :func:`score_forward`: the score rows alone of a batch built without targets
  (RAIL's read-out: the expected score after the marker);
- :func:`micro_batch_loss`: the head pass of one training micro-batch and a
  method's loss on it, in loss mode (``real_kernels.judge_loss``, docs/design.md
  section 6: the gradients formed in the forward), chunk by chunk of whole
  sequences, the loss once per chunk.  Every method's loss goes through it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from real.judge.batching import TeacherForcedBatch
from real_kernels import hf

# loss_fn(fwd, seqs) -> (loss, terms): the loss of the sequences ``seqs`` of a micro-batch (their
# JudgeForward ``fwd``) with the micro-batch's denominators, and its terms as detached 0-dim tensors
ChunkLossFn = Callable[["JudgeForward", slice], Tuple[torch.Tensor, Dict[str, torch.Tensor]]]


@dataclass
class JudgeForward:
    """Per-sequence judge outputs of a teacher-forced batch (differentiable unless made under no_grad)."""

    cot_logprobs: torch.Tensor  # [B, T] log p of the next token where cot_mask, else 0
    cot_mask: torch.Tensor  # [B, T] bool
    score_logprobs: torch.Tensor  # [B, m] log pi(k_j) at the score position
    expected_score: torch.Tensor  # [B] yhat
    sq_error: torch.Tensor  # [B] (yhat - y*)^2 (0 without targets)
    log_pi_star: Optional[torch.Tensor]  # [B] log pi(k*), k* the score token of round(y*); None without targets
    targets: torch.Tensor  # [B] y* (NaN without targets)
    score_pos: torch.Tensor  # [B]
    cot_entropy: Optional[torch.Tensor] = None  # [B, T] where cot_mask, else 0

    @property
    def cot_logprob_sum(self) -> torch.Tensor:
        """[B] log pi(c | x), the sequence log-prob of the CoT."""
        return self.cot_logprobs.sum(dim=1)

    @property
    def cot_token_count(self) -> torch.Tensor:
        """[B] number of CoT tokens."""
        return self.cot_mask.sum(dim=1)

    @property
    def pi_star(self) -> torch.Tensor:
        return self.log_pi_star.exp()

    def detached(self) -> "JudgeForward":
        return JudgeForward(**{k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()})


def judge_forward(
    model,
    batch: TeacherForcedBatch,
    score_token_ids: Sequence[int],
    score_values: Sequence[float],
    *,
    normalize: bool = False,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
) -> JudgeForward:
    """One decoder pass + one fused-head pass over a teacher-forced batch with targets."""
    _check_targets(batch, "judge_forward")
    return _head_pass(model, batch, score_token_ids, score_values, with_targets=True, normalize=normalize,
                      temperature=temperature, return_entropy=return_entropy, backend=backend)


def score_forward(model, batch: TeacherForcedBatch, score_token_ids: Sequence[int], score_values: Sequence[float],
                  *, normalize: bool = False, backend: str = "auto") -> JudgeForward:
    """The score rows alone (no CoT rows, no targets): RAIL's expected score at ``batch.score_pos``."""
    return _head_pass(model, batch, score_token_ids, score_values, with_targets=False, normalize=normalize,
                      backend=backend)


def _head_pass(model, batch: TeacherForcedBatch, score_token_ids, score_values, *, with_targets: bool,
               normalize: bool, temperature: float = 1.0, return_entropy: bool = False,
               backend: str = "auto") -> JudgeForward:
    """``with_targets``: the CoT rows, the squared error and log pi(k*) too; else the score rows alone."""
    out = hf.judge_outputs(
        model, batch.input_ids, batch.attention_mask, batch.targets if with_targets else None, score_token_ids,
        score_values, score_pos=batch.score_pos, cot_mask=batch.cot_mask if with_targets else None,
        normalize=normalize, temperature=temperature, return_entropy=return_entropy, backend=backend,
    )
    return _forward_of(out, batch, with_targets)


def _forward_of(out: hf.HFJudgeOutput, batch: TeacherForcedBatch, with_targets: bool) -> JudgeForward:
    log_pi_star = None
    if with_targets:
        index = batch.score_index[:, None].to(out.score_logprobs.device)
        log_pi_star = out.score_logprobs.gather(1, index).squeeze(1)
    return JudgeForward(
        cot_logprobs=out.cot_logprobs,
        cot_mask=batch.cot_mask if with_targets else torch.zeros_like(batch.cot_mask),
        score_logprobs=out.score_logprobs,
        expected_score=out.expected_score,
        sq_error=out.sq_error,
        log_pi_star=log_pi_star,
        targets=batch.targets,
        score_pos=batch.score_pos,
        cot_entropy=out.cot_entropy,
    )


def _check_targets(batch: TeacherForcedBatch, caller: str) -> None:
    if bool(torch.isnan(batch.targets).any()) or bool((batch.score_index < 0).any()):
        raise ValueError(f"{caller} needs a batch built with targets (build_teacher_forced_batch(..., targets=...))")


def micro_batch_loss(model, batch: TeacherForcedBatch, score_token_ids: Sequence[int],
                     score_values: Sequence[float], loss_fn: ChunkLossFn, *, sequence_group: int = 1,
                     normalize: bool = False, temperature: float = 1.0, return_entropy: bool = True,
                     backend: str = "auto", chunk_size: Optional[int] = None
                     ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], JudgeForward]:
    """The head pass of one training micro-batch and ``loss_fn`` on it, in loss mode: ``(loss, terms, fwd)``.

    The head runs as ``real_kernels.judge_loss`` (docs/design.md section 6):
    the gradient is formed chunk by chunk in the forward (3 GEMMs, no ``[rows,
    V]`` logits beyond one chunk), and ``loss.backward()`` hands it back.
    Chunks hold whole sequences (whole runs of ``sequence_group`` of them,
    e.g. prompt groups whose advantages the loss computes), and ``loss_fn(fwd,
    seqs)`` (the method's loss, ``real.methods``) is called once per chunk with
    the :class:`JudgeForward` of the chunk's sequences ``seqs`` (a slice of the
    micro-batch's rows).  It must be the chunk's share of the micro-batch loss
    (per-sequence terms over the micro-batch's denominators, every method's
    is): ``loss`` is the sum over the chunks.  ``terms`` are the sums of the
    chunks' detached 0-dim terms (the CoT entropy's mean added when the loss
    does not report it); nothing in the chunk loop is read back to the host.
    ``fwd`` is the micro-batch's detached forward.  Called as
    ``wrapped(micro_batch_loss, ...)`` (``real.multi_gpu.parallel``), so under FSDP the
    whole pass runs inside the root module's forward.
    """
    _check_targets(batch, "micro_batch_loss")
    cot_tokens = batch.cot_mask.sum().clamp(min=1)
    terms: Dict[str, torch.Tensor] = {}

    def chunk_loss(view: hf.HFJudgeOutput, seqs: slice) -> torch.Tensor:
        fwd = _forward_of(view, _sequences(batch, seqs), with_targets=True)
        loss, chunk_terms = loss_fn(fwd, seqs)
        if "entropy" not in chunk_terms and fwd.cot_entropy is not None:  # the SFT losses do not report it
            chunk_terms = dict(chunk_terms, entropy=(fwd.cot_entropy.detach() * fwd.cot_mask).sum() / cot_tokens)
        for name, value in chunk_terms.items():
            value = torch.as_tensor(value).detach()
            terms[name] = terms[name] + value if name in terms else value
        return loss

    loss, out = hf.judge_loss_outputs(
        model, batch.input_ids, batch.attention_mask, batch.targets, score_token_ids, score_values, chunk_loss,
        score_pos=batch.score_pos, cot_mask=batch.cot_mask, normalize=normalize, temperature=temperature,
        return_entropy=return_entropy, chunk_size=chunk_size, sequence_group=sequence_group, backend=backend,
    )
    return loss, terms, _forward_of(out, batch, with_targets=True)


def _sequences(batch: TeacherForcedBatch, seqs: slice) -> TeacherForcedBatch:
    """Rows ``seqs`` of the batch, every column kept (the chunk's outputs are laid out ``[S, T]``)."""
    return TeacherForcedBatch(**{name: getattr(batch, name)[seqs] for name in batch.__dataclass_fields__})
