"""Helpers of the pipeline and flow tests (the fixtures are in conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

MODEL_NAME = "digits"
IMAGE_SIZE = 8
#: The settings every pipeline test runs with (environment variables, so flows see them too).
TEST_SETTINGS = {
    "SHIFTCOST_MODEL_NAME": MODEL_NAME,
    "SHIFTCOST_DEVICE": "cpu",
    "SHIFTCOST_FLOW_MODE": "inline",
    "SHIFTCOST_INTERVAL_LEVEL": "0.8",
    "SHIFTCOST_CUTOFF_TOLERANCE": "0.1",
    "SHIFTCOST_RETRAIN_LR": "0.01",
    "SHIFTCOST_RETRAIN_MAX_EPOCHS": "8",
    "SHIFTCOST_ENERGY_SAMPLE_S": "0.2",
    "SHIFTCOST_COUNTRY_ISO_CODE": "FRA",
}

#: Run a test on SQLite only (the ``database_url`` fixture otherwise runs it on PostgreSQL too).
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])


def environment_settings(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **extra: str) -> Any:
    """The test settings (plus ``extra``) in the environment, with an empty landing folder
    and artifacts under ``tmp_path``, which is also the working directory (no stray .env is
    read, no stray file written elsewhere); the loaded settings."""
    from shiftcost.config import load_settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SHIFTCOST_CONFIG", raising=False)
    landing = tmp_path / "landing"
    landing.mkdir()
    environment = TEST_SETTINGS | {
        "SHIFTCOST_DATABASE_URL": database_url,
        "SHIFTCOST_LANDING": str(landing),
        "SHIFTCOST_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
    }
    for key, value in (environment | extra).items():
        monkeypatch.setenv(key, value)
    return load_settings()


@dataclass(frozen=True)
class TrainedModel:
    model: torch.nn.Module
    spec: Any
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]


def hand_made_calibration() -> list[dict[str, Any]]:
    """Ten calibration runs whose epochs grow with RESQUE_dist, with a little scatter."""
    scatter = (0.2, -0.1, 0.15, -0.2, 0.0, 0.1, -0.15, 0.2, -0.05, 0.1)
    return [
        {"resque_dist": 0.03 * i, "epochs": 0.5 + 20.0 * 0.03 * i + scatter[i], "reached_cutoff": True}
        for i in range(10)
    ]


def brightened(x: torch.Tensor, amount: float = 0.3) -> torch.Tensor:
    """A clear, learnable shift: every pixel brighter by ``amount``."""
    from shiftcost.shifts import corrupt

    return corrupt(x, "brightness", amount, seed=0)


def shuffled(y: torch.Tensor) -> torch.Tensor:
    """Labels that no model learns: a retrain on them runs until its epoch cap or until stopped."""
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]


@dataclass
class PipelineEnv:
    """A bootstrapped pipeline in a temporary folder: settings, data and helpers."""

    settings: Any
    root: Path
    landing: Path
    trained: TrainedModel
    bootstrapped: Any

    def drop(self, name: str, x: torch.Tensor, y: torch.Tensor | None, classes: tuple[str, ...] | None = None) -> Path:
        """Write a batch into the landing folder as a producer should: a hidden name, then a rename."""
        from shiftcost.data import Batch, save_batch

        final = self.landing / name
        hidden = save_batch(Batch(x, y, name, classes), self.landing / f".{name}.partial{final.suffix}")
        hidden.rename(final)
        return final

    def stream(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.trained.splits["stream"]
        return x[start:stop], y[start:stop]

    def count(self, table: Any, *where: Any) -> int:
        from sqlalchemy import func, select

        from shiftcost.pipeline import connect

        with connect(self.settings) as db, db.session(readonly=True) as session:
            return int(session.scalar(select(func.count()).select_from(table).where(*where)))

    def rows(self, table: Any, *where: Any) -> list[Any]:
        from sqlalchemy import select

        from shiftcost.pipeline import connect

        with connect(self.settings) as db, db.session(readonly=True) as session:
            return list(session.scalars(select(table).where(*where).order_by(table.id)))

    def budget(self, name: str, *, period: str, kwh: float) -> None:
        from shiftcost.pipeline import connect
        from tests.store import seed

        with connect(self.settings) as db:
            seed.committed(db).create_budget(name, period=period, kwh_cap=kwh)

    def drop_unlearnable(self, name: str) -> Path:
        """A shifted batch with shuffled labels: its retrain, uncapped, is still learning when stopped."""
        x, y = self.stream(0, 200)
        return self.drop(name, brightened(x), shuffled(y))

    def assert_stopped_retrain_recorded(self, context: str = "") -> None:
        """The one retrain run was stopped mid-run and recorded so: ``failed`` with what it had
        done, its spend settled at what it measured, its batch failed."""
        from shiftcost.store import models as db

        (run,) = self.rows(db.RetrainRun)
        assert run.status == "failed" and "stopped after" in (run.error or ""), (run.status, run.error, context)
        assert run.steps is not None and run.steps > 0 and run.energy_kwh is not None and run.energy_kwh > 0
        entries = self.rows(db.LedgerEntry, db.LedgerEntry.decision_id == run.decision_id)
        assert sorted(entry.kind for entry in entries) == ["reserve", "settle"]
        (settled,) = [entry for entry in entries if entry.kind == "settle"]
        assert settled.energy_kwh == pytest.approx(run.energy_kwh)
        assert [batch.status for batch in self.rows(db.Batch)] == ["failed"]

    def remaining_kwh(self, name: str) -> float:
        from shiftcost.pipeline import connect
        from tests.store import seed

        with connect(self.settings) as db:
            value = seed.committed(db).remaining(name).remaining_kwh
        assert value is not None
        return value


#: Joules per sample of the pipelines bootstrapped by :func:`bootstrapped_with_probe`.
PROBE_JOULES_PER_SAMPLE = 0.5
#: A rate other than the probe's default, so a probe that ignored the calibrated one would show.
PROBE = {"steps": 2, "samples": 8, "batch_size": 4, "lr": 2e-3, "optimizer": "adam"}


def bootstrapped_with_probe(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trained_model: TrainedModel, left_out: Any = None
) -> tuple[Any, Path, TrainedModel]:
    """A pipeline whose cost model has a probe stage (:data:`PROBE`): settings, landing folder, model."""
    from shiftcost import pipeline
    from shiftcost.forecast.forecaster import Forecaster
    from tests.forecast.helpers import long_retrain_rows

    settings = environment_settings(database_url, tmp_path, monkeypatch)
    # Long retrains beside a two-step probe, so a probe is cheap next to what is at stake.
    forecaster = Forecaster.fit(long_retrain_rows(), features=["resque_dist"], level=0.8, max_epochs=200.0, probe_settings=PROBE)
    assert forecaster.stage1 is not None, forecaster.stage1_error
    forecaster.left_out = left_out
    pipeline.bootstrap(
        settings, trained_model.model, trained_model.spec, *trained_model.splits["holdout"],
        calibration=forecaster, joules_per_sample_epoch=PROBE_JOULES_PER_SAMPLE, hardware="test",
    )  # fmt: skip
    return settings, tmp_path / "landing", trained_model
