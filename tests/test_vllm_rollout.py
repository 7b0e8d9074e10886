"""real.loop.vllm_rollout: the vLLM engines, driven by fake engines that check the calls.

vLLM needs CUDA, so a fake ``vllm`` module (``LLM``, ``SamplingParams``) and a fake TRL server client stand
in.  What is checked is what the real ones would receive, through the real ``Trainer``: the engine's
settings, the sleep / wake-up order around every rollout, the weights pushed before every rollout (equal to
the trained model's weights after the previous update; LoRA merged as peft merges it; FSDP shards gathered
on two ranks), and the prompts and sampling settings as configured.
"""
import copy
import os
import sys
import types

import pytest
import torch
import torch.multiprocessing as mp

from real.loop import vllm_rollout
from real.loop.config import make_config
from real.judge.prompts import SCORE_MARKER
from real.loop.vllm_rollout import engine_weights, finish_text

from rank_utils import assert_same_weights, free_port

pytestmark = pytest.mark.usefixtures("one_thread")

FAKE_TEXTS = ("two items are right and one is wrong {} [RESULT] 3 and more", "all fine {} [RESULT] 5")


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class FakeLLM:
    """Records every call; ``load_weights`` loads into a real model built from the engine's config folder
    (strict: the pushed names must be the model's own), and ``generate`` refuses to run asleep."""

    instances = []

    def __init__(self, **kwargs):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.kwargs, self.calls, self.pushed = kwargs, [], []
        self.model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(kwargs["model"]))
        FakeLLM.instances.append(self)
        engine = self

        class Runner:
            class model:  # noqa: N801 (the worker's model_runner.model, as vLLM names it)
                @staticmethod
                def load_weights(weights):
                    assert "weights" in engine.awake, "weights pushed while the weight memory sleeps"
                    got = {name: t.detach().clone() for name, t in weights}
                    engine.model.load_state_dict(got, strict=False)
                    engine.loaded.update(got)

        self.loaded = {}

        self.worker = types.SimpleNamespace(model_runner=Runner)
        self.awake = {"weights", "kv_cache"}

    def sleep(self, level):
        self.calls.append(("sleep", level))
        self.awake = set()

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags)))
        self.awake |= set(tags)

    def collective_rpc(self, method, args=(), kwargs=None):
        self.calls.append(("collective_rpc",))
        return [method(self.worker, *args, **(kwargs or {}))]

    def reset_prefix_cache(self):  # the end of a push: every weight must have arrived, under the model's names
        self.calls.append(("reset_prefix_cache",))
        assert set(self.loaded) == set(self.model.state_dict()), "a push that misses weights or invents names"
        self.pushed.append(self.loaded)
        self.loaded = {}

    def generate(self, prompts, params, use_tqdm=True):
        assert self.awake == {"weights", "kv_cache"}, "generate called while asleep"
        self.calls.append(("generate", prompts, params.kwargs))
        stop = params.kwargs["stop"]
        outs = []
        for i, _ in enumerate(prompts):
            texts = [FAKE_TEXTS[k % 2].format(i) for k in range(params.kwargs["n"])]
            if stop:
                texts = [t[:t.index(stop[0]) + len(stop[0])] for t in texts]
            # vLLM's CompletionOutput: the text and its token ids (here one per character)
            outs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(text=t, token_ids=list(range(len(t))))
                                                       for t in texts]))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    FakeLLM.instances = []
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM, SamplingParams=FakeSamplingParams))
    return FakeLLM


def _cfg(out, **overrides):
    base = dict(model="tiny", data=["synthetic"], synthetic_train_size=64, synthetic_eval_size=8, eval_size=4,
                prompts_per_step=2, group_size=4, max_new_tokens=12, eval_max_new_tokens=6, lr=1e-2,
                progress=False, output_dir=str(out), seed=0, steps=2, device="cpu")
    base.update(overrides)
    return make_config(**base)


def _trainer_with_snapshots(cfg):
    """A Trainer whose model weights are recorded before the run and after every optimizer update, and whose
    rollouts are recorded as the engine returns them."""
    from real.loop.train import Trainer

    trainer = Trainer(cfg, log=lambda m: None)
    snapshots = [{k: v.detach().clone() for k, v in trainer.model.state_dict().items()}]
    step = trainer.optimizer.step

    def step_and_snapshot(*args, **kwargs):
        out = step(*args, **kwargs)
        snapshots.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        return out

    trainer.optimizer.step = step_and_snapshot
    rollouts, generate = [], trainer.engine.generate

    def record(*args, **kwargs):
        rollouts.append(generate(*args, **kwargs))
        return rollouts[-1]

    trainer.engine.generate = record
    return trainer, snapshots, rollouts


def test_colocated_engine_sleeps_between_rollouts_and_gets_every_update(tmp_path, fake_vllm):
    cfg = _cfg(tmp_path, rollout="vllm-colocate", vllm_gpu_memory_utilization=0.45, temperature=0.7, top_p=0.8,
               max_prompt_tokens=300)
    trainer, snapshots, rollouts = _trainer_with_snapshots(cfg)
    [llm] = fake_vllm.instances
    assert llm.kwargs["gpu_memory_utilization"] == 0.45 and llm.kwargs["tensor_parallel_size"] == 1
    assert llm.kwargs["enable_sleep_mode"] is True and llm.kwargs["load_format"] == "dummy"
    assert llm.kwargs["dtype"] == "bfloat16" and llm.kwargs["max_model_len"] == 300 + 12
    assert "distributed_executor_backend" not in llm.kwargs  # one process: no external launcher
    assert llm.calls == [("sleep", 2)]  # asleep from the start: training has the memory
    trainer.run()
    trainer.close()

    per_rollout = [("wake_up", ("weights",)), ("collective_rpc",), ("reset_prefix_cache",), ("wake_up", ("kv_cache",)),
                   "generate", ("sleep", 2)]
    names = [c if c[0] != "generate" else "generate" for c in llm.calls[1:]]
    assert names == per_rollout * 2
    # the weights each rollout samples from: the initial ones, then those after the first update
    assert len(llm.pushed) == 2 and len(snapshots) == 3
    for pushed, expected in zip(llm.pushed, snapshots):
        assert_same_weights(expected, pushed, "pushed weights", atol=0)
    assert not torch.equal(llm.pushed[0]["model.layers.0.mlp.up_proj.weight"],
                           llm.pushed[1]["model.layers.0.mlp.up_proj.weight"])
    # prompts as token ids, cut as training cuts them; sampling settings as configured, seeded per step
    generates = [c for c in llm.calls if c[0] == "generate"]
    for step, (_, prompts, params) in enumerate(generates, start=1):
        assert params == dict(n=4, temperature=0.7, top_p=0.8, max_tokens=12, seed=trainer.step_seed(step),
                              stop=[SCORE_MARKER], include_stop_str_in_output=True)
        texts = rollouts[step - 1].prompts[::4]
        assert [p["prompt_token_ids"] for p in prompts] == [trainer.tokenizer(t)["input_ids"][-300:] for t in texts]
    assert rollouts[0].cots[:2] == [f"two items are right and one is wrong 0 {SCORE_MARKER}",
                                    f"all fine 0 {SCORE_MARKER}"]
    # the engine's own count of generated tokens (one per character in the fake), this rank's prompts
    outputs = [FAKE_TEXTS[k % 2].format(i) for i in range(2) for k in range(4)]
    assert rollouts[0].sampled_tokens == sum(len(t[:t.index(SCORE_MARKER) + len(SCORE_MARKER)]) for t in outputs)


def test_weights_go_to_a_colocated_engine_in_chunks(fake_vllm, monkeypatch):
    from real.model.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=0)
    monkeypatch.setattr(vllm_rollout, "PUSH_CHUNK_BYTES", 4096)
    engine = vllm_rollout.VLLMColocateRollout(model, tokenizer, sleep=False, temperature=1.0, top_p=1.0,
                                              max_new_tokens=4, score_values=[1, 2, 3], marker=SCORE_MARKER,
                                              max_prompt_tokens=64)
    engine.push_weights(model)
    [llm] = fake_vllm.instances
    rpcs = [c for c in llm.calls if c[0] == "collective_rpc"]
    assert len(rpcs) > 3 and llm.calls[-1] == ("reset_prefix_cache",)
    assert_same_weights(model.state_dict(), llm.pushed[0], "chunked push", atol=0)
    engine.close()


def _peft_model(dtype=torch.float64):
    from peft import LoraConfig, get_peft_model

    from real.model.tiny import build_tiny_model, build_tiny_tokenizer

    model = build_tiny_model(build_tiny_tokenizer(), seed=0)
    model = get_peft_model(model.to(dtype), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; a trained adapter is not
            p.data.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
    return model


def test_lora_is_merged_as_peft_merges_it():
    model = _peft_model()
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    got = dict(engine_weights(model))
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-12, msg=name)
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                           model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight)
    # the model itself is untouched: its adapters are still separate
    assert any("lora_A" in k for k in model.state_dict())


class FakeClient:
    """TRL's VLLMClient as the server engine uses it; completions are token ids, as the server returns them."""

    made = []

    def __init__(self, tokenizer, host, port, group_port, timeout):
        self.tokenizer, self.address = tokenizer, (host, port, group_port, timeout)
        self.calls, self.pushed = [], []
        FakeClient.made.append(self)

    def update_named_param(self, name, weights):
        if not self.calls or self.calls[-1] != "update_named_param":
            self.calls.append("update_named_param")
            self.pushed.append({})
        self.pushed[-1][name] = weights.detach().clone()

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def generate(self, prompts, n, temperature, top_p, max_tokens):
        self.calls.append(("generate", list(prompts), dict(n=n, temperature=temperature, top_p=top_p,
                                                           max_tokens=max_tokens)))
        return [self.tokenizer(FAKE_TEXTS[k % 2].format(i), add_special_tokens=False)["input_ids"]
                for i in range(len(prompts)) for k in range(n)]

    def close_communicator(self):
        self.calls.append("close_communicator")


def test_server_engine_gets_every_update_before_each_rollout(tmp_path, monkeypatch):
    FakeClient.made = []
    holder = {}
    monkeypatch.setattr(vllm_rollout, "trl_client", lambda *a: FakeClient(holder["tokenizer"], *a))
    from real.model import loading as models

    real_loader = models.load_model_and_tokenizer

    def loader(*args, **kwargs):
        model, tokenizer = real_loader(*args, **kwargs)
        holder["tokenizer"] = tokenizer
        return model, tokenizer

    monkeypatch.setattr("real.loop.train.load_model_and_tokenizer", loader)
    cfg = _cfg(tmp_path, method="grpo", rollout="vllm-server", vllm_server_port=8123, temperature=0.9, top_p=0.95)
    trainer, snapshots, rollouts = _trainer_with_snapshots(cfg)
    [client] = FakeClient.made
    assert client.address == ("127.0.0.1", 8123, 51216, 240.0)
    trainer.run()
    trainer.close()
    assert [c if isinstance(c, str) else c[0] for c in client.calls] == [
        "update_named_param", "reset_prefix_cache", "generate"] * 2 + ["close_communicator"]
    for pushed, expected in zip(client.pushed, snapshots):
        assert_same_weights(expected, pushed, "pushed weights", atol=0)
    assert len(client.pushed) == 2 and len(snapshots) == 3
    for step, call in enumerate([c for c in client.calls if c[0] == "generate"]):
        _, prompts, params = call
        assert params == dict(n=4, temperature=0.9, top_p=0.95, max_tokens=12)
        assert len(prompts) == 2 and prompts[0].endswith(rollouts[step].prompts[0][-40:])
    # GRPO: the CoT runs to the score it wrote; that score is what it is rewarded for
    assert rollouts[0].cots[:2] == [f"two items are right and one is wrong 0 {SCORE_MARKER} 3",
                                    f"all fine 0 {SCORE_MARKER} 5"]
    assert rollouts[0].decoded_scores[:2] == [3.0, 5.0]


def test_finish_text_matches_the_hf_engine():
    values = [1, 2, 3, 4, 5]
    assert finish_text("ok [RESULT] 4 blah", "[RESULT]", False, values) == "ok [RESULT]"
    assert finish_text("never wrote it", "[RESULT]", False, values) == "never wrote it [RESULT]"
    assert finish_text("ok [RESULT] 4 blah", "[RESULT]", True, values) == "ok [RESULT] 4"
    assert finish_text("ok [RESULT] x", "[RESULT]", True, values) == "ok [RESULT] x"


def test_without_vllm_or_trl_the_error_says_what_to_install(tmp_path, monkeypatch):
    from real.loop.train import Trainer

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"pip install 'real-kernels\[vllm\]'.*--rollout hf"):
        Trainer(_cfg(tmp_path / "a", rollout="vllm-colocate"), log=lambda m: None)
    monkeypatch.setitem(sys.modules, "trl.extras.vllm_client", None)
    with pytest.raises(ImportError, match="trl vllm-serve --model MODEL"):
        Trainer(_cfg(tmp_path / "b", rollout="vllm-server"), log=lambda m: None)


# --- two ranks: FSDP shards are gathered, every rank's engine gets the whole model --------------------------

def _fsdp_worker(rank, world, port, workdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    FakeLLM.instances = []
    sys.modules["vllm"] = types.SimpleNamespace(LLM=FakeLLM, SamplingParams=FakeSamplingParams)
    from real.multi_gpu.distributed import cleanup_distributed
    from real.loop.train import Trainer

    cfg = _cfg(workdir, rollout="vllm-colocate", steps=2, prompts_per_step=2, group_size=2, eval_size=2,
               collective_timeout=90, vllm_tensor_parallel_size=2)
    trainer = Trainer(cfg, log=lambda m: None)
    [llm] = FakeLLM.instances
    rollouts, generate = [], trainer.engine.generate
    trainer.engine.generate = lambda *a, **k: rollouts.append(generate(*a, **k)) or rollouts[-1]
    trainer.run()
    trainer.close()
    generates = [c for c in llm.calls if c[0] == "generate"]
    torch.save({"kwargs": {k: v for k, v in llm.kwargs.items() if k != "model"}, "pushed": llm.pushed,
                "prompts": [[p["prompt_token_ids"] for p in c[1]] for c in generates],
                "seeds": [c[2]["seed"] for c in generates],
                "cots": [r.cots for r in rollouts]},
               os.path.join(workdir, f"rank{rank}.pt"))
    cleanup_distributed()


@pytest.mark.slow
def test_two_fsdp_ranks_share_one_tensor_parallel_engine_with_the_whole_model(tmp_path):
    """Two ranks, FSDP, one engine over both (tensor parallel 2): both push the whole gathered model, ask the
    engine for both ranks' prompts with the same seed (vLLM's external launcher is SPMD), and each keeps the
    CoTs of its own prompt."""
    mp.spawn(_fsdp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r, got in enumerate(ranks):
        assert got["kwargs"]["distributed_executor_backend"] == "external_launcher" and got["kwargs"]["seed"] == 0
        assert got["kwargs"]["tensor_parallel_size"] == 2
        assert [len(p) for p in got["prompts"]] == [2, 2] and len(got["pushed"]) == 2
        # the fake numbers its outputs by prompt: rank r keeps those of prompt r
        assert all(f" {r} {SCORE_MARKER}" in cot for step in got["cots"] for cot in step)
    assert ranks[0]["prompts"] == ranks[1]["prompts"] and ranks[0]["seeds"] == ranks[1]["seeds"]
    for step in range(2):  # the same full (gathered) weights on both ranks, and full shapes
        assert_same_weights(ranks[0]["pushed"][step], ranks[1]["pushed"][step], f"rollout {step + 1}", atol=0)
    from real.model.tiny import build_tiny_model, build_tiny_tokenizer

    reference = build_tiny_model(build_tiny_tokenizer(), seed=0)
    shapes = {k: v.shape for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in ranks[0]["pushed"][0].items()} == shapes
    assert not torch.equal(ranks[0]["pushed"][0]["model.layers.0.mlp.up_proj.weight"],
                           ranks[0]["pushed"][1]["model.layers.0.mlp.up_proj.weight"])
