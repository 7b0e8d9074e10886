"""The ``real`` command: one entry point, one module per subcommand.

Each subcommand lives in its own module exposing ``main(argv) -> int``; this
file only routes to it, so a subcommand's imports (transformers, matplotlib...)
are paid only when it runs.  Commands from other packages come in through the
``real.commands`` entry-point group (name = "module:main"), so ``real`` never imports them by name.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import sys
from typing import Dict, List, Optional, Tuple

SUBCOMMANDS = {
    "demo": ("real.cpu_demo.run", "the built-in demo (the README's main command)"),
    "train": ("real.loop.train_cli", "train a judge with REAL or a baseline (RAFT, TRACT, GRPO)"),
    "eval": ("real.judge.evaluate", "score predictions or a judge model: Pearson / Spearman / Kendall"),
    "plan": ("real.planner.plan", "memory planner: will this model and batch fit on these GPUs?"),
    "data": ("real.judge.download", "download the paper's training set and benchmarks (real data download NAME DIR)"),
}
ENTRY_POINT_GROUP = "real.commands"  # name = "module:main" of a command another package adds


def commands() -> Dict[str, Tuple[str, str]]:
    """name -> (module, help): real's own commands and the installed ``real.commands`` entry points."""
    found = dict(SUBCOMMANDS)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, (ep.module, f"from {ep.module} (see `real {ep.name} --help`)"))
    return found


def _usage() -> str:
    lines = ["usage: real <command> [options]", "", "commands:"]
    lines += [f"  {name:<7} {help_}" for name, (_, help_) in commands().items()]
    lines += ["", "Run `real <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    available = commands()
    if name not in available:
        print(f"real: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _ = available[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == module_name or module_name.startswith(exc.name + ".")):
            print(f"real: command {name!r} is not available in this install ({module_name} missing)", file=sys.stderr)
            return 2
        raise
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
