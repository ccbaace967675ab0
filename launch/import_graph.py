"""The package's import graph, read from the source with `ast` (nothing is imported).

    python launch/import_graph.py [MODULE ...] [--lazy] [--third_party]

For each MODULE (default: the inference and serving entry points and every networks/ module) it prints the
musiclm_jax modules that importing it loads, directly or through others: the module-level imports, followed
transitively. Imports inside functions run only when the function does; `--lazy` follows them too (marked `*`
where only a lazy import reaches a module). `--third_party` adds the top-level third-party packages reached
(e.g. tensorflow, seqio, torch; the standard library left out). With no module named, it also checks the
layering rules the README states and exits 1 if one is broken: networks/ import only networks/ and the building
blocks (NETWORK_BLOCKS: layers, partitioning's axis names, weight precision, spectral transforms, the VQ
library), never models, the trainer, data or gin; the inference modules reach neither TensorFlow nor seqio nor
the data layer at import time.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
from typing import Iterable

PACKAGE = "musiclm_jax"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)
# What a serving or generating process loads; none of them may pull TensorFlow, seqio or data/ at import time.
INFERENCE = ("musiclm_jax.serving.bundle", "musiclm_jax.generation.pipeline",
             "musiclm_jax.generation.stage_sampling", "musiclm_jax.generation.params", "musiclm_jax.codec.inference",
             "musiclm_jax.mulan.inference", "musiclm_jax.semantic.inference", "musiclm_jax.checkpoint_loading")
FORBIDDEN_FOR_INFERENCE = ("tensorflow", "seqio", "tensorflow_datasets", "musiclm_jax.data", "musiclm_jax.tasks")
# What networks/ may import besides networks/: pure JAX building blocks with no training, data or gin.
NETWORK_BLOCKS = ("layers", "partitioning", "weight_precision", "spectral", "vq", "kmeans")


def modules() -> dict[str, str]:
    """{dotted module name: file path} of every module of the package."""
    found = {}
    for directory, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            parts = os.path.relpath(path, os.path.dirname(ROOT))[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(path: str, module: str, is_package: bool) -> list[tuple[str, bool]]:
    """(imported name, lazy) of every import statement in the file: lazy when inside a function."""
    tree = ast.parse(open(path).read(), path)
    out = []

    def visit(node, lazy):
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[:len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                out.append((base, lazy))
                out.extend((f"{base}.{a.name}", lazy) for a in child.names)  # `from pkg import module`
            visit(child, inner)
    visit(tree, False)
    return out


def graph(known: dict[str, str]) -> dict[str, list[tuple[str, bool]]]:
    """{module: [(imported project module or third-party top-level package, lazy)]}."""
    edges = {}
    for module, path in known.items():
        targets = []
        for name, lazy in _imports(path, module, path.endswith("__init__.py")):
            if name.split(".")[0] != PACKAGE:
                targets.append((name.split(".")[0], lazy))
                continue
            while name and name not in known:  # `from musiclm_jax.x import function` -> musiclm_jax.x
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.append((name, lazy))
        edges[module] = sorted(set(targets))
    return edges


def reached(edges: dict, start: str, lazy: bool) -> dict[str, bool]:
    """{module or package reached from `start`: True if only through a lazy import}, start excluded."""
    best: dict[str, bool] = {}
    stack = [(start, False)]
    while stack:
        module, through_lazy = stack.pop()
        for target, is_lazy in edges.get(module, ()):
            if is_lazy and not lazy:
                continue
            flag = through_lazy or is_lazy
            if target in best and (not best[target] or flag):
                continue
            best[target] = flag
            stack.append((target, flag))
    best.pop(start, None)
    # A package's __init__ is loaded with any of its modules.
    for name in list(best):
        parent = name.rpartition(".")[0]
        while parent.startswith(PACKAGE + ".") or parent == PACKAGE:
            if parent in edges and parent != start:
                best.setdefault(parent, best[name])
            parent = parent.rpartition(".")[0]
    return best


def layering_errors(edges: dict) -> list[str]:
    """The README's layering rules that the graph breaks (empty: none)."""
    errors = []
    for module in sorted(m for m in edges if m.startswith(f"{PACKAGE}.networks.")):
        for target, lazy in edges[module]:
            allowed = [PACKAGE, f"{PACKAGE}.networks"] + [f"{PACKAGE}.{b}" for b in NETWORK_BLOCKS]
            if target.startswith(PACKAGE) and not lazy and not (
                    target in allowed or target.startswith(f"{PACKAGE}.networks.")):
                errors.append(f"{module} imports {target}: networks/ import only networks/ and {NETWORK_BLOCKS}")
            if target in ("gin", "tensorflow", "seqio"):
                errors.append(f"{module} imports {target}: networks/ take their configuration as dataclasses")
    for module in INFERENCE:
        for target, _ in reached(edges, module, lazy=False).items():
            if any(target == f or target.startswith(f + ".") for f in FORBIDDEN_FOR_INFERENCE):
                errors.append(f"importing {module} loads {target}")
    return errors


def report(edges: dict, roots: Iterable[str], lazy: bool, third_party: bool, out=sys.stdout) -> None:
    for root in roots:
        if root not in edges:
            raise SystemExit(f"import_graph: no module {root!r} in {ROOT}")
        found = reached(edges, root, lazy)
        ours = sorted(m for m in found if m.startswith(PACKAGE))
        shown = [m[len(PACKAGE) + 1:] + ("*" if found[m] else "") for m in ours if m != PACKAGE]
        print(f"{root} ({len(shown)}): {', '.join(shown) or '-'}", file=out)
        if third_party:
            others = sorted(m + ("*" if found[m] else "") for m in found
                            if not m.startswith(PACKAGE) and m not in sys.stdlib_module_names)
            print(f"  third-party: {', '.join(others) or '-'}", file=out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*")
    parser.add_argument("--lazy", action="store_true", help="follow imports inside functions too")
    parser.add_argument("--third_party", action="store_true", help="list the third-party packages reached")
    args = parser.parse_args(argv)
    edges = graph(modules())
    roots = args.modules or list(INFERENCE) + ["musiclm_jax.serve"] + sorted(
        m for m in edges if m.startswith(f"{PACKAGE}.networks."))
    report(edges, roots, args.lazy, args.third_party)
    if args.modules:
        return 0
    errors = layering_errors(edges)
    for error in errors:
        print(f"layering: {error}")
    print(f"layering: {'ok' if not errors else f'{len(errors)} broken'}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
