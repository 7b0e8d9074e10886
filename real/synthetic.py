"""The synthetic judge task: grading a short quiz against its answer key.

Why it exists: the demo and the tests need a judge task that runs offline, is
learnable by a tiny model in minutes on a CPU, and has the properties that make
REAL matter on real judge data.

**The prompt** shows, per question, the key digit and the response's digit side
by side::

    key ans 33 15 44 21
    ###Feedback:

The true score is 1 + the number of answers equal to the key (here 3).

**(a) A chain of thought helps.**  Read straight after the prompt, the score
needs every comparison and their count at one position.  The CoT spells the
work out one question at a time, a verdict and a running score
(``real.prompts.format_cot`` adds the ``Feedback:`` prefix and the
``[RESULT] N`` ending)::

    Feedback: yes 2 no 2 yes 3 no 3 [RESULT] 3

so each CoT token needs one comparison or one increment, and the score after
the CoT is a copy of the last running score.  A question takes three tokens in
the prompt (space, key, answer) and three in the CoT (verdict, space, running
score), so what a CoT token needs sits at a fixed distance behind it: a tiny
model trained from scratch finds it within a few hundred steps.

**(b) Labels are continuous and noisy.**  Three careful graders grade each
response: each misjudges a question with probability ``flip_prob``, then
shifts the grade by -1 / 0 / +1 with probabilities ``shift_probs`` (clipped to
1..5).  The target is the mean of the three grades (4.33, 2.67, ...): the
Bayes-optimal prediction is a real number, so a judge that reports its expected
score beats one that emits an integer.

**(c) The reference CoTs are flawed, the labels are not.**  As with real judge
data, where the written rationales come from a cheaper source than the
grades, the reference CoT is written by a sloppy annotator who overlooks near
misses: a wrong answer one off the key (``near_miss_share`` of the wrong
answers) is marked ``yes`` with probability ``sloppy_prob``.  Imitating the
reference CoTs (TRACT) therefore learns to over-count, and more imitation only
learns it better; training on the labels through the model's own CoTs (REAL,
GRPO) can learn to mark near misses ``no``.

Everything is drawn from a seed with ``random.Random`` (no global state), so
the same seed gives the same examples on every machine.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Sequence, Tuple

from real.data import JudgeExample

PROMPT_SUFFIX = "###Feedback: "  # the Prometheus template's ending; the CoT is format_cot(feedback, grade)
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
    near_miss_share: float = 0.5
    sloppy_prob: float = 0.8

    def __post_init__(self):
        if not 1 <= self.n_items <= 4:
            raise ValueError(f"n_items must be 1..4 (the score is 1 + correct answers, at most 5); got {self.n_items}")
        if self.n_graders < 1:
            raise ValueError(f"n_graders must be >= 1; got {self.n_graders}")
        for name in ("flip_prob", "near_miss_share", "sloppy_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {value}")
        if self.flip_prob >= 0.5:
            raise ValueError(f"flip_prob must be < 0.5; got {self.flip_prob}")
        if len(self.shift_probs) != 3 or min(self.shift_probs) < 0 or abs(sum(self.shift_probs) - 1) > 1e-9:
            raise ValueError(f"shift_probs must be three probabilities summing to 1; got {self.shift_probs}")

    @property
    def max_score(self) -> int:
        return self.n_items + 1


def render_prompt(key: Sequence[int], answers: Sequence[int]) -> str:
    pairs = " ".join(f"{k}{a}" for k, a in zip(key, answers))
    return f"key ans {pairs}\n{PROMPT_SUFFIX}"


def render_feedback(verdicts: Sequence[bool]) -> str:
    """The worked CoT body: per question a verdict and the running score (starting from 1)."""
    running = 1
    parts: List[str] = []
    for ok in verdicts:
        running += int(ok)
        parts.append(f"{YES if ok else NO} {running}")
    return " ".join(parts)


def _clip(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def _wrong_answer(rng: random.Random, key: int, near_miss_share: float) -> int:
    if rng.random() < near_miss_share:
        return (key + rng.choice((-1, 1))) % 10
    return (key + rng.randint(2, 8)) % 10  # at least two off, either way round


def is_near_miss(key: int, answer: int) -> bool:
    return (answer - key) % 10 in (1, 9)


def make_example(rng: random.Random, task: SyntheticTask = SyntheticTask()) -> JudgeExample:
    """One example drawn from ``rng``: the number of correct answers is uniform over 0..n_items."""
    n = task.n_items
    n_correct = rng.randint(0, n)
    correct_items = set(rng.sample(range(n), n_correct))
    key = [rng.randint(0, 9) for _ in range(n)]
    answers = [k if i in correct_items else _wrong_answer(rng, k, task.near_miss_share) for i, k in enumerate(key)]
    correct = [i in correct_items for i in range(n)]

    grades: List[float] = []
    for _ in range(task.n_graders):
        verdicts = [ok if rng.random() >= task.flip_prob else not ok for ok in correct]
        shift = rng.choices((-1, 0, 1), weights=task.shift_probs)[0]
        grades.append(float(_clip(1 + sum(verdicts) + shift, 1, task.max_score)))
    sloppy = [ok or (is_near_miss(k, a) and rng.random() < task.sloppy_prob)
              for ok, k, a in zip(correct, key, answers)]
    return JudgeExample(
        prompt=render_prompt(key, answers),
        target=sum(grades) / len(grades),
        grades=grades,
        feedback=[render_feedback(sloppy)],
        meta={"source": SOURCE, "key": key, "answers": answers, "true_score": 1 + n_correct,
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
    """E[target | prompt] under the graders' noise model (the Bayes-optimal prediction), by enumeration."""
    n_correct = sum(int(k == a) for k, a in zip(example.meta["key"], example.meta["answers"]))
    # number of 'yes' verdicts of one grader: a correct answer stays yes w.p. 1 - flip, a wrong one
    # becomes yes w.p. flip
    dist = [1.0]
    for i in range(task.n_items):
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


def sloppy_target(example: JudgeExample, task: SyntheticTask = SyntheticTask()) -> float:
    """What imitating the reference CoTs predicts on average: near misses count as correct w.p. sloppy_prob."""
    key, answers = example.meta["key"], example.meta["answers"]
    n_correct = sum(int(k == a) for k, a in zip(key, answers))
    n_near = sum(int(is_near_miss(k, a)) for k, a in zip(key, answers))
    return 1 + n_correct + task.sloppy_prob * n_near
