"""How a setting of `real train` is declared, and the base of each method's own section of them.

A setting is a dataclass field made by :func:`setting`: its default, its
``--help`` line, its allowed values and the help group it is listed under.  The
common settings live in ``real.loop.config.TrainConfig``; the settings that only
one method (or the two policy-gradient methods) reads live in that method's
section, a :class:`MethodConfig` subclass named by the method's
``config_class``.  The parser, the file loader and ``--print-config`` are
generated from these declarations (``real.loop.config``), so a flag, a config
key and its help line cannot drift apart, and a setting given for a method that
does not read it is an error that names it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields


def setting(default, help_: str, choices=None, group: str = "training"):
    """A dataclass field with its help text, allowed values and help group in its metadata."""
    meta = {"help": help_, "choices": choices, "group": group}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def check_fields(obj, non_negative=(), positive=()) -> None:
    """Shared checks of a settings dataclass: allowed values, finite numbers, signs; errors name the setting."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ValueError(f"{f.name} must be one of {', '.join(choices)}; got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):  # --lr inf would train until the weights are NaN
            raise ValueError(f"{f.name} must be a finite number; got {value!r}")
    for name in positive:
        if getattr(obj, name) <= 0:
            raise ValueError(f"{name} must be > 0; got {getattr(obj, name)!r}")
    for name in non_negative:
        if getattr(obj, name) < 0:
            raise ValueError(f"{name} must be >= 0; got {getattr(obj, name)!r}")


@dataclass
class MethodConfig:
    """A method's own settings (none here); subclasses add fields made by :func:`setting`."""

    NON_NEGATIVE = ()
    POSITIVE = ()

    def validate(self) -> "MethodConfig":
        check_fields(self, self.NON_NEGATIVE, self.POSITIVE)
        return self
