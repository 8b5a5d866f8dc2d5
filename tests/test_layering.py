"""The front ends depend on `Operations`, never on the service that assembles them (no import cycles)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "sloth_daemon"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, as written (relative imports keep their dots), TYPE_CHECKING blocks included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
            sep = "" if base.endswith(".") else "."
            names.update(f"{base}{sep}{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_front_ends_and_operations_do_not_import_the_service():
    files = [PKG / "operations.py", PKG / "cli.py", *sorted((PKG / "api").glob("*.py"))]
    offenders = {}
    for f in files:
        bad = {m for m in imported_modules(f) if "service" in m.split(".")}
        # cli.py starts the daemon: it may import `serve` (the entry point), nothing else of the service.
        if f.name == "cli.py":
            bad = {m for m in bad if not m.endswith("service.serve")} - {".service"}
        if bad:
            offenders[f.name] = sorted(bad)
    assert not offenders, f"front ends import the service: {offenders}"


ROOTS = {"sloth_daemon": PKG, "sloth_replay": PKG.parent / "replay", "sloth_kernels": PKG.parent / "kernels"}


def module_graph() -> dict[str, set[str]]:
    """{module: the project modules it imports when it is imported}: module-level imports, resolved to modules;
    TYPE_CHECKING blocks and imports inside functions (deferred on purpose) left out."""
    files = {}
    for pkg, root in ROOTS.items():
        for f in root.rglob("*.py"):
            parts = [pkg, *f.relative_to(root).with_suffix("").parts]
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f

    def edges(name: str, f: Path) -> set[str]:
        here = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
        out: set[str] = set()

        def visit(body: list[ast.stmt]) -> None:
            for node in body:
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    continue
                if isinstance(node, (ast.If, ast.Try)):
                    for block in (node.body, node.orelse, *[h.body for h in getattr(node, "handlers", [])]):
                        visit(block)
                elif isinstance(node, ast.ImportFrom):
                    base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                        if node.level else node.module
                    for a in node.names:
                        target = f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                        if target in files:
                            out.add(target)
                elif isinstance(node, ast.Import):
                    out.update(a.name for a in node.names if a.name in files)

        visit(ast.parse(f.read_text()).body)
        return out - {name}

    return {name: edges(name, f) for name, f in files.items()}


def test_no_import_cycles():
    graph = module_graph()
    assert graph["sloth_daemon.api.zmq"] >= {"sloth_daemon.operations"}  # the graph sees relative imports
    cycles = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            walk(start, [start])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
