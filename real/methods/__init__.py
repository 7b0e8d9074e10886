"""The training methods, one module each, on the protocol of ``real.methods.base``.

``METHODS`` maps a ``--method`` name to its class; a new method is a new
module with a :class:`~real.methods.base.Method` subclass, registered here.
"""
from __future__ import annotations

from typing import Dict, Type

from real.methods.base import Method, MicroBatch, PolicyGradientMethod, StepBatch
from real.methods.grpo import GRPO
from real.methods.raft import RAFT
from real.methods.real import Real
from real.methods.tract import TRACT

METHODS: Dict[str, Type[Method]] = {cls.name: cls for cls in (Real, GRPO, RAFT, TRACT)}


def method_class(name: str) -> Type[Method]:
    if name not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {name!r}")
    return METHODS[name]


__all__ = ["METHODS", "Method", "MicroBatch", "PolicyGradientMethod", "StepBatch", "method_class",
           "GRPO", "RAFT", "Real", "TRACT"]
