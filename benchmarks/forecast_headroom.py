"""How much of the probe stage's error on the unseen kinds a better fit could remove.

Usage: python benchmarks/forecast_headroom.py <forecast_accuracy.py --json files of one kind set> [--bootstrap 1000]

The probe stage forecasts epochs from one number, the probe's own cutoff (``cutoff_log_epochs``:
where its evaluations met the cutoff rule, else its curve's crossing), held at slope 1, with an
intercept and interval fitted on the built-in kinds. On the evaluation-only kinds it misses MdAPE
<= 35% on some sets. This script asks whether the miss is the fit's (the built-in kinds calibrate
it wrongly for these kinds) or the signal's (no function of that number forecasts these runs
better), by fitting on the very runs it scores, which a real forecast can never do:

- ``intercept fitted on these runs``: the shipped form, ``exp(cutoff + b) - 1``, with ``b`` chosen to
  minimise the MdAPE of these runs themselves: the best any recalibration of the intercept could do.
- ``each kind's median bias removed``: the shipped form with one intercept per kind, the median of
  ``log(epochs + 1) - cutoff`` over the kind's runs that reached the cutoff after training: what is
  left once each kind's own bias is known, which no forecast of an unseen kind can know. (Each
  kind's MdAPE-best intercept would not do: medians do not add up over kinds.)
- ``isotonic on the cutoff, other unseen kinds``: any increasing function of the cutoff, fitted on
  the set's other kinds (each kind left out in turn): a calibration that had seen kinds like these.
- ``linear on cutoff, index forecast, accuracy drop, other unseen kinds``: the same, with the
  other free signals as well.
- ``replicates``: the median epochs of the same shift (kind and intensity) drawn at the other seed
  offsets (capped runs at the cap), the forecast a user would get by retraining the same shift
  three more times. The probe sees the batch itself, so it can do better than this; it says how far
  one run's epochs move with the draw alone.

Each is scored as ``forecast_accuracy.py`` scores (MdAPE of the runs that reached the cutoff after
some training, Harrell's C-index with capped runs censored), and its MdAPE minus the shipped probe
stage's gets a 95% CI from resampling (kind, seed offset) clusters. Nothing here chooses a setting.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LinearRegression

sys.path.insert(0, str(Path(__file__).resolve().parent))

from forecast_accuracy import TOLERANCE, _scores, cluster_draw, paired_ci  # noqa: E402

from shiftcost.forecast import protocol  # noqa: E402
from shiftcost.forecast.forecaster import Interval  # noqa: E402
from shiftcost.forecast.probe import features_of_saved_curve, horizon_epochs, starts_at_target  # noqa: E402

SHIPPED = "probe stage (shipped)"
OFFSET = "intercept fitted on these runs"
KIND_OFFSET = "each kind's median bias removed"
ISOTONIC = "isotonic on the cutoff, other unseen kinds"
LINEAR = "linear on cutoff, index forecast, accuracy drop, other unseen kinds"
REPLICATES = "replicates (same shift, other seed offsets)"
HEADROOM = (OFFSET, KIND_OFFSET, ISOTONIC, LINEAR, REPLICATES)
#: Intercepts searched for :data:`OFFSET`, in log(epochs + 1).
OFFSET_GRID = np.round(np.arange(-2.0, 2.0 + 1e-9, 0.01), 2)


def read_runs(paths: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """Every scored run of the files, per architecture, with the probe's cutoff read again from its saved curve."""
    by_arch: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        for result in json.loads(path.read_text()):
            ceiling = result["reference_accuracy"]
            target = ceiling - TOLERANCE
            for saved in result["runs"]:
                probe = saved["probe_curve"]
                read = features_of_saved_curve(probe, target=target, ceiling=ceiling, cap_epochs=protocol.MAX_EPOCHS)
                by_arch.setdefault(result["arch"], []).append({
                    "kind": saved["kind"], "intensity": saved["intensity"], "offset": result["seed_offset"], "cluster": f"{saved['kind']}/{result['seed_offset']}",
                    "epochs": saved["epochs"], "censored": saved["censored"], "accuracy_drop": saved["accuracy_drop"],
                    "cutoff": read["cutoff_log_epochs"], "stage0_log": math.log(saved["stage0"]["median"] + 1.0),
                    "already_met": starts_at_target([p["accuracy"] for p in probe], target),
                    SHIPPED: Interval(**saved["stage0_probe"]),
                })  # fmt: skip
    return by_arch


def point(epochs: float) -> Interval:
    return Interval(epochs, epochs, epochs, 0.0)


def from_log(z: float, already_met: bool) -> Interval:
    """A forecast of ``log(epochs + 1)`` as epochs, within the forecast horizon; a probe that started at the target forecasts 0, as shipped."""
    return point(0.0 if already_met else min(max(math.exp(z) - 1.0, 0.0), horizon_epochs(protocol.MAX_EPOCHS)))


def _reached(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in runs if not r["censored"] and r["epochs"] > 0]


def best_offset(runs: list[dict[str, Any]], grid: np.ndarray = OFFSET_GRID) -> float:
    """The intercept ``b`` of ``exp(cutoff + b) - 1`` with the lowest MdAPE over ``runs`` that reached the cutoff after training (first of ties)."""
    reached = _reached(runs)
    cutoff = np.array([r["cutoff"] for r in reached])
    truth = np.array([r["epochs"] for r in reached])
    errors = [np.median(np.abs(np.maximum(np.exp(cutoff + b) - 1.0, 0.0) - truth) / truth) for b in grid]
    return float(grid[int(np.argmin(errors))])


def _columns(runs: list[dict[str, Any]]) -> np.ndarray:
    return np.array([[r["cutoff"], r["stage0_log"], r["accuracy_drop"]] for r in runs])


def other_kinds(runs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The runs of the other kinds that reached the cutoff after training (capped ones bias any fit on them low, and are left out of it)."""
    return _reached([r for r in runs if r["kind"] != kind])


def add_headroom(runs: list[dict[str, Any]]) -> float:
    """Each run's :data:`HEADROOM` forecasts (see the module's docstring); returns the fitted offset."""
    offset = best_offset(runs)
    for kind in sorted({r["kind"] for r in runs}):
        train = other_kinds(runs, kind)
        log_epochs = np.log(np.array([r["epochs"] for r in train]) + 1.0)
        isotonic = IsotonicRegression(out_of_bounds="clip").fit([r["cutoff"] for r in train], log_epochs)
        linear = LinearRegression().fit(_columns(train), log_epochs)
        here = [r for r in runs if r["kind"] == kind]
        # A kind with no run that reached the cutoff after training has no bias to measure.
        kind_offset = float(np.median([math.log(r["epochs"] + 1.0) - r["cutoff"] for r in _reached(here)])) if _reached(here) else offset
        for r, iso, lin in zip(here, isotonic.predict([r["cutoff"] for r in here]), linear.predict(_columns(here))):
            r[ISOTONIC], r[LINEAR] = from_log(float(iso), r["already_met"]), from_log(float(lin), r["already_met"])
            r[KIND_OFFSET] = from_log(r["cutoff"] + kind_offset, r["already_met"])
    for r in runs:
        r[OFFSET] = from_log(r["cutoff"] + offset, r["already_met"])
        same = [o["epochs"] for o in runs if (o["kind"], o["intensity"]) == (r["kind"], r["intensity"]) and o["offset"] != r["offset"]]
        r[REPLICATES] = point(float(np.median(same))) if same else None
    return offset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    for arch, runs in read_runs(args.paths).items():
        offset = add_headroom(runs)
        kinds = sorted({r["kind"] for r in runs})
        print(f"\n=== {arch}: {len(runs)} runs, {len(_reached(runs))} reached the cutoff after training, kinds {', '.join(kinds)}")
        print(f"intercept fitted on these runs: {offset:+.2f} in log(epochs + 1)")
        print(f"{'forecast':<70s} {'MdAPE':>6s} {'C-index':>8s}  MdAPE minus shipped, 95% CI (clusters)")
        for name in (SHIPPED,) + HEADROOM:
            scored = [r for r in runs if r[name] is not None]
            s = _scores(scored, name)
            ci = "" if name == SHIPPED else "[{:+.3f}, {:+.3f}]".format(*paired_ci(scored, args.bootstrap, cluster_draw(scored), name, SHIPPED)["mdape"])
            print(f"{name:<70s} {s['mdape']:6.1%} {s['c_index']:8.3f}  {ci}")


if __name__ == "__main__":
    main()
