"""real.judge.prompts: the Prometheus template, the CoT format, score parsing and score-token ids."""
import json
import math
import re
import time

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from real.judge.prompts import (SCORE_MARKER, format_cot, format_rubric, parse_score, render_prompt,
                          resolve_score_token_ids)

from tests.data_paths import HOW_TO_GET, SHIPPED


# --- parse_score --------------------------------------------------------------------

PARSE_CASES = [
    # the forms a judge writes
    ("Feedback: Good answer. [RESULT] 4", 4.0),
    ("[RESULT] 1", 1.0),
    ("[RESULT]5", 5.0),
    ("[RESULT]: 3", 3.0),
    ("[RESULT] (2)", 2.0),
    ("[RESULT] **4**", 4.0),
    ("[result] 4", 4.0),
    ("So the overall score is 4", 4.0),
    ("So the overall score is 3.", 3.0),
    ("Score: 4", 4.0),
    ("The response deserves a score of 2 because it is vague.", 2.0),
    ("Rating = 5", 5.0),
    ("I would rate it 4/5", 4.0),
    ("4 / 5", 4.0),
    ("4 out of 5", 4.0),
    ("score is four", 4.0),
    ("[RESULT] 4 out of 5", 4.0),
    ("Score: 4/5.", 4.0),
    # last one wins
    ("Score: 2. On reflection, [RESULT] 4", 4.0),
    ("[RESULT] 5 ... no wait, the score is 3", 3.0),
    ("So the overall score is 2. [RESULT] 2\n[RESULT] 5", 5.0),
    ("[RESULT] 3 but then: Score: 9", None),  # the final verdict is invalid: not an earlier one
    # decimals are read as written
    ("[RESULT] 3.5", 3.5),
    ("4.5/5", 4.5),
    ("[RESULT] 4.0", 4.0),
    # out of range
    ("[RESULT] 7", None),
    ("[RESULT] 0", None),
    ("[RESULT] -1", None),
    ("The score is 45", None),
    ("Score: 8/10", None),  # a verdict on another scale
    ("Score: 4/10", None),
    ("[RESULT] 5.5", None),
    # no score, or not a verdict
    ("", None),
    ("The response is good.", None),
    ("Score 4: The response is accurate.", None),  # an echoed rubric line, not a verdict
    ("about 1/2 of the points are right", None),
    ("[RESULT] nan", None),
    ("[RESULT] inf", None),
    ("[RESULT] 4th", None),
    ("[RESULT]", None),
    # garbage that is not text
    (None, None),
    (4, None),
    (4.0, None),
    (["[RESULT] 4"], None),
    ({"score": 4}, None),
    (b"[RESULT] 3", 3.0),
    (b"\xff\xfe[RESULT] 2", 2.0),
    ("\x00\x01\ufffd [RESULT] \U0001F600", None),
]


@pytest.mark.parametrize("text,expected", PARSE_CASES)
def test_parse_score(text, expected):
    assert parse_score(text) == expected


def test_parse_score_custom_range():
    assert parse_score("[RESULT] 8", low=1, high=10) == 8.0
    assert parse_score("8/10", low=1, high=10) == 8.0
    assert parse_score("4/5", low=1, high=10) is None  # a fraction of 5 is not a verdict on 1..10
    assert parse_score("[RESULT] 0", low=0, high=1) == 0.0


def test_parse_score_bad_bounds_raise():
    with pytest.raises(ValueError, match="low"):
        parse_score("[RESULT] 3", low=5, high=1)
    with pytest.raises(ValueError):
        parse_score("[RESULT] 3", low=1, high=math.inf)


def test_parse_score_huge_and_adversarial_text_is_fast():
    texts = [
        "[RESULT] 4 " * 100_000,
        "word " * 400_000 + "[RESULT] 2",
        "[RESULT]" + " " * 200_000 + "x",
        "score" + ": " * 100_000 + "x",
        "9" * 500_000 + "/5",
    ]
    start = time.perf_counter()
    results = [parse_score(t) for t in texts]
    assert results == [4.0, 2.0, None, None, None]
    assert time.perf_counter() - start < 5.0  # linear-time patterns; quadratic ones would take minutes


# --- format_cot -------------------------------------------------------------------

def test_format_cot_round_trips_through_parse_score():
    cot = format_cot("The answer is accurate and complete.", 4)
    assert cot == "Feedback: The answer is accurate and complete. [RESULT] 4"
    assert parse_score(cot) == 4.0
    assert format_cot("Feedback: already prefixed ", 5.0) == "Feedback: already prefixed [RESULT] 5"
    assert format_cot("Fine.", 3.5).endswith("[RESULT] 3.5")


@pytest.mark.parametrize("score", [math.nan, "four", None])
def test_format_cot_rejects_bad_scores(score):
    with pytest.raises(ValueError, match="score"):
        format_cot("x", score)


# --- render_prompt ----------------------------------------------------------------

_PARTS = re.compile(
    r"###The instruction to evaluate:\n(?P<instruction>.*)\n\n###Response to evaluate:\n(?P<response>.*)"
    r"\n\n###Reference Answer \(Score 5\):\n(?P<reference>.*)\n\n###Score Rubrics:\n"
    r"\[(?P<criteria>.*)\]\nScore 1: (?P<s1>.*)\nScore 2: (?P<s2>.*)\nScore 3: (?P<s3>.*)"
    r"\nScore 4: (?P<s4>.*)\nScore 5: (?P<s5>.*)\n\n###Feedback: $",
    re.S,
)


@pytest.mark.skipif(not all(p.exists() for p in SHIPPED), reason=HOW_TO_GET)
def test_render_prompt_reproduces_every_shipped_prompt():
    rows = [row for path in SHIPPED for row in json.loads(path.read_text())]
    assert len(rows) == 640
    for i, row in enumerate(rows):
        m = _PARTS.search(row["instruction"])
        assert m, f"row {i}: template sections not found"
        rubric = {"criteria": m["criteria"], **{f"score{s}_description": m[f"s{s}"] for s in range(1, 6)}}
        rendered = render_prompt(m["instruction"], m["response"], rubric, reference_answer=m["reference"])
        assert rendered == row["instruction"], f"row {i} renders differently"


def test_render_prompt_structure_and_rubric_forms():
    descriptions = ["bad", "poor", "fair", "good", "great"]
    as_text = format_rubric("Is it helpful?", descriptions)
    assert as_text == ("[Is it helpful?]\nScore 1: bad\nScore 2: poor\nScore 3: fair\n"
                       "Score 4: good\nScore 5: great")
    as_mapping = {"orig_criteria": "Is it helpful?",
                  **{f"orig_score{s}_description": d for s, d in enumerate(descriptions, 1)}}
    by_number = format_rubric("Is it helpful?", {s: d for s, d in enumerate(descriptions, 1)})
    assert by_number == as_text
    prompt = render_prompt("Say hi.", "Hi!", as_mapping, reference_answer="Hello!")
    assert prompt == render_prompt("Say hi.", "Hi!", as_text, reference_answer="Hello!")
    assert prompt.startswith("###Task Description:\n")
    assert prompt.endswith("\n\n###Score Rubrics:\n" + as_text + "\n\n###Feedback: ")
    assert "###Reference Answer (Score 5):\nHello!\n\n" in prompt
    assert SCORE_MARKER in prompt  # the output-format instruction names the marker

    no_reference = render_prompt("Say hi.", "Hi!", as_text)
    assert "###Reference Answer" not in no_reference
    assert "a reference answer that gets a score of 5" not in no_reference
    assert no_reference.endswith("###Feedback: ")


@pytest.mark.parametrize("kwargs,match", [
    ({"instruction": None}, "instruction"),
    ({"response": 3}, "response"),
    ({"rubric": ""}, "rubric"),
    ({"rubric": {"criteria": "c"}}, "score1_description"),
    ({"rubric": 7}, "rubric"),
    ({"reference_answer": 5}, "reference_answer"),
])
def test_render_prompt_rejects_bad_parts(kwargs, match):
    args = dict(instruction="q", response="a", rubric="[c]\nScore 1: x", reference_answer=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        render_prompt(**args)


def test_format_rubric_needs_five_descriptions():
    with pytest.raises(ValueError, match="5 score descriptions"):
        format_rubric("c", ["a", "b"])
    with pytest.raises(ValueError, match="missing score 5"):
        format_rubric("c", {1: "a", 2: "b", 3: "c", 4: "d"})


# --- resolve_score_token_ids --------------------------------------------------------

def _byte_level_bpe() -> Tokenizer:
    """GPT-2/Qwen style: the leading space is merged into the digit (" 4" -> "Ġ4"); no "Ġ10" merge."""
    chars = list("[]RESULTabcd0123456789") + ["Ġ"]
    vocab = {c: i for i, c in enumerate(chars)}
    merges = [("R", "E"), ("RE", "S"), ("RES", "U"), ("RESU", "L"), ("RESUL", "T")]
    merges += [("Ġ", str(d)) for d in range(1, 6)]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def _word_level_plain() -> Tokenizer:
    """Whitespace-split words: the marker and each digit are their own tokens, the space is dropped."""
    words = ["[UNK]", SCORE_MARKER, "1", "2", "3", "4", "5", "good"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def _space_token_level() -> Tokenizer:
    """SentencePiece-with-split-digits style: the space is a token of its own before the digit."""
    from tokenizers import Regex
    pieces = ["[UNK]", SCORE_MARKER, " ", "1", "2", "3", "4", "5"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(pieces)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\[RESULT\]|\d|\s+|[^\s\d]+"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


def _fast(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_score_ids_merged_leading_space():
    tokenizer = _fast(_byte_level_bpe())
    ids = resolve_score_token_ids(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces == ["Ġ1", "Ġ2", "Ġ3", "Ġ4", "Ġ5"]  # the ids that follow the marker, not the bare digits
    assert ids != [tokenizer.convert_tokens_to_ids(str(v)) for v in range(1, 6)]
    context = tokenizer.encode("[RESULT] 4", add_special_tokens=False)
    assert context[-1] == ids[3]


def test_score_ids_plain_word_level():
    tokenizer = _fast(_word_level_plain())
    ids = resolve_score_token_ids(tokenizer, values=(1, 2, 3, 4, 5))
    assert tokenizer.convert_ids_to_tokens(ids) == ["1", "2", "3", "4", "5"]


def test_score_ids_space_as_its_own_token():
    tokenizer = _fast(_space_token_level())
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("[RESULT] 4", add_special_tokens=False)) == \
        [SCORE_MARKER, " ", "4"]
    ids = resolve_score_token_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(ids) == ["1", "2", "3", "4", "5"]


def test_score_ids_accept_a_raw_tokenizers_object():
    raw = _byte_level_bpe()
    assert resolve_score_token_ids(raw) == resolve_score_token_ids(_fast(raw))


def test_score_ids_multi_token_value_names_the_value():
    tokenizer = _fast(_byte_level_bpe())
    with pytest.raises(ValueError, match=r"'10'.*not a single token"):
        resolve_score_token_ids(tokenizer, values=(1, 5, 10))


def test_score_ids_unknown_value_names_the_value():
    with pytest.raises(ValueError, match="'6'"):
        resolve_score_token_ids(_fast(_word_level_plain()), values=(1, 6))


@pytest.mark.parametrize("values,match", [((), "empty"), ((1, "x"), "'x'"), ((1, math.nan), "nan")])
def test_score_ids_bad_values(values, match):
    with pytest.raises(ValueError, match=match):
        resolve_score_token_ids(_fast(_word_level_plain()), values=values)
