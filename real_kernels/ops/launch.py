"""One kernel launch as data: what runs, on which grid, with which arguments.

The launch sites build ``Launch`` objects and call them; the compile check
(``compile_check.py``) builds the very same objects from meta tensors at the
benchmark shapes and hands them to Triton's compiler, so what it checks is what
a real launch compiles: the same constexprs, block sizes, warps, stages, and
the argument specialisations (16-byte aligned pointers, integers divisible by 16)
that Triton's JIT would derive from these arguments.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Tuple


@dataclass
class Launch:
    name: str
    kernel: Any  # a triton.JITFunction
    grid: Tuple[int, ...]
    args: Dict[str, Any]  # runtime arguments, by name
    constexprs: Dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2

    def __call__(self) -> None:
        self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)
