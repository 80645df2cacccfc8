"""Structure figures of the package, for architecture reviews (docs/architecture.md).

    python tools/code_metrics.py [SRC_DIR]

Prints: the longest functions (in src/ and in server/), the largest files, the import
circles among modules (top-level and function-level imports, separately), function-level
imports, and private names (``_x``) imported from another module.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def main(src: Path) -> None:
    root = src
    files = sorted(p for p in (root / "chatforge").rglob("*.py"))
    modules = {module_name(root, p): p for p in files}
    funcs: list[tuple[int, str]] = []
    sizes: list[tuple[int, str]] = []
    edges: dict[str, dict[str, set[str]]] = {"top": defaultdict(set), "func": defaultdict(set)}
    private: list[str] = []
    local_imports = 0
    for mod, path in modules.items():
        text = path.read_text()
        tree = ast.parse(text)
        sizes.append((len(text.splitlines()), str(path.relative_to(root))))
        is_pkg = path.name == "__init__.py"
        parents: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                parents[child] = node
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                funcs.append((n, f"{path.relative_to(root)}:{node.lineno} {node.name}"))
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            inside = False
            p = parents.get(node)
            while p is not None:
                if isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    inside = True
                if isinstance(p, ast.If) and "TYPE_CHECKING" in ast.unparse(p.test):
                    inside = None  # type-only
                    break
                p = parents.get(p)
            if inside is None:
                continue
            kind = "func" if inside else "top"
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
                names: list[tuple[str, str]] = []
            else:
                base = resolve(mod, is_pkg, node)
                names = [(base, a.name) for a in node.names]
                # "from pkg import module" depends on the module, not on pkg's own code
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                targets = subs + ([base] if len(subs) < len(node.names) else [])
            for t in targets:
                if t in modules and t != mod and t.startswith("chatforge"):
                    edges[kind][mod].add(t)
                    if kind == "func":
                        local_imports += 1
            for base, name in names:
                if (
                    name.startswith("_")
                    and not name.startswith("__")
                    and base.startswith("chatforge")
                    and base != mod
                ):
                    private.append(f"{mod} imports {base}.{name}")
    funcs.sort(reverse=True)
    print("longest functions:")
    for n, where in funcs[:8]:
        print(f"  {n:5d}  {where}")
    server = [f for f in funcs if "/server/" in f[1]]
    print("longest in server/:")
    for n, where in server[:3]:
        print(f"  {n:5d}  {where}")
    sizes.sort(reverse=True)
    print(f"largest files ({len(sizes)} files, {sum(s for s, _ in sizes)} lines):")
    for n, where in sizes[:8]:
        print(f"  {n:5d}  {where}")
    print(f"function-level imports of chatforge modules: {local_imports}")
    for label, graph in (("top-level", edges["top"]), ("all", _merge(edges))):
        sccs = [c for c in _sccs(graph) if len(c) > 1]
        sccs.sort(key=len, reverse=True)
        print(f"import circles ({label} imports): {len(sccs)}")
        for c in sccs:
            print(f"  {len(c)} modules: {', '.join(sorted(c))}")
    print(f"private names imported across modules: {len(private)}")
    for line in private:
        print(f"  {line}")


def _merge(edges: dict[str, dict[str, set[str]]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for graph in edges.values():
        for k, v in graph.items():
            out[k] |= v
    return out


def _sccs(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []
    counter = [0]
    nodes = set(graph) | {t for v in graph.values() for t in v}

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
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            out.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "src")
