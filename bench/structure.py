"""Line counts and the import graph of the packages (issue 16: before/after).

Usage: python bench/structure.py [--json OUT] [ROOT]
Prints, per package, files and lines; the largest modules; and the import edges between the
modules of agent/ and mesh/ (who imports whom, at module level or lazily inside functions),
with the cycles among them.
"""

from __future__ import annotations

import ast
import json
import sys
from collections import defaultdict
from pathlib import Path

PACKAGES = ("agent", "mesh", "scores", "topologies")


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports(path: Path, mods: dict[str, Path], me: str) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    pkg = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")
                up = up[: len(up) - (node.level - 1)]
                base = ".".join([*up, base]) if base else ".".join(up)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            target = name
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != me:
                found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main() -> None:
    args = sys.argv[1:]
    out_json = None
    if args[:1] == ["--json"]:
        out_json, args = args[1], args[2:]
    root = Path(args[0] if args else ".")
    mods = modules(root)
    lines = {m: len(p.read_text().splitlines()) for m, p in mods.items()}
    graph = {m: imports(p, mods, m) for m, p in mods.items()}
    per_pkg: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for m, n in lines.items():
        top = m.split(".")[0]
        per_pkg[top][0] += 1
        per_pkg[top][1] += n
    print(f"{'package':<12} {'files':>5} {'lines':>6}")
    for pkg in PACKAGES:
        f, n = per_pkg[pkg]
        print(f"{pkg:<12} {f:>5} {n:>6}")
    print("\nlargest modules")
    for m, n in sorted(lines.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {n:>5}  {m}")
    core = {m for m in mods if m.startswith(("agent", "mesh")) and not m.startswith("agent.cli")}
    print("\nimports among agent/ (without the CLI) and mesh/")
    for m in sorted(core):
        deps = sorted(d for d in graph[m] if d in core)
        if deps:
            print(f"  {m} -> {', '.join(deps)}")
    cyc = cycles({m: {d for d in graph[m] if d in core} for m in core})
    print("\ncycles: " + ("none" if not cyc else "; ".join(" <-> ".join(c) for c in cyc)))
    if out_json:
        Path(out_json).write_text(
            json.dumps(
                {
                    "packages": dict(per_pkg),
                    "lines": lines,
                    "graph": {k: sorted(v) for k, v in graph.items()},
                    "cycles": cyc,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
