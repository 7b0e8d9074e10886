"""A tiny judge (tokenizer + random Qwen3) made on the spot.

Tests, the demo and CPU smoke runs need a causal LM and a tokenizer without
downloading anything.  ``build_tiny_tokenizer`` trains a small byte-level BPE
(at most 1,024 tokens; 847 with the built-in corpus) on a built-in corpus of Prometheus grading text, so
every string tokenises (unknown words fall back to bytes) and the grading
template is cheap; digits are always single tokens (no merges across digits
or with a leading space) and the score marker ``[RESULT]`` is one token.
``build_tiny_model`` makes a random ``Qwen3ForCausalLM`` of a few small layers
for that vocabulary.  ``real.model.loading.load_model_and_tokenizer`` builds this pair
for ``--model tiny``.
"""
from __future__ import annotations

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from real.judge.prompts import SCORE_MARKER

TINY_NAME = "tiny"
PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
TINY_VOCAB_SIZE = 1024

# Single tokens for the fixed parts of the Prometheus template, so a prompt is short.
_MARKERS = (
    SCORE_MARKER,
    "###Task Description:",
    "###The instruction to evaluate:",
    "###Response to evaluate:",
    "###Reference Answer (Score 5):",
    "###Score Rubrics:",
    "###Feedback:",
)

# Pieces the BPE may merge inside but never across: a digit alone, letters with an
# optional leading space, one punctuation mark with an optional leading space,
# whitespace runs.  A digit never carries its space, so " 4" is " " + "4".
_SPLIT_PATTERN = r"\d| ?[^\W\d_]+| ?[^\s\w]|_|\s+(?!\S)|\s+"

_CORPUS = """\
An instruction (might include an Input inside it), a response to evaluate, a reference answer that gets a score of 5, and a score rubric representing a evaluation criteria are given.
1. Write a detailed feedback that assess the quality of the response strictly based on the given score rubric, not evaluating in general.
2. After writing a feedback, write a score that is an integer between 1 and 5. You should refer to the score rubric.
3. The output format should look as follows: "Feedback: (write a feedback for criteria) [RESULT] (an integer number between 1 and 5)"
4. Please do not generate any other opening, closing, and explanations.
Score 1: The response is completely irrelevant, incorrect or unhelpful.
Score 2: The response is mostly inaccurate and only partially addresses the question.
Score 3: The response is somewhat accurate but misses important details.
Score 4: The response is accurate and helpful, with minor issues.
Score 5: The response is fully accurate, clear, complete and well organized.
Is the model able to provide a correct, relevant, clear and concise answer to the user's question?
Does the response demonstrate understanding of the context, the tone, the style and the facts?
Feedback: The response provides a clear and accurate explanation, however it lacks some depth and does not fully address the user's request. So the overall score is 3.
Feedback: The assistant's answer is correct, well structured and very helpful, covering all key points of the reference answer. So the overall score is 5.
Feedback: The response fails to follow the instruction and contains several factual errors, which makes it misleading. So the overall score is 1.
Feedback: While the response is relevant, it is too brief and misses details that the reference answer includes. So the overall score is 2.
Feedback: The answer is mostly accurate and complete with a few minor mistakes in the examples. So the overall score is 4.
Here is a previous dialogue between an assistant and an user. Generate a human preferable response by the assistant.
User: Please explain how this works, write a short story, solve the math problem, summarize the text and give an example.
Assistant: Sure, here is a summary of the main ideas, the steps of the solution and the final answer.
The quality, coherence, creativity, correctness, completeness, readability, harmlessness and helpfulness of the response were considered.
good bad poor fair excellent great weak strong simple complex short long true false yes no more less very only also
quality score value number answer question task criteria rubric grade judge model text word sentence paragraph code
a b c d e f g h i j k l m n o p q r s t u v w x y z the of and to in is it that for on with as was this be by are
"""


def build_tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained offline on a built-in corpus; deterministic for a given vocab_size.

    Digits ``0``-``9`` and ``[RESULT]`` are single tokens; ``pad_token`` and
    ``eos_token`` are set; ``decode`` gives back the text exactly.
    """
    if not isinstance(vocab_size, int) or vocab_size < 300:
        raise ValueError(f"vocab_size must be an int >= 300 (256 bytes + specials + merges), got {vocab_size!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(_MARKERS),
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    tok.add_tokens([AddedToken(m, single_word=False, normalized=False, special=False) for m in _MARKERS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        model_max_length=8192,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


_POSITIVE_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "max_position_embeddings")


def build_tiny_model(tokenizer, seed: int = 0, **config_overrides) -> Qwen3ForCausalLM:
    """A random ``Qwen3ForCausalLM`` sized for ``tokenizer`` (2 layers, hidden 64, tied embeddings).

    ``config_overrides`` go to ``Qwen3Config`` (e.g. ``num_hidden_layers=1``,
    ``tie_word_embeddings=False``).  Same seed, same weights.
    """
    config = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attn_implementation="sdpa",
    )
    for key, value in config_overrides.items():  # a typo'd size fails in a sentence, not deep inside torch
        if key in _POSITIVE_SIZES and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"tiny_config {key}={value!r}: must be a positive integer")
    config.update(config_overrides)
    if config["vocab_size"] < len(tokenizer):
        raise ValueError(f"vocab_size {config['vocab_size']} is smaller than the tokenizer's {len(tokenizer)} tokens")
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(Qwen3Config(**config))
    except (ValueError, TypeError, RuntimeError) as exc:  # e.g. hidden_size not divisible by the heads
        raise ValueError(f"tiny_config {config_overrides}: the tiny model cannot be built ({exc})") from None
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()
