"""The import graph of ``src/sluiceway`` follows the layers of ``docs/architecture.md``.

Every import is read with :mod:`ast` -- at module level, inside functions, under
``TYPE_CHECKING``, relative ones resolved -- and each module is mapped to a layer by
:data:`LAYERS`.  A module may import modules of its own layer or of a lower one, never of a
higher one; a few pairs of layers are kept apart although the order would allow them
(:data:`APART`); no two modules may import each other, directly or round a cycle; and every
module must be placed in a layer, so a new package says where it sits.

The checker itself is tested on small made-up module trees below, so a failure of the real
check is known to mean what it says.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"

#: The layers, lowest first.  An entry names a module and everything under it; the longest
#: matching entry wins (so ``sluiceway.metrics.registry`` can sit lower than the rest of
#: ``sluiceway.metrics``).  The root package ``sluiceway`` matches only itself.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # Pure foundations: the exception tree and the injected clock.  Import nothing of ours.
    ("foundation", ("sluiceway.errors", "sluiceway.time")),
    # Contracts and in-band types: Source/Sink, Batch/Watermark/Barrier, the bounded
    # channel, query answers, the graph description, per-partition state deltas.
    ("core", ("sluiceway.core",)),
    # Implementations of the core contract: they need the core and nothing of the engine.
    ("connectors", ("sluiceway.connectors",)),
    # Building blocks the operators configure themselves with: error policies, limiters,
    # aggregators, keyed-state API, window assigners, counters, the checkpoint store.
    (
        "support",
        (
            "sluiceway.agg",
            "sluiceway.checkpoint",
            "sluiceway.diskstate",
            "sluiceway.flowcontrol",
            "sluiceway.metrics.histogram",
            "sluiceway.metrics.registry",
            "sluiceway.policies",
            "sluiceway.state",
            "sluiceway.watermarks",
            "sluiceway.windows.assigners",
        ),
    ),
    # Operators: one spec (frozen config) and one step (running code) each.
    ("operators", ("sluiceway.operators", "sluiceway.windows", "sluiceway.joins")),
    # The logical graph and the physical plan built from it (and its description).
    ("plan", ("sluiceway.flow", "sluiceway.plan")),
    # Runs a plan: stage tasks, the handle, checkpoint coordination, load control.
    ("runtime", ("sluiceway.runtime",)),
    # What watches or drives a running flow from outside: exporters, views, test helpers.
    (
        "services",
        ("sluiceway.metrics", "sluiceway.console", "sluiceway.graph", "sluiceway.testing"),
    ),
    # Reserved: workers, partition assignment, per-partition state handover, commit.
    ("scaleout", ("sluiceway.scaleout",)),
    # The public names users import (``import sluiceway as sw``, ``sw.sources``...).
    ("api", ("sluiceway", "sluiceway.sources", "sluiceway.sinks")),
    # The command line: the only place that wires a process together.
    ("cli", ("sluiceway.cli", "sluiceway.checkpoint.cli", "sluiceway.demo", "sluiceway.__main__")),
)

#: Pairs (importer layer, imported layer) kept apart although the order would allow it.
APART: Mapping[tuple[str, str], str] = {
    ("operators", "connectors"): "operators use the Source/Sink contract in sluiceway.core",
    ("plan", "connectors"): "the flow and the plan use the contract in sluiceway.core",
    ("runtime", "connectors"): "the runtime never names a connector (sluiceway.core)",
    ("services", "operators"): (
        "views read the plan's graph description (sluiceway.plan.topology, "
        "sluiceway.core.topology), never operator specs"
    ),
}


#: Old homes of what moved into the core, kept as re-exports for users' code only.
SHIMS = frozenset(
    {
        "sluiceway.connectors.base",
        "sluiceway.runtime.channel",
        "sluiceway.runtime.messages",
        "sluiceway.runtime.query",
    }
)


@dataclass(frozen=True, slots=True)
class Import:
    """One import statement's target inside the package, with where it was written."""

    importer: str
    target: str
    path: str
    line: int
    text: str


def module_name(path: Path, root: Path) -> tuple[str, bool]:
    """``(dotted name, is a package)`` of a file under ``root`` (the ``src`` folder)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def imports_of(
    name: str, is_package: bool, source: str, path: str, known: set[str], top: str
) -> list[Import]:
    """Every import of a module of package ``top`` written anywhere in ``source``.

    ``from a.b import c`` counts as importing ``a.b.c`` when that is a module, else ``a.b``;
    a name that is not itself a module falls back to its closest known parent."""
    found: list[Import] = []
    for node in ast.walk(ast.parse(source, filename=path)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join([*base, *([node.module] if node.module else [])])
            else:
                prefix = node.module or ""
            for alias in node.names:
                sub = f"{prefix}.{alias.name}"
                targets.append(sub if sub in known else prefix)
        else:
            continue
        resolved: dict[str, None] = {}  # one entry per module, in order
        for written in targets:
            if written != top and not written.startswith(top + "."):
                continue
            target = written
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != name:
                resolved[target] = None
        found += [Import(name, t, path, node.lineno, ast.unparse(node)) for t in resolved]
    return found


def layer_of(module: str, layers: Sequence[tuple[str, Sequence[str]]], top: str) -> str | None:
    best: tuple[int, str] | None = None
    for layer, entries in layers:
        for entry in entries:
            matches = module == entry or (entry != top and module.startswith(entry + "."))
            if matches and (best is None or len(entry) > best[0]):
                best = (len(entry), layer)
    return None if best is None else best[1]


def cycles(edges: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def check(
    files: Mapping[str, str],
    *,
    layers: Sequence[tuple[str, Sequence[str]]] = LAYERS,
    apart: Mapping[tuple[str, str], str] = APART,
    shims: frozenset[str] = SHIMS,
    top: str = "sluiceway",
) -> list[str]:
    """The problems of a tree given as ``{path relative to src: source text}``."""
    modules: dict[str, tuple[str, bool]] = {}
    for path in files:
        name, is_package = module_name(Path(path), Path())
        modules[name] = (path, is_package)
    known = set(modules)
    rank = {layer: i for i, (layer, _) in enumerate(layers)}
    problems: list[str] = []
    placed: dict[str, str] = {}
    for name, (path, _) in sorted(modules.items()):
        layer = layer_of(name, layers, top)
        if layer is None:
            problems.append(
                f"{path}: module {name} is in no layer: add it to LAYERS in tests/test_layers.py "
                "and to the drawing in docs/architecture.md"
            )
        else:
            placed[name] = layer
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_package) in sorted(modules.items()):
        for imp in imports_of(name, is_package, files[path], path, known, top):
            edges[name].add(imp.target)
            where = f"{imp.path}:{imp.line}: `{imp.text}`"
            if imp.target in shims:
                problems.append(
                    f"{where}: {imp.target} is a re-export kept for users; import from "
                    "where it lives now (sluiceway.core)"
                )
            mine, theirs = placed.get(name), placed.get(imp.target)
            if mine is None or theirs is None:
                continue
            if rank[theirs] > rank[mine]:
                problems.append(
                    f"{where}: {name} ({mine}) imports {imp.target} ({theirs}), a higher layer; "
                    f"the {mine} layer may import only itself and the layers below it"
                )
            elif (mine, theirs) in apart:
                problems.append(
                    f"{where}: {name} ({mine}) imports {imp.target} ({theirs}): "
                    f"{apart[mine, theirs]}"
                )
    for component in cycles(edges):
        problems.append("import cycle between modules: " + " <-> ".join(component))
    return problems


def source_tree(root: Path = SRC) -> dict[str, str]:
    return {
        str(path.relative_to(root)): path.read_text(encoding="utf-8")
        for path in sorted((root / "sluiceway").rglob("*.py"))
    }


def test_src_follows_the_layers() -> None:
    problems = check(source_tree())
    assert not problems, "imports against the layers (docs/architecture.md):\n" + "\n".join(
        problems
    )


def test_the_core_imports_only_errors_time_and_itself() -> None:
    """The rule for the core, stated on its own: nothing of sluiceway but these."""
    tree = source_tree()
    allowed = ("sluiceway.core", "sluiceway.errors", "sluiceway.time")
    known = {module_name(Path(p), Path())[0] for p in tree}
    for path, text in tree.items():
        name, is_package = module_name(Path(path), Path())
        if layer_of(name, LAYERS, "sluiceway") != "core":
            continue
        for imp in imports_of(name, is_package, text, path, known, "sluiceway"):
            assert imp.target.startswith(allowed), f"{path}:{imp.line}: {imp.text}"


# The checker on made-up trees: it must catch what it is there to catch.

TINY: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("low", ("pkg.low",)),
    ("mid", ("pkg.mid",)),
    ("high", ("pkg", "pkg.high")),
)


def tiny(**files: str) -> dict[str, str]:
    tree = {"pkg/__init__.py": "", "pkg/low.py": "", "pkg/mid/__init__.py": "", "pkg/high.py": ""}
    tree.update({path.replace("__", "/") + ".py": text for path, text in files.items()})
    return tree


def tiny_check(
    tree: dict[str, str], apart: Mapping[tuple[str, str], str] | None = None
) -> list[str]:
    return check(tree, layers=TINY, apart=apart or {}, shims=frozenset({"pkg.old"}), top="pkg")


def test_checker_passes_a_downward_tree() -> None:
    tree = tiny(pkg__high="import pkg.mid\n", pkg__mid__step="from pkg.low import x\n")
    assert tiny_check(tree) == []


@pytest.mark.parametrize(
    "text",
    [
        "from pkg.high import thing\n",
        "def f():\n    from pkg import high\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.high\n",
        "from .. import high\n",
    ],
    ids=["top-level", "in-function", "type-checking", "relative"],
)
def test_checker_names_an_upward_import(text: str) -> None:
    problems = tiny_check(tiny(pkg__mid__step=text))
    assert len(problems) == 1, problems
    assert problems[0].startswith("pkg/mid/step.py:")
    assert "pkg.mid.step (mid) imports pkg.high (high), a higher layer" in problems[0]


def test_checker_finds_a_cycle_inside_one_layer() -> None:
    tree = tiny(
        pkg__mid__a="from pkg.mid import b\n", pkg__mid__b="def f():\n    import pkg.mid.a\n"
    )
    assert tiny_check(tree) == ["import cycle between modules: pkg.mid.a <-> pkg.mid.b"]


def test_checker_refuses_a_module_in_no_layer() -> None:
    tree = tiny(pkg__extra="import pkg.low\n")
    layers = (("low", ("pkg.low",)), ("high", ("pkg.high",)))
    problems = check(tree, layers=layers, apart={}, shims=frozenset(), top="pkg")
    assert any(p.startswith("pkg/extra.py: module pkg.extra is in no layer") for p in problems)


def test_checker_keeps_apart_pairs_apart() -> None:
    tree = tiny(pkg__high="import pkg.low\n")
    assert tiny_check(tree) == []
    problems = tiny_check(tree, apart={("high", "low"): "high uses mid's contract"})
    assert problems == [
        "pkg/high.py:1: `import pkg.low`: pkg.high (high) imports pkg.low (low): "
        "high uses mid's contract"
    ]


def test_checker_refuses_an_import_of_a_shim() -> None:
    tree = tiny(pkg__old="from pkg.low import x\n", pkg__high="def f():\n    import pkg.old\n")
    problems = check(
        tree,
        layers=(*TINY[:2], ("high", ("pkg", "pkg.high", "pkg.old"))),
        apart={},
        shims=frozenset({"pkg.old"}),
        top="pkg",
    )
    assert problems == [
        "pkg/high.py:2: `import pkg.old`: pkg.old is a re-export kept for users; import from "
        "where it lives now (sluiceway.core)"
    ]


def test_checker_sees_an_upward_import_in_a_copy_of_src() -> None:
    """On the real tree: one scratch module of the core importing the runtime fails."""
    tree = source_tree()
    tree["sluiceway/core/scratch.py"] = "def f():\n    from sluiceway.runtime import executor\n"
    problems = check(tree)
    assert problems == [
        "sluiceway/core/scratch.py:2: `from sluiceway.runtime import executor`: "
        "sluiceway.core.scratch (core) imports sluiceway.runtime.executor (runtime), a higher "
        "layer; the core layer may import only itself and the layers below it"
    ]
