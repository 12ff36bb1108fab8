"""Forecasts for batches smaller than the ones calibration retrained on.

Usage: nice -n 10 python benchmarks/batch_size_transfer.py [--arch digits_cnn] [--kind-set fourth]
       [--sizes 135,270,539] [--seeds 2] [--json out.json]

Calibrates on the built-in kinds as ``forecast_accuracy.py`` does, on its stream of 539 images.
Then, for each size, draws batches of that many distinct stream images (a seeded subset per
seed), corrupts them with every evaluation-only kind of ``--kind-set`` at each of its
intensities, forecasts the epochs with the index stage and the probe stage, and retrains to the
cutoff. Prints per size: runs, reached and capped, the median epochs and steps of the reached runs, and each
stage's MdAPE of epochs, median log(forecast / epochs) (its bias) and 90% coverage on the runs
that reached the cutoff after some training. Nothing here chooses a setting.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from forecast_accuracy import KIND_SETS, TOLERANCE, TRAINING_RECIPE, add_scenario_arguments, calibrated  # noqa: E402

from eval_shifts import eval_corrupt  # noqa: E402

from shiftcost.features import COST_FEATURES  # noqa: E402
from shiftcost.forecast import protocol  # noqa: E402
from shiftcost.forecast.probe import run_probe  # noqa: E402

STAGES = ("stage0", "stage0_probe")


def main() -> None:
    from shiftcost.index.engine import assess
    from shiftcost.retrain import retrain_to_cutoff

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_scenario_arguments(parser)
    parser.add_argument("--sizes", default="135,270,539")
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    model, spec, splits, stats, forecaster = calibrated(args)
    ceiling, target = stats.accuracy, stats.accuracy - TOLERANCE
    stream_x, stream_y = splits["stream"]
    print(f"{args.arch}: calibrated on a stream of {len(stream_y)} images", flush=True)

    summary: dict[str, Any] = {}
    runs: list[dict[str, Any]] = []
    for size in (int(s) for s in args.sizes.split(",")):
        sized = []
        for seed in range(args.seeds):
            pick = torch.randperm(len(stream_y), generator=torch.Generator().manual_seed(100 + seed))[:size]
            x, y = stream_x[pick], stream_y[pick]
            for kind, intensities in KIND_SETS[args.kind_set].items():
                for intensity in intensities:
                    shifted = eval_corrupt(x, kind, intensity, seed=seed)
                    report = assess(model, spec, stats, shifted, y, device=args.device)
                    features = {k: float(getattr(report, k)) for k in COST_FEATURES}
                    probe = run_probe(model, shifted, y, target_accuracy=target, ceiling=ceiling, seed=seed, device=args.device, **forecaster.probe_options())
                    forecasts = {"stage0": forecaster.predict(features), "stage0_probe": forecaster.predict(features, probe=probe)}
                    run = retrain_to_cutoff(
                        model, shifted, y, seed=seed, reference_accuracy=ceiling, tolerance=TOLERANCE, holdout_fraction=protocol.HOLDOUT_FRACTION,
                        max_epochs=protocol.MAX_EPOCHS, track_energy=False, device=args.device, **TRAINING_RECIPE,
                    )
                    sized.append(
                        {"size": size, "seed": seed, "kind": kind, "intensity": intensity, "status": run.status, "epochs": run.epochs, "steps": run.steps}
                        | {name: forecasts[name].epochs.to_dict() for name in STAGES}
                    )
        summary[str(size)] = summarise(sized)
        runs += sized
        print_size(size, summary[str(size)])
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "summary": summary, "runs": runs}, indent=2))


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    reached = [r for r in runs if r["status"] == "reached" and r["epochs"] > 0]
    epochs = np.array([r["epochs"] for r in reached])
    out: dict[str, Any] = {
        "runs": len(runs), "reached": len(reached), "capped": sum(r["status"] == "cap_reached" for r in runs),
        "median_epochs": float(np.median(epochs)) if len(epochs) else None,
        "median_steps": float(np.median([r["steps"] for r in reached])) if reached else None,
    }
    for name in STAGES:
        median = np.array([r[name]["median"] for r in reached])
        low = np.array([r[name]["low"] for r in reached])
        high = np.array([np.inf if r[name]["high"] is None else r[name]["high"] for r in reached])
        out[name] = {
            "mdape": float(np.median(np.abs(median - epochs) / epochs)) if len(epochs) else None,
            "median_log_ratio": float(np.median(np.log(np.maximum(median, 1e-3) / epochs))) if len(epochs) else None,
            "coverage": float(np.mean((low <= epochs) & (epochs <= high))) if len(epochs) else None,
        }
    return out


def print_size(size: int, s: dict[str, Any]) -> None:
    if not s["reached"]:
        print(f"batch of {size}: {s['runs']} runs, none reached the cutoff after some training ({s['capped']} capped)", flush=True)
        return
    stages = "; ".join(
        f"{name} MdAPE {s[name]['mdape']:.0%}, median log(forecast/epochs) {s[name]['median_log_ratio']:+.2f}, cov90 {s[name]['coverage']:.0%}"
        for name in STAGES
    )
    print(
        f"batch of {size}: {s['runs']} runs, {s['reached']} reached after some training, {s['capped']} capped; "
        f"median {s['median_epochs']:.2f} epochs, {s['median_steps']:.0f} steps; {stages}",
        flush=True,
    )


if __name__ == "__main__":
    main()
