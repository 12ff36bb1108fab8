from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from flow_support import PipelineEnv, sqlite_only
from test_killed_retrain import test_a_retrain_killed_outright_is_settled_at_the_priced_work_its_last_heartbeat_carried as killed


@sqlite_only
def test_walk(pipeline_env: PipelineEnv, tmp_path: Path) -> None:
    killed(pipeline_env, tmp_path)
    for args in (["audit", "cost"], ["audit", "budget"], ["audit", "errors"], ["budget", "list"], ["audit", "decisions"], ["budget", "release-open", "--older-than", "0", "--dry-run"]):
        out = subprocess.run([sys.executable, "-c", "from shiftcost.cli import main; main()", *args], capture_output=True, text=True, env=os.environ)
        print("$ shiftcost", " ".join(args), "->", out.returncode)
        print(out.stdout[-2500:], out.stderr[-1500:])
