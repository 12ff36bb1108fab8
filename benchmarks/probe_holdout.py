"""What capping the probe's held-out evaluations moves, on a batch whose holdout is larger than the cap.

Usage: nice -n 10 python benchmarks/probe_holdout.py [--arch digits_cnn] [--batch 6000] [--seeds 4]
       [--kind-set fourth] [--json out.json]

1. Calibrates the forecast on the built-in kinds as ``forecast_accuracy.py`` does. Its batches
   hold out 162 images, below the cap, so the calibration is the same with the cap and without.
2. Builds a large batch from the digits the model never trained on (the reference and stream
   splits), drawn with replacement up to ``--batch`` images, each with its own faint Gaussian
   noise (torchvision transforms v2, sigma 0.05 on [0, 1]); its retrains hold out 30% of it.
3. For each evaluation-only kind of ``--kind-set`` at its middle intensity and each of
   ``--seeds`` seeds: the probe reading the whole holdout and the probe reading at most
   :data:`~shiftcost.forecast.probe.DEFAULT_MAX_HOLDOUT` of it, side by side (same seed: same
   sample and steps), each turned into the probe-stage forecast; and the retrain to the cutoff.

Prints the probe's work both ways (sample-gradients plus a third of the samples evaluated, the
unit of the host's energy rate) beside the median retrain's; the |log| of the capped forecast's
median over the whole-holdout one's, beside the |log| between the whole-holdout forecasts of two
seeds (what the probe's own randomness moves); and each forecast's MdAPE of epochs and 90%
coverage on the retrains that reached the cutoff, with a paired bootstrap 95% CI of the
difference. Nothing here chooses a setting: the cap is the product's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from forecast_accuracy import KIND_SETS, TOLERANCE, TRAINING_RECIPE, add_scenario_arguments, calibrated, probe_work, work_units  # noqa: E402

from eval_shifts import eval_corrupt  # noqa: E402

from shiftcost.features import COST_FEATURES  # noqa: E402
from shiftcost.forecast import protocol  # noqa: E402
from shiftcost.forecast.probe import DEFAULT_MAX_HOLDOUT, run_probe  # noqa: E402

WAYS = ("whole", "capped")


def large_batch(splits: dict[str, Any], size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` images drawn with replacement from the splits the model never trained on, each
    with its own faint noise (so that no two are the same image)."""
    from torchvision.transforms import v2

    x = torch.cat([splits["holdout"][0], splits["stream"][0]])
    y = torch.cat([splits["holdout"][1], splits["stream"][1]])
    jitter = v2.GaussianNoise(sigma=0.05)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        picks = torch.randint(0, len(y), (size,))
        images = torch.stack([jitter(x[i]) for i in picks.tolist()])
    return images.contiguous(), y[picks].clone()


def main() -> None:
    from shiftcost.index.engine import assess
    from shiftcost.retrain import retrain_to_cutoff

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_scenario_arguments(parser)
    parser.add_argument("--batch", type=int, default=6000)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)

    started = time.perf_counter()
    model, spec, splits, stats, forecaster = calibrated(args)
    ceiling, target = stats.accuracy, stats.accuracy - TOLERANCE
    options = forecaster.probe_options()
    print(f"calibrated in {time.perf_counter() - started:.0f} s; probe {options}", flush=True)

    x, y = large_batch(splits, args.batch)
    work = work_units(len(y))
    pool, holdout = protocol.split_sizes(len(y))
    print(f"batch of {len(y)}: {pool} trained, {holdout} held out; the cap reads {min(holdout, DEFAULT_MAX_HOLDOUT)}", flush=True)

    runs: list[dict[str, Any]] = []
    for kind, intensities in KIND_SETS[args.kind_set].items():
        intensity = intensities[len(intensities) // 2]
        shifted = eval_corrupt(x, kind, intensity, seed=0)
        report = assess(model, spec, stats, shifted, y, device=args.device)
        features = {k: float(getattr(report, k)) for k in COST_FEATURES}
        for seed in range(args.seeds):
            record: dict[str, Any] = {"kind": kind, "intensity": intensity, "seed": seed}
            for way, cap in zip(WAYS, (None, DEFAULT_MAX_HOLDOUT)):
                t0 = time.perf_counter()
                probe = run_probe(model, shifted, y, target_accuracy=target, ceiling=ceiling, seed=seed, device=args.device, **(options | {"max_holdout": cap}))
                forecast = forecaster.predict(features, probe=probe).epochs
                record[way] = {
                    "median": forecast.median, "low": forecast.low, "high": forecast.high, "work": probe_work(probe.cost.sample_gradients, probe.cost.samples_evaluated),
                    "steps": probe.cost.steps, "seconds": time.perf_counter() - t0,
                }
            run = retrain_to_cutoff(
                model, shifted, y, seed=seed, reference_accuracy=ceiling, tolerance=TOLERANCE, holdout_fraction=protocol.HOLDOUT_FRACTION,
                max_epochs=protocol.MAX_EPOCHS, track_energy=False, device=args.device, **TRAINING_RECIPE,
            )
            record |= {"epochs": run.epochs, "reached": run.status == "reached", "status": run.status, "work": work(run.epochs, len(run.curve))}
            runs.append(record)
            print(
                f"  {kind} {intensity:g} seed {seed}: {run.status} {run.epochs:.2f} ep; "
                + "; ".join(f"{w} {record[w]['median']:.2f} [{record[w]['low']:.2f}, {record[w]['high']:.2f}] ({record[w]['work']:.0f} work)" for w in WAYS),
                flush=True,
            )
    summary = summarise(runs, args.bootstrap)
    print_summary(summary)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "options": options, "runs": runs, "summary": summary}, indent=2, default=str))


def summarise(runs: list[dict[str, Any]], resamples: int) -> dict[str, Any]:
    """The probe's work both ways against the median retrain's; how far the cap moves the
    forecast against how far another seed does; each way's MdAPE and coverage on reached runs."""
    moved = [abs(math.log(r["capped"]["median"] / r["whole"]["median"])) for r in runs if r["whole"]["median"] > 0 and r["capped"]["median"] > 0]
    by_kind: dict[str, list[float]] = {}
    for r in runs:
        by_kind.setdefault(r["kind"], []).append(r["whole"]["median"])
    reseeded = [abs(math.log(a / b)) for medians in by_kind.values() for a, b in itertools.combinations(medians, 2) if a > 0 and b > 0]
    reached = [r for r in runs if r["reached"] and r["epochs"] > 0]
    retrain = float(np.median([r["work"] for r in runs]))
    out: dict[str, Any] = {
        "runs": len(runs), "reached": len(reached), "median_retrain_work": retrain,
        "median_abs_log_capped_over_whole": float(np.median(moved)) if moved else math.nan,
        "median_abs_log_between_seeds_whole": float(np.median(reseeded)) if reseeded else math.nan,
    }
    for way in WAYS:
        ape = np.array([abs(r[way]["median"] - r["epochs"]) / r["epochs"] for r in reached])
        inside = np.array([r[way]["low"] <= r["epochs"] <= r[way]["high"] for r in reached])
        out[way] = {
            "probe_work_median": float(np.median([r[way]["work"] for r in runs])),
            "probe_seconds_median": float(np.median([r[way]["seconds"] for r in runs])),
            "mdape": float(np.median(ape)) if len(ape) else math.nan,
            "coverage": float(inside.mean()) if len(inside) else math.nan,
        }
    if reached:
        rng = np.random.default_rng(0)
        ape = {w: np.array([abs(r[w]["median"] - r["epochs"]) / r["epochs"] for r in reached]) for w in WAYS}
        diffs = []
        for _ in range(resamples):
            pick = rng.integers(0, len(reached), len(reached))
            diffs.append(np.median(ape["capped"][pick]) - np.median(ape["whole"][pick]))
        out["mdape_capped_minus_whole_ci95"] = [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]
    return out


def print_summary(s: dict[str, Any]) -> None:
    retrain = s["median_retrain_work"]
    print(f"{s['runs']} runs, {s['reached']} reached the cutoff; median retrain {retrain:.0f} work (sample-gradients + evaluated/3)")
    for way in WAYS:
        w = s[way]
        print(
            f"probe, {way} holdout: {w['probe_work_median']:.0f} work ({w['probe_work_median'] / retrain:.1%} of the median retrain), "
            f"{w['probe_seconds_median']:.2f} s; MdAPE {w['mdape']:.0%}, 90% coverage {w['coverage']:.0%}"
        )
    print(
        f"median |log| capped / whole forecast: {s['median_abs_log_capped_over_whole']:.3f}; "
        f"between two seeds of the whole-holdout forecast: {s['median_abs_log_between_seeds_whole']:.3f}"
    )
    if "mdape_capped_minus_whole_ci95" in s:
        lo, hi = s["mdape_capped_minus_whole_ci95"]
        print(f"MdAPE capped minus whole: {s['capped']['mdape'] - s['whole']['mdape']:+.3f}, paired bootstrap 95% CI [{lo:+.3f}, {hi:+.3f}]")


if __name__ == "__main__":
    main()
