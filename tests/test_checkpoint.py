"""real.loop.checkpoint (and the reading side, real.model.checkpoint_files): complete-or-absent checkpoints that
restore model, optimizer, scheduler and RNG exactly."""
import os
import random

import numpy as np
import pytest
import torch

from real.loop import checkpoint as ckpt
from real.model import checkpoint_files
from real.model.tiny import build_tiny_model, build_tiny_tokenizer

TINY = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _trained(tokenizer, seed=0):
    model = build_tiny_model(tokenizer, seed=seed, **TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0 / (u + 1))
    ids = torch.randint(0, len(tokenizer), (2, 6))
    for _ in range(2):
        model(input_ids=ids).logits.float().pow(2).mean().backward()  # any loss: this tests checkpoints
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def _fresh(tokenizer):
    model = build_tiny_model(tokenizer, seed=123, **TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0 / (u + 1))
    return model, opt, sched


def test_round_trip_restores_everything(tmp_path, tokenizer):
    model, opt, sched = _trained(tokenizer)
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    path = ckpt.save_checkpoint(str(tmp_path), 2, model=model, tokenizer=tokenizer, optimizer=opt, scheduler=sched,
                                trainer_state={"data_position": 17}, config={"seed": 0})
    expected = (torch.rand(3), random.random(), np.random.rand())
    assert os.path.basename(path) == "checkpoint-2"
    for name in ("model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "rng_state.pt",
                 "trainer_state.json", "tokenizer.json"):
        assert os.path.isfile(os.path.join(path, name)), name

    model2, opt2, sched2 = _fresh(tokenizer)
    torch.manual_seed(999)
    state = ckpt.load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert state == {"data_position": 17, "step": 2}
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    for k, v in opt.state_dict()["state"].items():
        assert torch.equal(v["exp_avg"], opt2.state_dict()["state"][k]["exp_avg"])
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert torch.equal(torch.rand(3), expected[0])  # the RNG continues where it was at save time
    assert (random.random(), np.random.rand()) == expected[1:]
    # the checkpoint folder also loads as a transformers model
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_rng_state_is_restored_exactly(tmp_path, tokenizer):
    model, opt, sched = _trained(tokenizer)
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    ckpt.save_checkpoint(str(tmp_path), 1, model=model, tokenizer=None, optimizer=opt, scheduler=sched,
                         trainer_state={})
    after_save = (torch.rand(4).tolist(), random.random(), float(np.random.rand()))
    torch.manual_seed(2)
    random.seed(2)
    np.random.seed(2)
    ckpt.load_checkpoint(ckpt.latest_checkpoint(str(tmp_path)), model=model)
    assert (torch.rand(4).tolist(), random.random(), float(np.random.rand())) == after_save


def test_a_crash_while_saving_leaves_no_checkpoint(tmp_path, tokenizer, monkeypatch):
    model, opt, sched = _trained(tokenizer)
    good = ckpt.save_checkpoint(str(tmp_path), 1, model=model, tokenizer=None, optimizer=opt, scheduler=sched,
                                trainer_state={})
    real_save = torch.save

    def crash_on_scheduler(obj, path, *a, **k):
        if str(path).endswith(ckpt.SCHEDULER_FILE):
            raise OSError("disk full")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", crash_on_scheduler)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(str(tmp_path), 2, model=model, tokenizer=None, optimizer=opt, scheduler=sched,
                             trainer_state={})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1"]  # no half checkpoint-2, no temp folder left
    assert ckpt.latest_checkpoint(str(tmp_path)) == good


def test_incomplete_folders_are_ignored_and_same_step_is_replaced(tmp_path, tokenizer):
    model, opt, sched = _trained(tokenizer)
    ckpt.save_checkpoint(str(tmp_path), 3, model=model, tokenizer=None, optimizer=opt, scheduler=sched,
                         trainer_state={"v": 1})
    os.makedirs(tmp_path / "checkpoint-9")  # e.g. written by hand, or by another tool, without the state file
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("checkpoint-3")
    ckpt.save_checkpoint(str(tmp_path), 3, model=model, tokenizer=None, optimizer=opt, scheduler=sched,
                         trainer_state={"v": 2})
    state = ckpt.load_checkpoint(str(tmp_path / "checkpoint-3"), model=model)
    assert state["v"] == 2
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(str(tmp_path / "checkpoint-9"), model=model)


def test_prune_keeps_the_newest(tmp_path, tokenizer):
    model, opt, sched = _trained(tokenizer)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(str(tmp_path), step, model=model, tokenizer=None, optimizer=opt, scheduler=sched,
                             trainer_state={})
    ckpt.prune_checkpoints(str(tmp_path), keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [2, 3]


def test_weights_that_do_not_match_are_an_error(tmp_path, tokenizer):
    model, opt, sched = _trained(tokenizer)
    ckpt.save_checkpoint(str(tmp_path), 1, model=model, tokenizer=None, optimizer=opt, scheduler=sched,
                         trainer_state={})
    other = build_tiny_model(tokenizer, **dict(TINY, num_hidden_layers=2))
    with pytest.raises(ValueError, match="does not match the model"):
        checkpoint_files.load_model_weights(other, str(tmp_path / "checkpoint-1"))


def test_lora_adapter_checkpoint(tmp_path, tokenizer):
    peft = pytest.importorskip("peft")
    base = build_tiny_model(tokenizer, **TINY)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0)
    path = ckpt.save_checkpoint(str(tmp_path), 1, model=model, tokenizer=None, optimizer=opt, scheduler=sched,
                                trainer_state={})
    assert os.path.isfile(os.path.join(path, "adapter_model.safetensors"))
    assert not os.path.isfile(os.path.join(path, "model.safetensors"))
    fresh = peft.get_peft_model(build_tiny_model(tokenizer, **TINY),
                                peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    checkpoint_files.load_model_weights(fresh, path)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), fresh.named_parameters()):
        if "lora_" in n1:
            assert torch.equal(p1, p2), n1
    with pytest.raises(ValueError, match="LoRA adapter"):
        checkpoint_files.load_model_weights(build_tiny_model(tokenizer, **TINY), path)
