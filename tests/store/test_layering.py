"""The storage layer and its commands import neither torch nor prefect."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import shiftcost.store, shiftcost.store.audit, shiftcost.store.ledger, shiftcost.store.repository
import shiftcost.store.migrate, shiftcost.config
import shiftcost.cli.db, shiftcost.cli.audit, shiftcost.cli.budget
heavy = sorted(name for name in ("torch", "prefect", "evidently", "codecarbon") if name in sys.modules)
print(",".join(heavy))
"""


def test_store_imports_no_heavy_packages() -> None:
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
