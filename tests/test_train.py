"""real.loop.train: the loop end to end on the tiny model and the synthetic task (CPU, seconds)."""
import json
import os
import signal

import pytest
import torch

from real.loop import checkpoint as ckpt
from real.loop.config import make_config
from real.judge.batching import micro_batch_ranges as plan_micro_batches
from real.judge.data import PromptStream
from real.loop.train import Trainer
from real.loop.train_cli import main


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(out, **overrides):
    base = dict(model="tiny", data=["synthetic"], synthetic_train_size=64, synthetic_eval_size=8, eval_size=8,
                prompts_per_step=2, group_size=4, max_new_tokens=12, eval_max_new_tokens=12, lr=1e-3,
                progress=False, output_dir=str(out), seed=0)
    base.update(overrides)
    return make_config(**base)


def _lines(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_cli_run_writes_metrics_and_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["--method", "real", "--model", "tiny", "--data", "synthetic", "--steps", "3", "--output-dir", str(out),
               "--no-progress"])
    assert rc == 0
    records = _lines(out / "metrics.jsonl")
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3]
    for key in ("loss", "pg_loss", "prediction_loss", "reward_mean", "reward_std", "advantage_mean", "advantage_std",
                "advantage_abs", "mse", "entropy", "grad_norm", "tokens_per_s", "peak_mem_mb", "lr"):
        assert all(isinstance(r[key], float) for r in train), key
    assert train[0]["attn_implementation"] == "sdpa"
    assert len(evals) == 1 and evals[0]["step"] == 3
    assert {"pearson", "spearman", "kendall", "n"} <= set(evals[0])
    folder = out / "checkpoint-3"
    assert (folder / "model.safetensors").is_file() and (folder / "optimizer.pt").is_file()
    assert json.loads((folder / "trainer_state.json").read_text())["step"] == 3
    assert "checkpoint-3" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["real", "grpo", "tract", "raft"])
def test_training_step_never_calls_the_lm_head(tmp_path, method):
    trainer = Trainer(_cfg(tmp_path, method=method, steps=1), log=lambda m: None)
    head = trainer.model.get_output_embeddings()
    armed = {"on": True}

    def refuse(module, args, output):
        if armed["on"]:
            raise AssertionError("the LM head module ran during the loss computation")

    handle = head.register_forward_hook(refuse)
    if trainer.engine is not None:  # sampling needs next-token logits; only the loss must avoid them
        generate = trainer.engine.generate

        def generate_unarmed(*args, **kwargs):
            armed["on"] = False
            try:
                rollouts = generate(*args, **kwargs)
            finally:
                armed["on"] = True
            if method == "grpo":  # an untrained model writes no readable score: give it some, for a gradient
                rollouts.decoded_scores = [float(1 + i % 4) for i in range(len(rollouts.cots))]
            return rollouts

        trainer.engine.generate = generate_unarmed
    before = [p.detach().clone() for p in trainer.trainable]
    record = trainer.train_step(1)
    handle.remove()
    assert torch.isfinite(torch.tensor(record["loss"]))
    assert record["grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.trainable))
    # and the hook does fire when the head is used, so the check above can fail
    armed["on"] = True
    handle = head.register_forward_hook(refuse)
    with pytest.raises(AssertionError, match="LM head module ran"):
        trainer.model(input_ids=torch.tensor([[1, 2, 3]]))
    handle.remove()


@pytest.mark.parametrize("updates", [
    {},
    # two mini-batches per epoch, two epochs (PPO-clipped after the first update), a warm-up over 6 updates
    # (across steps 1-2): the optimizer and schedule state after 4 updates per step must resume exactly (a
    # cosine schedule would differ by design: the first half runs with --steps 2)
    dict(mini_batch_size=4, epochs_per_batch=2, warmup_steps=6),
])
def test_stop_and_resume_gives_the_same_losses(tmp_path, updates):
    common = dict(method="real", steps=4, eval_every=0, save_every=2, **updates)
    whole = Trainer(_cfg(tmp_path / "whole", **common), log=lambda m: None).run()
    first = Trainer(_cfg(tmp_path / "split", **dict(common, steps=2)), log=lambda m: None).run()
    assert first.last_step == 2 and first.checkpoint.endswith("checkpoint-2")
    resumed = Trainer(_cfg(tmp_path / "split", **dict(common, resume=True)), log=lambda m: None).run()
    assert resumed.last_step == 4

    def train_values(path, key):
        return [(r["step"], r[key]) for r in _lines(path) if r["type"] == "train"]

    for key in ("loss", "reward_mean", "grad_norm", "mse", "lr", "updates"):
        assert train_values(tmp_path / "split" / "metrics.jsonl", key) == \
            train_values(tmp_path / "whole" / "metrics.jsonl", key), key
    a = ckpt.latest_checkpoint(str(tmp_path / "whole"))
    b = ckpt.latest_checkpoint(str(tmp_path / "split"))
    from safetensors.torch import load_file

    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _run_asking_to_stop_at_step_2(trainer, ask_to_stop, out_dir):
    """Run ``trainer``, calling ``ask_to_stop()`` once step 2 is done; it must stop there with checkpoint-2."""
    step_once = trainer.train_step

    def step_then_ask(step):
        record = step_once(step)
        if step == 2:
            ask_to_stop()
        return record

    trainer.train_step = step_then_ask
    result = trainer.run()
    assert result.interrupted and result.last_step == 2
    assert ckpt.latest_checkpoint(str(out_dir)).endswith("checkpoint-2")
    return result


def test_a_training_checkpoint_loads_with_load_checkpoint(tmp_path):
    """The loop writes parameter-name keyed optimizer states; the one-process loader reads them too."""
    trained = Trainer(_cfg(tmp_path / "run", method="tract", steps=2, eval_every=0), log=lambda m: None)
    result = trained.run()
    fresh = Trainer(_cfg(tmp_path / "fresh", method="tract", steps=2, eval_every=0), log=lambda m: None)
    state = ckpt.load_checkpoint(result.checkpoint, model=fresh.model, optimizer=fresh.optimizer,
                                 scheduler=fresh.scheduler)
    assert state["step"] == 2 and fresh.scheduler.last_epoch == trained.scheduler.last_epoch
    for p_trained, p_fresh in zip(trained.trainable, fresh.trainable):
        assert torch.equal(p_trained, p_fresh)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(trained.optimizer.state[p_trained][key], fresh.optimizer.state[p_fresh][key])


def test_ctrl_c_saves_a_checkpoint_and_stops_cleanly(tmp_path):
    trainer = Trainer(_cfg(tmp_path, method="tract", steps=5, eval_every=0), log=lambda m: None)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN in a shell's background job
    _run_asking_to_stop_at_step_2(trainer, lambda: signal.raise_signal(signal.SIGINT), tmp_path)  # what Ctrl-C sends
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    resumed = Trainer(_cfg(tmp_path, method="tract", steps=5, eval_every=0, resume=True), log=lambda m: None).run()
    assert not resumed.interrupted and resumed.last_step == 5
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl") if r["type"] == "train"] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("method,budget", [("real", 100), ("grpo", 200), ("tract", 100)])
def test_micro_batches_accumulate_to_the_full_batch_gradient(tmp_path, method, budget):
    """Several micro-batches (for REAL even groups split across them) give the one-batch loss and update."""
    results = []
    for name, tokens in (("one", 100_000), ("many", budget)):
        trainer = Trainer(_cfg(tmp_path / name, method=method, steps=1, micro_batch_tokens=tokens,
                               prompts_per_step=3), log=lambda m: None)
        record = trainer.train_step(1)
        results.append((record, [p.detach().clone() for p in trainer.trainable]))
    (one, w_one), (many, w_many) = results
    assert one["micro_batches"] == 1 and many["micro_batches"] > 1
    assert many["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-6)
    assert many["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-3)
    # Adam's first step moves each weight by about lr * sign(g) (lr = 1e-3): a gradient component near 0
    # turns a rounding-level difference (another chunking of the head's rows) into a visible one, so the
    # bound is 1% of the learning rate
    for a, b in zip(w_one, w_many):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_tract_micro_batches_of_unequal_cot_lengths_match_the_full_batch(tmp_path):
    """TRACT's CE is a mean over every CoT token of the step, so micro-batches holding CoTs of different
    lengths must still add up to it (each is normalised by the step's tokens per row, not its own)."""
    import dataclasses

    from real.judge.synthetic import make_splits

    train, held = make_splits(12, 4, seed=0)
    train = [dataclasses.replace(e, feedback=[f + " and so" * (3 * i) for f in e.feedback])
             for i, e in enumerate(train)]
    results = []
    for name, tokens in (("one", 100_000), ("many", 150)):
        trainer = Trainer(_cfg(tmp_path / name, method="tract", steps=1, micro_batch_tokens=tokens,
                               prompts_per_step=4), train_examples=train, eval_examples=held, log=lambda m: None)
        record = trainer.train_step(1)
        results.append((record, [p.detach().clone() for p in trainer.trainable]))
    (one, w_one), (many, w_many) = results
    assert one["micro_batches"] == 1 and many["micro_batches"] > 1
    assert many["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert many["ce"] == pytest.approx(one["ce"], rel=1e-5)
    # Adam's first step moves each weight by about lr * sign(g) (lr = 1e-3): a gradient component near 0
    # turns a rounding-level difference (another chunking of the head's rows) into a visible one, so the
    # bound is 1% of the learning rate
    for a, b in zip(w_one, w_many):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_stop_file_stops_after_the_step_with_a_checkpoint(tmp_path):
    trainer = Trainer(_cfg(tmp_path, method="raft", steps=5, eval_every=0), log=lambda m: None)
    _run_asking_to_stop_at_step_2(trainer, lambda: (tmp_path / "STOP").write_text(""), tmp_path)
    assert not (tmp_path / "STOP").exists()  # consumed: --resume does not stop again at once


def test_a_sequence_longer_than_the_token_budget_is_a_clear_error(tmp_path):
    trainer = Trainer(_cfg(tmp_path, method="tract", steps=1, micro_batch_tokens=8), log=lambda m: None)
    with pytest.raises(ValueError, match="does not fit --micro-batch-tokens 8"):
        trainer.train_step(1)
    with pytest.raises(ValueError, match="needs whole groups"):
        plan_micro_batches([10, 10, 10, 10], group_size=4, token_budget=30, split_groups=False)


def test_plan_micro_batches_and_prompt_stream():
    assert plan_micro_batches([5, 5, 5, 5], 2, 100, split_groups=False) == [(0, 4)]
    assert plan_micro_batches([5, 5, 9, 9], 2, 20, split_groups=False) == [(0, 2), (2, 4)]
    assert plan_micro_batches([5, 5, 9, 9], 2, 10, split_groups=True) == [(0, 2), (2, 3), (3, 4)]
    a, b = PromptStream(5, seed=1), PromptStream(5, seed=1)
    first = a.take(7)
    assert first == b.take(7) and sorted(first[:5]) == [0, 1, 2, 3, 4]
    resumed = PromptStream(5, seed=1, position=7)
    assert resumed.take(3) == a.take(3)


def test_several_epochs_per_batch_use_ratio_clipping_and_kl(tmp_path):
    trainer = Trainer(_cfg(tmp_path, method="real", steps=1, epochs_per_batch=2, kl_coef=0.1, lr=1e-2),
                      log=lambda m: None)
    record = trainer.train_step(1)
    assert "loss_last_epoch" in record and record["loss_last_epoch"] != record["loss"]
    assert record["kl"] == pytest.approx(0.0, abs=1e-6)  # first epoch: the policy is still the reference
    assert 0.0 <= record["clip_frac"] <= 1.0


def test_cosine_schedule_with_warmup(tmp_path):
    trainer = Trainer(_cfg(tmp_path, method="raft", steps=10, schedule="cosine", warmup_steps=2, lr=1.0,
                           min_lr_ratio=0.1), log=lambda m: None)
    lrs = [trainer._lr_lambda(u) for u in range(12)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(x >= y for x, y in zip(lrs[1:], lrs[2:]))


def test_lora_and_gradient_checkpointing(tmp_path):
    pytest.importorskip("peft")
    trainer = Trainer(_cfg(tmp_path, method="tract", steps=2, lora_rank=4, gradient_checkpointing=True,
                           eval_every=0), log=lambda m: None)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    result = trainer.run()
    assert os.path.isfile(os.path.join(result.checkpoint, "adapter_model.safetensors"))
    assert all(torch.equal(p, frozen[n]) for n, p in trainer.model.named_parameters() if n in frozen)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.records if r["type"] == "train")


def test_clear_errors(tmp_path, capsys):
    rc = main(["--model", str(tmp_path / "no-such-model"), "--output-dir", str(tmp_path / "o1")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err

    bad_key = tmp_path / "run.yaml"
    bad_key.write_text("stepz: 3\n")
    rc = main(["--config", str(bad_key)])
    assert rc == 2 and "unknown config key 'stepz'" in capsys.readouterr().err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc = main(["--data", str(empty), "--output-dir", str(tmp_path / "o2")])
    assert rc == 2 and "empty.jsonl" in capsys.readouterr().err

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "x", "gpt4_score": "high"}\n')
    rc = main(["--data", str(broken), "--output-dir", str(tmp_path / "o3")])
    assert rc == 2 and "row 0" in capsys.readouterr().err

    Trainer(_cfg(tmp_path / "o4", method="raft", steps=1, eval_every=0), log=lambda m: None).run()
    with pytest.raises(ValueError, match="already holds a run"):
        Trainer(_cfg(tmp_path / "o4", method="raft", steps=1), log=lambda m: None).run()


def test_tokenizer_without_single_token_scores_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from real.model.tiny import build_tiny_model, build_tiny_tokenizer

    vocab = {"[UNK]": 0, "<pad>": 1, "[RESULT]": 2, "1": 3, "2": 4, "3": 5, "4": 6}  # no "5"
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="[UNK]")
    tok.add_tokens(["[RESULT]"])
    model = build_tiny_model(build_tiny_tokenizer())  # any model: the tokenizer is refused first
    with pytest.raises(ValueError, match="'5'"):
        Trainer(_cfg(tmp_path, method="raft", steps=1), model=model, tokenizer=tok, log=lambda m: None)


def test_grpo_reads_the_score_token_after_the_first_marker():
    from real.loop.rollout_groups import decoded_score

    values = [1, 2, 3, 4, 5]
    assert decoded_score("Feedback: yes 2 [RESULT] 3", values) == 3.0
    assert decoded_score("Feedback: yes 2 [RESULT] 35 no", values) == 3.0  # the token after the marker is "3"
    assert decoded_score("Feedback: yes 2 [RESULT]4", values) == 4.0
    assert decoded_score("[RESULT] 2 [RESULT] 5", values) == 2.0
    assert decoded_score("Feedback: yes 2 no 2", values) is None
    assert decoded_score("[RESULT] 7", values) is None and decoded_score("[RESULT] yes", values) is None
    assert decoded_score("[RESULT] 10", [1, 10]) == 10.0  # the longest value wins


def test_raft_is_evaluated_without_a_cot(tmp_path, monkeypatch):
    import real.judge.inference

    def no_generation(*args, **kwargs):
        raise AssertionError("a RAFT judge reads its score right after the prompt; nothing is generated")

    monkeypatch.setattr(real.judge.inference, "generate_cots", no_generation)
    trainer = Trainer(_cfg(tmp_path, method="raft", steps=1), log=lambda m: None)
    record = trainer.evaluate(0)
    assert record["n"] == 8 and record["type"] == "eval"
