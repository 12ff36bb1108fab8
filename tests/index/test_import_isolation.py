"""`import shiftcost.index` must work where only torch, numpy, scipy and scikit-learn exist."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ["prefect", "sqlalchemy", "evidently", "codecarbon", "pandas", "matplotlib", "alembic", "typer", "rich"]
ORCHESTRATION = ["prefect", "prefect_dask", "dask", "distributed"]

PROBE = """
import json, sys
roots = lambda: sorted({name.split('.')[0] for name in sys.modules})
import shiftcost.index
from shiftcost.index import ClassSums, EmbeddingSample, resque_dist, resque_task
print(json.dumps(roots()))
from shiftcost.index.shards import index_shard, report_from_shards  # the library side of sharding
print(json.dumps(roots()))
"""


def test_importing_the_index_loads_no_pipeline_storage_or_plotting_module():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    index_only, with_shards = (set(json.loads(line)) for line in done.stdout.strip().splitlines()[-2:])
    assert "torch" in index_only and "shiftcost" in index_only  # the probe really imported the package
    assert sorted(index_only & set(HEAVY)) == []
    # scikit-learn, imported by the engine, loads pandas when it is installed; orchestration never.
    assert sorted(with_shards & set(ORCHESTRATION)) == []
