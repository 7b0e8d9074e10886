"""The synthetic judge task: grading a short quiz against its answer key.

Why it exists: the demo and the tests need a judge task that runs offline, is
learnable by a tiny model in minutes on a CPU, and has the two properties that
make REAL matter on real judge data:

(a) **A chain of thought helps.**  The prompt shows an answer key and a
    response, one digit per question::

        key 3 1 4 2 ans 3 5 4 1 ###Feedback:

    The score is 1 + the number of answers that match the key.  Read straight
    after the prompt, that needs every comparison and the count at one
    position.  The reference CoT spells the work out one question at a time,
    a verdict and a running score::

        yes2 no2 yes3 no3

    so that each CoT token needs one comparison (or one increment) and the
    score after the CoT is a copy of the last running score.  Every question
    takes two tokens in the prompt (digit, space) and two in the CoT (verdict,
    running score), so the digits a CoT token needs sit at fixed distances
    behind it: a tiny model trained from scratch finds them quickly.

(b) **Labels are continuous and noisy.**  Each example has three graders.  A
    grader misjudges each question with probability ``flip_prob`` and then
    shifts the grade by -1 / 0 / +1 with probabilities ``shift_probs``
    (clipped to 1..5).  The target is the mean of the three grades (4.33,
    2.67, ...), so the Bayes-optimal prediction is a real number and a judge
    that only emits an integer loses to one that reports its expected score.
    Each grader's feedback (with its own mistakes) is a reference CoT.

Everything is generated from a seed with ``random.Random`` (no global state),
so the same seed gives the same examples on every machine.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Sequence, Tuple

from real.data import JudgeExample

PROMPT_SUFFIX = "###Feedback:"
YES, NO = "yes", "no"
SOURCE = "synthetic"
EVAL_SEED_OFFSET = 1_000_003  # held-out examples come from a disjoint random stream


@dataclass(frozen=True)
class SyntheticTask:
    """Knobs of the task; the defaults are what the demo uses."""

    n_items: int = 4
    n_graders: int = 3
    flip_prob: float = 0.05
    shift_probs: Tuple[float, float, float] = (0.2, 0.6, 0.2)  # P(-1), P(0), P(+1)

    def __post_init__(self):
        if not 1 <= self.n_items <= 4:
            raise ValueError(f"n_items must be 1..4 (the score is 1 + correct answers, at most 5); got {self.n_items}")
        if self.n_graders < 1:
            raise ValueError(f"n_graders must be >= 1; got {self.n_graders}")
        if not 0.0 <= self.flip_prob < 0.5:
            raise ValueError(f"flip_prob must be in [0, 0.5); got {self.flip_prob}")
        if len(self.shift_probs) != 3 or min(self.shift_probs) < 0 or abs(sum(self.shift_probs) - 1) > 1e-9:
            raise ValueError(f"shift_probs must be three probabilities summing to 1; got {self.shift_probs}")

    @property
    def max_score(self) -> int:
        return self.n_items + 1


def render_prompt(key: Sequence[int], answers: Sequence[int]) -> str:
    return f"key {' '.join(map(str, key))} ans {' '.join(map(str, answers))} {PROMPT_SUFFIX}"


def render_feedback(verdicts: Sequence[bool]) -> str:
    """The worked CoT: per question a verdict and the running score (starting from 1)."""
    running = 1
    parts: List[str] = []
    for ok in verdicts:
        running += int(ok)
        parts.append(f"{YES if ok else NO}{running}")
    return " ".join(parts)


def _clip(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def make_example(rng: random.Random, task: SyntheticTask = SyntheticTask()) -> JudgeExample:
    """One example drawn from ``rng``: the number of correct answers is uniform over 0..n_items."""
    n = task.n_items
    n_correct = rng.randint(0, n)
    correct_items = set(rng.sample(range(n), n_correct))
    key = [rng.randint(0, 9) for _ in range(n)]
    answers = [k if i in correct_items else (k + rng.randint(1, 9)) % 10 for i, k in enumerate(key)]
    correct = [i in correct_items for i in range(n)]
    true_score = 1 + n_correct

    grades: List[float] = []
    feedback: List[str] = []
    for _ in range(task.n_graders):
        verdicts = [ok if rng.random() >= task.flip_prob else not ok for ok in correct]
        shift = rng.choices((-1, 0, 1), weights=task.shift_probs)[0]
        grades.append(float(_clip(1 + sum(verdicts) + shift, 1, task.max_score)))
        feedback.append(render_feedback(verdicts))
    return JudgeExample(
        prompt=render_prompt(key, answers),
        target=sum(grades) / len(grades),
        grades=grades,
        feedback=feedback,
        meta={"source": SOURCE, "key": key, "answers": answers, "true_score": true_score,
              "worked_cot": render_feedback(correct)},
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


def expected_target(example: JudgeExample, task: SyntheticTask = SyntheticTask()) -> float:
    """E[target | prompt] under the task's noise model (the Bayes-optimal prediction), by enumeration."""
    key, answers = example.meta["key"], example.meta["answers"]
    n_correct = sum(int(k == a) for k, a in zip(key, answers))
    n = task.n_items
    # distribution of the number of 'yes' verdicts of one grader: correct items stay yes w.p. 1 - flip,
    # incorrect ones become yes w.p. flip
    dist = [1.0]
    for i in range(n):
        p_yes = (1 - task.flip_prob) if i < n_correct else task.flip_prob
        new = [0.0] * (len(dist) + 1)
        for k, p in enumerate(dist):
            new[k] += p * (1 - p_yes)
            new[k + 1] += p * p_yes
        dist = new
    mean = 0.0
    for yes, p in enumerate(dist):
        for shift, q in zip((-1, 0, 1), task.shift_probs):
            mean += p * q * _clip(1 + yes + shift, 1, task.max_score)
    return mean
