"""`import shiftcost.index` must work where only torch, numpy, scipy and scikit-learn exist."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ["prefect", "sqlalchemy", "evidently", "codecarbon", "pandas", "matplotlib", "alembic", "typer", "rich"]

PROBE = """
import json, sys
import shiftcost.index
from shiftcost.index import ClassSums, EmbeddingSample, resque_dist, resque_task
roots = sorted({name.split('.')[0] for name in sys.modules})
print(json.dumps(roots))
"""


def test_importing_the_index_loads_no_pipeline_storage_or_plotting_module():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert "torch" in loaded and "shiftcost" in loaded  # the probe really imported the package
    assert sorted(loaded & set(HEAVY)) == []
