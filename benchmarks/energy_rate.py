"""How well the host's energy rate turns a retrain's work into the kWh CodeCarbon measures.

Usage: nice -n 10 python benchmarks/energy_rate.py [--archs digits_cnn,shufflenet_v2_x0_5]
       [--kind-set third] [--seeds 1] [--calibration-intensities 4] [--json out.json]

Work is samples trained + 1/3 of samples evaluated. For each architecture:

1. Calibrate on the built-in kinds (``forecast_accuracy.calibrate``): every calibration
   retrain is measured with CodeCarbon, giving ``(kWh, work)`` per run.
2. **Choose** a conversion rule on those runs alone, leaving one built-in kind out at a time:
   fit on the other kinds' runs, estimate the left-out kind's runs.
3. **Score** every rule, fitted on all calibration runs, on retrains of the evaluation-only
   kinds of ``eval_shifts.py`` (never used to choose), measured with CodeCarbon.

Rules: ``median_ratio`` (the median over runs of kWh / work), ``pooled`` (total kWh / total
work), and ``per_run_overhead`` (a robust line kWh = overhead + rate x work, Siegel's
repeated medians). Printed per rule: median |log(measured / estimated)|, the median of
measured / estimated (1 is unbiased; above 1 the estimate is low), and the share of runs
whose measured kWh is above the estimate (a budget on the estimate overspends on those),
and the median measured / estimated of the runs that trained on nothing (already at the
cutoff: one evaluation and the run's overhead). Calibration retrains at one torch thread,
as ``forecast_accuracy.py``'s sweeps do; the scored retrains at the process default, as
``shiftcost retrain`` and the pipeline do, unless ``--retrain-threads`` is given (give 1 to
score the rate at the count it was fitted at). CodeCarbon's figure on a CPU is a load model (TDP x load plus RAM), so it moves with what
else runs on the machine: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_shifts import eval_corrupt  # noqa: E402
from forecast_accuracy import KIND_SETS, TOLERANCE, TRAINING_RECIPE, build_arch, calibrate  # noqa: E402

from shiftcost.energy import EVAL_SAMPLE_WEIGHT, KWH_TO_JOULES, HostEnergyRate, run_work  # noqa: E402
from shiftcost.forecast import protocol  # noqa: E402

RULES = ("median_ratio", "pooled", "per_run_overhead")


def fit_rule(rule: str, runs: list[tuple[float, float, float]]) -> HostEnergyRate:
    if rule == "pooled":
        total_joules = sum(e for e, _, _ in runs) * KWH_TO_JOULES
        total_work = sum(t + EVAL_SAMPLE_WEIGHT * v for _, t, v in runs)
        return HostEnergyRate(total_joules / total_work, 0.0, len(runs))
    return HostEnergyRate.fit(runs, method=rule)


def score(ratios: list[float], untrained: list[bool]) -> dict[str, Any]:
    """Measured over estimated kWh, summarised; ``untrained`` marks the runs that trained on nothing."""
    ratios_array = np.array(ratios)
    none_trained = ratios_array[np.array(untrained, dtype=bool)]
    return {
        "n": len(ratios_array),
        "median_abs_log_error": float(np.median(np.abs(np.log(ratios_array)))),
        "median_measured_over_estimated": float(np.median(ratios_array)),
        "share_above_estimate": float(np.mean(ratios_array > 1.0)),
        "untrained_runs": len(none_trained),
        "untrained_median_measured_over_estimated": float(np.median(none_trained)) if len(none_trained) else None,
    }


def measured_runs(rows: list[dict[str, Any]]) -> dict[str, list[tuple[float, float, float]]]:
    """Calibration runs with a measured energy, by kind (the clean batch, copied under every
    kind, counted once)."""
    by_kind: dict[str, list[tuple[float, float, float]]] = {}
    for row in rows:
        if row.get("copy_of"):
            continue
        for run in row.get("runs", []):
            energy, trained, evaluated = run_work(run)
            if energy and energy > 0:
                by_kind.setdefault(row["corruption"], []).append((float(energy), trained, evaluated))
    return by_kind


def score_arch(arch: str, args: argparse.Namespace) -> dict[str, Any]:
    from shiftcost.index.engine import compute_reference_stats
    from shiftcost.retrain import retrain_to_cutoff

    started = time.perf_counter()
    model, spec, splits = build_arch(arch)
    stats = compute_reference_stats(model, spec, *splits["holdout"], device="cpu", seed=0)
    sweep = calibrate(model, spec, splits, stats, args.calibration_intensities, probe_steps=0)
    by_kind = measured_runs(sweep.rows)
    calibration = [run for runs in by_kind.values() for run in runs]

    left_out: dict[str, list[float]] = {rule: [] for rule in RULES}
    left_out_untrained: list[bool] = []
    for kind, held in by_kind.items():
        rest = [run for other, runs in by_kind.items() if other != kind for run in runs]
        for rule in RULES:
            rate = fit_rule(rule, rest)
            left_out[rule] += [e / rate.kwh(t, v) for e, t, v in held]
        left_out_untrained += [t == 0 for _, t, _ in held]

    new_x, new_y = splits["stream"]
    if args.retrain_threads:
        torch.set_num_threads(args.retrain_threads)
    result_threads = torch.get_num_threads()
    evaluation: list[tuple[float, float, float]] = []
    for kind, intensities in KIND_SETS[args.kind_set].items():
        for intensity in intensities:
            shifted = eval_corrupt(new_x, kind, intensity, seed=0)
            for seed in range(args.seeds):
                run = retrain_to_cutoff(
                    model, shifted, new_y, seed=seed, reference_accuracy=stats.accuracy, tolerance=TOLERANCE,
                    holdout_fraction=protocol.HOLDOUT_FRACTION, max_epochs=protocol.MAX_EPOCHS, track_energy=True, device="cpu",
                    energy_options={"measure_power_secs": 0.5}, **TRAINING_RECIPE,
                )
                energy, trained, evaluated = run_work(run.to_dict())
                if energy and energy > 0:
                    evaluation.append((float(energy), trained, evaluated))
                print(f"  {arch} {kind} {intensity:g} seed {seed}: {run.status} {run.epochs:.2f} ep, {energy} kWh", flush=True)

    result: dict[str, Any] = {"arch": arch, "calibration_runs": len(calibration), "retrain_threads": result_threads, "rules": {}}
    for rule in RULES:
        fitted = fit_rule(rule, calibration)
        result["rules"][rule] = {
            "rate": fitted.to_dict(),
            "built_in_left_out": score(left_out[rule], left_out_untrained),
            "evaluation": score([e / fitted.kwh(t, v) for e, t, v in evaluation], [t == 0 for _, t, _ in evaluation]),
        }
    result["seconds"] = time.perf_counter() - started
    return result


def print_arch(result: dict[str, Any]) -> None:
    print(
        f"\n{result['arch']}: {result['calibration_runs']} calibration runs at one torch thread, scored retrains at "
        f"{result['retrain_threads']}, {result['seconds']:.0f} s"
    )
    print("  per rule: median |log(measured/estimated)|, median measured/estimated, share above the estimate,")
    print("  and median measured/estimated of the runs that trained on nothing")
    for part, title in (("built_in_left_out", "built-in kinds, one left out at a time (chooses)"), ("evaluation", "evaluation kinds (scores)")):
        n = next(iter(result["rules"].values()))[part]
        print(f"  {title}: {n['n']} runs, {n['untrained_runs']} untrained")
        for rule, r in result["rules"].items():
            s, rate = r[part], r["rate"]
            untrained = s["untrained_median_measured_over_estimated"]
            print(
                f"    {rule:<17} {rate['joules_per_sample']:.4g} J/sample + {rate.get('overhead_joules', 0.0):.3g} J/run: "
                f"{s['median_abs_log_error']:.2f}  {s['median_measured_over_estimated']:.2f}  {s['share_above_estimate']:.0%}  "
                f"{'-' if untrained is None else f'{untrained:.2f}'}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="digits_cnn")
    parser.add_argument("--kind-set", default="third", choices=sorted(KIND_SETS))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--calibration-intensities", type=int, default=4)
    parser.add_argument(
        "--retrain-threads", type=int, default=None,
        help="torch threads of the scored retrains (default: the process default, as `shiftcost retrain` runs)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    for arch in args.archs.split(","):
        result = score_arch(arch, args)
        print_arch(result)
        results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
