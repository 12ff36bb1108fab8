"""A wrong PREFECT_API_URL is one sentence with the remedy, exit status 2, no traceback."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from prefect_stack import ROOT, free_loopback_port, shiftcost_command


def run_command(api_url: str | None, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for key in [key for key in environment if key.startswith("PREFECT_")] + ["SHIFTCOST_CONFIG"]:
        environment.pop(key, None)
    environment |= {"PREFECT_API_URL": api_url} if api_url is not None else {"PREFECT_HOME": str(cwd / "prefect-home")}
    return subprocess.run(shiftcost_command(*args), env=environment, cwd=cwd, capture_output=True, text=True, timeout=120)


def run_serve(api_url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_command(api_url, cwd, "serve")


@pytest.mark.parametrize("path", ["/api", ""])
def test_serve_against_a_prefect_api_url_where_nothing_answers_says_so_in_one_sentence(tmp_path: Path, path: str) -> None:
    url = f"http://127.0.0.1:{free_loopback_port()}{path}"
    result = run_serve(url, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"PREFECT_API_URL is {url}, but no Prefect server answers there" in lines[0]
    assert "prefect server start" in lines[0]
    assert ("ends in /api" in lines[0]) == (path == "")


def test_a_worker_without_a_prefect_server_says_so_in_one_sentence(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_loopback_port()}/api"
    for api_url, expected in [(None, "PREFECT_API_URL is not set"), (url, f"PREFECT_API_URL is {url}, but no Prefect server answers there")]:
        result = run_command(api_url, tmp_path, "worker", "--pool", "gpu")
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert expected in lines[0]
        # A worker has no embedded API to fall back on.
        assert "embedded" not in lines[0]
