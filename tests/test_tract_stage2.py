"""TRACT's second stage: --tract-cots own trains TRACT's loss on CoTs the model samples
itself (one per prompt per step) instead of the data's reference CoTs."""
import pytest

import real.loop.train as train
from real.loop.config import make_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(tmp_path, **overrides):
    cfg = make_config(model="tiny", data=["synthetic"], synthetic_train_size=8, synthetic_eval_size=2,
                      progress=False, output_dir=str(tmp_path), steps=1, method="tract", prompts_per_step=2,
                      max_new_tokens=6, **overrides)
    return train.Trainer(cfg, log=lambda m: None)


@pytest.mark.parametrize("group_size", [1, 3])
def test_stage_two_trains_on_the_models_own_cots(tmp_path, group_size):
    trainer = _trainer(tmp_path, tract_cots="own", group_size=group_size)
    assert trainer.engine is not None and trainer.method.group_size == 1
    sampled, batches = [], []
    original_sample, original_collect = trainer.sample_rollouts, trainer.method.collect

    def sample(prompts, step, *, with_score):
        out = original_sample(prompts, step, with_score=with_score)
        sampled.append(out)
        return out

    trainer.sample_rollouts = sample
    trainer.method.collect = lambda *a: batches.append(original_collect(*a)) or batches[-1]
    record = trainer.train_step(1)
    assert record["loss"] == record["loss"] and record["generated_tokens"] > 0
    assert len(sampled) == 1 and len(sampled[0].cots) == 2 * group_size
    assert len(batches[0].batch) == 2  # one CoT per prompt: the first of each prompt's samples
    first = sampled[0].cots[0].split("[RESULT]")[0].strip()
    assert first in trainer.tokenizer.decode(batches[0].batch.input_ids[0])


def test_stage_one_keeps_the_reference_cots_and_no_rollout_engine(tmp_path):
    trainer = _trainer(tmp_path)
    assert trainer.engine is None and not trainer.method.needs_rollouts
    with pytest.raises(ValueError, match="tract_cots"):
        make_config(method="tract", tract_cots="generated")
