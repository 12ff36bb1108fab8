"""Wall time of one drift test per embedding method (all three groups, HTML included).

Usage: python benchmarks/drift_speed.py [--rows 1000] [--dim 64] [--repeats 3]

Prints the one-off import time of Evidently, then for each method the median wall time of
``detect_drift`` over ``--repeats`` runs on a no-drift pair and on a shifted pair, and the
size of the HTML report. Figures are for the host it runs on; compare within one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    started = time.perf_counter()
    import evidently  # noqa: F401  (timed: the first drift test in a process pays it)

    print(f"import evidently: {time.perf_counter() - started:.2f} s")
    from shiftcost.drift import DriftInputs, detect_drift

    rng = np.random.default_rng(0)

    def side(shift: float) -> DriftInputs:
        n = args.rows
        return DriftInputs(
            embeddings=rng.normal(size=(n, args.dim)) + shift,
            image_stats={name: rng.normal(0.5 + shift, 0.1, n) for name in ("brightness", "contrast", "sharpness", "noise")},
            predictions=rng.choice(10, size=n),
        )

    reference, same, moved = side(0.0), side(0.0), side(0.3)
    detect_drift(reference, same)  # warm-up: first-use imports inside Evidently
    print(f"rows {args.rows} x dim {args.dim}, median of {args.repeats}")
    for method in ("model", "distance", "ratio", "mmd"):
        for label, current in (("no drift", same), ("shifted", moved)):
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                result = detect_drift(reference, current, embedding_method=method)
                times.append(time.perf_counter() - t0)
            print(f"{method:>8} {label:>8}: {statistics.median(times):6.2f} s  verdict={result.verdict!s:5}  html={len(result.html) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
