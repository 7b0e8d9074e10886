"""Judge examples: the Prometheus evaluation files and the Feedback-Collection training format.

Both formats become :class:`JudgeExample` (prompt, real-valued target, the
individual grades, reference CoTs, and everything else in ``meta``):

- **Prometheus eval** rows (``vicuna_eval.json``, ``mt_bench_eval.json``,
  ``flask_eval.json``, and Feedback Bench as ``feedback_collection_ood_test.json``):
  ``instruction`` (the whole rendered prompt), ``gpt4_score`` (several grades, or
  one), ``gpt4_feedback`` (one feedback per grade, or one text).  target = mean of
  the grades; other fields (FLASK's ``human_score``) stay in ``meta``.
- **Feedback Bench** as published on the Hugging Face Hub
  (``prometheus-eval/Feedback-Bench``) has the Feedback-Collection layout below:
  one GPT-4 grade per row (``orig_score``).
- **Feedback-Collection** rows: ``instruction`` (rendered prompt), ``output``
  (``"Feedback: ... [RESULT] N"``) and the ``orig_*`` parts
  (``orig_instruction``, ``orig_response``, ``orig_reference_answer``,
  ``orig_criteria``, ``orig_score1_description`` .. ``orig_score5_description``,
  ``orig_feedback``, ``orig_score``).  target = ``orig_score`` (or the score in
  ``output``); a row without ``instruction`` gets its prompt rendered from the
  ``orig_*`` parts with the same template.

``feedback`` always holds bare feedback texts (no ``Feedback:`` prefix, no
``[RESULT] N``), aligned with ``grades``; ``real.judge.prompts.format_cot`` turns one
into a full scored CoT.

Files are a JSON list of objects or JSON lines, told apart by content (a file
whose first non-blank character is ``[`` is a JSON list), whatever the suffix.
A malformed row raises ``ValueError`` naming the file and the 0-based row (and
line, for JSON lines); with ``skip_malformed=True`` it is skipped and one
warning gives the count.  Fields the loader does not use are kept in ``meta``.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from real.judge.example import JudgeExample
from real.judge.prompts import (FEEDBACK_PREFIX, SCORE_MARKER, parse_score, prompt_for_score_phrase, render_prompt,
                                with_chat_template)
from real.judge.synthetic import SyntheticTask, make_splits

PathLike = Union[str, Path]

EVAL_FORMAT = "prometheus_eval"
TRAIN_FORMAT = "feedback_collection"

# Fields consumed into JudgeExample's own attributes; everything else goes to meta.
_EVAL_FIELDS = {"instruction", "gpt4_score", "gpt4_feedback"}
_ORIG_PARTS = ("orig_instruction", "orig_response", "orig_criteria") + tuple(
    f"orig_score{s}_description" for s in range(1, 6))
_TRAIN_FIELDS = {"instruction", "output", "orig_feedback", "orig_score"}


class MalformedRow(ValueError):
    """A row that cannot become a JudgeExample; the message says why."""


# --- reading files ----------------------------------------------------------------

def _read_rows(path: Path) -> List[Tuple[int, Optional[int], Any]]:
    """(row index, 1-based line or None, parsed row or MalformedRow) for each row."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"judge data file not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory; pass the data files in it (.json / .jsonl)") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from None
    stripped = text.lstrip()
    if not stripped:
        raise ValueError(f"{path}: file is empty (expected a JSON list of rows or JSON lines)")
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
        return [(i, None, row) for i, row in enumerate(data)]
    try:  # one (possibly pretty-printed) object is a file of one row
        return [(0, 1, json.loads(text))]
    except json.JSONDecodeError:
        pass
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            row = MalformedRow(f"invalid JSON ({exc.msg} at column {exc.colno})")
        rows.append((len(rows), line_no, row))
    return rows


# --- field checks -----------------------------------------------------------------

def _number(value, what: str) -> float:
    if isinstance(value, bool):
        raise MalformedRow(f"{what} must be a number, got a boolean")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise MalformedRow(f"{what} must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)):
        raise MalformedRow(f"{what} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise MalformedRow(f"{what} must be finite, got {value!r}")
    return value


def _grade(value, what: str, score_range: Tuple[float, float]) -> float:
    value = _number(value, what)
    low, high = score_range
    if not low <= value <= high:
        raise MalformedRow(f"{what} = {value:g} is outside the score range [{low:g}, {high:g}]")
    return value


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        if key not in row:
            raise MalformedRow(f"field {key!r} is missing")
        raise MalformedRow(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _prompt(row: dict) -> str:
    """The row's rendered prompt, or one rendered from its orig_* parts."""
    if "instruction" in row:
        prompt = _text(row, "instruction")
        if not prompt.strip():
            raise MalformedRow("field 'instruction' is empty")
        return prompt
    missing = [k for k in _ORIG_PARTS if k not in row]
    if missing:
        raise MalformedRow("no 'instruction' and cannot render one: missing " + ", ".join(repr(k) for k in missing))
    reference = row.get("orig_reference_answer")
    if reference is not None and not isinstance(reference, str):
        raise MalformedRow("field 'orig_reference_answer' must be a string")
    try:
        return render_prompt(
            _text(row, "orig_instruction"), _text(row, "orig_response"),
            {k[len("orig_"):]: _text(row, k) for k in _ORIG_PARTS[2:]},
            reference_answer=reference,
        )
    except ValueError as exc:
        raise MalformedRow(f"cannot render the prompt: {exc}") from None


def bare_feedback(output: str) -> str:
    """The feedback text of a ``"Feedback: ... [RESULT] N"`` output, without prefix and score."""
    body = output.strip()
    if body.startswith(FEEDBACK_PREFIX):
        body = body[len(FEEDBACK_PREFIX):]
    cut = body.rfind(SCORE_MARKER)
    if cut >= 0:
        body = body[:cut]
    return body.strip()


# --- one row per format -----------------------------------------------------------

def _eval_example(row: dict, score_range) -> JudgeExample:
    scores = row["gpt4_score"]
    if isinstance(scores, (int, float)) and not isinstance(scores, bool):
        scores = [scores]  # Feedback Bench (feedback_collection_ood_test.json): one grade per row
    if not isinstance(scores, list) or not scores:
        raise MalformedRow("field 'gpt4_score' must be a number or a non-empty list of grades")
    grades = [_grade(s, f"gpt4_score[{i}]", score_range) for i, s in enumerate(scores)]
    feedback = row.get("gpt4_feedback", [])
    if feedback is None:
        feedback = []
    if isinstance(feedback, str):
        feedback = [bare_feedback(feedback)]
    if not isinstance(feedback, list) or not all(isinstance(f, str) for f in feedback):
        raise MalformedRow("field 'gpt4_feedback' must be a list of strings")
    if feedback and len(feedback) != len(grades):
        raise MalformedRow(f"'gpt4_feedback' has {len(feedback)} texts for {len(grades)} grades")
    meta = {k: v for k, v in row.items() if k not in _EVAL_FIELDS}
    meta["format"] = EVAL_FORMAT
    return JudgeExample(prompt=_prompt(row), target=sum(grades) / len(grades), grades=grades,
                        feedback=list(feedback), meta=meta)


def _train_example(row: dict, score_range) -> JudgeExample:
    output = row.get("output")
    if output is not None and not isinstance(output, str):
        raise MalformedRow(f"field 'output' must be a string, got {type(output).__name__}")
    output_score = parse_score(output, *score_range) if output else None
    if row.get("orig_score") is not None:
        score = _grade(row["orig_score"], "orig_score", score_range)
        if output_score is not None and output_score != score:
            raise MalformedRow(f"orig_score {score:g} disagrees with the score in 'output' ({output_score:g})")
    elif output_score is not None:
        score = output_score
    else:
        raise MalformedRow("no score: 'orig_score' is missing and 'output' has no readable [RESULT] score")
    if isinstance(row.get("orig_feedback"), str) and row["orig_feedback"].strip():
        feedback = [row["orig_feedback"].strip()]
    elif output:
        feedback = [bare_feedback(output)]
    else:
        feedback = []
    meta = {k: v for k, v in row.items()
            if k not in _TRAIN_FIELDS and k not in _ORIG_PARTS and k != "orig_reference_answer"}
    meta["format"] = TRAIN_FORMAT
    return JudgeExample(prompt=_prompt(row), target=score, grades=[score], feedback=feedback, meta=meta)


def parse_row(row: Any, score_range: Tuple[float, float] = (1, 5)) -> JudgeExample:
    """One JudgeExample from one row of either format; ``MalformedRow`` says what is wrong."""
    if isinstance(row, MalformedRow):
        raise row
    if not isinstance(row, dict):
        raise MalformedRow(f"expected a JSON object, got {type(row).__name__}")
    if "gpt4_score" in row:
        return _eval_example(row, score_range)
    if "orig_score" in row or "output" in row:
        return _train_example(row, score_range)
    raise MalformedRow("unknown row format: needs 'gpt4_score' (Prometheus eval) "
                       "or 'orig_score' / 'output' (Feedback-Collection)")


def load_prometheus(path: PathLike, skip_malformed: bool = False,
                    score_range: Tuple[float, float] = (1, 5)) -> List[JudgeExample]:
    """Every row of one Prometheus-eval or Feedback-Collection file (``.json`` list or JSON lines).

    ``meta`` gets ``source`` (the file stem), ``path`` and ``row`` (0-based
    position among the file's rows).  Grades outside ``score_range`` make a
    row malformed.
    """
    path = Path(path)
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"{path}: contains no rows")
    examples, skipped = [], []
    for index, line_no, row in rows:
        where = f"row {index}" + (f" (line {line_no})" if line_no is not None else "")
        try:
            example = parse_row(row, score_range)
        except MalformedRow as exc:
            if not skip_malformed:
                raise ValueError(f"{path}: {where}: {exc}") from None
            skipped.append(f"{where}: {exc}")
            continue
        example.meta.update(source=path.stem, path=str(path), row=index)
        examples.append(example)
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} malformed row(s) of {len(rows)}; first: {skipped[0]}",
                      stacklevel=2)
    if not examples:
        raise ValueError(f"{path}: all {len(rows)} rows are malformed; first: {skipped[0]}")
    return examples


def load_judge_data(paths: Union[PathLike, Iterable[PathLike]], skip_malformed: bool = False,
                    score_range: Tuple[float, float] = (1, 5)) -> List[JudgeExample]:
    """The examples of several files, in order; ``meta["source"]`` tells them apart (file stem)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ValueError("paths must name at least one judge data file")
    examples: List[JudgeExample] = []
    for path in paths:
        examples.extend(load_prometheus(path, skip_malformed=skip_malformed, score_range=score_range))
    return examples


def with_chat_templates(examples: Sequence[JudgeExample], tokenizer, enabled: bool = True) -> List[JudgeExample]:
    """The examples with their prompts laid out by the tokenizer's chat template (``--chat-template``; a
    tokenizer without one leaves them as they are)."""
    if not enabled or not getattr(tokenizer, "chat_template", None):
        return list(examples)
    return [replace(e, prompt=with_chat_template(tokenizer, e.prompt), meta=dict(e.meta, chat_template=True))
            for e in examples]


def with_score_phrase(examples: Sequence[JudgeExample], phrase: str = "prometheus") -> List[JudgeExample]:
    """The examples with their prompts as the judge reads them under ``--score-phrase phrase``
    (``real.judge.prompts.prompt_for_score_phrase``: the released phrase appends the released data scripts'
    instruction to each Prometheus prompt); applied before the chat template, as the release builds its
    user turns."""
    out = []
    for example in examples:
        prompt = prompt_for_score_phrase(example.prompt, phrase)
        out.append(example if prompt == example.prompt else replace(example, prompt=prompt))
    return out


def group_by_source(examples: Sequence[JudgeExample]) -> Dict[str, List[JudgeExample]]:
    """Examples grouped by ``meta["source"]``, in first-seen order."""
    groups: Dict[str, List[JudgeExample]] = {}
    for example in examples:
        groups.setdefault(example.meta.get("source", ""), []).append(example)
    return groups


class PromptStream:
    """A deterministic walk over ``n`` examples: a new seeded permutation every epoch."""

    def __init__(self, n: int, seed: int, position: int = 0):
        if n <= 0:
            raise ValueError("the training set is empty")
        self.n, self.seed, self.position = n, seed, position
        self._epoch, self._perm = -1, None

    def _order(self, epoch: int) -> List[int]:
        if epoch != self._epoch:
            import torch  # (only the training loop walks a stream; the rest of this module needs no torch)

            generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=generator).tolist(), epoch
        return self._perm

    def take(self, k: int) -> List[int]:
        out = []
        for _ in range(k):
            epoch, offset = divmod(self.position, self.n)
            out.append(self._order(epoch)[offset])
            self.position += 1
        return out


def load_train_and_eval(cfg) -> Tuple[List[JudgeExample], List[JudgeExample]]:
    """The training and held-out examples of a ``real train`` config (``--data``, ``--eval-data``,
    ``--eval-fraction``, the synthetic task's sizes)."""
    if cfg.data == ["synthetic"]:
        train, held_out = make_splits(cfg.synthetic_train_size, cfg.synthetic_eval_size, seed=cfg.seed,
                                      task=SyntheticTask(n_items=cfg.synthetic_items))
        if cfg.eval_data:
            held_out = load_judge_data(cfg.eval_data, skip_malformed=cfg.skip_malformed)
        return train, held_out
    if "synthetic" in cfg.data:
        raise ValueError("--data synthetic cannot be mixed with data files")
    examples = load_judge_data(cfg.data, skip_malformed=cfg.skip_malformed)
    if cfg.eval_data:
        return examples, load_judge_data(cfg.eval_data, skip_malformed=cfg.skip_malformed)
    n_eval = int(len(examples) * cfg.eval_fraction)
    if n_eval == 0:
        return examples, []
    import torch

    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    held = set(order[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)])


def held_out_apart(train: Sequence[JudgeExample], held: Sequence[JudgeExample], *, given: bool,
                   log) -> List[JudgeExample]:
    """``held`` without the prompts ``train`` has too: duplicate rows that a split put on both sides are dropped
    from the held-out side (said through ``log``); a ``given`` held-out set (--eval-data) is kept, with a warning."""
    seen = {e.prompt for e in train}
    both = [e for e in held if e.prompt in seen]
    if both and given:
        log(f"warning: {len(both)} of {len(held)} --eval-data prompts are also in the training data: their "
            "evaluation is not held out")
    elif both:
        log(f"warning: {len(both)} of {len(held)} held-out rows are also in the training split (duplicate rows "
            "in --data); they are dropped from the held-out side")
        return [e for e in held if e.prompt not in seen]
    return list(held)


def run_examples(cfg, tokenizer, check: Callable[[list], list], log, *, train=None, held_out=None
                 ) -> Tuple[List[JudgeExample], List[JudgeExample]]:
    """A training run's examples: loaded from ``cfg`` unless given, real data's held-out rows kept apart
    from the training rows, the method's ``check`` applied to the training rows, chat templates applied."""
    if train is None:
        train, held_out = load_train_and_eval(cfg)
        if cfg.data != ["synthetic"]:
            held_out = held_out_apart(train, held_out, given=bool(cfg.eval_data), log=log)
    if not train:
        raise ValueError("the training data is empty")
    if not held_out:
        log("warning: no held-out examples (too few rows, or all also in the training data): the run is "
            "not evaluated; pass --eval-data or raise --eval-fraction")
    train, held_out = check(list(train)), list(held_out or [])
    train, held_out = with_score_phrase(train, cfg.score_phrase), with_score_phrase(held_out, cfg.score_phrase)
    train = with_chat_templates(train, tokenizer, cfg.chat_template)
    held_out = with_chat_templates(held_out, tokenizer, cfg.chat_template)
    for name, rows in (("training", train), ("held-out", held_out)):
        note = prompt_cut_note(rows, tokenizer, cfg.max_prompt_tokens, name)
        if note:
            log(note)
    return train, held_out


def prompt_cut_note(examples: Sequence[JudgeExample], tokenizer, limit: int, name: str) -> Optional[str]:
    """A line saying how many of ``examples``' prompts are longer than ``limit`` tokens (they keep their last
    ``limit`` tokens, ``real.judge.batching``) and by how much, or None when none is."""
    if not examples:
        return None
    lengths = [len(ids) for ids in tokenizer([e.prompt for e in examples], add_special_tokens=True)["input_ids"]]
    over = sorted(n - limit for n in lengths if n > limit)
    if not over:
        return None
    return (f"note: {len(over)} of {len(lengths)} {name} prompts are longer than --max-prompt-tokens {limit} and "
            f"lose their first tokens: {over[len(over) // 2]} tokens cut at the median, {over[-1]} at most "
            f"(longest prompt {max(lengths)} tokens); raise --max-prompt-tokens to keep them whole")
