"""The layout holds: no import circles, ``real_kernels.ops`` imports only ``ops`` and ``core``, the folders of
``real`` import only the folders ``FOLDER_IMPORTS`` allows them, no module imports another's private name, and
every module of ``real`` and ``real_kernels`` imports on its own.

The import graph is read from the source (every ``import`` statement, at module level or inside a
function), so a circle hidden behind a function-level import is still a circle here.  Function-level
imports of this project's modules are allowed only where ``LAZY`` lists them, each for an optional
heavy dependency that the importing module must not pay for at import time.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("real", "real_kernels")

# importer -> imported: function-level imports kept on purpose (the reason is the imported module's weight)
LAZY = {
    ("real_kernels.functional", "real_kernels.ops.fused_head"): "triton: CPU torch wheels come without it",
    ("real_kernels.loss", "real_kernels.ops.chunk_pass"): "triton",
    ("real.judge.evaluate", "real.model.loading"): "transformers: `real eval --predictions` scores a file without it",
    ("real.judge.evaluate", "real.judge.inference"): "torch and transformers, as above",
    ("real.judge.evaluate", "real.model.tiny"): "transformers, as above",
    ("real.cpu_demo.run", "real.cpu_demo.plots"): "matplotlib",
    ("real.cpu_demo.report", "real.cpu_demo.plots"): "matplotlib",
    **{("real_kernels.ops.compile_check", f"real_kernels.{m}"): "triton and torch: the check imports them when it runs"
       for m in ("core.sizing", "ops.chunk_pass", "ops.head_config", "ops.head_launches")},
}

# folder -> the other folders its modules may import (``real_kernels`` counts as one folder here; its own order is
# test_ops_imports_only_ops_and_core's).  Read top to bottom, each folder imports only folders above it: an order,
# so a new import up it (say ``real.model`` -> ``real.loop``) fails test_folders_import_only_the_folders_below.
FOLDER_IMPORTS: Dict[str, Set[str]] = {
    "real_kernels": set(),  # the kernels never import real
    "real.judge": set(),  # prompts, data, batching, metrics: nothing of real (but UPWARD_EXCEPTIONS)
    "real.model": {"real.judge", "real_kernels"},  # loading, tiny, the head pass; checkpoint_files reads a checkpoint
    "real.multi_gpu": {"real_kernels"},
    "real.methods": {"real.judge", "real.model", "real.multi_gpu"},
    "real.loop": {"real_kernels", "real.judge", "real.model", "real.multi_gpu", "real.methods"},
    "real.planner": {"real_kernels"},
    "real.cpu_demo": {"real.judge", "real.methods", "real.loop"},
    "real": set(),  # real/cli.py routes to each command's module by name (importlib), importing none of them
}

# importer -> imported module: imports up FOLDER_IMPORTS's order, kept on purpose (each is an edge between two
# modules, not a folder, so another module of the folder doing the same still fails)
UPWARD_EXCEPTIONS = {
    ("real.judge.inference", "real.model.head"): "RAIL inference runs the judge's head pass (score_forward)",
    ("real.judge.evaluate", "real.model.loading"): "`real eval --model` loads the judge (lazily, see LAZY)",
    ("real.judge.evaluate", "real.model.tiny"): "`real eval --model tiny` (lazily, see LAZY)",
    ("real.judge.evaluate", "real.model.checkpoint_files"): "a `real train` checkpoint's train_config.json "
                                                           "(its --score-phrase); stdlib-only at import",
}


def _modules() -> Dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: Dict[str, Path]) -> List[Tuple[str, List[str], bool]]:
    """(imported module, imported names, inside a function) for each import of this project's modules."""
    is_pkg = path.name == "__init__.py"
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, [], in_function) for a in child.names if a.name in modules)
            elif isinstance(child, ast.ImportFrom):
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                if child.level:
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                for alias in child.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:
                        found.append((sub, [], in_function))
                    elif target in modules:
                        found.append((target, [alias.name], in_function))
            visit(child, nested)

    visit(ast.parse(path.read_text()), False)
    return found


def _graph():
    modules = _modules()
    return modules, {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_circles():
    modules, graph = _graph()
    edges: Dict[str, Set[str]] = {m: {t for t, _, _ in graph[m] if t != m} for m in modules}
    state: Dict[str, int] = {}
    cycles = []

    def walk(node, stack):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(modules):
        if module not in state:
            walk(module, [module])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_function_level_imports_are_the_listed_lazy_ones():
    _, graph = _graph()
    hidden = sorted({(m, t) for m, imports in graph.items() for t, _, lazy in imports if lazy} - set(LAZY))
    assert not hidden, f"function-level imports of this project's modules not in LAZY: {hidden}"


def test_ops_imports_only_ops_and_core():
    _, graph = _graph()
    upward = [(m, t) for m, imports in graph.items() if m.startswith("real_kernels.ops")
              for t, _, _ in imports
              if not t.startswith(("real_kernels.ops", "real_kernels.core"))]
    core_out = [(m, t) for m, imports in graph.items() if m.startswith("real_kernels.core")
                for t, _, _ in imports if not t.startswith("real_kernels.core")]
    assert not upward and not core_out, f"ops -> above: {upward}; core -> outside core: {core_out}"


def test_no_module_imports_a_private_name():
    _, graph = _graph()
    private = [(m, t, n) for m, imports in graph.items() for t, names, _ in imports for n in names
               if n.startswith("_") and not n.startswith("__")]
    assert not private, f"private names imported from another module: {private}"


def test_every_module_imports_in_a_fresh_interpreter():
    modules = sorted(_modules())
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    proc = subprocess.run([sys.executable, "-c", code, *modules], cwd=str(REPO), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _folder(path: Path) -> str:
    """``real_kernels``, ``real.<subfolder>``, or ``real`` for the modules at the top of ``real/``."""
    parts = path.relative_to(REPO).parts
    if parts[0] == "real" and len(parts) > 2:
        return f"real.{parts[1]}"
    return parts[0]


def test_folder_table_is_an_order():
    names = list(FOLDER_IMPORTS)
    later = [(a, b) for a, allowed in FOLDER_IMPORTS.items() for b in allowed
             if b not in FOLDER_IMPORTS or names.index(b) >= names.index(a)]
    assert not later, f"FOLDER_IMPORTS lets a folder import itself, a later one or an unknown one: {later}"


def test_folders_import_only_the_folders_below():
    modules, graph = _graph()
    folders = {m: _folder(path) for m, path in modules.items()}
    unknown = sorted({f for f in folders.values() if f not in FOLDER_IMPORTS})
    assert not unknown, f"folders missing from FOLDER_IMPORTS (say what they may import): {unknown}"
    upward = sorted({(m, t) for m, imports in graph.items() for t, _, _ in imports
                     if folders[t] != folders[m] and folders[t] not in FOLDER_IMPORTS[folders[m]]}
                    - set(UPWARD_EXCEPTIONS))
    assert not upward, f"imports that FOLDER_IMPORTS does not allow (importer, imported): {upward}"
    used = {(m, t) for m, imports in graph.items() for t, _, _ in imports}
    stale = sorted(set(UPWARD_EXCEPTIONS) - used)
    assert not stale, f"UPWARD_EXCEPTIONS lists imports that no longer exist (remove them): {stale}"
