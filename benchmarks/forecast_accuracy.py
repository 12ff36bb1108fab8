"""How well cost forecasts transfer to shift kinds they were never calibrated on.

Usage: nice -n 10 python benchmarks/forecast_accuracy.py [--archs digits_cnn,shufflenet_v2_x0_5]
       [--calibration-intensities 4] [--seeds 2] [--noise-seeds 4] [--bootstrap 1000] [--json out.json]
       [--kind-set original|fresh|third|fourth] [--seed-offset 0] [--device cpu]
       [--calibration-repeats 1]
       python benchmarks/forecast_accuracy.py --combine a.json,b.json [--bootstrap 1000]

``--json`` keeps every scored run's evaluations, index features and probe curve, and the
calibration's rows (each with its probe curve), so that other designs can be scored on the
same runs without retraining: ``--rescore a.json [--stage1-features F] [--stage1-offsets F] [--curve-horizon C]
[--own-curve-evals W] [--probe-steps K] [--calibration-fit F [--against-calibration-fit G]]``, which also prints what the probes would have cost had
they stopped at their cutoff, as probes now do, and the budgets and guard replayed on the saved evaluations. Score a design on these evaluation-only kinds once it has been chosen
on the built-in kinds (``forecast_selection.py``), never to choose it.

For each architecture (the demo CNN, and torchvision's shufflenet_v2_x0_5 at 16x16, which
trains on this CPU in about a minute):

1. **Calibrate** with :func:`shiftcost.calibrate.run_sweep` on the built-in kinds of
   :mod:`shiftcost.shifts` only (the learning probe runs on every point), giving the
   forecaster (stage 0 + stage 1) and the calibration rows the baselines are fitted on.
2. **Score** on the evaluation-only kinds of ``benchmarks/eval_shifts.py`` (never seen in
   calibration or used to choose a setting; ``--kind-set fresh``, ``third`` and ``fourth``
   score the later sets), every intensity, ``--seeds`` seeds each: the
   probe runs, then the real retrain under the one measurement protocol. ``--seed-offset``
   moves every seed of steps 1 and 2 (not the model's), to see how far one run's figures
   move with the seeds alone.
3. Print per predictor (constant, isotonic on accuracy drop, stage 0, stage 0 + probe,
   in-flight after the first quarter of the probe forecast, which starts from the probe
   forecast, and the same with the run's own curve given no weight; settings chosen by
   ``forecast_selection.py`` on the built-in kinds; and, for reference, each run forecast by its
   batch's other seeds, whose errors are the retrains' own seed-to-seed spread): MdAPE of epochs on reached
   runs, median |log error| (capped runs count as bounds) over all runs and its mean over the
   runs that needed training (``needed``: MdAPE leaves out the capped runs, which favours a
   forecast pulled to the middle), Harrell's C-index (capped runs censored), 90% coverage
   (``cov90``: runs whose cost is known; ``cov>0``: those that reached the cutoff after some
   training, since a batch whose probe already met the target is forecast at exactly zero), overspend counts when budgeting on the upper bound under caps at the
   25/50/75th percentiles of measured cost, and paired bootstrap 95% CIs of stage 0 + probe
   minus each baseline (MdAPE, C-index, and mean |log error| of the runs that needed training). Then the budget guard replayed on every
   run's evaluations (the guard only reads them, so the replay stops exactly where a live
   guard would), twice: from the probe stage's forecast, and as deployed (the probe only where
   it pays against the cap, its work then charged; the index forecast elsewhere); the probe's
   cost against the median retrain, and the noise floor: one
   batch per kind retrained with ``--noise-seeds`` seeds under the protocol, with the
   cutoff decided by the latest evaluation, the mean of the last two and the chosen window,
   and under the chosen window with the held-out split fixed (the training alone differing).

Cost is counted in sample-gradient equivalents (samples trained + 1/3 of samples
evaluated), the deterministic quantity that the host's energy rate converts to kWh; on a
shared CPU, CodeCarbon's per-run figure is a load model and would only add noise here.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_shifts import EVAL_KINDS, FOURTH_KINDS, FRESH_KINDS, THIRD_KINDS, eval_corrupt  # noqa: E402

from shiftcost.energy import EVAL_SAMPLE_WEIGHT, HostEnergyRate  # noqa: E402
from shiftcost.features import COST_FEATURES  # noqa: E402
from shiftcost.forecast import protocol  # noqa: E402
from shiftcost.forecast.decide import MAX_PROBE_SHARE  # noqa: E402
from shiftcost.forecast.forecaster import INTERVAL_RUNS, INTERVAL_SIZED_ON, STAGE1_DEFAULT, abs_log_errors, median_interval  # noqa: E402
from shiftcost.forecast.probe import DEFAULT_STEPS as PROBE_STEPS  # noqa: E402
from shiftcost.forecast.probe import HORIZON_CAPS, saved_curve  # noqa: E402
from shiftcost.shifts import DEFAULT_SWEEP  # noqa: E402

TOLERANCE = 0.03
KIND_SETS = {"original": EVAL_KINDS, "fresh": FRESH_KINDS, "third": THIRD_KINDS, "fourth": FOURTH_KINDS}
LEVEL = 0.90
PREDICTORS = ("constant", "isotonic_accuracy_drop", "stage0", "stage0_probe", "in_flight_quarter", "in_flight_quarter_prior_only")
#: The sets of calibration runs the probe stage's interval may be sized on besides the library's
#: (:attr:`~shiftcost.forecast.forecaster.Forecaster.interval_sized_on`; the median is the same).
OTHER_INTERVALS: tuple[str, ...] = tuple(d for d in INTERVAL_RUNS if d != INTERVAL_SIZED_ON)


def interval_key(design: str) -> str:
    """The predictor that forecasts with the interval ``design``: the library's is the probe stage itself."""
    return "stage0_probe" if design == INTERVAL_SIZED_ON else f"stage0_probe[interval on {design}]"


def resized(forecaster: Any, design: str) -> Any:
    """``forecaster`` with its probe stage's interval sized on ``design``'s runs."""
    other = copy.copy(forecaster)
    other.interval_sized_on = design
    return other


#: Cost is counted in sample-gradient equivalents: 3.6e6 J per sample makes the forecaster's kWh those units.
WORK_RATE = HostEnergyRate(joules_per_sample=3.6e6, spread=0.0, runs=0)


def probe_work(sample_gradients: float, samples_evaluated: float) -> float:
    """What a probe spent, in the sample-gradient equivalents :data:`WORK_RATE` prices."""
    return WORK_RATE.kwh(sample_gradients, samples_evaluated)


# ----------------------------------------------------------------------------- models


#: The retraining recipe of both evaluation models (trained from scratch on small digits, so
#: they fine-tune at 1e-3 with batch-norm statistics updated, as the demo does, and without
#: replay, since the scored retrains see only the shifted batch): every calibration and scored
#: retrain uses it, so the figures do not move with the library's default recipe, which is
#: chosen for converged models.
TRAINING_RECIPE = {"lr": 1e-3, "freeze_batchnorm": False, "replay_fraction": 0.0}


def build_arch(arch: str, seed: int = 0, recipe: dict[str, Any] | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """The trained model, its spec with ``recipe`` (default :data:`TRAINING_RECIPE`) and the digits splits."""
    import dataclasses

    from shiftcost.data.demo import load_digits, split_digits, train_classifier, train_demo_model
    from shiftcost.data.models import build_model

    if arch == "digits_cnn":
        model, spec, splits = train_demo_model(seed=seed)
    else:
        x, y = load_digits(16)
        splits = split_digits(x, y, seed=seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, spec = build_model(arch, 10, in_channels=1, image_size=16)
        train_classifier(model, *splits["train"], epochs=15, seed=seed)
    return model, dataclasses.replace(spec, recipe=dict(TRAINING_RECIPE if recipe is None else recipe)), splits


# ----------------------------------------------------------------------------- one arch


def calibrate(
    model: Any, spec: Any, splits: dict[str, Any], reference_stats: Any, intensities: int, seed: int = 0, probe_steps: int = PROBE_STEPS,
    device: str = "cpu", repeats: int = 1,
) -> Any:
    """The calibration sweep on the built-in kinds only (never the evaluation kinds); ``seed``
    sets its corruptions, held-out splits and shuffling, and each point's epochs are the mean of
    ``repeats`` retrains (seeds ``seed``, ``seed + 1``, ...; the probe and the first retrain do not
    depend on ``repeats``)."""
    from shiftcost.calibrate import run_sweep

    sweep = {kind: _subset(values, intensities) for kind, values in DEFAULT_SWEEP.items()}
    assert not set(sweep) & {k for kinds in KIND_SETS.values() for k in kinds}, "evaluation kinds must never enter calibration"
    return run_sweep(
        model, spec, *splits["holdout"], *splits["stream"], sweep=sweep, seed=seed, repeats=repeats, probe=False, device=device,
        threads=1, reference_stats=reference_stats, energy_options={"measure_power_secs": 0.5}, level=LEVEL,
        probe_steps=probe_steps,
    )


def add_scenario_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the benchmarks that calibrate one architecture and score one kind set."""
    parser.add_argument("--arch", default="digits_cnn")
    parser.add_argument("--kind-set", default="fourth", choices=sorted(KIND_SETS))
    parser.add_argument("--calibration-intensities", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)


def calibrated(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any], Any, Any]:
    """``args.arch``'s model, spec, splits, reference stats and a forecaster calibrated on the
    built-in kinds (on the stream split, seed 0); exits where calibration gives no probe stage."""
    from shiftcost.index.engine import compute_reference_stats

    model, spec, splits = build_arch(args.arch)
    stats = compute_reference_stats(model, spec, *splits["holdout"], device=args.device, seed=0)
    forecaster = calibrate(model, spec, splits, stats, args.calibration_intensities, device=args.device).forecaster
    if forecaster is None or forecaster.stage1 is None:
        raise SystemExit(f"{args.arch}: calibration gave no probe stage")
    return model, spec, splits, stats, forecaster


def score_arch(arch: str, args: argparse.Namespace) -> dict[str, Any]:
    from shiftcost.index.engine import assess, compute_reference_stats
    from shiftcost.retrain import retrain_to_cutoff

    started = time.perf_counter()
    model, spec, splits = build_arch(arch)
    ref_x, ref_y = splits["holdout"]
    new_x, new_y = splits["stream"]
    stats = compute_reference_stats(model, spec, ref_x, ref_y, device=args.device, seed=0)
    ceiling = stats.accuracy
    target = ceiling - TOLERANCE
    protocol.check_above_chance(ceiling, spec.num_classes, TOLERANCE, f"{arch}'s reference split")
    t0 = time.perf_counter()
    sweep = calibrate(
        model, spec, splits, stats, args.calibration_intensities, seed=args.seed_offset, device=args.device,
        repeats=args.calibration_repeats,
    )
    calibration_s = time.perf_counter() - t0
    forecaster = sweep.forecaster
    if forecaster is None or forecaster.stage1 is None:
        raise SystemExit(f"{arch}: calibration gave no usable forecaster ({sweep.cost_model_error or forecaster.stage1_error})")
    host_rate = forecaster.energy_rate  # CodeCarbon's rate on this host, for the probe's estimated energy
    cal_rows = [r for r in sweep.rows if r["status"] != "failed"]
    baselines = fit_baselines(cal_rows)
    forecaster.energy_rate = WORK_RATE
    n = len(new_y)
    work = work_units(n)

    runs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    kinds = KIND_SETS[args.kind_set]
    for kind, intensities in kinds.items():
        for intensity in intensities:
            shifted = eval_corrupt(new_x, kind, intensity, seed=args.seed_offset)
            report = assess(model, spec, stats, shifted, new_y, device=args.device)
            features = {k: float(getattr(report, k)) for k in COST_FEATURES}
            stage0 = forecaster.predict(features)
            for seed in range(args.seed_offset, args.seed_offset + args.seeds):
                probe = _probe(model, shifted, new_y, target, ceiling, seed, host_rate, forecaster.probe_options(), args.device)
                stage1 = forecaster.predict(features, probe=probe)
                run = retrain_to_cutoff(
                    model, shifted, new_y, seed=seed, reference_accuracy=ceiling, tolerance=TOLERANCE,
                    holdout_fraction=protocol.HOLDOUT_FRACTION, max_epochs=protocol.MAX_EPOCHS, track_energy=False, device=args.device,
                    **TRAINING_RECIPE,
                )
                record = {
                    "kind": kind, "cluster": f"{kind}/{args.seed_offset}", "intensity": intensity, "seed": seed, "epochs": run.epochs,
                    "censored": run.status == "cap_reached",
                    "status": run.status, "accuracy_drop": ceiling - features["accuracy"], "cost": work(run.epochs, len(run.curve)),
                    "samples_seen": run.samples_seen, "eval_every": run.eval_every,
                    "probe_sample_gradients": probe.cost.sample_gradients, "probe_samples_evaluated": probe.cost.samples_evaluated,
                    "probe_seconds": probe.cost.seconds, "retrain_seconds": run.wall_time_s, "probe_steps": probe.cost.steps,
                    "probe_length": probe.settings["steps"], "probe_batch_size": probe.settings["batch_size"], "probe_samples": probe.settings["samples"],
                    "probe_evaluations": len(probe.accuracy), "probe_energy_kwh_measured": probe.cost.energy_kwh if probe.cost.energy_measured else None,
                    "probe_energy_kwh_estimated": probe.cost.estimated_energy_kwh,
                    "retrain_energy_kwh_estimated": None if host_rate is None else host_rate.kwh(run.samples_seen, len(run.curve) * run.holdout_samples),
                    "stage0": stage0.epochs, "stage0_probe": stage1.epochs, "not_converging": flags(stage0, stage1),
                    "features": features,
                    "probe_curve": saved_curve(probe.epochs, probe.accuracy, probe.loss),
                    "probe_bn_adapted_accuracy": probe.bn_adapted_accuracy,
                }
                record["constant"], record["isotonic_accuracy_drop"] = baselines(record["accuracy_drop"])
                record["in_flight_quarter"] = _in_flight(forecaster, features, run, stage1, target, ceiling)
                record["in_flight_quarter_prior_only"] = _in_flight(forecaster, features, run, stage1, target, ceiling, math.inf)
                spent_on_probe = probe_work(probe.cost.sample_gradients, probe.cost.samples_evaluated)
                record["guard"] = _guard_replay(run, run.target_accuracy, stage0, stage1, n, spent_on_probe, forecaster.probe_options())
                runs.append(record)
                print(
                    f"  {arch} {kind} {intensity:g} seed {seed}: {run.status} {run.epochs:.2f} ep; "
                    f"stage0 {stage0.epochs.median:.2f} probe {stage1.epochs.median:.2f} [{stage1.epochs.low:.2f}, {stage1.epochs.high:.2f}]",
                    flush=True,
                )
    scoring_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    noise = noise_floor(model, new_x, new_y, ceiling, args.noise_seeds, kinds, args.device) if args.noise_seeds > 1 else None
    noise_s = time.perf_counter() - t0
    return {
        "arch": arch,
        "seed_offset": args.seed_offset,
        "reference_accuracy": ceiling,
        "calibration_points": len(cal_rows),
        "calibration_stage0_loo": forecaster.stage0.loo_,
        "calibration_stage1_loo": forecaster.stage1.loo_,
        "calibration_left_out": forecaster.left_out,
        "probe_not_worth": forecaster.probe_not_worth(),
        "stage1_coefficients": dict(zip(forecaster.stage1.features_, map(float, forecaster.stage1.coef_))),
        "runs": runs,
        "calibration_rows": cal_rows,
        "stage0_features": list(forecaster.stage0.features_),
        "metrics": metrics(runs, args.bootstrap),
        "not_converging": not_converging_flags(runs),
        "budget": budget_table(runs, forecaster, work),
        "probe_cost": probe_cost(runs),
        "noise_floor": noise,
        "seconds": {"total": time.perf_counter() - started, "calibration": calibration_s, "scoring": scoring_s, "noise": noise_s},
    }


def work_units(batch_samples: int) -> Any:
    """``work(epochs, evaluations=None)``: a retrain's cost on a batch of ``batch_samples``, in
    sample-gradient equivalents (the unit :data:`WORK_RATE` makes the forecaster's kWh)."""
    pool, holdout = protocol.split_sizes(batch_samples)
    per_epoch = protocol.steps_per_epoch(pool, 64)

    def work(epochs: float, evaluations: int | None = None) -> float:
        evals = protocol.evaluations(epochs, per_epoch) if evaluations is None else evaluations
        return epochs * pool + EVAL_SAMPLE_WEIGHT * evals * holdout

    return work


def _probe(
    model: Any, x: Any, y: Any, target: float, ceiling: float, seed: int, rate: Any, options: dict[str, Any], device: str
) -> Any:
    """The probe as calibration ran it (``options``), measured with CodeCarbon as retrains are,
    and estimated through the host's rate."""
    from shiftcost.forecast.probe import run_probe

    return run_probe(
        model, x, y, target_accuracy=target, ceiling=ceiling, seed=seed, device=device, track_energy=True,
        energy_options={"measure_power_secs": 0.5}, energy_rate=rate, **options,
    )


def _in_flight(
    forecaster: Any, features: dict[str, float], run: Any, stage1: Any, target: float, ceiling: float, own_curve_evals: float | None = None
) -> Any:
    """The in-flight forecast once a quarter of the probe forecast's median is spent.

    ``own_curve_evals`` as in ``Forecaster.in_flight`` (default: the product's; ``inf``: the
    probe forecast alone, truncated at what the run has spent, which shows what the run's own
    curve adds). ``None`` when the run ended before that point (nothing left to forecast)."""
    quarter = 0.25 * stage1.epochs.median
    seen = [p for p in run.curve if p.epoch <= quarter + 1e-9]
    if len(seen) < 3 or run.curve[len(seen) - 1] is run.curve[-1]:
        return None
    forecast = forecaster.in_flight(
        [p.epoch for p in seen], [p.accuracy for p in seen], [p.loss for p in seen], target=target, ceiling=ceiling, features=features,
        prior=stage1, own_curve_evals=own_curve_evals,
    )
    return forecast.epochs


def _guard_replay(run: Any, target: float, stage0: Any, stage1: Any, n: int, probe_spent: float, probe_options: dict[str, Any]) -> Any:
    """What the guard's replay under each budget cap (:func:`budget_table`) reads: the run's
    evaluations, both stages' forecasts, and the probe's work as spent and as priced before it ran."""
    return {
        "curve": [(p.step, p.epoch, p.samples_seen, p.accuracy, p.loss) for p in run.curve], "target": target, "n": n,
        "initial": stage1, "index": stage0, "probe_work": probe_spent, "probe_full_work": probe_price(n, probe_options),
    }


def probe_price(batch_samples: int, probe_options: dict[str, Any]) -> float:
    """The probe's full-length work on a batch, priced as ``retrain --budget-kwh`` and the pipeline price it."""
    from shiftcost.forecast.price import RetrainPrice

    pool, holdout = protocol.split_sizes(batch_samples)
    return RetrainPrice(pool, holdout, 64, WORK_RATE, None).probe_kwh(probe_options)


def _guard_figures(
    runs: list[dict[str, Any]], forecaster: Any, cap: float, *, as_deployed: bool, work: Any, max_share: float = MAX_PROBE_SHARE
) -> dict[str, Any]:
    """Where a guard holding each run to ``cap`` stops it, and how far past the cap the run then spends
    (as deployed: probing where the probe costs at most ``max_share`` of the cap)."""
    from shiftcost.forecast.decide import probe_pays
    from shiftcost.forecast.guard import BudgetGuard
    from shiftcost.retrain import EvalPoint

    over_intervals, stopped, wasted, unguarded, probed, recovered, total_spent = [], 0, 0, 0, 0, 0, 0.0
    for r in runs:
        g = r["guard"]
        initial, spent_before = g["initial"], 0.0
        if as_deployed:
            index_work = g["index"].epochs.map(work)
            if probe_pays(index_work, cap, g["probe_full_work"], max_share).probe:
                probed += 1
                spent_before = g["probe_work"]
            else:
                initial = g["index"]
        guard = BudgetGuard(
            forecaster, budget_kwh=cap, batch_samples=g["n"], ceiling=g["target"] + TOLERANCE, initial=initial, spent_before_kwh=spent_before,
        )
        spent = spent_before + r["cost"]
        for k, (step, epoch, seen, acc, loss) in enumerate(g["curve"]):
            point = EvalPoint(step=step, epoch=epoch, samples_seen=seen, accuracy=acc, loss=loss, grad_norm=None, elapsed_s=0.0)
            if guard(point, 0, g["target"]) == "stopped_by_budget":
                stopped += 1
                wasted += int(r["status"] == "reached" and spent_before + r["cost"] <= cap)  # it would have recovered within the cap
                spent = spent_before + seen + EVAL_SAMPLE_WEIGHT * (k + 1) * guard.holdout
                break
        else:
            recovered += int(r["status"] == "reached" and spent <= cap)
        total_spent += spent
        unguarded += int(spent_before + r["cost"] > cap)
        interval_cost = r["eval_every"] * 64 + EVAL_SAMPLE_WEIGHT * guard.holdout
        over_intervals.append(max(spent - cap, 0.0) / interval_cost)
    figures = {
        "stopped": stopped,
        "stopped_but_would_have_recovered_within_cap": wasted,
        "recovered_within_cap": recovered,
        "work_spent": total_spent,
        "over_cap_without_guard": unguarded,
        "over_cap_by_more_than_one_interval": int(sum(v > 1.0 for v in over_intervals)),
        "max_overshoot_intervals": float(max(over_intervals)),
    }
    return figures | ({"probed": probed, "runs": len(runs)} if as_deployed else {})


# ----------------------------------------------------------------------------- baselines


def fit_baselines(rows: list[dict[str, Any]]) -> Any:
    """Constant (median calibration epochs) and isotonic log1p(epochs) on accuracy drop, each
    with a 90% interval from the calibration residuals (capped runs enter at what they spent)."""
    from sklearn.isotonic import IsotonicRegression

    from shiftcost.forecast.forecaster import Interval

    epochs = np.array([r["epochs"] for r in rows], dtype=float)
    drop = np.array([r["accuracy_drop"] for r in rows], dtype=float)
    z = np.log1p(epochs)
    constant = median_interval(epochs, LEVEL)
    iso = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(drop, z)
    width = float(np.quantile(np.abs(z - iso.predict(drop)), LEVEL))

    def predict(accuracy_drop: float) -> tuple[Any, Any]:
        m = float(iso.predict([accuracy_drop])[0])
        return constant, Interval(float(np.expm1(m)), float(max(np.expm1(m - width), 0.0)), float(np.expm1(m + width)), LEVEL)

    return predict


# ----------------------------------------------------------------------------- metrics


def _cindex(pred: np.ndarray, truth: np.ndarray, censored: np.ndarray) -> float:
    """Harrell's C: among pairs where the shorter run reached the cutoff, the share ordered alike."""
    good = total = 0.0
    for i in range(len(truth)):
        if censored[i]:
            continue
        for j in range(len(truth)):
            if truth[j] > truth[i]:
                total += 1
                good += 1.0 if pred[j] > pred[i] else 0.5 if pred[j] == pred[i] else 0.0
    return good / total if total else math.nan


def _scores(runs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    pairs = [(r, r[name]) for r in runs if r[name] is not None]
    truth = np.array([r["epochs"] for r, _ in pairs])
    cens = np.array([r["censored"] for r, _ in pairs])
    med = np.array([p.median for _, p in pairs])
    low = np.array([p.low for _, p in pairs])
    high = np.array([p.high for _, p in pairs])
    reached = ~cens & (truth > 0)
    ape = np.abs(med[reached] - truth[reached]) / truth[reached]
    log_err = abs_log_errors(truth, med, ~cens)
    # The mean over the runs that needed training, as calibrate scores its naive forecast. MdAPE
    # leaves out the capped runs, so a forecast pulled to the middle scores well on it; the median
    # over all runs sits at 0 wherever most runs needed none or capped beyond the forecast, so one
    # forecasting the cap for everything would too. The mean charges both.
    needed = cens | (truth > 0)
    known = ~cens
    # Coverage counts every run whose cost is known; a batch whose probe already met the target is
    # forecast at exactly zero epochs and covered by construction, so coverage over the runs that
    # reached the cutoff after some training is the interval's own.
    inside = (low <= truth) & (truth <= high)
    return {
        "n": len(pairs),
        "n_reached": int(reached.sum()),
        "n_capped": int(cens.sum()),
        "mdape": float(np.median(ape)) if len(ape) else math.nan,
        "median_abs_log_error": float(np.median(log_err)) if len(log_err) else math.nan,
        "mean_abs_log_error_needed": float(np.mean(log_err[needed])) if needed.any() else math.nan,
        "c_index": _cindex(med, truth, cens),
        "coverage": float(np.mean(inside[known])) if known.any() else math.nan,
        "coverage_needed": float(np.mean(inside[reached])) if reached.any() else math.nan,
        # Over every run, capped ones included: a capped run's interval covers its unknown cost at
        # best when it reaches past what the run spent, and at worst never.
        "coverage_all_bounds": [float(np.mean(inside & known)), float(np.mean(inside | (cens & (high >= truth))))] if len(truth) else [math.nan, math.nan],
        "capped_definite_misses": int((cens & (high < truth)).sum()),
    }


#: Whose "not to converge" flag skips a batch: the index stage's alone, the probe stage's alone,
#: or a batch the index stage would skip probed and the probe deciding (a rule the pipeline tried and
#: dropped: the probe stage's flag let the capped runs through; the pipeline skips on the index stage's).
FLAG_RULES = ("stage0", "stage0_probe", "probe_when_index_flags")


def flags(index: Any, probed: Any) -> dict[str, bool]:
    """Each rule's "not to converge" flag, from the index-stage and probe-stage forecasts."""
    return {"stage0": index.not_converging, "stage0_probe": probed.not_converging, "probe_when_index_flags": index.not_converging and probed.not_converging}


def not_converging_flags(runs: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per stage, how many batches its "not to converge" flag (which skips a batch) was raised
    on, and how many of those the retrain took to the cutoff anyway or left capped."""
    out = {}
    for stage in FLAG_RULES:
        flagged = [r for r in runs if r["not_converging"][stage]]
        out[stage] = {
            "flagged": len(flagged), "flagged_but_reached": sum(not r["censored"] for r in flagged),
            "capped": sum(r["censored"] for r in runs), "capped_and_flagged": sum(r["censored"] for r in flagged),
        }  # fmt: skip
    return out


def metrics(runs: list[dict[str, Any]], resamples: int, predictors: tuple[str, ...] = PREDICTORS) -> dict[str, Any]:
    """Each predictor's scores, and paired bootstrap CIs of the probe stage minus each baseline:
    resampling runs, and, where runs say which (kind, seed offset) they belong to, resampling
    those clusters, whose runs share a corruption and so are not independent draws."""
    scored = {"predictors": {name: _scores(runs, name) for name in predictors}}
    if runs and all("cluster" in r and "seed" in r for r in runs):
        scored["predictors"][OTHER_SEED] = _scores(other_seed(runs), OTHER_SEED)
    scored["stage0_probe_minus_baseline_ci95"] = _differences(runs, resamples, lambda rng: rng.integers(0, len(runs), len(runs)))
    if runs and all("cluster" in r for r in runs):
        scored["stage0_probe_minus_baseline_ci95_by_cluster"] = _differences(runs, resamples, cluster_draw(runs))
    return scored


#: Each scored run forecast by its batch's other seeds (:func:`other_seed`).
OTHER_SEED = "other_seeds_same_batch"


def other_seed(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``runs``, each with :data:`OTHER_SEED`: the mean epochs of the other seeds' retrains of the
    same batch (the same kind, intensity and corruption; a capped one counts at its cap), as a point
    with no interval (its coverage means nothing). Its errors are the retrains' own seed-to-seed
    spread on exactly the runs scored, which no forecast from the batch removes; with one other
    seed they carry that seed's noise as well as the scored run's, so a forecast of the batch's
    typical epochs can err less (by about a factor of the square root of 2 in log epochs where the
    spread is log-normal)."""
    from shiftcost.forecast.forecaster import Interval

    batches: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for run in runs:
        batches.setdefault((run["cluster"], run["intensity"]), []).append(run)
    out = []
    for run in runs:
        others = [mate["epochs"] for mate in batches[(run["cluster"], run["intensity"])] if mate["seed"] != run["seed"]]
        epochs = float(np.mean(others)) if others else None
        out.append(run | {OTHER_SEED: None if epochs is None else Interval(epochs, epochs, epochs, LEVEL)})
    return out


def cluster_draw(runs: list[dict[str, Any]]) -> Callable[[np.random.Generator], np.ndarray]:
    """A bootstrap draw of ``runs``' indices that resamples whole clusters (each run's ``cluster``)."""
    labels = np.array([r["cluster"] for r in runs])
    members = [np.flatnonzero(labels == c) for c in dict.fromkeys(labels)]
    return lambda rng: np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])


def paired_ci(
    runs: list[dict[str, Any]], resamples: int, draw: Callable[[np.random.Generator], np.ndarray], forecast: str, against: str,
    measures: tuple[str, ...] = ("mdape",), rng: np.random.Generator | None = None,
) -> dict[str, list[float]]:
    """Paired bootstrap 95% CI of each measure of ``forecast`` minus ``against`` over the same resampled runs."""
    rng = np.random.default_rng(0) if rng is None else rng
    diffs: dict[str, list[float]] = {m: [] for m in measures}
    for _ in range(resamples):
        sample = [runs[i] for i in draw(rng)]
        a, b = _scores(sample, forecast), _scores(sample, against)
        for measure, values in diffs.items():
            values.append(a[measure] - b[measure])
    return {k: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))] for k, v in diffs.items()}


def _differences(runs: list[dict[str, Any]], resamples: int, draw: Callable[[np.random.Generator], np.ndarray]) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    measures = ("mdape", "c_index", "mean_abs_log_error_needed")
    return {baseline: paired_ci(runs, resamples, draw, "stage0_probe", baseline, measures, rng) for baseline in ("constant", "isotonic_accuracy_drop", "stage0")}


#: Shares of the cap the probe may cost (``probe_max_share``) at which the deployed guard is
#: replayed too, beside the default: on these small models the default never lets it run.
DEPLOYED_SHARES = (0.25, 1.0)


def _deployed_row(share: float) -> str:
    return f"guard_as_deployed_probe_share_{share:g}"


#: Entries of a budget row that are the guard's, not a predictor's admissions.
GUARD_ROWS = ("guard", "guard_as_deployed", *map(_deployed_row, DEPLOYED_SHARES))


def budget_table(runs: list[dict[str, Any]], forecaster: Any, work: Any) -> dict[str, Any]:
    """Budgeting on each predictor's upper bound, and the guard, under caps at cost percentiles.

    The guard is replayed from the probe stage's forecast on every run, its probe not
    charged (``guard``), and as ``retrain --budget-kwh`` and the pipeline run it (``guard_as_deployed``):
    the probe only where it pays against the cap (``probe_pays``, its full length priced), its
    work then charged before the first step, and from the index forecast elsewhere; that at the
    default ``probe_max_share`` and at each of ``DEPLOYED_SHARES``."""
    costs = np.array([r["cost"] for r in runs])
    out: dict[str, Any] = {}
    for pct in (25, 50, 75):
        cap = float(np.percentile(costs, pct))
        row: dict[str, Any] = {"cap": cap}
        for name in ("constant", "isotonic_accuracy_drop", "stage0", "stage0_probe"):
            admitted = [r for r in runs if work(r[name].high if math.isfinite(r[name].high) else math.inf) <= cap]
            point = [r for r in runs if work(r[name].median) <= cap]
            row[name] = {
                "admitted_upper": len(admitted),
                "overspent_upper": sum(r["cost"] > cap for r in admitted),
                "admitted_median": len(point),
                "overspent_median": sum(r["cost"] > cap for r in point),
            }
        row["guard"] = _guard_figures(runs, forecaster, cap, as_deployed=False, work=work)
        row["guard_as_deployed"] = _guard_figures(runs, forecaster, cap, as_deployed=True, work=work)
        for share in DEPLOYED_SHARES:
            row[_deployed_row(share)] = _guard_figures(runs, forecaster, cap, as_deployed=True, work=work, max_share=share)
        out[f"p{pct}"] = row
    return out


def probe_cost(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The probe's fixed size, its cost beside the median retrain (both counted as work:
    samples trained + 1/3 of samples evaluated), and its energy measured vs estimated."""
    retrain = float(np.median([r["samples_seen"] for r in runs]))
    probe = float(np.median([r["probe_sample_gradients"] for r in runs]))
    probe_median = float(np.median([probe_work(r["probe_sample_gradients"], r["probe_samples_evaluated"]) for r in runs]))
    measured = [r["probe_energy_kwh_measured"] for r in runs if r["probe_energy_kwh_measured"] is not None]
    estimated = [r["probe_energy_kwh_estimated"] for r in runs if r["probe_energy_kwh_estimated"] is not None]
    ratios = [
        r["probe_energy_kwh_measured"] / r["probe_energy_kwh_estimated"]
        for r in runs if r["probe_energy_kwh_measured"] is not None and r["probe_energy_kwh_estimated"]
    ]
    return {
        # A probe stops where its evaluations meet the cutoff: its length varies, bounded by its settings.
        "probe_steps_max": max(r["probe_steps"] for r in runs), "probe_steps_median": float(np.median([r["probe_steps"] for r in runs])),
        "probe_batch_size": runs[0]["probe_batch_size"], "probe_samples": runs[0]["probe_samples"],
        "probe_evaluations_max": max(r["probe_evaluations"] for r in runs),
        "work_ratio_incl_evaluations": probe_median / float(np.median([r["cost"] for r in runs])),
        "probe_energy_kwh_measured_median": float(np.median(measured)) if measured else None,
        "probe_energy_kwh_estimated_median": float(np.median(estimated)) if estimated else None,
        "probe_energy_measured_over_estimated_median": float(np.median(ratios)) if ratios else None,
        "probe_energy_measured_over_estimated_range": [float(min(ratios)), float(max(ratios))] if ratios else None,
        "probe_sample_gradients": probe,
        "probe_samples_evaluated": float(np.median([r["probe_samples_evaluated"] for r in runs])),
        "probe_seconds_median": float(np.median([r["probe_seconds"] for r in runs])),
        "median_retrain_sample_gradients": retrain,
        "median_retrain_seconds": float(np.median([r["retrain_seconds"] for r in runs])),
        "ratio": probe / retrain if retrain else math.inf,
    }


def noise_floor(
    model: Any, x: Any, y: Any, ceiling: float, seeds: int, kinds: dict[str, tuple[float, ...]], device: str = "cpu"
) -> dict[str, Any]:
    """One batch per evaluation kind (middle intensity), ``seeds`` retrains, under the latest
    evaluation alone deciding the cutoff (window 1), the mean of two, and the chosen window
    (chosen on the built-in kinds by ``forecast_selection.py``; reported here, not chosen);
    then the chosen window with every seed judged on one held-out split."""
    batches = {kind: eval_corrupt(x, kind, intensities[len(intensities) // 2], seed=0) for kind, intensities in kinds.items()}
    out: dict[str, Any] = {}
    chosen = protocol.CUTOFF_WINDOW
    for window in sorted({1, 2, chosen}):
        protocol.CUTOFF_WINDOW = window
        out[f"cutoff_window_{window}"] = seed_spread(model, batches, y, ceiling, seeds, device=device)
    protocol.CUTOFF_WINDOW = chosen
    # The probe sees the held-out split the retrain will be judged on (same seed): the part of
    # the floor left when only the training differs is the part such a forecast cannot remove.
    out[f"cutoff_window_{chosen}_holdout_fixed"] = seed_spread(model, batches, y, ceiling, seeds, holdout_seed=100, device=device)
    return out


def seed_spread(
    model: Any, batches: dict[str, Any], y: Any, ceiling: float, seeds: int, holdout_seed: int | None = None, device: str = "cpu",
    recipe: dict[str, Any] | None = None, reference: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """Epochs to the cutoff of each batch under ``seeds`` retrain seeds: the median CV and the
    leave-one-seed-out MdAPE (the error of forecasting one seed by the mean of the others).
    ``recipe`` defaults to :data:`TRAINING_RECIPE`; one that replays needs the labelled
    ``reference`` to replay from.

    Both are taken over batches whose every seed reached the cutoff, as forecast MdAPE is over
    reached runs: a capped run's epochs are only a bound, and two seeds capped at the same
    epoch would count as a perfect forecast."""
    from shiftcost.retrain import retrain_to_cutoff

    cvs, apes, per_kind, capped = [], [], {}, []
    for kind, shifted in batches.items():
        runs = [
            retrain_to_cutoff(
                model, shifted, y, seed=100 + s, reference_accuracy=ceiling, tolerance=TOLERANCE,
                holdout_fraction=protocol.HOLDOUT_FRACTION, holdout_seed=holdout_seed, max_epochs=protocol.MAX_EPOCHS,
                track_energy=False, device=device, reference_x=None if reference is None else reference[0],
                reference_y=None if reference is None else reference[1], **(TRAINING_RECIPE if recipe is None else recipe),
            )
            for s in range(seeds)
        ]
        epochs = np.array([run.epochs for run in runs])
        per_kind[kind] = epochs.tolist()
        if any(run.status == "cap_reached" for run in runs):
            capped.append(kind)
            continue
        if epochs.mean() > 0:
            cvs.append(float(epochs.std(ddof=1) / epochs.mean()))
        for i in range(seeds):
            if epochs[i] > 0:
                apes.append(abs(np.delete(epochs, i).mean() - epochs[i]) / epochs[i])
    return {
        "cv_median": float(np.median(cvs)) if cvs else math.nan,
        "cv_range": [float(min(cvs)), float(max(cvs))] if cvs else None,
        "leave_one_seed_out_mdape": float(np.median(apes)) if apes else math.nan,
        "median_epochs": float(np.median([e for v in per_kind.values() for e in v])),
        "epochs": per_kind,
        "kinds_with_a_capped_seed": capped,
    }


# ----------------------------------------------------------------------------- output


def print_flags(counts: dict[str, dict[str, int]], indent: str = "") -> None:
    for rule, c in counts.items():
        print(f"{indent}not-converging flag, {rule}: raised on {c['flagged']} runs, {c['flagged_but_reached']} of which reached the cutoff; "
              f"raised on {c['capped_and_flagged']} of the {c['capped']} capped runs")


def print_arch(result: dict[str, Any]) -> None:
    print(f"\n=== {result['arch']} (reference accuracy {result['reference_accuracy']:.3f}; {result['calibration_points']} calibration points; seed offset {result['seed_offset']})")
    print(f"calibration LOCO stage 0: {result['calibration_stage0_loo']}")
    print(f"calibration LOCO stage 1: {result['calibration_stage1_loo']}")
    stages = result.get("calibration_left_out")
    if stages:
        print(
            f"calibration, both stages on the {stages['probe']['n']} batches that needed training, each kind left out: MdAPE epochs "
            f"probe {stages['probe']['mdape_epochs']:.0%}, index {stages['index']['mdape_epochs']:.0%}; "
            f"the pipeline {'would not probe: ' + result['probe_not_worth'] if result.get('probe_not_worth') else 'probes where it pays'}"
        )
        if "rate_scaling" in stages:
            from shiftcost.calibrate.outputs import describe_rate_scaling

            print(f"calibration's {describe_rate_scaling(stages['rate_scaling'])}")
    print(f"stage 1 coefficients: {result['stage1_coefficients']}")
    print_metrics(result["metrics"])
    print_flags(result["not_converging"])
    print_budget(result["budget"])
    print(f"probe cost: {result['probe_cost']}")
    if result["noise_floor"]:
        for name, nf in result["noise_floor"].items():
            print(
                f"noise floor ({name}): CV median {nf['cv_median']:.2f}, range {nf['cv_range']}, leave-one-seed-out MdAPE "
                f"{100 * nf['leave_one_seed_out_mdape']:.0f}% (left out, a seed capped: {', '.join(nf['kinds_with_a_capped_seed']) or 'none'})"
            )
    print(f"seconds: {result['seconds']}")


def print_budget(budget: dict[str, Any]) -> None:
    for pct, row in budget.items():
        cells = "; ".join(
            f"{name}: over {v['overspent_upper']}/{v['admitted_upper']} admitted (median rule {v['overspent_median']}/{v['admitted_median']})"
            for name, v in row.items() if name != "cap" and name not in GUARD_ROWS
        )
        print(f"cap {pct} = {row['cap']:.0f} sample-gradients: {cells}")
        for name in GUARD_ROWS:
            if name in row:
                print(f"   {name.replace('_', ' ')}: {row[name]}")


def print_budget_totals(budgets: list[dict[str, Any]]) -> None:
    """Overspends summed over several files' budget tables (each file's caps at its own percentiles)."""
    cells = [row for budget in budgets for row in budget.values()]
    names = [name for name in cells[0] if name != "cap" and name not in GUARD_ROWS]
    spent = "; ".join(f"{name} {sum(row[name]['overspent_upper'] for row in cells)}/{sum(row[name]['admitted_upper'] for row in cells)}" for name in names)
    print(f"budgets over {len(cells)} caps, overspent/admitted on the upper bound: {spent}")
    for name in GUARD_ROWS:
        guard = [row[name] for row in cells if name in row]
        if not guard:
            continue
        probed = f"probed {sum(g['probed'] for g in guard)} of {sum(g['runs'] for g in guard)} replays, " if "probed" in guard[0] else ""
        print(
            f"   {name.replace('_', ' ')}: {probed}over by more than one interval {sum(g['over_cap_by_more_than_one_interval'] for g in guard)}, "
            f"most {max(g['max_overshoot_intervals'] for g in guard):.2f} intervals, stopped {sum(g['stopped'] for g in guard)} "
            f"({sum(g['stopped_but_would_have_recovered_within_cap'] for g in guard)} would have recovered within the cap), "
            f"recovered within the cap {sum(g['recovered_within_cap'] for g in guard)}, work spent {sum(g['work_spent'] for g in guard):.4g}"
        )


def print_metrics(scored: dict[str, Any]) -> None:
    """The per-predictor table and the paired bootstrap CIs of :func:`metrics`."""
    print(
        f"{'predictor':28s} {'n':>4s} {'reached':>7s} {'capped':>6s} {'MdAPE':>7s} {'med|log|':>8s} {'needed':>7s} {'C-index':>7s} "
        f"{'cov90':>6s} {'cov>0':>6s} {'cov all':>9s} {'capped miss':>11s}"
    )
    for name, s in scored["predictors"].items():
        print(
            f"{name:28s} {s['n']:4d} {s['n_reached']:7d} {s['n_capped']:6d} {100 * s['mdape']:6.0f}% {s['median_abs_log_error']:8.3f} "
            f"{s['mean_abs_log_error_needed']:7.3f} {s['c_index']:7.3f} {100 * s['coverage']:5.0f}% {100 * s['coverage_needed']:5.0f}% {_percent_range(s['coverage_all_bounds']):>9s} {s['capped_definite_misses']:11d}"
        )
    for key, unit in (("stage0_probe_minus_baseline_ci95", ""), ("stage0_probe_minus_baseline_ci95_by_cluster", ", (kind, seed offset) resampled")):
        for base, ci in scored.get(key, {}).items():
            needed = ci["mean_abs_log_error_needed"]
            print(
                f"stage0+probe minus {base}{unit}: MdAPE diff 95% CI [{ci['mdape'][0]:+.3f}, {ci['mdape'][1]:+.3f}], C-index diff "
                f"[{ci['c_index'][0]:+.3f}, {ci['c_index'][1]:+.3f}], mean |log error| of runs that needed training diff [{needed[0]:+.3f}, {needed[1]:+.3f}]"
            )


def _percent_range(bounds: list[float]) -> str:
    low, high = (round(100 * b) for b in bounds)
    return f"{low}%" if low == high else f"{low}-{high}%"


def print_pooled(paths: list[Path], resamples: int) -> None:
    """The scored runs of several ``--json`` outputs (say several ``--seed-offset`` runs) pooled
    per architecture: each predictor's figures and the paired bootstrap CIs over all of them."""
    from shiftcost.forecast.forecaster import Interval

    pooled: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        for result in json.loads(path.read_text()):
            for run in result["runs"]:
                for name in PREDICTORS:
                    saved = run.get(name)
                    run[name] = None if saved is None else Interval(*(math.inf if saved[k] is None else saved[k] for k in ("median", "low", "high", "level")))
                pooled.setdefault(result["arch"], []).append(run)
    for arch, runs in pooled.items():
        print(f"\n=== {arch}: {len(runs)} scored runs pooled from {len(paths)} files")
        print_metrics(metrics(runs, resamples))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="digits_cnn,shufflenet_v2_x0_5")
    parser.add_argument("--calibration-intensities", type=int, default=6, help="intensities per built-in kind (0 included)")
    parser.add_argument(
        "--calibration-repeats", type=int, default=1,
        help="retrains per calibration point, averaged (1 gives the quoted figures; shiftcost calibrate's default is 2)",
    )
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--noise-seeds", type=int, default=4)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument(
        "--seed-offset", type=int, default=0,
        help=(
            "first seed of the calibration sweep, the evaluation batches' corruptions and the scored retrains and probes "
            "(the model stays the same): 0 gives the quoted figures; other offsets show how far one run's figures move "
            "with the seeds alone"
        ),
    )
    parser.add_argument(
        "--device", default="cpu",
        help="where calibration, probes and retrains run: cpu (the quoted figures), cuda or auto; the base model is trained on the CPU",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--kind-set", choices=sorted(KIND_SETS), default="original",
        help=(
            "evaluation-only kinds to score: the original eight, the fresh six added once those had been scored "
            "several times, the third six added with the geometric calibration kinds, or the fourth six added when "
            "runs that needed no training stopped widening the intervals"
        ),
    )
    parser.add_argument("--combine", default=None, help="comma-separated --json outputs of earlier runs: print their scored runs pooled")
    parser.add_argument(
        "--rescore", default=None,
        help="comma-separated --json outputs of earlier runs: score their runs again under the design below, without retraining",
    )
    parser.add_argument("--stage1-features", default=",".join(STAGE1_DEFAULT), help="with --rescore: stage 1's features")
    parser.add_argument(
        "--stage1-offsets", default=None,
        help="with --rescore: stage 1's features whose coefficient is held at 1 ('' for none; default: the library's, where stage 1 reads them)",
    )
    parser.add_argument("--curve-horizon", type=float, default=HORIZON_CAPS, help="with --rescore: caps at which the curve feature is clipped")
    parser.add_argument("--own-curve-evals", type=float, default=None, help="with --rescore: the in-flight weight on the run's own curve")
    parser.add_argument(
        "--interval-sized-on", choices=INTERVAL_RUNS, default=None,
        help="with --rescore: the calibration runs the probe stage's interval is sized on (default: the library's)",
    )
    parser.add_argument(
        "--probe-steps", type=int, default=None,
        help="with --rescore: read every saved probe (calibration's and the scored runs') as if it had stopped after this many steps",
    )
    parser.add_argument(
        "--calibration-fit", choices=CALIBRATION_FITS, default="mean",
        help="with --rescore: fit each calibration point on the mean of its retrains (as calibrate does), its first alone, or each as a row",
    )
    parser.add_argument(
        "--against-calibration-fit", choices=CALIBRATION_FITS, default=None,
        help="with --rescore: also fit the calibration points so, and pair the two probe stages on the same runs",
    )
    parser.add_argument(
        "--probe-rate-scaling", choices=("none", "linear", "sqrt", "chosen"), default=None,
        help="calibrate and score with probes whose rate and clock follow their batch so, or (chosen) with the one each calibration "
        "keeps of the retrain's rate and its optimizer's rule, see shiftcost.forecast.probe.CHOOSE_RATE_SCALING (default: the library's)",
    )
    args = parser.parse_args()
    if args.probe_rate_scaling is not None:
        from shiftcost.forecast import probe

        probe.CHOOSE_RATE_SCALING = args.probe_rate_scaling == "chosen"
        if args.probe_rate_scaling != "chosen":
            probe.RATE_SCALING = args.probe_rate_scaling
    if args.combine:
        print_pooled([Path(p) for p in args.combine.split(",")], args.bootstrap)
        return
    if args.rescore:
        rescore([Path(p) for p in args.rescore.split(",")], args)
        return
    torch.set_num_threads(1)
    load = os.getloadavg()
    started = time.perf_counter()
    results = []
    for arch in args.archs.split(","):
        result = score_arch(arch, args)
        print_arch(result)
        results.append(result)
    gpu = f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() and args.device != "cpu" else ""
    print(
        f"\nwall {time.perf_counter() - started:.0f} s; load average at start {load}, at end {os.getloadavg()}; "
        f"{os.cpu_count()} CPUs; device {args.device}{gpu}"
    )
    if args.json:
        for r in results:
            for run in r["runs"]:
                for name in PREDICTORS:
                    run[name] = None if run[name] is None else run[name].to_dict()
                # The run's evaluations, with the probe's curve and the calibration rows (each with its
                # probe_curve), let another design be scored on these very runs without retraining.
                run["curve"] = [dict(zip(("step", "epoch", "samples_seen", "accuracy", "loss"), p)) for p in run.pop("guard")["curve"]]
        args.json.write_text(json.dumps(results, indent=1, default=str))


def rescore(paths: list[Path], args: argparse.Namespace) -> None:
    """The runs of earlier ``--json`` outputs scored again under another design, with no retraining:
    the forecaster is refitted on each output's calibration rows with ``--stage1-features`` and the
    curve clipped at ``--curve-horizon`` caps (both read again from the saved probe curves), and the
    in-flight forecast weighs the run's own curve with ``--own-curve-evals``; with ``--probe-steps`` every
    saved probe is read as if it had stopped after that many steps. With the defaults it
    repeats the live run's table. Several files of one architecture (say several ``--seed-offset``
    runs of a kind set) are also scored pooled. Budgets and the guard are replayed on the saved
    evaluations as a live run replays them (the guard only reads them), so a design that narrows the
    intervals shows what it would overspend; pooled, the overspends are summed over the files.

    ``--calibration-fit`` says how a calibration point retrained several times is fitted
    (:func:`rows_fitted_as`); with ``--against-calibration-fit`` a second forecaster is fitted the
    other way, and its probe stage is scored on the same runs with the paired bootstrap CI of the
    first's minus its own."""
    from types import SimpleNamespace

    from shiftcost.calibrate.analysis import _fit_ready, _fit_row
    from shiftcost.forecast.forecaster import Forecaster
    from shiftcost.forecast.probe import features_of_saved_curve, starts_at_target

    def read(curve: list[dict[str, float]], target: float, ceiling: float, bn_adapted: float | None = None) -> dict[str, float]:
        return features_of_saved_curve(
            shortened(curve), target=target, ceiling=ceiling, cap_epochs=protocol.MAX_EPOCHS, horizon_caps=args.curve_horizon,
            bn_adapted_accuracy=bn_adapted,
        )

    def shortened(curve: list[dict[str, float]]) -> list[dict[str, float]]:
        return curve if args.probe_steps is None else curve[: args.probe_steps + 1]

    predictors = PREDICTORS if args.against_calibration_fit is None else (*PREDICTORS, AGAINST)
    stage1_features = tuple(args.stage1_features.split(","))
    stage1_offsets = None if args.stage1_offsets is None else tuple(f for f in args.stage1_offsets.split(",") if f)
    pooled: dict[str, list[list[dict[str, Any]]]] = {}
    pooled_probes: dict[str, list[tuple[int, int, int]]] = {}
    pooled_budgets: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        for result in json.loads(path.read_text()):
            if "calibration_rows" not in result or "stage0_features" not in result:
                raise SystemExit(f"{path} does not keep its calibration rows (written by an older version); run the benchmark again with --json.")
            features = result["stage0_features"]
            ceiling = result["reference_accuracy"]
            target = ceiling - TOLERANCE

            def fitted(cal_rows: list[dict[str, Any]]) -> Any:
                fit_rows = [_fit_row(r | read(r["probe_curve"], r["target_accuracy"], r["reference_accuracy"], r.get("probe_bn_adapted_accuracy"))) for r in cal_rows if _fit_ready(r, features)]
                forecaster = Forecaster.fit(
                    fit_rows, features=features, level=LEVEL, max_epochs=protocol.MAX_EPOCHS, stage1_features=stage1_features, stage1_offsets=stage1_offsets,
                )
                if forecaster.stage1 is None:
                    raise SystemExit(f"{path}, {result['arch']}: stage 1 could not be fitted on {stage1_features}: {forecaster.stage1_error}")
                forecaster.energy_rate = WORK_RATE
                if args.interval_sized_on is not None:
                    forecaster.interval_sized_on = args.interval_sized_on
                return forecaster

            usable = [r for r in result["calibration_rows"] if r["status"] != "failed"]
            cal_rows = rows_fitted_as(usable, args.calibration_fit)
            forecaster = fitted(cal_rows)
            against = None if args.against_calibration_fit is None else fitted(rows_fitted_as(usable, args.against_calibration_fit))
            # Every retrain of a file is on the stream batch calibration corrupted: its pool and holdout.
            batch_samples = cal_rows[0]["samples"] + cal_rows[0]["holdout_samples"]
            work = work_units(batch_samples)
            baselines = fit_baselines(cal_rows)
            runs, probes = [], []
            for saved in result["runs"]:
                probe = saved["probe_curve"]
                probe_read = read(probe, target, ceiling, saved.get("probe_bn_adapted_accuracy"))
                met = starts_at_target([p["accuracy"] for p in probe], target)
                stage0 = forecaster.predict(saved["features"])
                stage1 = forecaster.predict_from_probe_features(saved["features"], probe_read, already_met=met)
                run = SimpleNamespace(curve=[SimpleNamespace(**p) for p in saved["curve"]])
                record = {k: saved[k] for k in ("kind", "intensity", "seed", "epochs", "censored", "accuracy_drop", "cost", "status", "eval_every")}
                record["cluster"] = f"{saved['kind']}/{result['seed_offset']}"
                spent_on_probe = probe_work(saved["probe_sample_gradients"], saved["probe_samples_evaluated"])
                saved_probe = {"steps": saved.get("probe_length", len(probe) - 1), "batch_size": saved["probe_batch_size"]}
                record["guard"] = _guard_replay(run, target, stage0, stage1, batch_samples, spent_on_probe, saved_probe)
                record |= {"stage0": stage0.epochs, "stage0_probe": stage1.epochs, "not_converging": flags(stage0, stage1)}
                if against is not None:
                    record[AGAINST] = against.predict_from_probe_features(saved["features"], probe_read, already_met=met).epochs
                record["constant"], record["isotonic_accuracy_drop"] = baselines(record["accuracy_drop"])
                record["in_flight_quarter"] = _in_flight(forecaster, saved["features"], run, stage1, target, ceiling, args.own_curve_evals)
                record["in_flight_quarter_prior_only"] = _in_flight(forecaster, saved["features"], run, stage1, target, ceiling, math.inf)
                runs.append(record)
                # A probe that stopped at its cutoff saved only the steps it took; files that do not say
                # how long it could run were written when every probe ran its full length.
                length = saved.get("probe_length", len(probe) - 1)
                full = length if args.probe_steps is None else min(length, args.probe_steps)
                probes.append((probe_steps_taken(shortened(probe), target) * saved["probe_batch_size"], full * saved["probe_batch_size"], saved["samples_seen"]))
            coefficients = dict(zip(forecaster.stage1.features_, map(float, forecaster.stage1.coef_)))
            print(
                f"\n=== {result['arch']} from {path}: stage 1 on {', '.join(stage1_features)} (held at 1: {', '.join(forecaster.stage1.offset_features or ()) or 'none'}), curve clipped at {args.curve_horizon:g} caps, "
                f"in flight weighing the run's own curve at {'the default' if args.own_curve_evals is None else args.own_curve_evals}, "
                f"interval sized on {forecaster.interval_sized_on}; "
                f"stage 1 coefficients {coefficients}"
            )
            print_metrics(metrics(runs, args.bootstrap, predictors))
            print_against(runs, args)
            print_flags(not_converging_flags(runs))
            print_probe_share(probes)
            budget = budget_table(runs, forecaster, work)
            print_budget(budget)
            pooled_budgets.setdefault(result["arch"], []).append(budget)
            pooled.setdefault(result["arch"], []).append(runs)
            pooled_probes.setdefault(result["arch"], []).extend(probes)
    for arch, per_file in pooled.items():
        if len(per_file) > 1:
            runs = [run for file_runs in per_file for run in file_runs]
            print(f"\n=== {arch}: the {len(runs)} runs of {len(per_file)} files pooled")
            print_metrics(metrics(runs, args.bootstrap, predictors))
            print_against(runs, args)
            print_probe_share(pooled_probes[arch])
            print_budget_totals(pooled_budgets[arch])


#: The probe stage of ``rescore``'s second forecaster (``--against-calibration-fit``).
AGAINST = "stage0_probe_against"
#: How a calibration point retrained several times can be fitted: on the mean of its retrains
#: (``shiftcost calibrate``), on its first retrain alone (the sweep with one retrain per point, since
#: the first retrain's seed does not depend on how many follow it), or on each retrain as a row.
CALIBRATION_FITS = ("mean", "first", "each")


def rows_fitted_as(rows: list[dict[str, Any]], how: str) -> list[dict[str, Any]]:
    """Calibration rows to fit, each point's retrains read as ``how`` (:data:`CALIBRATION_FITS`) says."""
    if how == "mean":
        return rows
    if how == "first":
        return [_over_runs(row, row["runs"][:1]) for row in rows]
    if how == "each":
        return [_over_runs(row, [run]) for row in rows for run in row["runs"]]
    raise ValueError(f"a calibration point is fitted as one of {CALIBRATION_FITS}, not {how!r}")


def _over_runs(row: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """``row`` as if its point had been retrained ``runs`` only, summarised again as the sweep does."""
    from shiftcost.calibrate.sweep import _summarise_runs

    if runs == row["runs"]:
        return row
    row = row | {"runs": runs, "repeats": len(runs), "notes": list(row["notes"])}
    _summarise_runs(row)
    return row


def print_against(runs: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """The paired bootstrap CI of the probe stage minus ``rescore``'s second forecaster's."""
    if args.against_calibration_fit is None:
        return
    ci = paired_ci(runs, args.bootstrap, cluster_draw(runs), "stage0_probe", AGAINST, ("mdape", "c_index", "mean_abs_log_error_needed"))
    print(
        f"stage0+probe fitted on each calibration point's {args.calibration_fit} minus on its {args.against_calibration_fit}, "
        f"(kind, seed offset) resampled: MdAPE diff 95% CI [{ci['mdape'][0]:+.3f}, {ci['mdape'][1]:+.3f}], "
        f"C-index diff [{ci['c_index'][0]:+.3f}, {ci['c_index'][1]:+.3f}], mean |log error| of runs that needed training diff "
        f"[{ci['mean_abs_log_error_needed'][0]:+.3f}, {ci['mean_abs_log_error_needed'][1]:+.3f}]"
    )


def probe_steps_taken(curve: list[dict[str, float]], target: float) -> int:
    """The steps a saved probe would have taken had it stopped, as probes do, at its first
    evaluation meeting the cutoff rule (features read under the cutoff design are the same)."""
    met = protocol.first_cutoff([p["accuracy"] for p in curve], target)
    return len(curve) - 1 if met is None else met


def print_probe_share(work: list[tuple[int, int, int]]) -> None:
    """The probes' sample-gradients, stopped at their cutoff and not, against the median retrain's."""
    table = np.array(work, dtype=float)
    stopped, full, retrain = np.median(table, axis=0)
    mean = float(table[:, 0].mean())
    print(
        f"probe sample-gradients against the median retrain's {retrain:.0f}: stopped at its cutoff, median {stopped:.0f} "
        f"({stopped / retrain:.1%}), mean {mean:.0f} ({mean / retrain:.1%}), {np.mean(table[:, 0] < table[:, 1]):.0%} stopped early; "
        f"never stopped {full:.0f} ({full / retrain:.1%})"
    )


def _subset(values: tuple[float, ...], count: int) -> tuple[float, ...]:
    if count >= len(values):
        return values
    picks = np.linspace(0, len(values) - 1, count).round().astype(int)
    return tuple(values[i] for i in sorted(set(picks)))


if __name__ == "__main__":
    main()
