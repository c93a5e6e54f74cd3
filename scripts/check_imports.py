"""Report the import cycles inside a package and the imports of other modules' private names.

Reads every module of the package with ast (nothing is imported) and takes every import statement in it, at module
level or inside a function or method (lazy imports count the same); relative imports are resolved against the
importing module's package.

- Edges: A -> B when module A imports module B of the package. ``import p.b`` gives p.b; ``from p import b`` gives
  p.b when p/b is a module of the package, else p (b is then a name defined in p). Only the module named counts, not
  the parent packages Python also runs on the way; imports from outside the package are ignored.
- Cycles: the strongly connected components of that graph with more than one module, printed with the imports
  inside each component (file:line), any of which the lead may cut to break it.
- Private imports: ``from M import _x`` (or ``import M._x``) where M is a module of the package other than the
  importer and _x starts with one underscore; dunder names such as ``__version__`` are public.

Usage: python scripts/check_imports.py [ROOT] [--strict]
ROOT is the package folder (default: lowbit/ beside scripts/). Exits 0; with --strict, exits 1 when either count is
not zero.
"""
import argparse
import ast
import sys
from pathlib import Path


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def read_modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is_package) for every .py file under root."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def scan(root: Path):
    """The edges {(importer, imported): {lines}} and the private imports [(file, line, module, name)]."""
    modules = read_modules(root)

    def owner(name):  # the module of the package that `name` lives in, None if outside it
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges, private = {}, []
    for mod, (path, is_package) in modules.items():
        def add(target, line):
            if target and target != mod:
                edges.setdefault((mod, target), set()).add(line)

        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(owner(alias.name), node.lineno)
                    parent, _, last = alias.name.rpartition(".")
                    if _is_private(last) and owner(parent) not in (None, mod):
                        private.append((path, node.lineno, parent, last))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: up from this module's package
                    pkg = mod.split(".") if is_package else mod.split(".")[:-1]
                    pkg = pkg[:len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([node.module] if node.module else []))
                home = owner(base)
                if home is None:
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    add(sub if sub in modules else home, node.lineno)
                    if _is_private(alias.name) and home != mod:
                        private.append((path, node.lineno, base, alias.name))
    return modules, edges, private


def cycles(nodes, edges) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan), each sorted, largest first."""
    succ = {n: sorted(b for a, b in edges if a == n) for n in nodes}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(nodes) + 100))
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return sorted(found, key=lambda c: (-len(c), c))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", type=Path, default=Path(__file__).resolve().parent.parent / "lowbit")
    parser.add_argument("--strict", action="store_true", help="exit 1 if there is a cycle or a private import")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    modules, edges, private = scan(root)
    found = cycles(modules, edges)

    for i, component in enumerate(found, 1):
        print(f"cycle {i} ({len(component)} modules): {', '.join(component)}")
        members = set(component)
        for (a, b), lines in sorted(edges.items()):
            if a in members and b in members:
                where = modules[a][0].relative_to(root.parent)
                print(f"    {a} -> {b}  ({where}:{','.join(map(str, sorted(lines)))})")
    for path, line, module, name in sorted(private):
        print(f"private: {path.relative_to(root.parent)}:{line} imports {module}.{name}")
    print(f"cycles: {len(found)} ({sum(map(len, found))} modules), private imports: {len(private)}")
    return 1 if args.strict and (found or private) else 0


if __name__ == "__main__":
    sys.exit(main())
