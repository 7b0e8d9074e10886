"""``JudgeExample``, one grading task: its own module so that every data source (the Prometheus
files in ``data``, the synthetic task in ``synthetic``) builds it and ``data`` can load them all."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List


@dataclass
class JudgeExample:
    """One grading task: the prompt a judge reads and the score it should give.

    ``target`` is the real-valued ground truth (mean of ``grades``);
    ``feedback[i]`` is the reference CoT for ``grades[i]`` (may be empty);
    ``meta`` holds ``source`` (file stem), ``path``, ``row`` (0-based position
    in the file), ``format`` and every field of the row not used above (e.g.
    the Prometheus files' own ``idx``, which numbers prompts and repeats).
    """

    prompt: str
    target: float
    grades: List[float]
    feedback: List[str] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)
