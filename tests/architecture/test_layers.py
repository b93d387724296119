"""The import layers (README, "Layout") hold: no import runs upward and no modules import each other in a
circle. Every import statement that can run counts, also those inside functions (that is where circles hide);
imports under ``if TYPE_CHECKING:`` (type annotations only) do not."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# (module prefix, layer); the longest matching prefix wins. The toy world's definitions (shapes, oracles, the
# aesthetic proxy, the toy CLIP) sit at the bottom beside rewards, which score with them; its pair sampling and
# pretraining sit with the bench.
LAYERS = [
    ("diffalign.backbones", 0), ("diffalign.utils", 0), ("rewards", 0),
    ("diffalign.toyworld.shapes", 0), ("diffalign.toyworld.oracles", 0), ("diffalign.toyworld.aesthetic", 0),
    ("diffalign.toyworld.clip", 0), ("diffalign.toyworld.identity", 0),
    ("diffalign.objectives", 1), ("diffalign.sampling", 1),
    ("diffalign.data", 2), ("diffalign.personalization", 2),
    ("diffalign.config", 3), ("diffalign.training", 3),
    ("diffalign.toyworld", 4), ("diffalign.bench", 4),
    ("diffalign.cli", 5), ("diffalign.api", 5), ("diffalign.demo", 5), ("diffalign", 5),
]
NAMES = ["backbones, utils, rewards, toy-world definitions", "objectives, sampling", "data, personalization",
         "config, training", "toyworld, bench", "cli, api, demo"]


def layer(module: str) -> int:
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return dict(LAYERS)[best]


def modules() -> dict[str, Path]:
    out = {}
    for pkg in ("diffalign", "rewards"):
        for f in (REPO / pkg).rglob("*.py"):
            parts = list(f.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (resolved to the longest known module name)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # imports under `if TYPE_CHECKING:` never run: annotations only
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(m, p, set(mods)) for m, p in mods.items()}


def test_no_import_runs_upward():
    bad = [f"{m} (layer {layer(m)}: {NAMES[layer(m)]}) imports {d} (layer {layer(d)}: {NAMES[layer(d)]})"
           for m, deps in graph().items() for d in sorted(deps)
           if layer(d) > layer(m) and not m.startswith(d + ".")]  # a module may import its own package
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_circles():
    g = graph()
    # a package's __init__ re-exporting its submodules is not a circle with them
    g = {m: {d for d in deps if not d.startswith(m + ".") and not m.startswith(d + ".")} for m, deps in g.items()}
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not sccs, "import circles:\n" + "\n".join(" <-> ".join(c) for c in sccs)


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path):
    """The two checks above can fail: a planted upward import and circle are found."""
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from diffalign.cli import main\n")
    assert imports("diffalign.backbones.x", a, {"diffalign.cli", "diffalign.backbones.x"}) == {"diffalign.cli"}
    assert layer("diffalign.cli") > layer("diffalign.backbones.x")
    c = tmp_path / "c.py"
    c.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from diffalign.cli import main\n")
    assert imports("diffalign.backbones.x", c, {"diffalign.cli", "diffalign.backbones.x"}) == set()
    b = tmp_path / "b.py"
    b.write_text("from .base import unwrap\n")
    assert imports("diffalign.backbones.lora", b, {"diffalign.backbones.base", "diffalign.backbones.lora"}) == {
        "diffalign.backbones.base"}
