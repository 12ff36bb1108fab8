"""How much the CPU energy of the same work moves from one measurement to the next.

Usage: nice -n 10 python benchmarks/energy_repeatability.py [--workload torch|python]
       [--repeats 6] [--steps 20,100,500] [--threads 2] [--json out.json]

Runs the same work ``--repeats`` times per step count, each run under its own
:class:`shiftcost.energy.EnergyMeter` (process tracking, 1 s sampling, as retrains are
measured). A step of the ``torch`` workload trains the digits demo CNN on 64 images (torch
releases Python's lock while it computes); one of the ``python`` workload is 1/5 of a million
multiplications in pure Python, which holds it, as Python-side data loading and augmentation do.
It prints per step count the CPU joules per step of

- ``integrated``: the meter's figure, CodeCarbon's own model (TDP x CPU-seconds / cores) applied
  once to the run's process CPU time;
- ``sampled``: the figure CodeCarbon's tracker itself reported for the same run (read from the
  tracker), its model applied window by window between samples;

as median, min, max, max/min and coefficient of variation. Only meaningful where the CPU is
estimated from its load (no RAPL): where it is measured, both are the counter's figure. Other
work on the machine changes what both read: torch's OpenMP threads spin while they wait for a
core, and that is CPU time (compare ``--threads 1`` and ``OMP_WAIT_POLICY=PASSIVE`` there).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from shiftcost.energy import KWH_TO_JOULES, EnergyMeter


def train_steps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch_size: int = 64) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()


def python_steps(steps: int) -> int:
    total = 0
    for _ in range(steps):
        total += sum(i * i for i in range(200_000))
    return total


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "max_over_min": max(values) / min(values) if min(values) > 0 else float("inf"),
        "cv": statistics.stdev(values) / statistics.mean(values) if len(values) > 1 else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("torch", "python"), default="torch")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--steps", default="20,100,500", help="step counts to measure, comma-separated")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from shiftcost.data.demo import train_demo_model

    base, _, splits = train_demo_model(seed=0)
    x, y = splits["train"]
    results: dict[str, Any] = {"workload": args.workload, "threads": args.threads, "repeats": args.repeats, "by_steps": {}}
    cpu_model = ""
    for steps in (int(s) for s in args.steps.split(",")):
        runs: list[dict[str, float]] = []
        for _ in range(args.repeats):
            model = copy.deepcopy(base).train()
            meter = EnergyMeter(measure_power_secs=1.0, count_gpu=False, experiment_name="repeatability")
            started = time.perf_counter()
            with meter:
                if args.workload == "torch":
                    train_steps(model, x, y, steps)
                else:
                    python_steps(steps)
            wall = time.perf_counter() - started
            reported = meter._tracker.final_emissions_data  # what CodeCarbon's tracker itself said
            measurement = meter.measurement
            cpu_model = measurement.cpu_model
            runs.append({
                "integrated_j_per_step": measurement.cpu_energy_kwh * KWH_TO_JOULES / steps,
                "sampled_j_per_step": float(reported.cpu_energy) * KWH_TO_JOULES / steps,
                "wall_s": wall,
                "cpu_method": measurement.cpu_method,
            })
        results["by_steps"][steps] = {
            "runs": runs,
            "integrated": summary([r["integrated_j_per_step"] for r in runs]),
            "sampled": summary([r["sampled_j_per_step"] for r in runs]),
            "median_wall_s": statistics.median(r["wall_s"] for r in runs),
        }
    results["cpu_model"] = cpu_model

    print(f"CPU: {cpu_model}; {args.workload} workload; torch threads {args.threads}; {args.repeats} runs per step count")
    print(f"{'steps':>6} {'wall s':>7} {'figure':>11} {'median J/step':>14} {'min':>9} {'max':>9} {'max/min':>8} {'CV':>6}")
    for steps, row in results["by_steps"].items():
        for figure in ("integrated", "sampled"):
            s = row[figure]
            print(
                f"{steps:>6} {row['median_wall_s']:>7.2f} {figure:>11} {s['median']:>14.4g} {s['min']:>9.4g} {s['max']:>9.4g}"
                f" {s['max_over_min']:>8.2f} {s['cv']:>6.2f}"
            )
    print(f"meter's CPU method: {results['by_steps'][next(iter(results['by_steps']))]['runs'][0]['cpu_method']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
