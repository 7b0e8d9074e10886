"""The judge's text interface: the Prometheus grading prompt, the CoT format, and scores.

A judge reads a prompt rendered with the Prometheus absolute-grading template
(task description, instruction, response, reference answer, rubric with five
score descriptions, ending in ``"###Feedback: "``), writes
``"Feedback: ... [RESULT] N"``, and its score token is the token that follows
the marker ``[RESULT]``.  This module owns the three places where text meets
numbers:

- :func:`render_prompt` / :func:`format_rubric` build the prompt exactly as the
  shipped Prometheus files spell it (tests re-render every shipped row from its
  parts and compare byte for byte);
- :func:`format_cot` / :func:`parse_score` write and read the scored CoT;
- :func:`resolve_score_token_ids` finds the vocabulary id of each score value
  *as it appears after the marker*, which matters for tokenizers that merge a
  leading space into the digit (GPT-2 / Qwen byte-level BPE: ``" 4"`` is one
  token, different from ``"4"``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple, Union

SCORE_MARKER = "[RESULT]"
# The phrase a judge writes before its score, by name: Prometheus' marker (the default) and the released REAL
# code's delimiter (" So the overall score is N", how Feedback-Collection's feedback texts end).
SCORE_PHRASES = {"prometheus": SCORE_MARKER, "released": "So the overall score is"}
SCORE_VALUES = (1, 2, 3, 4, 5)  # the judge's score scale: the Prometheus rubric's five scores
FEEDBACK_PREFIX = "Feedback:"
# The sentence the released data scripts append to each Prometheus prompt (github.com/YasminZhang/REAL,
# data/collection.py and data/collection_sft.py, `instruction_following`, used for local_dir names holding
# "base", as the README's commands give them), so that the judge ends its feedback in "So the overall score is N".
RELEASED_INSTRUCTION = ("Let's output the final score as \"So the overall score is (score)\" without a period at the "
                        "end. The score, which is a number between 1 and 5, should appear at the end of the answer in "
                        "place of the period.")

_TASK_WITH_REFERENCE = (
    "An instruction (might include an Input inside it), a response to evaluate, "
    "a reference answer that gets a score of 5, and a score rubric representing "
    "a evaluation criteria are given."
)
_TASK_WITHOUT_REFERENCE = (
    "An instruction (might include an Input inside it), a response to evaluate, "
    "and a score rubric representing a evaluation criteria are given."
)
# The grammar slips ("assess", "a evaluation") are the template's own; models
# trained on Prometheus data saw exactly this text, so it is kept verbatim.
_STEPS = (
    "1. Write a detailed feedback that assess the quality of the response strictly "
    "based on the given score rubric, not evaluating in general.\n"
    "2. After writing a feedback, write a score that is an integer between 1 and 5. "
    "You should refer to the score rubric.\n"
    '3. The output format should look as follows: "Feedback: (write a feedback for '
    'criteria) [RESULT] (an integer number between 1 and 5)"\n'
    "4. Please do not generate any other opening, closing, and explanations."
)
_FORMAT_LINE = '"Feedback: (write a feedback for criteria) [RESULT] (an integer number between 1 and 5)"'

RubricLike = Union[str, Mapping]


def with_chat_template(tokenizer, prompt: str) -> str:
    """``prompt`` as one user turn of the tokenizer's chat template, ready for the reply (``prompt`` itself
    when the tokenizer has no template).  A BOS the template writes is dropped when the tokenizer adds
    one itself, so the encoded prompt does not start with two."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        adds_bos = tokenizer("", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]
        if adds_bos:
            text = text[len(bos):]
    return text


def format_rubric(criteria: str, descriptions: Union[Sequence[str], Mapping]) -> str:
    """The rubric block: ``[criteria]`` then ``Score 1: ...`` .. ``Score 5: ...``.

    ``descriptions`` is five strings in score order, or a mapping from score
    (1..5, int or str) to its description.
    """
    if not isinstance(criteria, str) or not criteria.strip():
        raise ValueError("criteria must be a non-empty string")
    if isinstance(descriptions, Mapping):
        ordered = []
        for score in range(1, 6):
            if score not in descriptions and str(score) not in descriptions:
                raise ValueError(f"descriptions is missing score {score} (need 1..5)")
            ordered.append(descriptions[score] if score in descriptions else descriptions[str(score)])
    else:
        ordered = list(descriptions)
    if len(ordered) != 5:
        raise ValueError(f"descriptions must hold 5 score descriptions, got {len(ordered)}")
    for score, text in enumerate(ordered, start=1):
        if not isinstance(text, str):
            raise ValueError(f"description of score {score} must be a string, got {type(text).__name__}")
    lines = [f"[{criteria}]"] + [f"Score {s}: {text}" for s, text in enumerate(ordered, start=1)]
    return "\n".join(lines)


def _rubric_text(rubric: RubricLike) -> str:
    if isinstance(rubric, str):
        if not rubric.strip():
            raise ValueError("rubric must not be empty")
        return rubric
    if isinstance(rubric, Mapping):
        # Accept Feedback-Collection style keys, with or without the orig_ prefix.
        def get(key):
            for name in (key, f"orig_{key}"):
                if name in rubric:
                    return rubric[name]
            raise ValueError(f"rubric mapping is missing {key!r}")

        criteria = get("criteria")
        descriptions = [get(f"score{s}_description") for s in range(1, 6)]
        return format_rubric(criteria, descriptions)
    raise ValueError(f"rubric must be a string or a mapping, got {type(rubric).__name__}")


def render_prompt(instruction: str, response: str, rubric: RubricLike,
                  reference_answer: Optional[str] = None) -> str:
    """The Prometheus absolute-grading prompt, ending in ``"###Feedback: "``.

    ``rubric`` is the finished rubric text (see :func:`format_rubric`) or a
    mapping with ``criteria`` and ``score1_description`` .. ``score5_description``
    (``orig_`` prefixes accepted).  Without a reference answer the template's
    own no-reference variant is used (no reference section, and the task
    description does not mention one).
    """
    for name, value in (("instruction", instruction), ("response", response)):
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    rubric_text = _rubric_text(rubric)
    if reference_answer is not None and not isinstance(reference_answer, str):
        raise ValueError(f"reference_answer must be a string or None, got {type(reference_answer).__name__}")
    has_reference = reference_answer is not None and reference_answer.strip() != ""
    parts = [
        "###Task Description:\n"
        + (_TASK_WITH_REFERENCE if has_reference else _TASK_WITHOUT_REFERENCE)
        + "\n" + _STEPS,
        f"###The instruction to evaluate:\n{instruction}",
        f"###Response to evaluate:\n{response}",
    ]
    if has_reference:
        parts.append(f"###Reference Answer (Score 5):\n{reference_answer}")
    parts.append(f"###Score Rubrics:\n{rubric_text}")
    parts.append("###Feedback: ")
    return "\n\n".join(parts)


def _format_value(score) -> str:
    value = float(score)
    if not math.isfinite(value):
        raise ValueError(f"score must be finite, got {score!r}")
    return str(int(value)) if value.is_integer() else f"{value:g}"


def score_phrase(name_or_phrase: str) -> str:
    """The score phrase of ``--score-phrase``: a name of SCORE_PHRASES, or the phrase itself."""
    phrase = SCORE_PHRASES.get(name_or_phrase, name_or_phrase)
    if not isinstance(phrase, str) or not phrase.strip() or phrase != phrase.strip():
        raise ValueError(f"score phrase must be one of {', '.join(SCORE_PHRASES)} or a phrase without leading or "
                         f"trailing spaces; got {name_or_phrase!r}")
    return phrase


def prompt_for_score_phrase(prompt: str, phrase: str = "prometheus") -> str:
    """The prompt as the judge reads it under ``--score-phrase phrase``.

    With the released phrase, a Prometheus prompt (one that holds the template's output-format line) gets
    the released data scripts' sentence appended, as they append it (``prompt + " " + RELEASED_INSTRUCTION``),
    so the prompt asks for "So the overall score is N" where the CoT ends.  Other phrases, and prompts of
    other tasks (the synthetic one), are returned unchanged; a prompt that already ends in the sentence is
    not given it twice.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if score_phrase(phrase) != SCORE_PHRASES["released"] or _FORMAT_LINE not in prompt:
        return prompt
    if prompt.rstrip().endswith(RELEASED_INSTRUCTION):
        return prompt
    return f"{prompt} {RELEASED_INSTRUCTION}"


# Where a feedback text states its score: any score phrase (Feedback-Collection's texts end in "So the overall
# score is 4." and their outputs in "[RESULT] 4"); format_cot cuts the text at the first of them.
_STATED_SCORE_RE = re.compile("|".join(re.escape(p) for p in SCORE_PHRASES.values()), re.IGNORECASE)


def format_cot(feedback: str, score, marker: str = SCORE_MARKER) -> str:
    """``"Feedback: <feedback> <marker> <score>"`` (integral scores written as ``4``, not ``4.0``).

    A feedback that already starts with ``Feedback:`` is not prefixed twice.  A feedback that already
    states its score (Feedback-Collection's texts end in "So the overall score is 4.", its outputs in
    "[RESULT] 4") is cut before that statement, whatever ``marker`` is: the only score in the CoT is the one
    after the marker, so the judge does not commit to a digit in its CoT for RAIL to copy at the marker.
    """
    if not isinstance(feedback, str):
        raise ValueError(f"feedback must be a string, got {type(feedback).__name__}")
    if not isinstance(marker, str) or not marker.strip():
        raise ValueError(f"marker must be a non-empty string, got {marker!r}")
    try:
        value = _format_value(score)
    except (TypeError, ValueError):
        raise ValueError(f"score must be a finite number, got {score!r}") from None
    body = feedback.strip()
    if body.startswith(FEEDBACK_PREFIX):
        body = body[len(FEEDBACK_PREFIX):].strip()
    body = body.split(marker, 1)[0]
    stated = _STATED_SCORE_RE.search(body)
    if stated:
        body = body[:stated.start()]
    body = body.rstrip()
    return f"{FEEDBACK_PREFIX} {body} {marker} {value}" if body else f"{FEEDBACK_PREFIX} {marker} {value}"


# --- reading a score back from generated text -------------------------------------

_WORD_VALUES = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5,
    "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
}
# A number: optional sign, digits, optional decimals; or a number word.  The
# trailing \b stops "45" being read as "4" and "4th" being read at all, while
# "4." at the end of a sentence still reads as 4.
_NUM = r"(?P<num>[-+]?\d+(?:\.\d+)?|" + "|".join(_WORD_VALUES) + r")\b"
_OPENERS = r"(?:[*(\[\"']\s*)*"  # "**4**", "(4)", "[4]", "'4'"
# Each whitespace run is matched by exactly one \s* so that long runs of spaces
# cannot make the patterns backtrack quadratically.
# An explicit denominator ("Score: 8/10") is captured so that a verdict on another
# scale is read as invalid instead of as 8.
_DENOMINATOR = r"(?:\s*(?:/|out\s+of)\s*(?P<den>\d+(?:\.\d+)?)\b)?"
_MARKER_RE = re.compile(re.escape(SCORE_MARKER) + r"\s*(?:[:=]\s*)?" + _OPENERS + _NUM + _DENOMINATOR,
                        re.IGNORECASE)
# "score is 4", "overall score: 4", "a score of 4", "rating = 4", "result: 4";
# at least one connector is required, so an echoed rubric line "Score 4: ..."
# is not read as a verdict.
_PHRASE_RE = re.compile(
    r"\b(?:score|rating|grade|result)\b\s*"
    r"(?:(?:is|of|would\s+be|should\s+be|will\s+be|be|equals|:|=)\s*)+"
    + _OPENERS + _NUM + _DENOMINATOR,
    re.IGNORECASE,
)


def _fraction_re(high: float) -> "re.Pattern[str]":
    # "4/5", "4 / 5", "4 out of 5", "4.5/5.0": only fractions over the scale's top
    # value count; "8/10" or "1/2 of the points" is not a score on this scale.
    top = re.escape(_format_value(high))
    return re.compile(
        r"(?<![\w.])" + _NUM + r"\s*(?:/|out\s+of)\s*" + top + r"(?:\.0+)?(?![\d.]*\d)",
        re.IGNORECASE,
    )


def _as_value(token: str) -> Optional[float]:
    word = _WORD_VALUES.get(token.lower())
    if word is not None:
        return float(word)
    try:
        value = float(token)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _marker_re(marker: str) -> "re.Pattern[str]":
    if marker == SCORE_MARKER:
        return _MARKER_RE
    return re.compile(re.escape(marker) + r"\s*(?:[:=]\s*)?" + _OPENERS + _NUM + _DENOMINATOR, re.IGNORECASE)


def parse_score(text, low: float = 1, high: float = 5, marker: str = SCORE_MARKER) -> Optional[float]:
    """The score a judge wrote, or ``None``.

    Recognised forms (case-insensitive): ``[RESULT] 4`` (or ``marker 4`` for another score
    phrase; also ``[RESULT]: 4``,
    ``[RESULT] (4)``, ``[RESULT] **4**``), ``So the overall score is 4``,
    ``Score: 4``, ``a score of 4``, ``Rating = 4``, ``4/5``, ``4 out of 5``, and
    number words (``score is four``).  When the text holds several, the **last
    one wins** (judges restate their verdict at the end); if that last one lies
    outside ``[low, high]`` the answer is ``None`` rather than an earlier score,
    because the judge's final word was invalid.

    Decimals are read as written (``[RESULT] 3.5`` -> 3.5): the value is a
    regression target, and rounding would hide what the judge said.

    Never raises on bad text: ``None``, bytes (decoded as UTF-8 with
    replacement), numbers and other non-text, and text with no score all give
    ``None``.  Invalid bounds (``low > high`` or non-finite) raise ``ValueError``
    because that is a caller bug, not bad text.
    """
    if not (isinstance(low, (int, float)) and isinstance(high, (int, float))) \
            or not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ValueError(f"need finite low <= high, got low={low!r}, high={high!r}")
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", errors="replace")
    if not isinstance(text, str) or not text:
        return None
    last_pos, last_value = -1, None
    for pattern in (_marker_re(marker), _PHRASE_RE, _fraction_re(high)):
        for match in pattern.finditer(text):
            pos = match.start("num")
            if pos > last_pos:
                value = _as_value(match.group("num"))
                den = match.groupdict().get("den")
                if den is not None and float(den) != float(high):
                    value = None  # "8/10": a score on another scale
                last_pos, last_value = pos, value
    if last_value is None or not (low <= last_value <= high):
        return None
    return float(last_value)


# --- score tokens -----------------------------------------------------------------

def _encode(tokenizer, text: str) -> List[int]:
    """Token ids of ``text`` without special tokens, for a transformers tokenizer
    or a raw ``tokenizers.Tokenizer``."""
    try:
        out = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        out = tokenizer.encode(text)
    ids = getattr(out, "ids", out)  # tokenizers.Encoding -> .ids
    return [int(i) for i in ids]


def _decode(tokenizer, ids: List[int]) -> str:
    return tokenizer.decode(ids)


def resolve_score_token_ids(tokenizer, values: Iterable = SCORE_VALUES, marker: str = SCORE_MARKER) -> List[int]:
    """One vocabulary id per score value: the token a judge emits after the marker.

    The id is read in context: ``"[RESULT] 4"`` is tokenized and its last token
    must decode to ``"4"`` (surrounding whitespace ignored), while everything
    before it must decode to the marker (plus whitespace).  This picks ``"Ġ4"``
    for byte-level BPE tokenizers that merge the leading space (GPT-2, Qwen),
    ``"4"`` for tokenizers that keep the space apart or drop it (word-level,
    SentencePiece with split digits), and fails with a ``ValueError`` naming the
    value when it is not a single token in that context (e.g. ``"10"`` split
    into ``"1"`` ``"0"``) or when two values share a token.
    """
    values = list(values)
    if not values:
        raise ValueError("values must not be empty")
    marker_ids = _encode(tokenizer, marker)
    if not marker_ids:
        raise ValueError(f"tokenizer encodes the marker {marker!r} to no tokens")
    ids: List[int] = []
    for value in values:
        try:
            text = _format_value(value)
        except (TypeError, ValueError):
            raise ValueError(f"score value {value!r} is not a finite number") from None
        context = _encode(tokenizer, f"{marker} {text}")
        if len(context) < 2:
            raise ValueError(f"score value {text!r}: '{marker} {text}' encodes to {len(context)} token(s); "
                             "the value is not a separate token after the marker")
        last = context[-1]
        if _decode(tokenizer, [last]).strip() != text or _decode(tokenizer, context[:-1]).strip() != marker:
            pieces = [_decode(tokenizer, [i]) for i in context]
            raise ValueError(
                f"score value {text!r} is not a single token after {marker!r}: "
                f"'{marker} {text}' tokenizes as {pieces!r}")
        ids.append(last)
    if len(set(ids)) != len(ids):
        raise ValueError(f"score values {values!r} do not map to distinct tokens: {ids!r}")
    return ids


@dataclass(frozen=True)
class ScoreScale:
    """The score tokens a judge writes after the marker and their values, together.

    Built once from the tokenizer (``ScoreScale.from_tokenizer``) and passed
    around whole, so token ids and values cannot drift apart.
    """

    token_ids: Tuple[int, ...]
    values: Tuple[float, ...]
    marker: str = SCORE_MARKER  # the phrase the score follows (SCORE_PHRASES)

    @classmethod
    def from_tokenizer(cls, tokenizer, values: Iterable = SCORE_VALUES, marker: str = SCORE_MARKER) -> "ScoreScale":
        values = tuple(values)
        return cls(tuple(resolve_score_token_ids(tokenizer, values, marker)), values, marker)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)
