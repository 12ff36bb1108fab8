"""Settings: defaults, SHIFTCOST_* variables, a TOML file named by SHIFTCOST_CONFIG."""

from __future__ import annotations

from pathlib import Path

import pytest

from shiftcost.config import load_settings
from shiftcost.errors import ConfigError


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SHIFTCOST_DATABASE_URL", raising=False)
    monkeypatch.delenv("SHIFTCOST_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env file


def test_default_is_a_sqlite_file_in_the_working_directory() -> None:
    assert load_settings().database_url == "sqlite:///shiftcost.db"


def test_toml_file_then_environment_then_arguments(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "shiftcost.toml"
    config.write_text('database_url = "sqlite:///from-file.db"\n')
    monkeypatch.setenv("SHIFTCOST_CONFIG", str(config))
    assert load_settings().database_url == "sqlite:///from-file.db"
    monkeypatch.setenv("SHIFTCOST_DATABASE_URL", "sqlite:///from-env.db")
    assert load_settings().database_url == "sqlite:///from-env.db"
    assert load_settings(database_url="sqlite:///given.db").database_url == "sqlite:///given.db"


def test_missing_or_broken_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SHIFTCOST_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings()
    broken = tmp_path / "broken.toml"
    broken.write_text("database_url = \n")
    monkeypatch.setenv("SHIFTCOST_CONFIG", str(broken))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings()


@pytest.mark.parametrize("url", ["", "not a url"])
def test_unparseable_database_url_is_a_config_error(url: str) -> None:
    from shiftcost.store.db import parse_url

    with pytest.raises(ConfigError, match="not a valid SQLAlchemy URL"):
        parse_url(url)
