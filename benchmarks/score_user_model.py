"""Score the forecasters of ``calibrate_user_model.py`` runs on shift kinds no calibration saw.

Usage: python benchmarks/score_user_model.py [--workdir DIR] [--calibrations default,fitted] [--json FILE]

Each named calibration is a ``--out-name`` of ``benchmarks/calibrate_user_model.py`` in the same
work directory (same model, same data), for example one with the default intensities and one
with ``-- --fit-intensities``. Every batch is the new data under an evaluation-only kind of
``benchmarks/eval_shifts.py`` (the ``fresh`` and ``fourth`` sets, their medium and strong
intensities, seed 0), retrained once to the cutoff under the measurement protocol; the
retrain is the truth every calibration is scored against in the same run. Per calibration
it prints, for the constant and isotonic-on-accuracy-drop baselines fitted on that
calibration's points, the index stage, the probe stage and the default forecast (``shiftcost
forecast`` without options: the probe stage unless the calibration found probing no better):
MdAPE of epochs on reached runs, median |log error| with capped runs as bounds, C-index and
90% coverage (of the runs whose cost is known, and of those that reached the cutoff after some
training), the probe stage again with its interval sized on each other set of calibration runs,
paired bootstrap 95% CIs of the probe stage's MdAPE and C-index minus each other predictor's,
and for the index and probe stages how often the "not to converge" flag (which skips a batch)
was raised on a batch whose retrain reached the cutoff.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_shifts import FOURTH_KINDS, FRESH_KINDS, eval_corrupt  # noqa: E402
from forecast_accuracy import OTHER_INTERVALS, fit_baselines, flags, interval_key, metrics, not_converging_flags, print_flags, resized  # noqa: E402

#: ``default``: what ``shiftcost forecast`` gives without options, the probe stage unless the
#: calibration found probing no better (:meth:`Forecaster.probe_not_worth`), then the index stage.
PREDICTORS = ("constant", "isotonic_accuracy_drop", "stage0", "stage0_probe", "default")
#: Paired bootstrap resamples of the batches for the probe stage's differences from each baseline.
RESAMPLES = 2000


def measure_batches(work: Path, reference_stats: Path) -> tuple[Any, list[dict[str, Any]]]:
    """Each evaluation batch with its index features and the epochs its retrain took."""
    import torch

    from shiftcost.calibrate import SWEEP_CONFIG
    from shiftcost.cli.forecast import _index_features
    from shiftcost.data.models import load_model
    from shiftcost.index.reference import ReferenceStats
    from shiftcost.retrain import retrain_to_cutoff

    net, spec = load_model(work / "model.safetensors")
    reference = ReferenceStats.load(reference_stats, model=net)
    new = np.load(work / "new.npz")
    x, y = torch.from_numpy(new["x"]), torch.from_numpy(new["y"])
    config = SWEEP_CONFIG.for_model(spec).replace(require_energy=False)
    batches = []
    for kind, intensities in {**FRESH_KINDS, **FOURTH_KINDS}.items():
        for intensity in intensities[1:]:
            started = time.perf_counter()
            shifted = eval_corrupt(x, kind, intensity, seed=0)
            batch = SimpleNamespace(x=shifted, y=y)
            features = _index_features(net, spec, reference, batch, "cpu")
            run = retrain_to_cutoff(net, shifted, y, seed=0, config=config, reference_accuracy=reference.accuracy)
            batches.append({
                "kind": kind, "intensity": intensity, "batch": batch, "features": features, "epochs": float(run.epochs),
                "censored": run.status == "cap_reached", "status": run.status,
            })  # fmt: skip
            print(f"{kind} {intensity:g}: {run.status} at {run.epochs:.2f} epochs ({time.perf_counter() - started:.0f} s)", flush=True)
    return SimpleNamespace(net=net, reference=reference), batches


def score(work: Path, name: str, model: Any, batches: list[dict[str, Any]]) -> dict[str, Any]:
    from shiftcost.cli.forecast import run_calibrated_probe
    from shiftcost.forecast.forecaster import Forecaster

    forecaster = Forecaster.load(work / name / "forecaster.json")
    rows = [r for r in json.loads((work / name / "sweep.json").read_text())["rows"] if r.get("epochs") is not None]
    baselines = fit_baselines(rows)
    runs = []
    for batch in batches:
        features = batch["features"]
        drop = model.reference.accuracy - features["accuracy"]
        constant, isotonic = baselines(drop)
        trajectory = run_calibrated_probe(forecaster, model.net, batch["batch"], model.reference.accuracy, 0.03, None, 0, "cpu", batch["kind"], False, "USA")
        index = forecaster.predict(features)
        probed = forecaster.predict(features, probe=trajectory)
        runs.append({interval_key(d): resized(forecaster, d).predict(features, probe=trajectory).epochs for d in OTHER_INTERVALS} | {
            "epochs": batch["epochs"], "censored": batch["censored"], "constant": constant, "isotonic_accuracy_drop": isotonic,
            "stage0": index.epochs, "stage0_probe": probed.epochs, "default": index.epochs if forecaster.probe_not_worth() else probed.epochs,
            "not_converging": flags(index, probed),
        })  # fmt: skip
    return {
        "calibration_points": len(rows), "not_converging": not_converging_flags(runs), "probe_not_worth": forecaster.probe_not_worth(),
    } | metrics(runs, RESAMPLES, predictors=PREDICTORS + tuple(map(interval_key, OTHER_INTERVALS)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/shiftcost-calibrate-user"))
    parser.add_argument("--calibrations", default="default,fitted", help="Comma-separated --out-name values to score.")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    options = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    names = [n.strip() for n in options.calibrations.split(",") if n.strip()]
    model, batches = measure_batches(options.workdir, options.workdir / names[0] / "reference.safetensors")
    statuses = {s: sum(b["status"] == s for b in batches) for s in sorted({b["status"] for b in batches})}
    print(f"{len(batches)} evaluation batches: {statuses}")
    figures: dict[str, Any] = {"batches": [{k: v for k, v in b.items() if k != "batch"} for b in batches]}
    for name in names:
        figures[name] = score(options.workdir, name, model, batches)
        print(f"\n{name} ({figures[name]['calibration_points']} calibration points)")
        print(f"  default forecast: {'index stage, ' + figures[name]['probe_not_worth'] if figures[name]['probe_not_worth'] else 'probe stage'}")
        print(f"  {'predictor':<44}{'MdAPE':>8}{'|log err|':>11}{'C-index':>9}{'cov 90%':>9}{'cov>0':>7}")
        for predictor, s in figures[name]["predictors"].items():
            cells = (s["mdape"], s["median_abs_log_error"], s["c_index"], s["coverage"], s["coverage_needed"])
            print(f"  {predictor:<44}" + "".join(f"{'-' if math.isnan(v) else format(v, '.2f'):>{w}}" for v, w in zip(cells, (8, 11, 9, 9, 7))))
        print_flags(figures[name]["not_converging"], indent="  ")
        for baseline, ci in figures[name]["stage0_probe_minus_baseline_ci95"].items():
            print(f"  probe stage minus {baseline}, 95% CI: MdAPE [{ci['mdape'][0]:+.2f}, {ci['mdape'][1]:+.2f}], "
                  f"C-index [{ci['c_index'][0]:+.2f}, {ci['c_index'][1]:+.2f}]")
    if options.json:
        options.json.write_text(json.dumps(figures, indent=1, default=str))


if __name__ == "__main__":
    main()
