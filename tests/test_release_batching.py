"""The training loop as the released REAL code runs it:

- ``--group-filter partial`` fills the step's batch: rollout rounds of ``--prompts-per-step`` prompts until it
  holds ``--prompts-per-step`` partial groups (at most ``--max-fill-rounds``), then trains on exactly those;
- ``--mini-batch-size``: each epoch over the rollout batch takes one optimizer update per mini-batch.
Before, the filter kept what one round gave (30-60% of the prompts) and every epoch was one update."""
import copy
import json
import math

import pytest
import torch

import real.loop.train as train
from real.judge.batching import slice_batch
from real.loop.config import make_config, parse_train_args
from real.model.head import judge_forward
from real.methods.objectives import raft_loss
from real.loop.rollout_groups import Rollouts

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(tmp_path, **overrides):
    base = dict(model="tiny", data=["synthetic"], synthetic_train_size=64, synthetic_eval_size=4, eval_every=0,
                progress=False, output_dir=str(tmp_path), steps=1, max_new_tokens=8, seed=0)
    base.update(overrides)
    return make_config(**base)


# --- the partial filter fills its batch ------------------------------------------------------------

def _scripted_rollouts(trainer, partial_every=2):
    """Replace the sampler: in every round, the groups of every ``partial_every``-th prompt are partial (one
    rollout writes round(y*), the other nothing), the rest all wrong.  Returns the calls' (prompts, round)."""
    calls = []
    target_of = {e.prompt: e.target for e in trainer.train_examples}
    g = trainer.config.group_size

    def sample(prompts, step, *, with_score, fill_round=0):
        calls.append((list(prompts), fill_round))
        repeated = [p for p in prompts for _ in range(g)]
        scores = []
        for i, prompt in enumerate(prompts):
            right = float(math.floor(target_of[prompt] + 0.5))
            scores += ([right] + [None] * (g - 1)) if i % partial_every == 0 else [None] * g
        cots = [f"Feedback: round {fill_round} prompt {i // g} sample {i % g}" for i in range(len(repeated))]
        return Rollouts(prompts=repeated, cots=cots, decoded_scores=scores, group_size=g,
                        sampled_tokens=100 * len(repeated))  # as if each rollout were 100 tokens

    trainer.sample_rollouts = sample
    return calls


def _collected(trainer):
    batches = []
    original = trainer.method.collect
    trainer.method.collect = lambda *a: batches.append(original(*a)) or batches[-1]
    return batches


def test_the_partial_filter_generates_until_its_batch_is_full(tmp_path):
    trainer = train.Trainer(_cfg(tmp_path, method="real", group_filter="partial", prompts_per_step=4,
                                 group_size=2), log=lambda m: None)
    calls, batches = _scripted_rollouts(trainer), _collected(trainer)
    record = trainer.train_step(1)
    # round 0 gives 2 partial groups of 4, round 1 two more: the batch holds exactly 4 groups
    assert [r for _, r in calls] == [0, 1]
    assert record["fill_rounds"] == 2 and record["prompts_trained"] == 4 and record["groups_kept"] == 0.5
    assert record["sequences"] == 8 and len(batches[0].batch) == 8 and batches[0].trainable
    assert trainer.stream.position == 8  # two rounds of prompts taken from the stream
    kept = [calls[0][0][0], calls[0][0][2], calls[1][0][0], calls[1][0][2]]
    text = [trainer.tokenizer.decode(ids) for ids in batches[0].batch.input_ids[::2]]
    assert all(p.split("###")[0][-40:] in t for p, t in zip(kept, text))


def test_the_fill_stops_at_its_cap_and_says_so(tmp_path):
    trainer = train.Trainer(_cfg(tmp_path, method="real", group_filter="partial", prompts_per_step=4,
                                 group_size=2, max_fill_rounds=3), log=lambda m: None)
    calls = _scripted_rollouts(trainer, partial_every=8)  # one partial group per round of 4 prompts
    record = trainer.train_step(1)
    assert len(calls) == 3 and record["fill_rounds"] == 3 and record["prompts_trained"] == 3
    assert record["sequences"] == 6 and trainer.stream.position == 12
    # every round's rollouts were generated, the discarded groups' too: 3 rounds x 8 rollouts x 100 tokens
    assert record["generated_tokens"] == 2400


def test_without_the_filter_one_round_is_taken(tmp_path):
    trainer = train.Trainer(_cfg(tmp_path, method="real", prompts_per_step=4, group_size=2), log=lambda m: None)
    calls = _scripted_rollouts(trainer)
    record = trainer.train_step(1)
    assert len(calls) == 1 and record["sequences"] == 8 and "fill_rounds" not in record


# --- updates per rollout batch -----------------------------------------------------------------------

def _captured_updates(trainer):
    """(weights before, gradient) at every optimizer update."""
    updates = []
    step_once = trainer.optimizer.step

    def step(*args, **kwargs):
        updates.append(([p.detach().clone() for p in trainer.trainable],
                        [p.grad.detach().clone() for p in trainer.trainable]))
        return step_once(*args, **kwargs)

    trainer.optimizer.step = step
    return updates


def test_each_mini_batch_is_one_update_with_its_own_gradient(tmp_path):
    cfg = _cfg(tmp_path, method="raft", prompts_per_step=6, mini_batch_size=2, epochs_per_batch=2, grad_clip=0.0,
               micro_batch_tokens=10_000)
    trainer = train.Trainer(cfg, log=lambda m: None)
    updates, batches = _captured_updates(trainer), _collected(trainer)
    record = trainer.train_step(1)
    assert len(updates) == 6 and record["updates"] == 6 == cfg.updates_per_step  # 2 epochs x 3 mini-batches
    batch, scale = batches[0].batch, trainer.scale
    reference = copy.deepcopy(trainer.model)
    for u, (weights, grads) in enumerate(updates):
        start = 2 * (u % 3)  # epoch after epoch, mini-batch after mini-batch, in order
        with torch.no_grad():
            for p, w in zip([p for p in reference.parameters() if p.requires_grad], weights):
                p.copy_(w)
        reference.zero_grad()
        fwd = judge_forward(reference, slice_batch(batch, start, start + 2), scale.token_ids, scale.values)
        loss, _ = raft_loss(fwd)
        expected = torch.autograd.grad(loss, [p for p in reference.parameters() if p.requires_grad])
        for g, r in zip(grads, expected):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)
    assert not torch.equal(updates[0][0][0], updates[1][0][0])  # the second mini-batch sees updated weights


def test_mini_batches_of_rollouts_are_ppo_clipped_after_the_first(tmp_path):
    cfg = _cfg(tmp_path, method="real", prompts_per_step=2, group_size=4, mini_batch_size=4)
    trainer = train.Trainer(cfg, log=lambda m: None)
    updates = _captured_updates(trainer)
    record = trainer.train_step(1)
    assert len(updates) == 2 and record["updates"] == 2 and record["micro_batches"] == 2
    assert "loss_last_epoch" in record and 0.0 <= record["clip_frac"] <= 1.0


def test_a_full_batch_mini_batch_is_the_old_single_update(tmp_path):
    records = []
    for size in (0, 8):
        cfg = _cfg(tmp_path / str(size), method="real", prompts_per_step=2, group_size=4, mini_batch_size=size)
        records.append(train.Trainer(cfg, log=lambda m: None).train_step(1))
    assert records[0]["updates"] == records[1]["updates"] == 1
    for key in ("loss", "grad_norm", "reward_mean"):
        assert records[0][key] == records[1][key], key


# --- the settings ---------------------------------------------------------------------------------------------

def test_the_settings_come_from_yaml_and_flags_and_print_config_shows_them(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("method: real\ngroup_size: 4\nmini_batch_size: 16\nmax_fill_rounds: 5\n")
    from real.loop.train_cli import main as cli_main

    assert cli_main(["--config", str(path), "--print-config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["mini_batch_size"] == 16 and shown["real"]["max_fill_rounds"] == 5
    assert cli_main(["--config", str(path), "--mini-batch-size", "8", "--max-fill-rounds", "2", "--print-config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["mini_batch_size"] == 8 and shown["real"]["max_fill_rounds"] == 2
    cfg = parse_train_args(["--mini-batch-size", "32", "--group-size", "4"])
    assert cfg.mini_batch_size == 32 and cfg.updates_per_step == 1  # 8 prompts x 4 rollouts = one mini-batch


@pytest.mark.parametrize("values,field", [
    (dict(mini_batch_size=-8), "mini_batch_size"),
    (dict(mini_batch_size=6, group_size=4), "mini_batch_size"),
    (dict(max_fill_rounds=0), "max_fill_rounds"),
    (dict(mini_batch_size="many"), "mini_batch_size"),
])
def test_bad_settings_name_the_field(values, field):
    with pytest.raises(ValueError, match=field):
        make_config(**values)


def test_mini_batches_must_split_over_the_ranks_in_whole_groups():
    cfg = make_config(method="real", group_size=4, prompts_per_step=8, mini_batch_size=8)
    cfg.check_for_ranks(2)
    with pytest.raises(ValueError, match="--mini-batch-size 8"):
        cfg.check_for_ranks(4)


@pytest.mark.parametrize("preset,group_size,mini_batch_size,updates", [
    ("qwen3-8b-real", 8, 1024, 6),  # bash_real/run_real.sh: n=8, 128 responses per GPU x 8 GPUs, 3 epochs
    ("mistral-7b-real", 8, 1024, 6),
    ("qwen3-32b-real", 16, 2048, 6),  # ..._from_tract_full_lr1e-6n16.sh: n=16, 128 per GPU x 16 GPUs
    ("qwen3-32b-real-lora", 8, 1024, 6),  # ..._from_raft_r128_lr1e-5.sh: n=8, 1 node x 8 GPUs
    ("qwen3-8b-grpo", 8, 256, 8),  # verl's PPO actor: ppo_mini_batch_size 32 prompts x n=8, one epoch
])
def test_the_presets_take_the_released_updates_per_rollout_batch(capsys, preset, group_size, mini_batch_size,
                                                                 updates):
    from pathlib import Path

    from real.loop.train_cli import main as cli_main

    path = Path(__file__).resolve().parents[1] / "configs" / "paper" / f"{preset}.yaml"
    assert cli_main(["--config", str(path), "--print-config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["group_size"], shown["mini_batch_size"]) == (group_size, mini_batch_size)
    assert make_config(**{k: v for k, v in shown.items()}).updates_per_step == updates
