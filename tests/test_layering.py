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
