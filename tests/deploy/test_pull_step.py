"""The pull step of prefect.yaml finds the project folder on any machine: the folder of the
installed ``flows`` package, or SHIFTCOST_HOME; a wrong SHIFTCOST_HOME is one sentence."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from flows.deployments import DEPLOYMENTS, enter_project_directory

ROOT = Path(__file__).resolve().parents[2]


def test_the_pull_step_enters_the_folder_of_the_installed_flows_from_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SHIFTCOST_HOME", raising=False)
    assert enter_project_directory() == {"directory": str(ROOT)}
    assert Path.cwd() == ROOT
    for spec in DEPLOYMENTS:
        assert Path(spec.entrypoint.split(":")[0]).is_file()  # relative to the new working directory


def test_shiftcost_home_names_the_folder_and_a_wrong_one_says_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SHIFTCOST_HOME", str(ROOT))
    assert enter_project_directory() == {"directory": str(ROOT)}
    monkeypatch.setenv("SHIFTCOST_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"has no flows/watch\.py, flows/assess\.py, flows/retrain\.py; set SHIFTCOST_HOME"):
        enter_project_directory()


def test_prefect_yaml_pulls_with_this_step_and_names_no_machine_path() -> None:
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert config["pull"] == [{"flows.deployments.enter_project_directory": {}}]
    assert os.sep + "opt" + os.sep not in (ROOT / "prefect.yaml").read_text()
