"""The store owns its schema: no SQL is written or run in node/services or node/edges."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import node

# What a statement for SQLite starts with (keywords in capitals, as all the node's SQL is).
SQL_STATEMENT = re.compile(
    r"^\s*(SELECT|INSERT|UPDATE|DELETE|REPLACE|CREATE|ALTER|DROP|PRAGMA|BEGIN|COMMIT|WITH)\s"
)
# Methods of a database connection or cursor, and attributes that hand one out.
CONNECTION_METHODS = {"execute", "executemany", "executescript", "create_function", "cursor"}
CONNECTION_ATTRIBUTES = {"reader", "writer", "_writer", "_db", "_conn"}


def sql_outside_the_store(root: Path) -> list[str]:
    """Every place under ``root``'s services and edges that writes or runs SQL."""
    found: list[str] = []
    for layer in ("services", "edges"):
        for path in sorted((root / layer).rglob("*.py")):
            where = path.relative_to(root.parent)
            for item in ast.walk(ast.parse(path.read_text(), str(path))):
                line = getattr(item, "lineno", 0)
                if isinstance(item, ast.Constant) and isinstance(item.value, str):
                    if SQL_STATEMENT.match(item.value):
                        found.append(f"{where}:{line}: SQL text {item.value[:40]!r}")
                elif isinstance(item, ast.Attribute):
                    if item.attr in CONNECTION_METHODS | CONNECTION_ATTRIBUTES:
                        found.append(f"{where}:{line}: database connection use .{item.attr}")
                elif isinstance(item, ast.Import | ast.ImportFrom):
                    modules = (
                        [a.name for a in item.names]
                        if isinstance(item, ast.Import)
                        else [item.module or ""]
                    )
                    if any(m.split(".")[0] == "sqlite_utils" for m in modules):
                        found.append(f"{where}:{line}: imports sqlite_utils")
    return found


def test_no_sql_is_written_or_run_in_services_or_edges() -> None:
    assert sql_outside_the_store(Path(node.__file__).parent) == []


def test_the_check_finds_sql_where_it_is_written(tmp_path: Path) -> None:
    services = tmp_path / "node" / "services"
    services.mkdir(parents=True)
    (tmp_path / "node" / "edges").mkdir()
    (services / "leaky.py").write_text(
        "import sqlite_utils\n"
        "def count(store):\n"
        '    return store.reader.execute("SELECT COUNT(*) FROM studies").fetchone()\n'
        'QUERY = """\n    DELETE FROM nonces WHERE timestamp < ?"""\n'
        'HTTP_VERB = "DELETE"\n'
    )
    found = sql_outside_the_store(tmp_path / "node")
    assert sorted(f.split(": ", 1)[1] for f in found) == sorted(
        [
            "imports sqlite_utils",
            "database connection use .execute",
            "database connection use .reader",
            "SQL text 'SELECT COUNT(*) FROM studies'",
            "SQL text '\\n    DELETE FROM nonces WHERE timestamp '",
        ]
    )
