"""The released REAL code's settings: verl's loss-aggregation names, the
released advantage normalisation, the probability bonus and the 'partial' group filter.

Every test here fails on the code before the issue: 'token-mean' meant a mean per sequence, the old
names were accepted silently, advantages could only be divided by the std of the rewards, --mu was a
reward weight described as the released bonus, and no group filter existed.
"""
import pytest
import torch

from real.loop.config import make_config
from real.methods.real import partial_groups
from real.methods.objectives import real_advantages, real_loss, rloo_advantages
from tests.test_objectives import _fake_forward


def test_token_mean_weighs_every_token_of_the_batch_the_same():
    fwd = _fake_forward()  # CoT lengths 3, 5, 2, 4
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss, _ = real_loss(fwd, 2, beta=0.0, advantages=adv, ppo_clip=None, agg="token-mean")
    loss.backward()
    torch.testing.assert_close(fwd.cot_logprobs.grad, (-adv / 14.0)[:, None] * fwd.cot_mask)


def test_token_mean_over_micro_batches_adds_up_to_the_whole_batch():
    fwd = _fake_forward()
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    whole, _ = real_loss(fwd, 2, beta=0.0, advantages=adv, ppo_clip=None, agg="token-mean")
    per_row = float(fwd.cot_mask.sum()) / 4
    parts = 0.0
    for s, e in ((0, 2), (2, 4)):
        part = type(fwd)(**{k: (v[s:e] if isinstance(v, torch.Tensor) else v) for k, v in vars(fwd).items()})
        loss, _ = real_loss(part, 2, beta=0.0, advantages=adv[s:e], ppo_clip=None, agg="token-mean",
                            tokens_per_row=per_row)
        parts = parts + loss * (e - s) / 4
    torch.testing.assert_close(parts, whole)


@pytest.mark.parametrize("unknown", ["sequence-sum", "batch-token-mean"])
def test_unknown_aggregation_names_are_rejected_listing_verls(unknown):
    with pytest.raises(ValueError, match="seq-mean-token-sum"):
        make_config(loss_agg=unknown)
    with pytest.raises(ValueError, match="seq-mean-token-sum"):
        real_loss(_fake_forward(), 2, agg=unknown)
    assert make_config(loss_agg="seq-mean-token-sum").method_config.loss_agg == "seq-mean-token-sum"


def test_advantage_std_normalisation_is_the_released_one():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    raw = rloo_advantages(r, normalize=False, clip=None)
    released = rloo_advantages(r, normalize="advantage-std", clip=None, eps=1e-8)
    torch.testing.assert_close(released, raw / raw.std(unbiased=False))
    # the released scaling is G/(G-1) times smaller than dividing by the std of the rewards
    torch.testing.assert_close(released * 4 / 3, rloo_advantages(r, normalize="reward-std", clip=None, eps=0.0))
    with pytest.raises(ValueError, match="normalize"):
        rloo_advantages(r, normalize="group")
    assert make_config(adv_norm="advantage-std").method_config.adv_norm == "advantage-std"


def test_prob_bonus_is_a_separately_normalised_and_clipped_advantage():
    fwd = _fake_forward()
    adv = real_advantages(fwd, 2, normalize="advantage-std", clip=1.0, prob_bonus=0.5)
    reward = rloo_advantages((-fwd.sq_error).detach().view(2, 2), normalize="advantage-std", clip=1.0)
    bonus = rloo_advantages(fwd.pi_star.detach().view(2, 2), normalize="advantage-std", clip=1.0)
    torch.testing.assert_close(adv, (reward + 0.5 * bonus).view(-1))
    # the bonus moves the CoT term only: the prediction term's gradient is the one without it
    a, _ = real_loss(fwd, 2, beta=1.0, prob_bonus=0.5)
    a.backward()
    assert fwd.log_pi_star.grad is None  # (lam = mu = 0: pi(k*) is not in the differentiated reward)
    help_text = make_config().method_config.__dataclass_fields__["mu"].metadata["help"]
    assert "Not the released code's probability bonus" in help_text


def test_partial_filter_keeps_groups_neither_all_right_nor_all_wrong():
    targets = [4.0] * 3 + [2.2] * 3 + [5.0] * 3
    decoded = [4.0, 3.0, None, 2.0, 2.0, 2.0, 1.0, None, 3.0]
    assert partial_groups(decoded, targets, 3) == [0]
    cfg = make_config(group_filter="partial")
    assert cfg.method_config.group_filter == "partial"
    with pytest.raises(ValueError, match="group_filter"):
        make_config(group_filter="incorrect")


@pytest.mark.usefixtures("one_thread")
def test_a_real_step_with_the_released_settings(tmp_path):
    from real.loop.train import Trainer

    cfg = make_config(model="tiny", data=["synthetic"], synthetic_train_size=16, synthetic_eval_size=4, eval_size=4,
                      prompts_per_step=2, group_size=4, max_new_tokens=12, eval_max_new_tokens=12, progress=False,
                      output_dir=str(tmp_path), steps=1, group_filter="partial", loss_agg="token-mean",
                      adv_norm="advantage-std", prob_bonus=1.0, micro_batch_tokens=600)
    trainer = Trainer(cfg, log=lambda m: None)
    record = trainer.train_step(1)
    assert 0.0 <= record["groups_kept"] <= 1.0
    assert record["micro_batches"] >= 1 and record["loss"] == record["loss"]
