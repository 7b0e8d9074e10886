"""The training step's loss mode (``real.model.head.micro_batch_loss`` -> ``hf.judge_loss_outputs`` -> ``judge_loss``):
chunks of whole sequences, the method's loss once per chunk with the micro-batch's denominators, give every
method's loss value and parameter gradients as ``judge_forward`` + autograd on the whole micro-batch does, and
nothing in the chunk loop is read back to the host."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import real_kernels.loss as loss_module
from real.judge.batching import build_teacher_forced_batch
from real.loop.config import make_config
from real.model.head import judge_forward, micro_batch_loss
from real.methods import GRPO, RAFT, TRACT, MicroBatch, Real
from real.methods.objectives import grpo_action_mask, grpo_loss, loss_norms, raft_loss, real_loss, tract_loss
from real.judge.prompts import resolve_score_token_ids
from real.model.tiny import build_tiny_model, build_tiny_tokenizer
from real_kernels import plan_chunks

PROMPTS = ["Grade: good answer.", "Grade: bad.", "Grade: so-so, missing a step.", "Grade: fine.",
           "Grade: wrong units.", "Grade: perfect."]
COTS = ["Feedback: fine [RESULT] 5", "Feedback: poor answer, wrong", "Feedback: partly right", "Feedback: ok",
        "Feedback: the units are off", "Feedback: complete and right"]
TARGETS = [4.33, 1.67, 3.0, 3.67, 2.0, 5.0]
GROUP = 2
SAMPLED = torch.tensor([4, 0, -1, 2, 1, 4])


def _setup(seed=1):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=seed)  # vocabulary of 847 (not a power of two)
    ids = resolve_score_token_ids(tok)
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    batch = build_teacher_forced_batch(tok, PROMPTS, COTS, TARGETS, ids, values)
    return model, batch, ids, values


def _losses(batch):
    """name -> (loss_fn(fwd, seqs), sequence_group): each loss with the whole batch's denominators."""
    gen = torch.Generator().manual_seed(0)
    shape = batch.cot_mask.shape
    old = -torch.rand(shape, generator=gen) * 3
    ref = -torch.rand(shape, generator=gen) * 3
    adv = torch.randn(len(batch), generator=gen)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    cot = loss_norms(batch.cot_mask)
    actions, _ = grpo_action_mask(batch.cot_mask, batch.score_pos, SAMPLED)
    grpo_norms = loss_norms(actions, cot_mask=batch.cot_mask)
    token_norms = loss_norms(batch.cot_mask, tokens_per_row=5.0)
    return {
        "real-ppo-kl": (lambda f, s: real_loss(f, GROUP, beta=0.5, lam=0.1, mu=0.2, advantages=adv[s],
                                               old_logprobs=old[s], ppo_clip=0.2, ref_logprobs=ref[s],
                                               kl_coef=0.05, agg="token-mean", norms=cot), 1),
        "real-on-policy": (lambda f, s: real_loss(f, GROUP, beta=1.0, lam=0.1, agg="seq-mean-token-sum",
                                                  ppo_clip=None, norms=cot), GROUP),
        "grpo": (lambda f, s: grpo_loss(f, rewards[s], GROUP, sampled_score_index=SAMPLED[s], old_logprobs=old[s],
                                        norms=grpo_norms, advantages=_grpo_advantages(rewards)[s]), 1),
        "grpo-in-loss-advantages": (lambda f, s: grpo_loss(f, rewards[s], GROUP, sampled_score_index=SAMPLED[s],
                                                           agg="token-mean", norms=grpo_norms), GROUP),
        "tract": (lambda f, s: tract_loss(f, lam=0.7, norms=token_norms), 1),
        "raft": (lambda f, s: raft_loss(f, norms=cot), 1),
    }


def _grpo_advantages(rewards):
    from real.methods.objectives import group_normalized_advantages

    return group_normalized_advantages(rewards.view(-1, GROUP)).reshape(-1)


def _rows_per_sequence(batch):
    return [int(n) + 1 for n in batch.cot_mask.sum(1)]


@pytest.mark.parametrize("name", ["real-ppo-kl", "real-on-policy", "grpo", "grpo-in-loss-advantages", "tract",
                                  "raft"])
@pytest.mark.parametrize("chunk_size", [None, 25])
def test_loss_mode_equals_the_head_and_autograd(name, chunk_size):
    model, batch, ids, values = _setup()
    loss_fn, group = _losses(batch)[name]
    params = [p for p in model.parameters() if p.requires_grad]
    if chunk_size is not None:  # chunks that hold several sequences, and more than one chunk
        rows = _rows_per_sequence(batch)
        groups = [sum(rows[g:g + group]) for g in range(0, len(rows), group)]
        plan = plan_chunks(sum(rows), model.config.vocab_size, "cpu", row_groups=groups, chunk_size=chunk_size)
        assert len(plan) >= 2 and any(sum(rows[:2]) <= r.stop - r.start for r in plan)

    fwd = judge_forward(model, batch, ids, values, return_entropy=True)
    ref_loss, ref_terms = loss_fn(fwd, slice(0, len(batch)))
    ref_grads = torch.autograd.grad(ref_loss, params, allow_unused=True)

    loss, terms, out = micro_batch_loss(model, batch, ids, values, loss_fn, chunk_size=chunk_size,
                                        sequence_group=group)
    grads = torch.autograd.grad(loss, params, allow_unused=True)

    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-5, abs=1e-6)
    for key, value in ref_terms.items():  # every term adds up over the chunks to the whole batch's
        assert not terms[key].requires_grad
        assert float(terms[key]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), key
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None or float(g.abs().max()) == 0.0
            continue
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.cot_logprobs, fwd.cot_logprobs.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.expected_score, fwd.expected_score.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size,group", [(None, 1), (25, 1), (12, 1), (12, GROUP), (1000, 1)])
def test_the_loss_runs_once_per_chunk_on_whole_sequences(chunk_size, group):
    model, batch, ids, values = _setup()
    loss_fn, _ = _losses(batch)["real-ppo-kl"]
    calls = []

    def counted(fwd, seqs):
        calls.append(seqs)
        assert fwd.expected_score.shape == (seqs.stop - seqs.start,)
        assert fwd.cot_logprobs.shape == (seqs.stop - seqs.start, batch.cot_mask.shape[1])
        return loss_fn(fwd, seqs)

    micro_batch_loss(model, batch, ids, values, counted, chunk_size=chunk_size, sequence_group=group)
    rows = _rows_per_sequence(batch)
    groups = [sum(rows[g:g + group]) for g in range(0, len(rows), group)]
    plan = plan_chunks(sum(rows), model.config.vocab_size, "cpu", row_groups=groups, chunk_size=chunk_size)
    assert len(calls) == len(plan)  # k calls for k chunks (was 2k + 1)
    assert [(s.start, s.stop) for s in calls] == _sequence_spans(plan, rows)
    assert all((s.stop - s.start) % group == 0 for s in calls)
    if chunk_size == 1000:
        assert calls == [slice(0, len(batch))]


def _sequence_spans(plan, rows):
    starts = [0]
    for r in rows:
        starts.append(starts[-1] + r)
    return [(starts.index(r.start), starts.index(r.stop)) for r in plan]


# --- no host syncs in the chunk loop ------------------------------------------------------------

# aten ops that make the host wait for the device: a value read back (.item(), float(), bool(), an if on a
# tensor) or an output whose size depends on the data (nonzero, boolean indexing, masked_select, unique)
SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
            "repeat_interleave", "index.Tensor_bool")


class ForbidHostSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen, self.active = [], False

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name == "index" and any(t is not None and t.dtype == torch.bool for t in args[1])
        if name in SYNC_OPS or bool_index:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def chunk_syncs(monkeypatch):
    """The host syncs made inside judge_loss's chunk loop (every chunk's GEMMs, passes, the caller's loss and
    its derivatives)."""
    mode = ForbidHostSyncs()
    inner = loss_module._Run.execute

    def watched(*args, **kwargs):
        with mode:
            return inner(*args, **kwargs)

    monkeypatch.setattr(loss_module._Run, "execute", watched)
    for name in ("tolist", "numpy"):  # copied out without an aten op the mode would see
        def spy(self, *a, _original=getattr(torch.Tensor, name), _name=name, **k):
            if mode.active:
                mode.seen.append(f"Tensor.{_name}")
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return mode


def test_the_detector_sees_host_syncs(chunk_syncs):
    with chunk_syncs:
        x = torch.tensor([1.0, -2.0])
        float(x.sum())
        x[x > 0]
        torch.nonzero(x)
        x.tolist()
    assert len(chunk_syncs.seen) >= 4 and "Tensor.tolist" in chunk_syncs.seen


def _method_losses(batch):
    """(method, micro-batch) pairs as the training loop prepares them, each with the whole batch's rows."""
    rows = len(batch)
    gen = torch.Generator().manual_seed(3)
    old = -torch.rand(batch.cot_mask.shape, generator=gen) * 3
    cases = []
    real_cfg = make_config(method="real", group_size=GROUP, kl_coef=0.05, epochs_per_batch=2, lam=0.1, mu=0.2,
                           loss_agg="token-mean")
    real = Real(real_cfg, None)
    cases.append((real, MicroBatch(0, rows, {"advantages": torch.randn(rows, generator=gen), "old_logprobs": old,
                                             "ref_logprobs": old - 0.1},
                                   real.loss_norms(batch, {}, None))))
    on_policy = Real(make_config(method="real", group_size=GROUP, prob_bonus=0.5), None)
    cases.append((on_policy, MicroBatch(0, rows, {}, on_policy.loss_norms(batch, {}, 4.0))))
    grpo = GRPO(make_config(method="grpo", group_size=GROUP, epochs_per_batch=2), None)
    grpo_rows = {"rewards": torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), "sampled_index": SAMPLED,
                 "advantages": torch.randn(rows, generator=gen), "old_logprobs": old}
    cases.append((grpo, MicroBatch(0, rows, grpo_rows, grpo.loss_norms(batch, grpo_rows, None))))
    tract = TRACT(make_config(method="tract"), None)
    cases.append((tract, MicroBatch(0, rows, {}, tract.loss_norms(batch, {}, 5.0))))
    raft = RAFT(make_config(method="raft"), None)
    cases.append((raft, MicroBatch(0, rows, {}, raft.loss_norms(batch, {}, None))))
    return cases


def test_no_host_sync_inside_the_chunk_loop_for_every_method(chunk_syncs):
    model, batch, ids, values = _setup()
    for method, mb in _method_losses(batch):
        chunk_syncs.seen.clear()
        loss, terms, _ = micro_batch_loss(model, batch, ids, values,
                                          lambda fwd, seqs: method.loss(fwd, mb.inputs(seqs), mb.norms),
                                          chunk_size=12, sequence_group=method.sequence_group(mb))
        assert chunk_syncs.seen == [], f"{method.name}: host syncs in the chunk loop: {chunk_syncs.seen}"
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in terms.values())
        assert loss.requires_grad


def test_the_methods_losses_equal_the_whole_batch_loss_and_do_not_mutate_their_inputs():
    model, batch, ids, values = _setup()
    params = [p for p in model.parameters() if p.requires_grad]
    for method, mb in _method_losses(batch):
        rows_before = {k: v.clone() for k, v in mb.rows.items()}
        fwd = judge_forward(model, batch, ids, values, return_entropy=True)
        ref_loss, ref_terms = method.loss(fwd, mb.inputs(slice(0, len(batch))), mb.norms)
        ref_grads = torch.autograd.grad(ref_loss, params, allow_unused=True)
        loss, terms, _ = micro_batch_loss(model, batch, ids, values,
                                          lambda f, seqs: method.loss(f, mb.inputs(seqs), mb.norms),
                                          chunk_size=12, sequence_group=method.sequence_group(mb))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-5, abs=1e-6), method.name
        for key, value in ref_terms.items():
            assert float(terms[key]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), (method.name, key)
        for g, r in zip(grads, ref_grads):
            if r is not None:
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
        assert mb.rows.keys() == rows_before.keys()
        assert all(torch.equal(mb.rows[k], rows_before[k]) for k in rows_before)


# --- bad input ---------------------------------------------------------------------------------------

def test_bad_chunking_arguments_are_named():
    model, batch, ids, values = _setup()
    loss_fn, _ = _losses(batch)["raft"]
    with pytest.raises(ValueError, match="sequence_group"):
        micro_batch_loss(model, batch, ids, values, loss_fn, sequence_group=4)  # 6 sequences
    with pytest.raises(ValueError, match="sequence_group"):
        micro_batch_loss(model, batch, ids, values, loss_fn, sequence_group=0)
    with pytest.raises(ValueError, match="chunk_size"):
        micro_batch_loss(model, batch, ids, values, loss_fn, chunk_size=-3)
    with pytest.raises(ValueError, match="scalar"):
        micro_batch_loss(model, batch, ids, values, lambda f, s: (f.sq_error, {}))
    with pytest.raises(ValueError, match="tokens_per_row"):
        real_loss(judge_forward(model, batch, ids, values), GROUP, tokens_per_row=2.0, norms=loss_norms(batch.cot_mask))
    with pytest.raises(TypeError, match="norms"):
        raft_loss(judge_forward(model, batch, ids, values), norms=3)


def test_loss_mode_backward_of_twice_the_loss_gives_twice_the_gradient():
    model, batch, ids, values = _setup()
    loss_fn, _ = _losses(batch)["tract"]
    loss, _, _ = micro_batch_loss(model, batch, ids, values, loss_fn, chunk_size=25)
    (2.0 * loss).backward()
    doubled = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    loss, _, _ = micro_batch_loss(model, batch, ids, values, loss_fn, chunk_size=25)
    loss.backward()
    once = [p.grad for p in model.parameters() if p.grad is not None]
    for d, o in zip(doubled, once):
        torch.testing.assert_close(d, 2 * o, rtol=1e-6, atol=1e-9)
