"""real_kernels.hf.patch: a patched tiny causal LM gives transformers' own loss and gradients, without logits.

Every comparison runs the same model instance unpatched (transformers'
``ForCausalLMLoss`` on full fp32 logits) and then patched, and checks the loss
and the gradient of every parameter.  The LM head module must not run while
labels are given.
"""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from real_kernels import hf

VOCAB = 101  # prime, not a power of two
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)


def _qwen3(tied: bool, seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(tie_word_embeddings=tied, attn_implementation="sdpa", **SMALL)).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :5] = -100  # a prompt that is not trained on
    return ids, mask, labels


def _loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


class _HeadNotCalled:
    """Fails the test if the LM head module runs (the patched loss must not build logits)."""

    def __init__(self, model):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.head = base.get_output_embeddings()

    def __enter__(self):
        def hook(*_):
            raise AssertionError("the LM head module was called: logits were built")

        self.handle = self.head.register_forward_hook(hook)

    def __exit__(self, *exc):
        self.handle.remove()


def _assert_same(got, want, got_grads, want_grads):
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
    assert got.logits is None
    assert got_grads.keys() == want_grads.keys() and len(want_grads) > 0
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-5, atol=1e-7, msg=f"gradient of {name}")


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("num_items", [None, 17, "tensor"])
def test_patched_qwen3_gives_the_same_loss_and_gradients(tied, num_items):
    model = _qwen3(tied)
    ids, mask, labels = _batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    if num_items is not None:  # what Trainer passes under gradient accumulation: the tokens of the whole step
        inputs["num_items_in_batch"] = torch.tensor(17) if num_items == "tensor" else num_items
    want, want_grads = _loss_and_grads(model, **inputs)
    assert hf.patch(model) is model and hf.is_patched(model)
    with _HeadNotCalled(model):
        got, got_grads = _loss_and_grads(model, **inputs)
    _assert_same(got, want, got_grads, want_grads)
    if tied:
        assert hf.lm_head_weight(model) is model.get_input_embeddings().weight


def test_patched_forward_takes_positional_arguments_shift_labels_and_chunks():
    model = _qwen3(False)
    ids, mask, labels = _batch()
    want, want_grads = _loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    hf.patch(model, chunk_size=5)  # several chunks of rows through the loss
    model.zero_grad(set_to_none=True)
    with _HeadNotCalled(model):
        out = model(ids, mask, labels=labels)  # input_ids, attention_mask positionally
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    _assert_same(out, want, grads, want_grads)
    with _HeadNotCalled(model):
        got, got_grads = _loss_and_grads(model, input_ids=ids, attention_mask=mask, shift_labels=shifted)
    _assert_same(got, want, got_grads, want_grads)


def test_patched_triton_backend_under_the_interpreter():
    model = _qwen3(True)
    ids, mask, labels = _batch()
    want, want_grads = _loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    hf.patch(model, backend="triton")
    got, got_grads = _loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    _assert_same(got, want, got_grads, want_grads)


def test_without_labels_the_model_is_unchanged_and_generate_works():
    model = _qwen3(False)
    ids, mask, _ = _batch()
    want = model(input_ids=ids, attention_mask=mask).logits
    hf.patch(model)
    got = model(input_ids=ids, attention_mask=mask)
    assert got.loss is None and torch.equal(got.logits, want)
    generated = model.generate(ids[:1, :6], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 9)


def test_all_labels_ignored_gives_zero_not_nan():
    model = _qwen3(False)
    ids, mask, _ = _batch()
    hf.patch(model)
    out = model(input_ids=ids, attention_mask=mask, labels=torch.full_like(ids, -100))
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert all(not p.grad.any() for p in model.parameters() if p.grad is not None)


def test_patch_is_idempotent_and_undone_by_unpatch():
    model = _qwen3(False)
    ids, mask, labels = _batch()
    class_forward = model.forward
    hf.patch(model)
    first = model.forward
    hf.patch(model, chunk_size=4)  # patching again only updates the settings
    assert model.forward is first
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert hf.unpatch(model) is model and not hf.is_patched(model)
    assert "forward" not in model.__dict__ and model.forward == class_forward
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, loss, rtol=1e-6, atol=1e-6)
    hf.unpatch(model)  # a second unpatch is a no-op


def test_patch_keeps_an_instance_forward_it_found():
    model = _qwen3(False)
    ids, mask, labels = _batch()
    calls = []
    original = model.forward

    def wrapped(*args, **kwargs):  # what accelerate or another library may have set on the instance
        calls.append(kwargs.get("labels") is not None)
        return original(*args, **kwargs)

    model.forward = wrapped
    hf.patch(model)
    model(input_ids=ids, attention_mask=mask)  # no labels: the previous forward runs
    model(input_ids=ids, attention_mask=mask, labels=labels)  # labels: the fused loss, not the previous forward
    assert calls == [False]
    hf.unpatch(model)
    assert model.forward is wrapped


@pytest.mark.parametrize("patch_first", [False, True])
def test_patched_peft_lora_model_gives_the_same_loss_and_gradients(patch_first):
    peft = pytest.importorskip("peft")
    model = _qwen3(True)
    if patch_first:
        hf.patch(model)
        hf.unpatch(model)  # the reference must be unpatched; patch the peft model below instead
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False)  # random B: the LoRA gradients are not trivially zero
    lora = peft.get_peft_model(model, config)
    ids, mask, labels = _batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    want, want_grads = _loss_and_grads(lora, **inputs)
    assert any("lora_A" in name for name in want_grads) and all("lora" in name for name in want_grads)
    hf.patch(model if patch_first else lora)  # on the inner model or through the wrapper: the same patch
    assert hf.is_patched(lora)
    with _HeadNotCalled(lora):
        got, got_grads = _loss_and_grads(lora, **inputs)
    _assert_same(got, want, got_grads, want_grads)


@pytest.mark.parametrize("model_type", [t for t in hf.SUPPORTED_MODEL_TYPES if t != "qwen3"])
def test_every_supported_model_type_gives_its_own_loss(model_type):
    config = AutoConfig.for_model(model_type, **SMALL)
    if model_type == "cohere":
        config.logit_scale = 0.5  # folded into the temperature
    if model_type == "granite":
        config.logits_scaling = 4.0  # logits divided by it: folded into the temperature too
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids, mask, labels = _batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    want, want_grads = _loss_and_grads(model, **inputs)
    hf.patch(model)
    with _HeadNotCalled(model):
        got, got_grads = _loss_and_grads(model, **inputs)
    _assert_same(got, want, got_grads, want_grads)


def test_what_cannot_be_folded_is_refused():
    peft = pytest.importorskip("peft")
    model = _qwen3(False)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        hf.patch(model)
    model.config.final_logit_softcapping = None

    lora = peft.get_peft_model(_qwen3(False), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="lm_head"):
        hf.patch(lora)

    model.loss_function = lambda *a, **k: 0.0
    with pytest.raises(ValueError, match="loss_function"):
        hf.patch(model)

    gemma2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma2", **SMALL))
    with pytest.raises(ValueError, match="model_type"):
        hf.patch(gemma2)
    with pytest.raises(TypeError, match="model"):
        hf.patch("Qwen/Qwen3-8B")


@pytest.mark.parametrize("kwargs,error,argument", [
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=2.5), ValueError, "chunk_size"),
])
def test_bad_patch_settings_are_named(kwargs, error, argument):
    with pytest.raises(error, match=argument):
        hf.patch(_qwen3(False), **kwargs)


def test_bad_call_arguments_are_named():
    model = hf.patch(_qwen3(False))
    ids, mask, labels = _batch()
    cases = [
        (dict(labels=labels[:, :-1]), ValueError, "labels"),
        (dict(labels=labels.float()), TypeError, "labels"),
        (dict(labels=labels.masked_fill(labels == labels[0, 7], VOCAB)), ValueError, "labels"),
        (dict(shift_labels=labels[:2]), ValueError, "shift_labels"),
        (dict(labels=labels, logits_to_keep=1), ValueError, "logits_to_keep"),
        (dict(labels=labels, num_items_in_batch="17"), TypeError, "num_items_in_batch"),
        (dict(labels=labels, num_items_in_batch=torch.tensor([1, 2])), ValueError, "num_items_in_batch"),
    ]
    for extra, error, argument in cases:
        with pytest.raises(error, match=argument):
            model(input_ids=ids, attention_mask=mask, **extra)


def test_transformers_trainer_takes_the_same_steps_patched(tmp_path):
    """Trainer passes num_items_in_batch under gradient accumulation; the patched model must train identically."""
    from transformers import Trainer, TrainingArguments

    ids, mask, labels = _batch()
    rows = [dict(input_ids=ids[i], attention_mask=mask[i], labels=labels[i]) for i in range(3)] * 2
    params = []
    for patched in (False, True):
        model = _qwen3(False)
        if patched:
            hf.patch(model)
        args = TrainingArguments(output_dir=str(tmp_path / str(patched)), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=1, learning_rate=1e-2, report_to="none",
                                 save_strategy="no", use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
                                 lr_scheduler_type="constant", optim="sgd")
        Trainer(model=model, args=args, train_dataset=rows).train()
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})
    moved = 0
    for name, before in _qwen3(False).named_parameters():
        torch.testing.assert_close(params[1][name], params[0][name], rtol=1e-5, atol=1e-7, msg=name)
        moved += not torch.equal(params[0][name], before)
    assert moved > 0


def test_evaluation_under_no_grad_gives_the_loss_without_forming_gradients(monkeypatch):
    from real_kernels import loss as loss_mod

    model = _qwen3(False)
    ids, mask, labels = _batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    hf.patch(model)
    needs = []
    execute = loss_mod._Run.execute
    monkeypatch.setattr(loss_mod._Run, "execute",
                        lambda self, need_dh, need_dw, phase=None: needs.append((need_dh, need_dw))
                        or execute(self, need_dh, need_dw, phase))
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(got.loss, want, rtol=1e-6, atol=1e-6)
    # the weights require grad, but under no_grad judge_loss forms neither dh nor an fp32 dW
    assert got.logits is None and needs and all(need == (False, False) for need in needs)


def test_patched_loss_never_allocates_tokens_by_vocab_logits():
    from head_utils import LargestAllocation

    vocab = 4099
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**{**SMALL, "vocab_size": vocab, "num_hidden_layers": 1}))
    ids = torch.randint(3, vocab, (4, 64))
    tokens = ids.numel()
    largest = []
    for patched in (False, True):
        if patched:
            hf.patch(model)
        with LargestAllocation(allocations_only=True) as watch:
            model(input_ids=ids, labels=ids).loss.backward()
        largest.append(watch.largest)
    assert largest[0] >= tokens * vocab  # the plain forward builds [tokens, vocab] logits
    assert largest[1] <= tokens * vocab // 4  # the patched one a [chunk <= tokens / 4, vocab] buffer at most


def test_bf16_model_and_autocast_give_transformers_loss_within_bf16_rounding():
    ids, mask, labels = _batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    model = _qwen3(False).to(torch.bfloat16)
    want, want_grads = _loss_and_grads(model, **inputs)
    hf.patch(model)
    got, got_grads = _loss_and_grads(model, **inputs)
    assert got.loss.dtype == torch.float32 and got.logits is None
    torch.testing.assert_close(got.loss, want.loss, rtol=2e-3, atol=0)
    for name, g in want_grads.items():  # bf16 gradients: the same direction, not the same bits
        cos = torch.nn.functional.cosine_similarity(got_grads[name].float().flatten(), g.float().flatten(), dim=0)
        assert cos > 0.99, f"gradient of {name}: cosine {cos:.4f}"

    model = _qwen3(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(**inputs).loss
        hf.patch(model)
        got = model(**inputs).loss
    torch.testing.assert_close(got, want, rtol=2e-3, atol=0)


def test_causal_lm_loss_and_unpatch_name_bad_arguments():
    hidden, weight = torch.randn(2, 5, 8), torch.randn(11, 8)
    labels = torch.randint(0, 11, (2, 5))
    logits = (hidden.double() @ weight.double().T)[:, :-1]
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), labels[:, 1:].reshape(-1))
    got = hf.causal_lm_loss(hidden, weight, labels=labels, backend="torch")
    assert abs(got.item() - want.item()) <= 1e-6 * want.item()
    for call, error, argument in [
        (lambda: hf.causal_lm_loss(hidden[0], weight, labels=labels), ValueError, "hidden"),
        (lambda: hf.causal_lm_loss(hidden, weight), ValueError, "labels"),
        (lambda: hf.causal_lm_loss(hidden, weight, labels=labels, ignore_index=None), TypeError, "ignore_index"),
        (lambda: hf.causal_lm_loss(hidden, weight[:, :4], labels=labels), ValueError, "weight"),
        (lambda: hf.causal_lm_loss(hidden, weight[0], labels=labels), ValueError, "weight"),
        (lambda: hf.unpatch("Qwen/Qwen3-8B"), TypeError, "model"),
        (lambda: hf.is_patched(None), TypeError, "model"),
    ]:
        with pytest.raises(error, match=argument):
            call()
