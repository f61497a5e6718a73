"""The package layout holds: public APIs between packages, no import cycles, one SQL writer."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import imagesieve

ROOT = Path(imagesieve.__file__).parent
#: Statements that change a DuckDB database; only ``imagesieve/store`` may hold them.
WRITE_SQL = re.compile(
    r"\b(INSERT\s+(OR\s+\w+\s+)?INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|CREATE\s+(OR\s+REPLACE\s+)?"
    r"(TEMP\s+)?(TABLE|VIEW|INDEX)|DROP\s+(TABLE|VIEW)|ALTER\s+TABLE)\b"
)


def _package(module: str) -> str | None:
    """The top-level package of an ``imagesieve`` module (None: a root module or elsewhere)."""
    parts = module.split(".")
    if parts[0] != "imagesieve" or len(parts) < 2 or parts[1].startswith("_"):
        return None
    return parts[1] if (ROOT / parts[1]).is_dir() else None


def _imports() -> list[tuple[str, str, int]]:
    """(importing file, imported module, line) for every import in the package, local ones too."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(str(path), a.name, node.lineno) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.append((str(path), node.module, node.lineno))
                found += [(str(path), f"{node.module}.{a.name}", node.lineno) for a in node.names]
    return [f for f in found if f[1].startswith("imagesieve.")]


def _owner(path: str) -> str | None:
    parts = Path(path).relative_to(ROOT).parts
    return parts[0] if len(parts) > 1 else None


def test_layout__no_module_reaches_into_another_package_s_private_modules():
    bad = []
    for path, module, line in _imports():
        parts = module.split(".")
        private = len(parts) >= 3 and parts[2].startswith("_")
        if private and _package(module) is not None and _package(module) != _owner(path):
            bad.append(f"{Path(path).relative_to(ROOT.parent)}:{line} imports {module}")
    assert not bad, "import from the package's public API instead:\n" + "\n".join(sorted(bad))


def test_layout__packages_import_each_other_without_a_cycle():
    edges: dict[str, set[str]] = {}
    for path, module, _ in _imports():
        src, dst = _owner(path), _package(module)
        if src and dst and src != dst:
            edges.setdefault(src, set()).add(dst)

    def cycle_from(node: str, trail: list[str]) -> list[str] | None:
        if node in trail:
            return [*trail[trail.index(node) :], node]
        for nxt in sorted(edges.get(node, ())):
            found = cycle_from(nxt, [*trail, node])
            if found:
                return found
        return None

    for start in sorted(edges):
        cycle = cycle_from(start, [])
        assert cycle is None, "import cycle: " + " -> ".join(cycle)
    assert "store" in edges["search"] and "search" not in edges.get("store", ())  # it looks


def test_layout__only_the_store_writes_sql():
    writers = sorted(
        str(p.relative_to(ROOT))
        for p in ROOT.rglob("*.py")
        if p.relative_to(ROOT).parts[0] != "store" and WRITE_SQL.search(p.read_text())
    )
    assert writers == []
    assert WRITE_SQL.search((ROOT / "store" / "_clusters.py").read_text())  # the check sees SQL


def test_layout__every_package_names_its_public_api():
    for init in sorted(ROOT.glob("*/__init__.py")):
        tree = ast.parse(init.read_text())
        names = [
            n.value
            for node in tree.body
            if isinstance(node, ast.Assign)
            and any(getattr(t, "id", "") == "__all__" for t in node.targets)
            for n in node.value.elts
        ]
        assert names, f"{init.relative_to(ROOT)} has no __all__"
        module = __import__(f"imagesieve.{init.parent.name}", fromlist=names)
        assert all(hasattr(module, n) for n in names), init
