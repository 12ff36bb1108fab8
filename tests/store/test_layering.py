"""Layers: the storage layer imports neither torch nor prefect; the pipeline builds no SQL."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CHECK = """
import sys
import shiftcost.store, shiftcost.store.audit, shiftcost.store.ledger, shiftcost.store.repository
import shiftcost.store.batches, shiftcost.store.runs, shiftcost.store.assessments, shiftcost.store.landing_entries
import shiftcost.store.migrate, shiftcost.config
import shiftcost.cli.db, shiftcost.cli.audit, shiftcost.cli.budget
heavy = sorted(name for name in ("torch", "prefect", "evidently", "codecarbon") if name in sys.modules)
print(",".join(heavy))
"""


def test_store_imports_no_heavy_packages() -> None:
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


# --- SQL lives in shiftcost/store -----------------------------------------------------------

PIPELINE = Path(__file__).resolve().parents[2] / "shiftcost" / "pipeline"
#: What the pipeline may take from SQLAlchemy: the Session type, for annotations.
ALLOWED_SQLALCHEMY = {("sqlalchemy.orm", "Session")}
#: Session methods that read or write rows; the pipeline calls store functions instead.
QUERYING_METHODS = {"execute", "scalars", "scalar", "get", "add", "add_all", "delete", "merge", "query", "flush"}


def sql_in_pipeline(source: str, filename: str) -> list[str]:
    """Where ``source`` builds or runs SQL itself: SQLAlchemy imports beyond the Session type,
    or a query method called on a session."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sqlalchemy":
            found += [f"{filename}:{node.lineno} imports {node.module}.{alias.name}"
                      for alias in node.names if (node.module, alias.name) not in ALLOWED_SQLALCHEMY]
        elif isinstance(node, ast.Import):
            found += [f"{filename}:{node.lineno} imports {alias.name}"
                      for alias in node.names if alias.name.split(".")[0] == "sqlalchemy"]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in QUERYING_METHODS
              and isinstance(node.func.value, ast.Name) and "session" in node.func.value.id):
            found.append(f"{filename}:{node.lineno} calls {node.func.value.id}.{node.func.attr}()")
    return found


def test_pipeline_builds_no_sql() -> None:
    problems = [problem for path in sorted(PIPELINE.rglob("*.py"))
                for problem in sql_in_pipeline(path.read_text(encoding="utf-8"), path.name)]
    assert problems == [], "queries belong in shiftcost/store/: " + "; ".join(problems)


def test_the_sql_check_sees_queries() -> None:
    source = (
        "from sqlalchemy import select, update\n"
        "import sqlalchemy.dialects.postgresql\n"
        "from sqlalchemy.orm import Session\n"
        "def f(session):\n"
        "    session.execute(select(1))\n"
        "    session.add(object())\n"
    )
    assert [problem.split(" ", 1)[1] for problem in sql_in_pipeline(source, "x.py")] == [
        "imports sqlalchemy.select", "imports sqlalchemy.update", "imports sqlalchemy.dialects.postgresql",
        "calls session.execute()", "calls session.add()",
    ]


LIGHT = """
import sys
import shiftcost.pipeline, shiftcost.statuses, shiftcost.store.records
print(",".join(sorted(name for name in ("sqlalchemy", "torch", "prefect") if name in sys.modules)))
"""


def test_pipeline_statuses_and_records_load_neither_sqlalchemy_nor_torch() -> None:
    result = subprocess.run([sys.executable, "-c", LIGHT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
