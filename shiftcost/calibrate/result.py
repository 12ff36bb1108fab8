"""The outcome of a sweep, and writing it to a directory."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shiftcost.calibrate.helpers import _cost_model_summary
from shiftcost.jsonsafe import json_safe
from shiftcost.calibrate.outputs import _write_csv, _write_text, markdown_report, plot_sweep
from shiftcost.calibrate.settings import LABEL_FREE_FILE, PLOT_NAME
from shiftcost.errors import InputError
from shiftcost.forecast.forecaster import FORECASTER_FILE


@dataclass
class SweepResult:
    """Everything a calibration sweep produced; :meth:`to_dict` is its JSON view.

    ``rows``: one dict per (corruption, intensity), keys :data:`COLUMNS` plus ``runs`` (each
    repeat's :meth:`RetrainResult.to_dict`), ``notes`` and, where the learning probe ran,
    ``probe_curve`` (its evaluations: ``epoch`` on the retrain's clock, ``accuracy``, ``loss``). ``correlations``: see
    :func:`correlate`. ``cost_model``: fitted on every point (``None`` with the reason in
    ``cost_model_error`` when the points do not allow a fit). ``loco``: the
    leave-one-corruption-out evaluation (``GroupOutReport.to_dict()``) with the joules
    figure estimated from the training kinds; ``loco_probe`` the same with the probe's
    figure. ``joules_per_sample_epoch``: ``probe`` (hardware probe, training only),
    ``sweep`` (all measured joules / all sample-epochs trained, evaluations included),
    ``loco`` (how the evaluation obtained its figure). ``timing``: wall and CPU seconds of
    the whole sweep and the load average around it.
    """

    rows: list[dict[str, Any]]
    correlations: dict[str, Any]
    cost_model: Any
    cost_model_error: str | None
    loco: dict[str, Any] | None
    loco_probe: dict[str, Any] | None
    loco_error: str | None
    plot_curve: dict[str, Any] | None
    joules_per_sample_epoch: dict[str, Any]
    probe: dict[str, Any] | None
    best_index: dict[str, Any]
    settings: dict[str, Any]
    timing: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    forecaster: Any = None
    label_free: dict[str, Any] | None = None
    """The label-free cost model (``cost_model``, features :data:`LABEL_FREE_FEATURES`) with
    its leave-one-corruption-out figures (``loco``) on the same runs, or its ``error``."""
    cost_model_note: str | None = None
    """How the cost model's intervals were cross-validated when not by leaving one kind out."""
    loco_stages: dict[str, Any] | None = None
    """Both forecast stages on the batches that needed training, each kind left out
    (:meth:`~shiftcost.forecast.forecaster.Forecaster.leave_one_kind_out`), ``{"error": why}``
    when they could not be compared, or ``None``."""

    @property
    def failed(self) -> list[dict[str, Any]]:
        """Rows whose point crashed."""
        return [row for row in self.rows if row["status"] == "failed"]

    @property
    def uninformative_kinds(self) -> dict[str, list[str]]:
        """See :func:`uninformative_kinds`."""
        return uninformative_kinds(self.rows)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (non-finite numbers become ``None``)."""
        return json_safe(
            {
                "settings": self.settings,
                "timing": self.timing,
                "joules_per_sample_epoch": self.joules_per_sample_epoch,
                "probe": self.probe,
                "rows": self.rows,
                "correlations": self.correlations,
                "best_index": self.best_index,
                "uninformative_kinds": self.uninformative_kinds,
                "cost_model": None if self.cost_model is None else _cost_model_summary(self.cost_model),
                "cost_model_error": self.cost_model_error,
                "cost_model_note": self.cost_model_note,
                "loco": self.loco,
                "loco_probe": self.loco_probe,
                "loco_error": self.loco_error,
                "loco_stages": self.loco_stages,
                "label_free": None if self.label_free is None else {k: v for k, v in self.label_free.items() if k != "cost_model"},
                "plot_curve": self.plot_curve,
                "files": self.files,
            }
        )

    def write(self, out_dir: str | os.PathLike[str]) -> dict[str, str]:
        """Write every output into ``out_dir`` (created if needed); returns name -> path."""
        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InputError(f"cannot create the output directory {out} ({error.strerror}); choose a writable path.") from None
        files = {
            "table_json": out / "points.json",
            "table_csv": out / "points.csv",
            "correlations_json": out / "correlations.json",
            "report": out / "report.md",
            "loco_json": out / "loco.json",
            "plot": out / PLOT_NAME,
            "sweep_json": out / "sweep.json",
        }
        if self.cost_model is not None:
            files["cost_model"] = out / "costmodel.json"
        if self.forecaster is not None:
            files["forecaster"] = out / FORECASTER_FILE
        label_free_model = (self.label_free or {}).get("cost_model")
        if label_free_model is not None:
            files["label_free_cost_model"] = out / LABEL_FREE_FILE
        self.files = {name: str(path) for name, path in files.items()}
        _write_text(files["table_json"], json.dumps(json_safe(self.rows), indent=1, allow_nan=False))
        _write_csv(files["table_csv"], self.rows)
        _write_text(files["correlations_json"], json.dumps(json_safe(self.correlations), indent=1, allow_nan=False))
        loco = {"leave_one_corruption_out": self.loco, "with_probe_joules": self.loco_probe, "error": self.loco_error}
        _write_text(files["loco_json"], json.dumps(json_safe(loco), indent=1, allow_nan=False))
        if self.cost_model is not None:
            _write_text(files["cost_model"], self.cost_model.to_json())
        if self.forecaster is not None:
            _write_text(files["forecaster"], self.forecaster.to_json())
        if label_free_model is not None:
            _write_text(files["label_free_cost_model"], label_free_model.to_json())
        plot_sweep(self, files["plot"])
        _write_text(files["report"], markdown_report(self))
        _write_text(files["sweep_json"], json.dumps(self.to_dict(), indent=1, allow_nan=False))
        return dict(self.files)


class SweepInterrupted(KeyboardInterrupt):
    """The sweep was interrupted (Ctrl-C); ``rows`` holds the points finished so far (also
    written to ``points.json``/``points.csv`` when the sweep had an output directory).
    A ``KeyboardInterrupt``, so that it still ends the program."""

    def __init__(self, message: str, rows: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.rows = rows


def uninformative_kinds(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Kinds whose points show the cost model no cost, by why.

    ``never_retrained``: every point was already at the cutoff, so the kind never needed a
    step of training at any intensity. ``capped_throughout``: every shifted point reached
    the epoch cap, so the kind gives only lower bounds. Failed points are left out.
    """
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] != "failed":
            by_kind.setdefault(row["corruption"], []).append(row)
    never = [kind for kind, points in by_kind.items() if all(p["status"] == "already_met" for p in points)]
    capped = [
        kind for kind, points in by_kind.items()
        if any(p["intensity"] > 0 for p in points) and all(p["status"] == "cap_reached" for p in points if p["intensity"] > 0)
    ]  # fmt: skip
    return {"never_retrained": never, "capped_throughout": capped}
