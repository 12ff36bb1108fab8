"""``shiftcost --version`` names the version the installed package declares."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import shiftcost


def test_version_is_the_installed_distributions_and_the_packages() -> None:
    # The console entry point itself, as a user runs it: no subcommand, no other output.
    result = subprocess.run(
        [sys.executable, "-c", "from shiftcost.cli import main; main()", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"shiftcost {importlib.metadata.version('shiftcost')}\n"
    assert importlib.metadata.version("shiftcost") == shiftcost.__version__
