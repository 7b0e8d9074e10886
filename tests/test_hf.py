"""real_kernels.hf against the model's own logits, on tiny random Qwen3 models (tied and untied, LoRA)."""
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from real_kernels import hf

VOCAB = 97
SCORE_IDS = [11, 12, 13, 14, 15]
SCORE_VALUES = [1.0, 2.0, 3.0, 4.0, 5.0]


def _model(tied: bool, seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied, attn_implementation="sdpa",
    )
    return Qwen3ForCausalLM(config).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    mask[2, 10:] = 0
    return ids, mask


def _reference_logp(model, ids, mask):
    """What a plain trainer computes: full logits, log_softmax (fp32)."""
    return torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)


def _fail_if_head_called(model):
    def hook(*_):
        raise AssertionError("the LM head module was called")

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings().register_forward_hook(hook)


@pytest.mark.parametrize("tied", [True, False])
def test_lm_head_weight_is_output_embedding(tied):
    model = _model(tied)
    weight = hf.lm_head_weight(model)
    assert weight is model.get_output_embeddings().weight
    assert (weight is model.get_input_embeddings().weight) == tied


@pytest.mark.parametrize("tied", [True, False])
def test_token_logprobs_match_model_logits(tied):
    model = _model(tied)
    ids, mask = _batch()
    ref = _reference_logp(model, ids, mask)
    ref_tok = ref[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)
    ref_ent = -(ref.exp() * ref).sum(-1)[:, :-1]
    handle = _fail_if_head_called(model)
    out = hf.token_logprobs(model, ids, mask, return_entropy=True)
    handle.remove()
    valid = mask[:, 1:].bool()
    assert out.logprobs.shape == (3, 11) and out.entropy.shape == (3, 11)
    torch.testing.assert_close(out.logprobs[valid], ref_tok[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy[valid], ref_ent[valid], atol=1e-5, rtol=1e-5)
    assert (out.logprobs[~valid] == 0).all() and (out.entropy[~valid] == 0).all()


def test_a_granite_models_logits_scaling_is_folded_into_the_temperature():
    """Granite divides its logits by config.logits_scaling (Cohere multiplies by logit_scale): the fused head must
    give the log-probs of the model's own logits, at temperature 1 and at another."""
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    config = GraniteConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0,
                           attn_implementation="sdpa")
    model = GraniteForCausalLM(config).eval()
    ids, mask = _batch()
    valid = mask[:, 1:].bool()
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    for temperature in (1.0, 0.7):
        ref = torch.log_softmax(logits / temperature, dim=-1)[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)
        out = hf.token_logprobs(model, ids, mask, temperature=temperature)
        torch.testing.assert_close(out.logprobs[valid], ref[valid], atol=1e-5, rtol=1e-5)
    assert hf.effective_temperature(model, 0.7) == pytest.approx(2.8)


@pytest.mark.parametrize("tied", [True, False])
def test_token_logprob_gradients_match_model_logits(tied):
    ids, mask = _batch()
    valid = mask[:, 1:].bool()
    weights = torch.randn(3, 11) * valid  # per-token upstream grads, like advantages

    ref_model, our_model = _model(tied), _model(tied)
    ref = _reference_logp(ref_model, ids, mask)[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)
    (ref * weights).sum().backward()
    handle = _fail_if_head_called(our_model)
    (hf.token_logprobs(our_model, ids, mask).logprobs * weights).sum().backward()
    handle.remove()
    for (name, p_ref), (_, p_our) in zip(ref_model.named_parameters(), our_model.named_parameters()):
        assert p_our.grad is not None, name
        torch.testing.assert_close(p_our.grad, p_ref.grad, atol=2e-5, rtol=1e-4, msg=name)


def test_left_padding_gives_the_unpadded_logprobs():
    model = _model(True)
    ids = torch.randint(0, VOCAB, (1, 9))
    alone = hf.token_logprobs(model, ids).logprobs
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], dim=1)
    out = hf.token_logprobs(model, padded, mask).logprobs
    torch.testing.assert_close(out[:, 3:], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("normalize", [False, True])
def test_judge_outputs_match_model_logits(tied, normalize):
    model = _model(tied)
    ids, mask = _batch()
    cot_mask = torch.zeros_like(ids, dtype=torch.bool)
    cot_mask[0, 3:9] = True
    cot_mask[1, 2:5] = True
    cot_mask[2, 4:8] = True
    score_pos = torch.tensor([9, 5, 8])
    targets = torch.tensor([4.0, 1.5, 3.0])

    ref = _reference_logp(model, ids, mask)
    rows = torch.arange(3)
    ref_score = ref[rows, score_pos][:, SCORE_IDS]
    if normalize:
        ref_score = torch.log_softmax(ref_score, -1)
    ref_expected = ref_score.exp() @ torch.tensor(SCORE_VALUES)
    ref_cot = ref[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)
    ref_ent = -(ref.exp() * ref).sum(-1)

    handle = _fail_if_head_called(model)
    out = hf.judge_outputs(
        model, ids, mask, targets, SCORE_IDS, SCORE_VALUES, score_pos=score_pos, cot_mask=cot_mask,
        normalize=normalize, return_entropy=True,
    )
    handle.remove()
    torch.testing.assert_close(out.score_logprobs, ref_score, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.expected_score, ref_expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.sq_error, (ref_expected - targets) ** 2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cot_logprobs[:, :-1][cot_mask[:, :-1]], ref_cot[cot_mask[:, :-1]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cot_entropy[cot_mask], ref_ent[cot_mask], atol=1e-5, rtol=1e-5)
    assert (out.cot_logprobs[~cot_mask] == 0).all() and (out.cot_entropy[~cot_mask] == 0).all()


def test_judge_outputs_without_cot_or_targets():
    model = _model(True)
    ids, mask = _batch()
    pos = torch.tensor([4, 4, 4])
    out = hf.judge_outputs(model, ids, mask, None, SCORE_IDS, SCORE_VALUES, score_pos=pos)
    assert (out.cot_logprobs == 0).all() and (out.sq_error == 0).all() and out.cot_entropy is None
    # full-vocabulary softmax: the score tokens hold only part of the mass of a random model
    assert ((out.expected_score > 0) & (out.expected_score < 5)).all()
    renormalised = hf.judge_outputs(model, ids, mask, None, SCORE_IDS, SCORE_VALUES, score_pos=pos, normalize=True)
    assert ((renormalised.expected_score >= 1) & (renormalised.expected_score <= 5)).all()


def test_works_under_no_grad_like_with_grad():
    model = _model(False)
    ids, mask = _batch()
    with_grad = hf.token_logprobs(model, ids, mask).logprobs
    with torch.no_grad():
        without = hf.token_logprobs(model, ids, mask).logprobs
    assert with_grad.requires_grad and not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach())


def test_bad_inputs_are_named():
    model = _model(True)
    ids, mask = _batch()
    with pytest.raises(ValueError, match="score_pos"):
        hf.judge_outputs(model, ids, mask, None, SCORE_IDS, SCORE_VALUES, score_pos=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="score_pos"):
        hf.judge_outputs(model, ids, mask, None, SCORE_IDS, SCORE_VALUES, score_pos=torch.tensor([1, 2, 12]))
    with pytest.raises(ValueError, match="cot_mask"):
        hf.judge_outputs(model, ids, mask, None, SCORE_IDS, SCORE_VALUES, score_pos=torch.tensor([1, 2, 3]),
                         cot_mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention_mask"):
        hf.decoder_hidden_states(model, ids, mask[:, :5])
    with pytest.raises(ValueError, match="token_mask"):
        hf.token_logprobs(model, ids, mask, token_mask=torch.ones(3, 12, dtype=torch.bool))
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="softcapping"):
        hf.token_logprobs(model, ids, mask)


peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft torch==2.13.0)")


def _lora(model, target_modules=("q_proj", "v_proj", "down_proj")):
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(target_modules), lora_dropout=0.0)
    )
    with torch.no_grad():  # B starts at zero; make the adapter change the model so the test can see it
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return lora


@pytest.mark.parametrize("tied", [True, False])
def test_lora_wrapped_model_logprobs_and_gradients(tied):
    ids, mask = _batch()
    valid = mask[:, 1:].bool()
    weights = torch.randn(3, 11) * valid
    ref_model, our_model = _lora(_model(tied)), _lora(_model(tied))
    torch.manual_seed(0)
    ref = _reference_logp(ref_model, ids, mask)[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)
    (ref * weights).sum().backward()
    handle = _fail_if_head_called(our_model)
    ours = hf.token_logprobs(our_model, ids, mask).logprobs
    (ours * weights).sum().backward()
    handle.remove()
    torch.testing.assert_close(ours[valid], ref[valid].detach(), atol=1e-5, rtol=1e-5)
    trainable = [(n, p) for n, p in our_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    ref_params = dict(ref_model.named_parameters())
    for name, p in trainable:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, ref_params[name].grad, atol=2e-5, rtol=1e-4, msg=name)


def test_lora_on_the_lm_head_is_refused():
    model = _lora(_model(False), target_modules=("q_proj", "lm_head"))
    with pytest.raises(ValueError, match="lm_head"):
        hf.lm_head_weight(model)
