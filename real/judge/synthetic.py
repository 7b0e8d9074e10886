"""The synthetic judge task: grading a short quiz against its answer key, with a running score.

Why it exists: the demo and the tests need a judge task that runs offline, is
learnable by a tiny model in minutes on a CPU, and has the properties that make
REAL matter on real judge data.

**The prompt** shows, per question, the key digit and the response's digit side
by side::

    key ans 33 15 44 21 77 90
    ###Feedback:

**The grading rule** is a running score: it starts at 1, goes up by one for an
answer equal to the key and down by one for a wrong one, and never leaves
1..5.  The grade is where it ends (here: 2 1 2 1 2 1, so 1).

**(a) A chain of thought helps.**  Because the running score is clipped, the
grade depends on the *order* of right and wrong answers, not just on how many
there are: read straight after the prompt, the model must replay the whole walk
at one position (the number of matches alone correlates only about 0.78 with
the labels, against 0.92 for the rule itself).  The CoT writes the walk down,
one question at a time, a verdict and the running score
(``real.judge.prompts.format_cot`` adds the ``Feedback:`` prefix and the
``[RESULT] N`` ending)::

    Feedback: yes 2 no 1 yes 2 no 1 yes 2 no 1 [RESULT] 1

so each CoT token needs one comparison or one clipped increment of the score
just written, and the grade after the CoT is a copy of the last running score.
A question takes three tokens in the prompt (space, key, answer) and three in
the CoT (verdict, space, running score), so what a CoT token needs sits at a
fixed distance behind it, which a tiny model trained from scratch finds.

**(b) Labels are continuous and noisy.**  Three careful graders grade each
response: each misjudges a question with probability ``flip_prob``, walks the
running score with their verdicts, then shifts the grade by -1 / 0 / +1 with
probabilities ``shift_probs`` (clipped to 1..5).  The target is the mean of
the three grades (4.33, 2.67, ...): the Bayes-optimal prediction is a real
number, so a judge that reports its expected score beats one that emits an
integer.

**(c) The reference CoTs are flawed, the labels are not.**  As with real judge
data, where the written rationales come from a cheaper source than the grades,
the reference CoT is written by a sloppy annotator who overlooks near misses:
a wrong answer one off the key (``near_miss_share`` of the wrong answers) is
marked ``yes`` with probability ``sloppy_prob``.  Imitating the reference CoTs
(TRACT) learns to over-score, and more imitation only learns it better;
training on the labels through the model's own CoTs (REAL, GRPO) can learn to
mark near misses ``no``.

Everything is drawn from a seed with ``random.Random`` (no global state), so
the same seed gives the same examples on every machine.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import List, Sequence, Tuple

from real.judge.example import JudgeExample

PROMPT_SUFFIX = "###Feedback: "  # the Prometheus template's ending; the CoT is format_cot(feedback, grade)
YES, NO = "yes", "no"
SOURCE = "synthetic"
EVAL_SEED_OFFSET = 1_000_003  # held-out examples come from a disjoint random stream
LOW, HIGH = 1, 5


@dataclass(frozen=True)
class SyntheticTask:
    """Knobs of the task; the defaults are what the demo uses."""

    n_items: int = 6
    start: int = 1
    correct_prob: float = 0.5
    n_graders: int = 3
    flip_prob: float = 0.05
    shift_probs: Tuple[float, float, float] = (0.2, 0.6, 0.2)  # P(-1), P(0), P(+1)
    near_miss_share: float = 0.5
    sloppy_prob: float = 0.8

    def __post_init__(self):
        if not 1 <= self.n_items <= 10:
            raise ValueError(f"n_items must be 1..10; got {self.n_items}")
        if not LOW <= self.start <= HIGH:
            raise ValueError(f"start must be in {LOW}..{HIGH}; got {self.start}")
        if self.n_graders < 1:
            raise ValueError(f"n_graders must be >= 1; got {self.n_graders}")
        for name in ("correct_prob", "flip_prob", "near_miss_share", "sloppy_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {value}")
        if self.flip_prob >= 0.5:
            raise ValueError(f"flip_prob must be < 0.5; got {self.flip_prob}")
        if len(self.shift_probs) != 3 or min(self.shift_probs) < 0 or abs(sum(self.shift_probs) - 1) > 1e-9:
            raise ValueError(f"shift_probs must be three probabilities summing to 1; got {self.shift_probs}")


def _clip(value: int) -> int:
    return max(LOW, min(HIGH, value))


def running_scores(verdicts: Sequence[bool], start: int = 1) -> List[int]:
    """The score after each question: +1 for a right answer, -1 for a wrong one, kept in 1..5."""
    score, out = start, []
    for ok in verdicts:
        score = _clip(score + (1 if ok else -1))
        out.append(score)
    return out


def render_prompt(key: Sequence[int], answers: Sequence[int]) -> str:
    pairs = " ".join(f"{k}{a}" for k, a in zip(key, answers))
    return f"key ans {pairs}\n{PROMPT_SUFFIX}"


def render_feedback(verdicts: Sequence[bool], start: int = 1) -> str:
    """The worked CoT body: per question a verdict and the running score."""
    return " ".join(f"{YES if ok else NO} {s}" for ok, s in zip(verdicts, running_scores(verdicts, start)))


def _wrong_answer(rng: random.Random, key: int, near_miss_share: float) -> int:
    if rng.random() < near_miss_share:
        return (key + rng.choice((-1, 1))) % 10
    return (key + rng.randint(2, 8)) % 10  # at least two off, either way round


def is_near_miss(key: int, answer: int) -> bool:
    return (answer - key) % 10 in (1, 9)


def make_example(rng: random.Random, task: SyntheticTask = SyntheticTask()) -> JudgeExample:
    """One example drawn from ``rng``."""
    key = [rng.randint(0, 9) for _ in range(task.n_items)]
    correct = [rng.random() < task.correct_prob for _ in range(task.n_items)]
    answers = [k if ok else _wrong_answer(rng, k, task.near_miss_share) for k, ok in zip(key, correct)]
    grades: List[float] = []
    for _ in range(task.n_graders):
        verdicts = [ok if rng.random() >= task.flip_prob else not ok for ok in correct]
        shift = rng.choices((-1, 0, 1), weights=task.shift_probs)[0]
        grades.append(float(_clip(running_scores(verdicts, task.start)[-1] + shift)))
    sloppy = [ok or (is_near_miss(k, a) and rng.random() < task.sloppy_prob)
              for ok, k, a in zip(correct, key, answers)]
    return JudgeExample(
        prompt=render_prompt(key, answers),
        target=sum(grades) / len(grades),
        grades=grades,
        feedback=[render_feedback(sloppy, task.start)],
        meta={"source": SOURCE, "key": key, "answers": answers,
              "true_score": running_scores(correct, task.start)[-1], "n_correct": sum(correct),
              "worked_cot": render_feedback(correct, task.start)},
    )


def make_examples(n: int, seed: int = 0, task: SyntheticTask = SyntheticTask()) -> List[JudgeExample]:
    """``n`` examples, a pure function of (n, seed, task)."""
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    rng = random.Random(seed)
    examples = [make_example(rng, task) for _ in range(n)]
    for i, ex in enumerate(examples):
        ex.meta["row"] = i
    return examples


def make_splits(train_size: int, eval_size: int, seed: int = 0,
                task: SyntheticTask = SyntheticTask()) -> Tuple[List[JudgeExample], List[JudgeExample]]:
    """A training split and a held-out split from disjoint random streams."""
    return make_examples(train_size, seed, task), make_examples(eval_size, seed + EVAL_SEED_OFFSET, task)


def _expected_grade(p_yes: Sequence[float], task: SyntheticTask) -> float:
    """E[grade] when question i gets a 'yes' verdict independently with probability p_yes[i]."""
    mean = 0.0
    for verdicts in itertools.product((True, False), repeat=len(p_yes)):
        p = 1.0
        for ok, q in zip(verdicts, p_yes):
            p *= q if ok else 1 - q
        if p == 0.0:
            continue
        end = running_scores(verdicts, task.start)[-1]
        mean += p * sum(w * _clip(end + s) for s, w in zip((-1, 0, 1), task.shift_probs))
    return mean


def expected_target(example: JudgeExample, task: SyntheticTask = SyntheticTask()) -> float:
    """E[target | prompt] under the graders' noise model (the Bayes-optimal prediction), by enumeration."""
    correct = [k == a for k, a in zip(example.meta["key"], example.meta["answers"])]
    return _expected_grade([1 - task.flip_prob if ok else task.flip_prob for ok in correct], task)


def sloppy_target(example: JudgeExample, task: SyntheticTask = SyntheticTask()) -> float:
    """What following the sloppy annotator's verdicts predicts: near misses count as right w.p. sloppy_prob."""
    p_yes = [1.0 if k == a else task.sloppy_prob if is_near_miss(k, a) else 0.0
             for k, a in zip(example.meta["key"], example.meta["answers"])]
    return _expected_grade(p_yes, task)
