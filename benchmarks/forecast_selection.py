"""Choose the forecast's settings on the built-in shift kinds only (leave-one-kind-out).

Usage: nice -n 10 python benchmarks/forecast_selection.py [--archs digits_cnn,shufflenet_v2_x0_5]
       [--windows 1,2,3] [--own-curve-evals inf,2,4,8,16] [--noise-seeds 4] [--seeds 3] [--probe-steps 16]
       [--replay-fraction 0] [--calibrations a.json,b.json [--probe-scaling S] [--each-sweep [--calibration-fit mean|first|each] [--stage1-design D]]]
       [--json out.json]
       python benchmarks/forecast_selection.py --compare-probes current.json other.json

``benchmarks/forecast_accuracy.py`` scores on evaluation-only kinds that must never choose
anything; every setting is chosen here instead, on :data:`shiftcost.shifts.DEFAULT_SWEEP`:

1. **Cutoff window** (:data:`shiftcost.forecast.protocol.CUTOFF_WINDOW`): one batch per
   built-in kind (its middle non-zero intensity) retrained with ``--noise-seeds`` seeds under
   each window; the leave-one-seed-out MdAPE of epochs is the noise floor no forecast can
   beat. The smallest window within one point of the lowest floor is reported (a wider window
   delays every stop by up to a cadence interval); the protocol's comment says what decided it.
2. Under the protocol's window, the calibration sweep of the accuracy benchmark at ``--seeds``
   seeds (each its own corruptions, held-out splits and shuffling; one sweep's verdicts are at
   the level of its retrains' noise), pooled, then **leave-one-kind-out** over its kinds (all
   seeds of a kind left out together): every predictor is fitted on all kinds but one and
   scored on that one (constant, isotonic on accuracy drop, stage 0, stage 0 + probe,
   and the in-flight forecast after a quarter of the probe forecast's median for each
   ``--own-curve-evals`` weight of the run's own curve,
   :data:`shiftcost.forecast.forecaster.OWN_CURVE_EVALS`). The weight with the lowest
   median |log error| of the in-flight forecast (capped runs as bounds) is chosen. Against the
   current design (:data:`~shiftcost.forecast.forecaster.STAGE1_DEFAULT`, every step evaluated,
   the probe's full length, no pull) compete: the stage-1 designs of :data:`STAGE1_DESIGNS`, the
   current design with its curve feature clipped at each of :data:`CURVE_HORIZONS` caps (read
   again from each point's ``probe_curve``), the probe's evaluations of the held-out split (most
   of its cost) every k-th step of :data:`PROBE_EVAL_EVERY`, the probe's first k steps of
   :data:`PROBE_LENGTHS`, a probe sized by the index stage's forecast (:data:`ADAPTIVE`: each
   point's probe read at the length that forecast gives, its sample-gradients and the retrains'
   printed), pulls towards calibration's median epochs (:data:`PULLS`), and the probe stage's interval
   sized on every run, on the runs that needed training or on the batch's stratum (:data:`~shiftcost.forecast.forecaster.INTERVAL_RUNS`,
   the median the same). Each
   is scored by its MdAPE, averaged over the architectures, and by a paired bootstrap 95% CI of
   that mean minus the current design's, resampling each architecture's (kind, sweep) clusters.
   A setting replaces the current one only on that evidence: a design, horizon or pull when its
   whole CI lies below zero (the lowest such), the sparsest cadence and the shortest probe when
   their CI lies below :data:`MARGIN` (no more than two points worse), the probe sized by the
   forecast on the same margin, another interval design when the CI of its coverage's distance
   from the level, minus the current one's, lies below zero (:func:`interval_choice`). Where the choice rested
   on the lowest mean alone, the curve's horizon went from 3 caps to 2 with four sweeps per
   architecture and to 1.5 with six, each by a lead the bootstrap puts well inside its noise. Beside MdAPE, which
   leaves out the capped runs, every predictor's mean |log error| of the batches that needed
   training (capped runs as bounds) is printed, with the design lowest on it; settings are not
   chosen on it.
3. On the same left-out points, **the "not to converge" flag** that skips a batch: how often
   the index stage (the pipeline's rule), the probe stage and a batch the index stage would
   skip probed with the probe deciding (a rule the pipeline tried and dropped) raise it on
   runs that reached the cutoff, and on how many of the capped runs.

With ``--calibrations`` the sweeps of step 2 are the ones ``forecast_accuracy.py --json`` saved
(one per seed offset: every kind set of one offset shares its sweep), and step 1 is skipped;
those files' scored runs, of evaluation-only kinds, are not read. Sweeps that ran a probe per rate
scaling (``forecast_accuracy.py --probe-rate-scaling chosen``) are read under one of them with
``--probe-scaling none|linear|sqrt``, or with ``--probe-scaling chosen-in-fold`` under the one each
sweep's other kinds forecast better in each fold. ``--each-sweep`` fits every sweep on its own other
kinds, as ``calibrate`` fits one sweep, and scores the probe stage and the baselines only: probes
chosen per sweep are compared so, where a pooled fit would read a mixture of them. With sweeps that
retrained every point more than once (``forecast_accuracy.py --calibration-repeats``), ``--calibration-fit``
fits each point on the mean of its retrains (as ``calibrate`` does), on its first alone or on each
as a row, and scores every left-out point on its first retrain; ``--stage1-design`` fits stage 1 on one
of :data:`STAGE1_DESIGNS` instead of the library's. ``--compare-probes`` pairs two such selections of
the same sweeps (:func:`probe_choice`).

One protocol holds for every architecture: each setting is chosen on the mean of its criterion
over the architectures (``--combine`` joins separate runs' ``--json``).
Prints the figures each choice was made on; nothing here reads ``benchmarks/eval_shifts.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from forecast_accuracy import (  # noqa: E402
    CALIBRATION_FITS, LEVEL, OTHER_INTERVALS, PROBE_STEPS, TOLERANCE, TRAINING_RECIPE, _scores, build_arch, calibrate, fit_baselines, flags,
    interval_key, not_converging_flags, print_flags, probe_steps_taken, resized, rows_fitted_as, seed_spread,
)

from shiftcost.forecast import protocol  # noqa: E402
from shiftcost.forecast.forecaster import INTERVAL_RUNS, INTERVAL_SIZED_ON, PULL_TO_MEDIAN, STAGE0_FEATURE, STAGE1_INPUTS, Forecaster  # noqa: E402
from shiftcost.forecast.probe import DEFAULT_BATCH_SIZE as PROBE_BATCH  # noqa: E402
from shiftcost.forecast.probe import HORIZON_CAPS, PROBE_STRATUM, features_of_saved_curve  # noqa: E402
from shiftcost.shifts import DEFAULT_SWEEP, corrupt  # noqa: E402

PROTOCOL_WINDOW = protocol.CUTOFF_WINDOW


def noise_floor_by_window(
    model: Any, x: Any, y: Any, ceiling: float, seeds: int, windows: list[int], recipe: dict[str, Any], reference: tuple[Any, Any]
) -> dict[str, Any]:
    """Leave-one-seed-out MdAPE and CV of epochs per cutoff window, on the built-in kinds
    (one batch each, at its middle non-zero intensity), retrained under ``recipe`` (replaying from ``reference`` if it replays)."""
    batches = {}
    for kind, values in DEFAULT_SWEEP.items():
        nonzero = [v for v in values if v > 0]
        batches[kind] = corrupt(x, kind, nonzero[len(nonzero) // 2], seed=0)
    out: dict[str, Any] = {}
    for window in windows:
        protocol.CUTOFF_WINDOW = window
        out[str(window)] = seed_spread(model, batches, y, ceiling, seeds, recipe=recipe, reference=reference)
    return out


def choose_window(floors: dict[str, Any]) -> int:
    best = min(v["leave_one_seed_out_mdape"] for v in floors.values())
    return min(int(w) for w, v in floors.items() if v["leave_one_seed_out_mdape"] <= best + 0.01)


#: Stage-1 designs compared (the features of its censored regression).
STAGE1_DESIGNS: dict[str, tuple[str, ...]] = {
    "index+curve+progress+loss_drop": (STAGE0_FEATURE, "curve_log_epochs", "probe_progress", "probe_loss_drop"),
    "index+curve": (STAGE0_FEATURE, "curve_log_epochs"),
    "index+curve+progress": (STAGE0_FEATURE, "curve_log_epochs", "probe_progress"),
    "curve+progress+loss_drop": ("curve_log_epochs", "probe_progress", "probe_loss_drop"),
    "curve": ("curve_log_epochs",),
    "gap": ("probe_gap",),
    "curve+gap": ("curve_log_epochs", "probe_gap"),
    "cutoff": ("cutoff_log_epochs",),
    "cutoff+gap": ("cutoff_log_epochs", "probe_gap"),
    "curve at slope 1": ("curve_log_epochs",),
    "cutoff at slope 1": ("cutoff_log_epochs",),
    "index+cutoff at slope 1": (STAGE0_FEATURE, "cutoff_log_epochs"),
    "cutoff at slope 1 + stratum": ("cutoff_log_epochs", PROBE_STRATUM),
    "cutoff at slope 1 + gap": ("cutoff_log_epochs", "probe_gap"),
    "cutoff at slope 1 + initial gap": ("cutoff_log_epochs", "probe_initial_gap"),
    "cutoff at slope 1 + first-step gain": ("cutoff_log_epochs", "probe_first_step_gain"),
    "cutoff at slope 1 + batch-norm gain": ("cutoff_log_epochs", "probe_bn_gain"),
}
#: Designs whose features enter with their coefficient held at 1 (offsets).
STAGE1_DESIGN_OFFSETS: dict[str, tuple[str, ...]] = {
    "curve at slope 1": ("curve_log_epochs",), "cutoff at slope 1": ("cutoff_log_epochs",), "index+cutoff at slope 1": ("cutoff_log_epochs",),
    "cutoff at slope 1 + stratum": ("cutoff_log_epochs",), "cutoff at slope 1 + gap": ("cutoff_log_epochs",),
    "cutoff at slope 1 + initial gap": ("cutoff_log_epochs",), "cutoff at slope 1 + first-step gain": ("cutoff_log_epochs",),
    "cutoff at slope 1 + batch-norm gain": ("cutoff_log_epochs",),
}


def design_fit(name: str) -> dict[str, tuple[str, ...]]:
    """``Forecaster.fit``'s stage-1 arguments for the design ``name`` of :data:`STAGE1_DESIGNS`."""
    return {"stage1_features": STAGE1_DESIGNS[name], "stage1_offsets": STAGE1_DESIGN_OFFSETS.get(name, ())}


def probe_values(row: dict[str, Any]) -> dict[str, float]:
    """What a point's probe gives stage 1 (:data:`~shiftcost.forecast.forecaster.STAGE1_INPUTS`); a stage 1
    that reads one the point lacks says so itself."""
    return {f: row[f] for f in STAGE1_INPUTS if f in row}


#: Where the curve feature of a probe whose curve does not reach the target is clipped, in epoch
#: caps (:data:`~shiftcost.forecast.probe.HORIZON_CAPS`), compared on the current stage-1 design.
CURVE_HORIZONS: tuple[float, ...] = (1.0, 1.5, 2.0, HORIZON_CAPS)


def reread(
    rows: list[dict[str, Any]], keep: Callable[[list[dict[str, float]]], list[dict[str, float]]] = list, horizon_caps: float | None = None,
) -> list[dict[str, Any]]:
    """``rows`` with the probe's features read again from what ``keep`` keeps of each row's
    ``probe_curve`` (all of it by default), a curve that does not reach the target clipped at
    ``horizon_caps`` caps (the library's horizon by default)."""
    return [
        row | features_of_saved_curve(
            keep(row["probe_curve"]), target=row["target_accuracy"], ceiling=row["reference_accuracy"], cap_epochs=protocol.MAX_EPOCHS,
            horizon_caps=horizon_caps, bn_adapted_accuracy=row.get("probe_bn_adapted_accuracy"),
        )
        for row in rows
    ]


#: Sparser evaluation of the probe's held-out split, every k-th step (the first and the last always),
#: compared on the current stage-1 design. Evaluating does not change a probe's steps, so such a
#: probe's curve is the saved full curve's subsequence: read again, not run again.
PROBE_EVAL_EVERY: tuple[int, ...] = (2, 4)


def evaluated_every(curve: list[dict[str, float]], k: int, length: int = PROBE_STEPS) -> list[dict[str, float]]:
    """What a probe of ``length`` steps evaluating after every ``k``-th step (and after its last) saw of ``curve``.

    A saved probe that stopped at its cutoff off that grid was seen by the sparser probe only at
    its next evaluation: the stopping evaluation stands in for it there, up to ``k - 1`` steps
    later (read where it stopped, the sparser probe would be credited with steps it never saw)."""
    last = len(curve) - 1
    seen = [p for i, p in enumerate(curve) if i % k == 0 or i == last]
    if last < length and last % k:
        step = curve[1]["epoch"] - curve[0]["epoch"]
        seen[-1] = seen[-1] | {"epoch": curve[0]["epoch"] + min(-(-last // k) * k, length) * step}
    return seen


#: Shorter probes, compared on the current stage-1 design: the first k steps of a probe are the
#: same whatever its length (same samples, same order, same seed), so a k-step probe's curve is
#: the saved curve's first k + 1 evaluations: read again, not run again.
PROBE_LENGTHS: tuple[int, ...] = (8, 10, 12)

#: How far the probe stage's forecast is pulled towards the median epochs of calibration's batches
#: that needed training (:data:`~shiftcost.forecast.forecaster.PULL_TO_MEDIAN`), compared on the
#: current design: the pull acts on the forecast, not the fit, so one fitted forecaster serves all.
PULLS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)


def leave_one_kind_out(
    rows: list[dict[str, Any]], features: list[str], weights: list[float], probe_steps: int = PROBE_STEPS, probe_scaling: str | None = None,
) -> list[dict[str, Any]]:
    """Every calibration point forecast by predictors fitted on the other kinds (every seed's
    points of a kind are left out together).

    The in-flight forecasts start from the probe forecast of the current stage-1 design
    (:data:`~shiftcost.forecast.forecaster.STAGE1_DEFAULT`); each design adds a
    ``stage0_probe[<design>]`` predictor, each of :data:`CURVE_HORIZONS` but the current one a
    ``stage0_probe[curve to <caps> caps]``, each of :data:`PROBE_EVAL_EVERY` a
    ``stage0_probe[evaluated every <k> steps]`` and each of :data:`PROBE_LENGTHS` a
    ``stage0_probe[probe of <k> steps]``. ``probe_scaling`` says which probe each point is read
    under, where its sweep ran several (``row["probes"]``): ``None``, the one its calibration kept;
    a scaling, that one throughout; :data:`IN_FOLD`, in each fold the one each sweep's other kinds
    forecast better (``shiftcost.calibrate.analysis.choose_rate_scaling``), so that the left-out
    kind plays no part in its own probe's choice, as an unseen kind plays none in calibration's."""
    from shiftcost.calibrate.analysis import _fit_row

    everything = scored_points(rows, features, probe_scaling)
    usable = everything
    # Chosen in each fold, the points are read again in each fold.
    reread = read_again(usable, probe_steps) if probe_scaling != IN_FOLD else {}
    records: list[dict[str, Any]] = []
    for kind in dict.fromkeys(r["corruption"] for r in everything):
        if probe_scaling == IN_FOLD:
            usable = chosen_in_fold(everything, kind, features)
            reread = read_again(usable, probe_steps)
        train = [r for r in usable if r["corruption"] != kind]
        refits = {
            name: Forecaster.fit(
                [_fit_row(r) for r in read if r["corruption"] != kind], features=features, level=LEVEL, max_epochs=protocol.MAX_EPOCHS,
            )
            for name, read in reread.items()
        }
        forecaster = Forecaster.fit([_fit_row(r) for r in train], features=features, level=LEVEL, max_epochs=protocol.MAX_EPOCHS)
        if forecaster.stage1 is None:
            raise SystemExit(f"leaving {kind} out, stage 1 could not be fitted: {forecaster.stage1_error}")
        baselines = fit_baselines(train)
        designs = {
            name: Forecaster.fit([_fit_row(r) for r in train], features=features, level=LEVEL, max_epochs=protocol.MAX_EPOCHS, **design_fit(name))
            for name in STAGE1_DESIGNS
        }
        lengths = [adaptive_length(forecaster, row, features, probe_steps) for row in usable]
        adaptive_rows = reread_each(usable, lengths)
        adaptive = Forecaster.fit(
            [_fit_row(r) for r in adaptive_rows if r["corruption"] != kind], features=features, level=LEVEL, max_epochs=protocol.MAX_EPOCHS,
        )
        for i, row in enumerate(usable):
            if row["corruption"] != kind:
                continue
            record = _forecast_point(forecaster, baselines, row, features, weights)
            record["probe_read_under"] = row.get("probe_read_under")
            met = bool(row["probe_already_met"])
            read = adaptive_rows[i]
            record[f"stage0_probe[{ADAPTIVE}]"] = adaptive.predict_from_probe_features(
                {f: read[f] for f in features}, probe_values(read), already_met=met,
            ).epochs
            record["probe_work"] = {  # sample-gradients, each probe stopped at its cutoff
                "current": probe_steps_taken(row["probe_curve"], row["target_accuracy"]) * PROBE_BATCH,
                ADAPTIVE: probe_steps_taken(row["probe_curve"][: lengths[i] + 1], row["target_accuracy"]) * PROBE_BATCH,
                "retrain": float(row["runs"][0]["samples_seen"]),
            }
            for name, design in designs.items():
                record[f"stage0_probe[{name}]"] = design.predict_from_probe_features(
                    {f: row[f] for f in features}, probe_values(row), already_met=met,
                ).epochs
            for design in OTHER_INTERVALS:
                record[interval_key(design)] = resized(forecaster, design).predict_from_probe_features(
                    {f: row[f] for f in features}, probe_values(row), already_met=met,
                ).epochs
            for pull in PULLS:
                pulled = copy.copy(forecaster)
                pulled.pull_to_median = pull
                record[f"stage0_probe[pulled {pull:g} to the median]"] = pulled.predict_from_probe_features(
                    {f: row[f] for f in features}, probe_values(row), already_met=met,
                ).epochs
            for name, fit in refits.items():
                read = reread[name][i]
                record[f"stage0_probe[{name}]"] = fit.predict_from_probe_features(
                    {f: read[f] for f in features}, probe_values(read), already_met=met,
                ).epochs
            records.append(record)
    return records


#: ``--probe-scaling`` for the rate scaling chosen in each fold, as calibration chooses it.
IN_FOLD = "chosen-in-fold"


def scored_points(rows: list[dict[str, Any]], features: list[str], probe_scaling: str | None) -> list[dict[str, Any]]:
    """The calibration points leave-one-kind-out scores (measured, with their features and runs),
    read under ``probe_scaling``'s probe where that is one scaling throughout."""
    from shiftcost.calibrate.analysis import _fit_ready

    if probe_scaling not in (None, IN_FOLD):
        rows = with_probe(rows, probe_scaling)
    return [r for r in rows if r["status"] != "failed" and _fit_ready(r, features) and r.get("runs")]


def read_under(records: list[dict[str, Any]], probe_scaling: str | None) -> Any:
    """How many points of each kind were read under each scaling where each fold chose it; else the
    one scaling (``None``: the one each calibration kept)."""
    if probe_scaling != IN_FOLD:
        return probe_scaling
    kinds = dict.fromkeys(r["kind"] for r in records)
    return {kind: dict(Counter(r["probe_read_under"] for r in records if r["kind"] == kind)) for kind in kinds}


def with_probe(rows: list[dict[str, Any]], scaling: str) -> list[dict[str, Any]]:
    """``rows`` read under the probe their sweep ran at ``scaling`` beside the one it kept."""
    missing = sum(1 for r in rows if r["status"] != "failed" and scaling not in r.get("probes", {}))
    if missing:
        raise SystemExit(
            f"{missing} calibration points ran no probe under the rate scaling {scaling!r}; pass sweeps that ran it "
            "(forecast_accuracy.py --probe-rate-scaling chosen, or --probe-rate-scaling with that scaling)."
        )
    return [r | r["probes"][scaling] if r["status"] != "failed" else r for r in rows]


def chosen_in_fold(rows: list[dict[str, Any]], kind: str, features: list[str]) -> list[dict[str, Any]]:
    """``rows`` with each sweep's points read under the probe its kinds other than ``kind`` forecast
    better, ``kind``'s own points included."""
    from shiftcost.calibrate.analysis import choose_rate_scaling

    out: list[dict[str, Any]] = []
    for sweep in dict.fromkeys(r["sweep"] for r in rows):
        mine = [dict(r) for r in rows if r["sweep"] == sweep]
        scalings = {"probe_rate_scalings": list(mine[0].get("probes", {}))}
        choice = choose_rate_scaling([r for r in mine if r["corruption"] != kind], scalings, features, LEVEL, protocol.MAX_EPOCHS)
        if choice is None:
            raise SystemExit(
                f"sweep {sweep} ran one probe per point, so there is no scaling to choose; pass sweeps that ran several "
                "(forecast_accuracy.py --probe-rate-scaling chosen)."
            )
        out += [r | r["probes"][choice["chosen"]] | {"probe_read_under": choice["chosen"]} for r in mine]
    return out


def each_sweep_left_out(
    rows: list[dict[str, Any]], features: list[str], weights: list[float], probe_scaling: str | None, calibration_fit: str = "mean",
    stage1_design: str | None = None,
) -> list[dict[str, Any]]:
    """Every calibration point forecast as its own calibration's leave-one-kind-out forecasts it: by
    predictors fitted on its sweep's other kinds alone (``calibrate`` fits one sweep, where
    :func:`leave_one_kind_out` pools them), each point's probe read as ``probe_scaling`` says
    there. Where sweeps keep different probes, a pooled fit would read a mixture no calibration
    fits, so probe designs chosen per sweep are compared here. The other kinds' points are fitted
    as ``calibration_fit`` says (``forecast_accuracy.rows_fitted_as``); every left-out point is
    scored on its first retrain, as one retrain of an unseen batch is, however the fit read them.
    ``stage1_design`` (a key of :data:`STAGE1_DESIGNS`) fits stage 1 on that design instead of the library's."""
    from shiftcost.calibrate.analysis import _fit_row

    usable = scored_points(rows, features, probe_scaling)
    design = {} if stage1_design is None else design_fit(stage1_design)
    records: list[dict[str, Any]] = []
    for sweep in dict.fromkeys(r["sweep"] for r in usable):
        mine = [r for r in usable if r["sweep"] == sweep]
        for kind in dict.fromkeys(r["corruption"] for r in mine):
            read = chosen_in_fold(mine, kind, features) if probe_scaling == IN_FOLD else mine
            train = rows_fitted_as([r for r in read if r["corruption"] != kind], calibration_fit)
            forecaster = Forecaster.fit([_fit_row(r) for r in train], features=features, level=LEVEL, max_epochs=protocol.MAX_EPOCHS, **design)
            if forecaster.stage1 is None:
                raise SystemExit(f"sweep {sweep}, leaving {kind} out: stage 1 could not be fitted: {forecaster.stage1_error}")
            baselines = fit_baselines(train)
            for row in (r for r in read if r["corruption"] == kind):
                records.append(_forecast_point(forecaster, baselines, row, features, weights) | {"probe_read_under": row.get("probe_read_under")})
    return records


def select_each_sweep(arch: str, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`each_sweep_left_out` on the saved calibrations of ``arch``, scored as :func:`select_arch`
    scores, in the shape :func:`probe_choice` pairs."""
    started = time.perf_counter()
    weights = [float(w) for w in args.own_curve_evals.split(",")]
    rows, features, seeds = saved_calibrations([Path(p) for p in args.calibrations.split(",")], arch)
    records = each_sweep_left_out(rows, features, weights, args.probe_scaling, args.calibration_fit, args.stage1_design)
    names = ["constant", "isotonic_accuracy_drop", "stage0", "stage0_probe"] + [f"in_flight_own_{w:g}" for w in weights]
    return {
        "arch": arch, "each_sweep": True, "calibration_fit": args.calibration_fit, "stage1_design": args.stage1_design, "loko": {name: _scores(records, name) for name in names},
        "points_scored": [{k: r[k] for k in ("kind", "sweep", "intensity", "epochs", "censored")} for r in records],
        "stage1_errors": stage1_errors(records, ["stage0_probe"]),
        "probe_read_under": read_under(records, args.probe_scaling),
        "points": len(records), "seeds": seeds, "seconds": time.perf_counter() - started,
    }


#: A probe sized by the index stage's forecast instead of a fixed length: at most ADAPTIVE_SHARE of
#: the sample-gradients of the retrain that forecast says, within [ADAPTIVE_MIN_STEPS, the probe's
#: length] steps. Calibration's probes are read at the length the forecast of each gives (its
#: first steps are the same whatever its length, as for PROBE_LENGTHS).
ADAPTIVE_SHARE = 0.2
ADAPTIVE_MIN_STEPS = min(PROBE_LENGTHS)
ADAPTIVE = f"probe to {ADAPTIVE_SHARE:g} of the index forecast"


def adaptive_length(forecaster: Forecaster, row: dict[str, Any], features: list[str], probe_steps: int) -> int:
    """The steps of a probe sized by ``forecaster``'s index-stage forecast of ``row``."""
    batch = forecaster.batch_size
    forecast_steps = forecaster.predict({f: row[f] for f in features}).epochs.median * protocol.steps_per_epoch(int(row["samples"]), batch)
    length = math.floor(ADAPTIVE_SHARE * batch * forecast_steps / PROBE_BATCH)
    return int(min(probe_steps, max(ADAPTIVE_MIN_STEPS, length)))


def reread_each(rows: list[dict[str, Any]], lengths: list[int]) -> list[dict[str, Any]]:
    """``rows`` with each probe read again as if it had stopped after its own length in ``lengths``."""
    return [reread([row], lambda curve, k=k: curve[: k + 1])[0] for row, k in zip(rows, lengths)]


def read_again(rows: list[dict[str, Any]], probe_steps: int = PROBE_STEPS) -> dict[str, list[dict[str, Any]]]:
    """``rows`` with the probe's features read again from their saved curves, per variant compared
    on the current design: the curve clipped at other horizons, the probe evaluated more sparsely,
    the probe stopped after fewer steps."""
    variants = {f"curve to {caps:g} caps": reread(rows, horizon_caps=caps) for caps in CURVE_HORIZONS if caps != HORIZON_CAPS}
    variants |= {
        f"evaluated every {k} steps": reread(rows, lambda curve, k=k: evaluated_every(curve, k, probe_steps)) for k in PROBE_EVAL_EVERY
    }
    return variants | {f"probe of {k} steps": reread(rows, lambda curve, k=k: curve[: k + 1]) for k in PROBE_LENGTHS}


def _forecast_point(forecaster: Forecaster, baselines: Any, row: dict[str, Any], features: list[str], weights: list[float]) -> dict[str, Any]:
    run = row["runs"][0]
    x = {f: row[f] for f in features}
    stage1 = forecaster.predict_from_probe_features(
        x, probe_values(row), already_met=bool(row["probe_already_met"])
    )
    stage0 = forecaster.predict(x)
    record = {
        "kind": row["corruption"], "sweep": row.get("sweep"), "intensity": row["intensity"], "epochs": float(run["epochs"]),
        "censored": run["status"] == "cap_reached", "stage0": stage0.epochs, "stage0_probe": stage1.epochs,
        "not_converging": flags(stage0, stage1),
    }
    record["constant"], record["isotonic_accuracy_drop"] = baselines(row["accuracy_drop"])
    quarter = 0.25 * stage1.epochs.median
    seen = [p for p in run["curve"] if p["epoch"] <= quarter + 1e-9]
    ceiling = run["target_accuracy"] + TOLERANCE
    for weight in weights:
        name = f"in_flight_own_{weight:g}"
        record[name] = None
        if len(seen) >= 3 and len(seen) < len(run["curve"]):
            record[name] = forecaster.in_flight(
                [p["epoch"] for p in seen], [p["accuracy"] for p in seen], [p["loss"] for p in seen], target=run["target_accuracy"],
                ceiling=ceiling, prior=stage1, own_curve_evals=weight,
            ).epochs
    if len(seen) >= 3 and len(seen) < len(run["curve"]):
        old = forecaster.in_flight(  # the earlier design: stage 1 read on the run's own curve
            [p["epoch"] for p in seen], [p["accuracy"] for p in seen], [p["loss"] for p in seen], target=run["target_accuracy"],
            ceiling=ceiling, own_curve_evals=math.inf,
        )
        record["in_flight_stage1_on_run"] = old.epochs
    else:
        record["in_flight_stage1_on_run"] = None
    return record


def select_arch(arch: str, args: argparse.Namespace) -> dict[str, Any]:
    from shiftcost.index.engine import compute_reference_stats

    started = time.perf_counter()
    weights = [float(w) for w in args.own_curve_evals.split(",")]
    if args.calibrations:
        rows, features, seeds = saved_calibrations([Path(p) for p in args.calibrations.split(",")], arch)
        floors: dict[str, Any] = {}
        window = None
    else:
        recipe = TRAINING_RECIPE | {"replay_fraction": args.replay_fraction}
        model, spec, splits = build_arch(arch, recipe=recipe)
        stats = compute_reference_stats(model, spec, *splits["holdout"], device="cpu", seed=0)
        new_x, new_y = splits["stream"]
        windows = [int(w) for w in args.windows.split(",")]
        floors = noise_floor_by_window(model, new_x, new_y, stats.accuracy, args.noise_seeds, windows, recipe, splits["holdout"])
        window = choose_window(floors)
        protocol.CUTOFF_WINDOW = PROTOCOL_WINDOW  # the noise-floor runs set it; leave-one-kind-out measures the protocol
        # One sweep's choice is at the level of its retrains' noise: several seeds' sweeps (their own
        # corruptions, splits and shuffling) are pooled, each kind still left out as a whole.
        sweeps = [
            calibrate(model, spec, splits, stats, args.calibration_intensities, seed=seed, probe_steps=args.probe_steps) for seed in range(args.seeds)
        ]
        rows = [r | {"sweep": seed} for seed, sweep in enumerate(sweeps) for r in sweep.rows]
        features, seeds = list(sweeps[0].forecaster.stage0.features_), args.seeds
    records = leave_one_kind_out(rows, features, weights, args.probe_steps, args.probe_scaling)
    names = ["constant", "isotonic_accuracy_drop", "stage0", "stage0_probe"] + [f"stage0_probe[{d}]" for d in STAGE1_DESIGNS]
    names += [f"stage0_probe[curve to {caps:g} caps]" for caps in CURVE_HORIZONS if caps != HORIZON_CAPS]
    names += [f"stage0_probe[evaluated every {k} steps]" for k in PROBE_EVAL_EVERY]
    names += [f"stage0_probe[probe of {k} steps]" for k in PROBE_LENGTHS if k < args.probe_steps]
    names += [f"stage0_probe[pulled {pull:g} to the median]" for pull in PULLS] + [f"stage0_probe[{ADAPTIVE}]"]
    names += [interval_key(design) for design in OTHER_INTERVALS]
    names += ["in_flight_stage1_on_run"] + [f"in_flight_own_{w:g}" for w in weights]
    table = {name: _scores(records, name) for name in names}
    scored = {w: table[f"in_flight_own_{w:g}"]["median_abs_log_error"] for w in weights}
    own = min(scored, key=lambda w: (scored[w], -w if math.isfinite(w) else 0))
    mdape = {d: table[f"stage0_probe[{d}]"]["mdape"] for d in STAGE1_DESIGNS}
    return {
        "arch": arch, "chosen_stage1_design": min(mdape, key=mdape.get), "noise_floor_by_window": floors, "lowest_floor_window": window,
        "protocol_window": PROTOCOL_WINDOW, "loko": table, "chosen_own_curve_evals": own, "not_converging": not_converging_flags(records),
        "points_scored": [
            {k: r[k] for k in ("kind", "intensity", "epochs", "censored", "not_converging")}
            | {name: r[name].to_dict() for name in ("stage0", "stage0_probe")}
            for r in records
        ],
        "stage1_errors": stage1_errors(records, [n for n in names if n.startswith("stage0_probe")]),
        "interval_hits": interval_hits(records),
        "probe_work": {
            name: {"median": float(np.median([r["probe_work"][name] for r in records])), "mean": float(np.mean([r["probe_work"][name] for r in records]))}
            for name in ("current", ADAPTIVE, "retrain")
        },
        "probe_read_under": read_under(records, args.probe_scaling),
        "points": len(records), "seeds": seeds, "probe_steps": args.probe_steps, "replay_fraction": 0.0 if args.calibrations else args.replay_fraction,
        "seconds": time.perf_counter() - started,
    }


def saved_calibrations(paths: list[Path], arch: str) -> tuple[list[dict[str, Any]], list[str], int]:
    """The calibration sweeps that ``forecast_accuracy.py --json`` saved for ``arch`` (built-in kinds
    only; the scored runs of evaluation-only kinds in the same files are never read), one per seed
    offset however many kind sets share it, with their index features and how many sweeps there are."""
    sweeps: dict[int, list[dict[str, Any]]] = {}
    features: list[str] | None = None
    for path in paths:
        for result in json.loads(path.read_text()):
            if result["arch"] != arch:
                continue
            if "calibration_rows" not in result:
                raise SystemExit(f"{path} does not keep its calibration rows (written by an older version); run forecast_accuracy.py again with --json.")
            sweeps.setdefault(int(result["seed_offset"]), result["calibration_rows"])
            features = features or list(result["stage0_features"])
    if features is None:
        raise SystemExit(f"none of {', '.join(map(str, paths))} holds a calibration of {arch}; pass forecast_accuracy.py --json outputs that do.")
    # Read again from the saved curves: the same features, and those of a later version (the stratum).
    rows = [r | {"sweep": offset} for offset, rows in sweeps.items() for r in rows]
    return [reread([r])[0] if r.get("probe_curve") else r for r in rows], features, len(sweeps)


#: MdAPE a cheaper probe may give up against the current design (non-inferiority margin).
MARGIN = 0.02
#: Resamples of the paired bootstrap that says whether a setting's lead over the current design
#: exceeds what the draw of kinds and sweeps moves.
RESAMPLES = 2000


def stage1_errors(records: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Each point's absolute percentage error of epochs under every probe-stage predictor in
    ``names``, on the points MdAPE reads (reached the cutoff after some training), with the
    (kind, sweep) each belongs to: the unit the bootstrap resamples, since a kind's points in one
    sweep share its intensities and are left out together."""
    reached = [r for r in records if not r["censored"] and r["epochs"] > 0]
    return {
        "cluster": [f"{r['kind']}/{r['sweep']}" for r in reached],
        "ape": {n: [abs(r[n].median - r["epochs"]) / r["epochs"] for r in reached] for n in names},
    }


def _by_cluster(clusters: list[str], series: dict[str, list[Any]]) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """Each (kind, sweep) cluster's point indices, and each named per-point series as an array."""
    labels = np.array(clusters)
    return [np.flatnonzero(labels == c) for c in dict.fromkeys(clusters)], {n: np.asarray(v, dtype=float) for n, v in series.items()}


def _draw(rng: np.random.Generator, members: list[np.ndarray]) -> np.ndarray:
    """The points of as many clusters as there are, drawn with replacement."""
    return np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])


def interval_hits(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether each point whose cost is known lies inside each interval design's interval (what
    cov90 counts), with its (kind, sweep) cluster, and which of them reached the cutoff after some
    training (a batch whose probe already met the target is forecast at exactly zero and covered by
    any design: the others' coverage is the interval's own)."""
    known = [r for r in records if not r["censored"]]

    def inside(r: dict[str, Any], design: str) -> bool:
        interval = r[interval_key(design)]
        return bool(interval.low <= r["epochs"] <= interval.high)

    return {
        "cluster": [f"{r['kind']}/{r['sweep']}" for r in known],
        "trained": [bool(r["epochs"] > 0) for r in known],
        "inside": {design: [inside(r, design) for r in known] for design in INTERVAL_RUNS},
    }


def coverage_distance_difference(
    results: list[dict[str, Any]], design: str, *, trained_only: bool = False, resamples: int = RESAMPLES, seed: int = 0
) -> list[float]:
    """Paired bootstrap 95% CI of interval ``design``'s mean distance of cov90 from the level over the
    architectures minus the library's, resampling each architecture's (kind, sweep) clusters;
    ``trained_only``: over the runs that reached the cutoff after some training."""
    rng = np.random.default_rng(seed)
    per_arch = []
    for r in results:
        hits = r["interval_hits"]
        kept = [trained or not trained_only for trained in hits["trained"]]
        inside = {d: [v for v, keep in zip(values, kept) if keep] for d, values in hits["inside"].items()}
        per_arch.append(_by_cluster([c for c, keep in zip(hits["cluster"], kept) if keep], inside))
    draws = np.empty(resamples)
    for b in range(resamples):
        gaps = []
        for members, inside in per_arch:
            idx = _draw(rng, members)
            gaps.append(abs(inside[design][idx].mean() - LEVEL) - abs(inside[INTERVAL_SIZED_ON][idx].mean() - LEVEL))
        draws[b] = np.mean(gaps)
    return [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]


def mdape_differences(results: list[dict[str, Any]], resamples: int = RESAMPLES, seed: int = 0) -> dict[str, list[float]]:
    """Paired bootstrap 95% CI of each probe-stage setting's mean MdAPE over the architectures
    minus the current design's, resampling each architecture's (kind, sweep) clusters."""
    rng = np.random.default_rng(seed)
    per_arch = [_by_cluster(r["stage1_errors"]["cluster"], r["stage1_errors"]["ape"]) for r in results]
    names = [n for n in per_arch[0][1] if n != "stage0_probe" and all(n in ape for _, ape in per_arch)]
    draws = {n: np.empty(resamples) for n in names}
    for b in range(resamples):
        picked = [_draw(rng, members) for members, _ in per_arch]
        current = np.mean([np.median(ape["stage0_probe"][idx]) for (_, ape), idx in zip(per_arch, picked)])
        for n in names:
            draws[n][b] = np.mean([np.median(ape[n][idx]) for (_, ape), idx in zip(per_arch, picked)]) - current
    return {n: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for n, v in draws.items()}


def combine(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One setting for every architecture: the lowest mean of each criterion over them."""
    recipes = {r.get("replay_fraction", 0.0) for r in results}
    if len(recipes) > 1:
        raise SystemExit(f"the runs retrained under different replay fractions ({sorted(recipes)}); combine runs of one recipe.")
    # Runs from saved calibrations measure no floor: a floor is read only where every run measured it.
    windows = [w for w in results[0]["noise_floor_by_window"] if all(w in r["noise_floor_by_window"] for r in results)]
    floor = {w: float(np.mean([r["noise_floor_by_window"][w]["leave_one_seed_out_mdape"] for r in results])) for w in windows}
    best = min(floor.values(), default=math.nan)
    names = [n for n in results[0]["loko"] if n.startswith("in_flight_own_")]
    own = {n: float(np.mean([r["loko"][n]["median_abs_log_error"] for r in results])) for n in names}
    designs = [n for n in results[0]["loko"] if n.startswith("stage0_probe[")]
    design = {n: float(np.mean([r["loko"][n]["mdape"] for r in results])) for n in designs}
    needed = {n: float(np.mean([r["loko"][n]["mean_abs_log_error_needed"] for r in results])) for n in designs}
    # Every step is the current design itself; runs saved before the cadences were compared have only it.
    cadence = {1: float(np.mean([r["loko"]["stage0_probe"]["mdape"] for r in results]))}
    cadence |= {k: design[name] for k in PROBE_EVAL_EVERY if (name := f"stage0_probe[evaluated every {k} steps]") in design}
    # The probe as calibrated is the current design itself.
    lengths = {int(results[0]["probe_steps"]): cadence[1]}
    lengths |= {k: design[name] for k in PROBE_LENGTHS if (name := f"stage0_probe[probe of {k} steps]") in design}
    pulls = {pull: design[name] for pull in PULLS if (name := f"stage0_probe[pulled {pull:g} to the median]") in design}
    # Runs saved before the per-point errors were kept have no intervals: nothing then shows a change.
    ci = mdape_differences(results) if all("stage1_errors" in r for r in results) else {}
    better = [n for n in design if n in ci and ci[n][1] < 0]
    return {
        "pull_to_median": min((p for p in pulls if f"stage0_probe[pulled {p:g} to the median]" in better), key=pulls.get, default=PULL_TO_MEDIAN),
        "mean_mdape_by_pull_to_median": pulls,
        "probe_eval_every": max((k for k in PROBE_EVAL_EVERY if _no_worse(ci, f"stage0_probe[evaluated every {k} steps]")), default=1),
        "mean_mdape_by_probe_eval_every": cadence,
        "probe_steps": min((k for k in PROBE_LENGTHS if _no_worse(ci, f"stage0_probe[probe of {k} steps]")), default=int(results[0]["probe_steps"])),
        "mean_mdape_by_probe_steps": lengths,
        # A probe sized by the index forecast is a cheaper probe: taken on the same margin as a shorter one.
        "probe_sized_by_index_forecast": _no_worse(ci, f"stage0_probe[{ADAPTIVE}]"),
        "lowest_floor_window": min((int(w) for w, v in floor.items() if v <= best + 0.01), default=None), "mean_noise_floor": floor,
        "own_curve": min(own, key=own.get), "mean_in_flight_median_abs_log_error": own,
        "stage1_design": min(better, key=design.get, default="the current design"), "mean_stage1_mdape": design,
        # Reported beside MdAPE, which leaves out the capped runs; settings are not chosen on it.
        "mean_stage1_mean_abs_log_error_needed": needed,
        "mean_mdape_minus_current_ci95": ci,
        # Runs saved before the interval designs were compared have only the current one.
        "interval_design": interval_choice(results) if all("interval_hits" in r for r in results) else None,
    }


def interval_choice(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The probe stage's interval design: another design replaces the library's where the paired
    bootstrap 95% CI of its mean distance of cov90 (over the runs whose cost is known) from the
    level, minus the library's, lies below zero, and it lets no more of each architecture's runs
    than the upper tail's share, ``(1 - level) / 2``, cap beyond its upper end (a capped run that
    spent more than the upper bound is a definite miss on the high side, which coverage of the
    known costs leaves out); of several such, the nearest the level. The median is the same under
    every design, so MdAPE cannot decide. The same distance over the runs that reached the cutoff
    after some training (the interval's own coverage) is reported beside it; it decides nothing."""
    distance, distance_trained, upper_tail_held = {}, {}, {}
    for design in INTERVAL_RUNS:
        scores = [r["loko"][interval_key(design)] for r in results]
        distance[design] = float(np.mean([abs(s["coverage"] - LEVEL) for s in scores]))
        distance_trained[design] = float(np.mean([abs(s["coverage_needed"] - LEVEL) for s in scores]))
        upper_tail_held[design] = all(s["capped_definite_misses"] <= (1 - LEVEL) / 2 * s["n"] for s in scores)
    ci = {design: coverage_distance_difference(results, design) for design in OTHER_INTERVALS}
    ci_trained = {design: coverage_distance_difference(results, design, trained_only=True) for design in OTHER_INTERVALS}
    better = [design for design in OTHER_INTERVALS if upper_tail_held[design] and ci[design][1] < 0]
    return {
        "chosen": min(better, key=distance.get, default=INTERVAL_SIZED_ON), "mean_distance_of_cov90_from_level": distance,
        "distance_minus_current_ci95": ci, "upper_tail_held": upper_tail_held,
        "mean_distance_of_trained_cov90_from_level": distance_trained, "trained_distance_minus_current_ci95": ci_trained,
    }


def probe_choice(current: list[dict[str, Any]], other: list[dict[str, Any]], resamples: int = RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """Two probe designs, each calibrated on the same sweeps (the probe changes no retrain): the other
    replaces the current one where the paired bootstrap 95% CI of its probe stage's MdAPE, averaged
    over the architectures, minus the current one's lies below zero, resampling each architecture's
    (kind, sweep) clusters as :func:`mdape_differences` does. A probe cannot be read again from another
    probe's curve, so each design's sweeps are run under it (``forecast_accuracy.py
    --probe-rate-scaling``, ``chosen`` running every scaling the choice reads) and selected apart
    (``--json``, with ``--probe-scaling`` where the sweeps ran several) before they are paired here."""
    arches = [r["arch"] for r in current]
    if arches != [r["arch"] for r in other]:
        raise SystemExit(f"the two selections cover different architectures ({arches} against {[r['arch'] for r in other]}).")
    rng = np.random.default_rng(seed)
    paired = []
    for mine, theirs in zip(current, other):
        epochs = [[p["epochs"] for p in r["points_scored"]] for r in (mine, theirs)]
        if epochs[0] != epochs[1] or mine["stage1_errors"]["cluster"] != theirs["stage1_errors"]["cluster"]:
            raise SystemExit(f"{mine['arch']}: the two selections did not score the same retrains; pair sweeps of the same seed offsets.")
        members, ape = _by_cluster(
            mine["stage1_errors"]["cluster"], {"current": mine["stage1_errors"]["ape"]["stage0_probe"], "other": theirs["stage1_errors"]["ape"]["stage0_probe"]}
        )
        paired.append((members, ape["current"], ape["other"]))
    draws = np.empty(resamples)
    for b in range(resamples):
        picked = [(_draw(rng, members), mine, theirs) for members, mine, theirs in paired]
        draws[b] = np.mean([np.median(theirs[idx]) - np.median(mine[idx]) for idx, mine, theirs in picked])
    ci = [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]
    scores = {
        name: {r["arch"]: {k: r["loko"]["stage0_probe"][k] for k in ("mdape", "c_index", "coverage", "mean_abs_log_error_needed")} for r in results}
        for name, results in (("current", current), ("other", other))
    }
    return {"chosen": "other" if ci[1] < 0 else "current", "mean_mdape_minus_current_ci95": ci, "probe_stage": scores}


def _no_worse(ci: dict[str, list[float]], name: str) -> bool:
    """Whether a cheaper probe's MdAPE is shown to lie within :data:`MARGIN` of the current design's."""
    return name in ci and ci[name][1] < MARGIN


def print_combined(results: list[dict[str, Any]]) -> None:
    """The joint choice, then each setting's mean MdAPE over the architectures against the current
    design's, with its bootstrap CI."""
    combined = combine(results)
    print(json.dumps(combined | {"mean_mdape_minus_current_ci95": "below" if combined["mean_mdape_minus_current_ci95"] else None}, indent=1))
    current = combined["mean_mdape_by_probe_eval_every"][1]
    print("mean MdAPE over the architectures minus the current design's, paired bootstrap 95% CI over (kind, sweep):")
    for name, (low, high) in combined["mean_mdape_minus_current_ci95"].items():
        print(f"  {name:48s} {100 * (combined['mean_stage1_mdape'][name] - current):+6.1f} points [{100 * low:+.1f}, {100 * high:+.1f}]")


def print_read_under(read: Any) -> None:
    if isinstance(read, dict):
        counts = "; ".join(f"{kind} {', '.join(f'{n} {scaling}' for scaling, n in under.items())}" for kind, under in read.items())
        print(f"points read under each rate scaling, chosen in each fold on the other kinds: {counts}")
    else:
        print(f"probes read under: {read or 'the one each calibration kept'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="digits_cnn,shufflenet_v2_x0_5")
    parser.add_argument("--windows", default="1,2,3")
    parser.add_argument("--own-curve-evals", default="inf,2,4,8,16")
    parser.add_argument("--calibration-intensities", type=int, default=6)
    parser.add_argument("--noise-seeds", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3, help="calibration sweeps pooled for leave-one-kind-out (seeds 0, 1, ...)")
    parser.add_argument("--probe-steps", type=int, default=PROBE_STEPS, help="the probe's length in steps (its batch stays the default)")
    parser.add_argument(
        "--replay-fraction", type=float, default=TRAINING_RECIPE["replay_fraction"],
        help="share of each retrain's epoch replayed from the reference split (the library's default recipe replays 0.5)",
    )
    parser.add_argument(
        "--calibrations", default=None,
        help=(
            "comma-separated forecast_accuracy.py --json outputs: leave one kind out on the calibration sweeps they saved "
            "(one per seed offset) instead of running sweeps; no noise floor"
        ),
    )
    parser.add_argument(
        "--probe-scaling", default=None,
        help=(
            f"with --calibrations of sweeps that ran a probe per rate scaling: read every point under this scaling's probe "
            f"(none, linear, sqrt), or under the one each sweep's other kinds forecast better in each fold ({IN_FOLD}); "
            "default: the one each calibration kept"
        ),
    )
    parser.add_argument(
        "--each-sweep", action="store_true",
        help="with --calibrations: fit each sweep on its own other kinds, as calibrate does, and score the probe stage only",
    )
    parser.add_argument(
        "--calibration-fit", choices=CALIBRATION_FITS, default="mean",
        help=(
            "with --each-sweep: fit each calibration point retrained several times (forecast_accuracy.py --calibration-repeats) on "
            "the mean of its retrains, as calibrate does, on its first alone, or on each as a row; points are scored on their first"
        ),
    )
    parser.add_argument(
        "--stage1-design", choices=sorted(STAGE1_DESIGNS), default=None,
        help="with --each-sweep: fit stage 1 on this design of STAGE1_DESIGNS instead of the library's (compare two with --compare-probes)",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--combine", default=None, help="comma-separated --json outputs of earlier runs: print the joint choice only")
    parser.add_argument(
        "--compare-probes", nargs=2, type=Path, default=None, metavar=("CURRENT", "OTHER"),
        help=(
            "two --json outputs of selections on the same sweeps run under two probe designs, or fitted under two --calibration-fit: "
            "print which probe stage to keep"
        ),
    )
    args = parser.parse_args()
    for option, given in (("--calibration-fit", args.calibration_fit != "mean"), ("--stage1-design", args.stage1_design is not None)):
        if given and not args.each_sweep:
            raise SystemExit(f"{option} is read with --each-sweep only; add it.")
    if args.compare_probes:
        current, other = (json.loads(path.read_text()) for path in args.compare_probes)
        print(json.dumps(probe_choice(current, other), indent=1))
        return
    if args.combine:
        print_combined([r for path in args.combine.split(",") for r in json.loads(Path(path).read_text())])
        return
    torch.set_num_threads(1)
    load = os.getloadavg()
    started = time.perf_counter()
    results = []
    if args.each_sweep:
        if not args.calibrations:
            raise SystemExit("--each-sweep reads saved sweeps; pass them with --calibrations.")
        design = "the library's stage 1" if args.stage1_design is None else f"stage 1 on {args.stage1_design}"
        print(f"each calibration point fitted on its retrains' {args.calibration_fit}, {design}")
        for arch in args.archs.split(","):
            result = select_each_sweep(arch, args)
            results.append(result)
            print(f"\n=== {arch}: {result['points']} calibration points, each sweep's kinds left out within it ({result['seeds']} sweeps), {result['seconds']:.0f} s")
            print_read_under(result["probe_read_under"])
            for name, sc in result["loko"].items():
                print(f"{name:28s} {sc['n']:4d} MdAPE {100 * sc['mdape']:4.0f}%  C-index {sc['c_index']:.3f}  cov90 {100 * sc['coverage']:3.0f}%  "
                      f"mean |log error| needed {sc['mean_abs_log_error_needed']:.3f}")
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
        return
    for arch in args.archs.split(","):
        result = select_arch(arch, args)
        results.append(result)
        print(f"\n=== {arch}: {result['points']} calibration points from {result['seeds']} seeds' sweeps, {result['seconds']:.0f} s")
        if args.calibrations:
            print(f"sweeps read from {args.calibrations}")
        for window, nf in result["noise_floor_by_window"].items():
            print(
                f"cutoff window {window}: noise floor leave-one-seed-out MdAPE {100 * nf['leave_one_seed_out_mdape']:.0f}%, "
                f"CV median {nf['cv_median']:.2f}, median epochs {nf['median_epochs']:.2f} "
                f"(left out, a seed capped: {', '.join(nf['kinds_with_a_capped_seed']) or 'none'})"
            )
        print(f"smallest window within one point of the lowest floor: {result['lowest_floor_window']}; "
              f"leave-one-kind-out under the protocol's window {result['protocol_window']}")
        print(
            f"{'leave-one-kind-out':28s} {'n':>4s} {'MdAPE':>7s} {'med|log|':>8s} {'needed':>7s} {'C-index':>7s} {'cov90':>6s} {'cov>0':>6s} "
            f"{'capped>hi':>9s}"
        )
        for name, s in result["loko"].items():
            print(
                f"{name:28s} {s['n']:4d} {100 * s['mdape']:6.0f}% {s['median_abs_log_error']:8.3f} {s['mean_abs_log_error_needed']:7.3f} "
                f"{s['c_index']:7.3f} {100 * s['coverage']:5.0f}% {100 * s['coverage_needed']:5.0f}% {s['capped_definite_misses']:9d}"
            )
        print_flags(result["not_converging"])
        print_read_under(result["probe_read_under"])
        print(f"lowest leave-one-kind-out MdAPE of stage 1: {result['chosen_stage1_design']}")
        needed = {d: result["loko"][f"stage0_probe[{d}]"]["mean_abs_log_error_needed"] for d in STAGE1_DESIGNS}
        print(f"lowest mean |log error| of the batches that needed training (reported, not chosen on): {min(needed, key=needed.get)}")
        print(f"chosen own-curve weight (evaluations at half weight): {result['chosen_own_curve_evals']:g}")
        work = result["probe_work"]
        print(
            "sample-gradients, median / mean over the points: probe as calibrated (stopped at its cutoff) "
            f"{work['current']['median']:.0f} / {work['current']['mean']:.0f}, {ADAPTIVE} {work[ADAPTIVE]['median']:.0f} / "
            f"{work[ADAPTIVE]['mean']:.0f}, retrain {work['retrain']['median']:.0f} / {work['retrain']['mean']:.0f}"
        )
    if len(results) > 1:
        print_combined(results)
    print(f"\nwall {time.perf_counter() - started:.0f} s; load average at start {load}, at end {os.getloadavg()}")
    if args.json:
        for r in results:
            r["chosen_own_curve_evals"] = str(r["chosen_own_curve_evals"])
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
