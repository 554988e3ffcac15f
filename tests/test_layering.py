"""Dependencies point one way: the HTTP layer reads the shared services from
`cds_service.services`, never from the app factory that builds them."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cds_service"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_http_layer_does_not_import_the_app_factory() -> None:
    offenders = {p.name: sorted(m for m in imported_modules(p) if m == "cds_service.app")
                 for p in (PACKAGE / "http").glob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}
    assert any("cds_service.services" in imported_modules(p) for p in (PACKAGE / "http").glob("*.py"))


def test_services_module_does_not_import_upwards() -> None:
    # Only type-checking imports of lower layers; nothing from http/ or the factory.
    mods = imported_modules(PACKAGE / "services.py")
    assert not any(m == "cds_service.app" or m.startswith("cds_service.http") for m in mods)
