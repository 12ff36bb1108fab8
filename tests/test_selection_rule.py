"""The rule ``benchmarks/forecast_selection.py`` changes a forecast setting by, and the paired
cluster bootstraps of both forecast benchmarks, on errors made up so that the answer is known."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _benchmark(name: str):
    """A benchmark script as a module (they import each other from their own folder)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def selection():
    return _benchmark("forecast_selection")


def _result(current: np.ndarray, variants: dict[str, np.ndarray], clusters: list[str]) -> dict:
    """One architecture's selection output, as much of it as ``combine`` reads."""
    errors = {"stage0_probe": current} | variants
    loko = {name: {"mdape": float(np.median(ape)), "mean_abs_log_error_needed": 0.0} for name, ape in errors.items()}
    loko["in_flight_own_8"] = {"median_abs_log_error": 0.1}
    return {
        "noise_floor_by_window": {}, "loko": loko, "probe_steps": 16,
        "stage1_errors": {"cluster": clusters, "ape": {name: list(map(float, ape)) for name, ape in errors.items()}},
    }


def _arch(seed: int, variants) -> dict:
    rng = np.random.default_rng(seed)
    clusters = [f"kind{k}/{s}" for k in range(9) for s in range(4) for _ in range(3)]
    current = rng.uniform(0.0, 1.0, len(clusters))
    return _result(current, {name: make(current, rng) for name, make in variants.items()}, clusters)


def test_a_setting_changes_only_where_the_bootstrap_shows_it(selection):
    variants = {
        "stage0_probe[curve to 2 caps]": lambda cur, rng: cur - 0.1,  # better everywhere: adopted
        "stage0_probe[curve to 1.5 caps]": lambda cur, rng: rng.permutation(cur) - 0.02,  # lower mean, within noise
        "stage0_probe[probe of 12 steps]": lambda cur, rng: cur + 0.01,  # cheaper, within the margin
        "stage0_probe[probe of 10 steps]": lambda cur, rng: cur + 0.01,  # cheaper still, within it too
        "stage0_probe[probe of 8 steps]": lambda cur, rng: cur + 0.03,  # cheaper, beyond the margin
        "stage0_probe[evaluated every 2 steps]": lambda cur, rng: cur + 0.03,
        "stage0_probe[pulled 0.25 to the median]": lambda cur, rng: rng.permutation(cur) - 0.01,
        f"stage0_probe[{selection.ADAPTIVE}]": lambda cur, rng: cur + 0.03,  # cheaper, beyond the margin
    }
    combined = selection.combine([_arch(0, variants), _arch(1, variants)])
    ci = combined["mean_mdape_minus_current_ci95"]
    assert ci["stage0_probe[curve to 2 caps]"] == pytest.approx([-0.1, -0.1])
    assert ci["stage0_probe[curve to 1.5 caps]"][0] < 0 < ci["stage0_probe[curve to 1.5 caps]"][1]
    assert combined["stage1_design"] == "stage0_probe[curve to 2 caps]"
    assert combined["probe_steps"] == 10
    assert combined["probe_eval_every"] == 1
    assert combined["pull_to_median"] == 0.0
    assert combined["probe_sized_by_index_forecast"] is False
    within = {f"stage0_probe[{selection.ADAPTIVE}]": lambda cur, rng: cur + 0.01}
    assert selection.combine([_arch(0, within), _arch(1, within)])["probe_sized_by_index_forecast"] is True


@pytest.mark.parametrize(("forecast_epochs", "steps"), [(0.0, 8), (1.0, 8), (2.5, 12), (2.7, 12), (3.0, 14), (5.0, 16)])
def test_a_probe_sized_by_the_index_forecast_costs_a_share_of_that_retrain(selection, forecast_epochs, steps):
    from types import SimpleNamespace

    class IndexStage:  # the forecaster's index stage as adaptive_length reads it
        batch_size = 64

        def predict(self, features):
            return SimpleNamespace(epochs=SimpleNamespace(median=forecast_epochs))

    # 378 pool images at 64 a step: 6 steps an epoch. 0.2 of a retrain of 6 e steps of 64 images,
    # in probe steps of 16, is floor(4.8 e), held to [8, 16].
    assert selection.adaptive_length(IndexStage(), {"samples": 378, "f": 0.0}, ["f"], 16) == steps


def test_without_evidence_nothing_changes(selection):
    # A lower mean that the draw of clusters explains keeps the current design.
    variants = {"stage0_probe[curve to 1.5 caps]": lambda cur, rng: rng.permutation(cur) - 0.02}
    combined = selection.combine([_arch(2, variants), _arch(3, variants)])
    assert combined["mean_stage1_mdape"]["stage0_probe[curve to 1.5 caps]"] < combined["mean_mdape_by_probe_eval_every"][1]
    assert combined["stage1_design"] == "the current design"


def test_the_bootstrap_resamples_whole_clusters(selection):
    # A variant that differs from the current design in one cluster only: every resample that
    # leaves that cluster out gives a difference of exactly zero, so with 12 clusters about
    # (11/12)^12 = 35% of the draws sit at zero and the CI's lower end is zero.
    clusters = [f"kind{k}/0" for k in range(12) for _ in range(5)]
    current = np.linspace(0.1, 0.9, len(clusters))
    worse = current.copy()
    worse[:5] += 5.0
    result = _result(current, {"stage0_probe[curve]": worse}, clusters)
    draws_at_zero = selection.mdape_differences([result], resamples=400)["stage0_probe[curve]"]
    assert draws_at_zero[0] == 0.0 and draws_at_zero[1] > 0.0


def test_forecast_accuracy_resamples_kinds_whole_where_runs_name_them():
    from shiftcost.forecast.forecaster import Interval

    accuracy = _benchmark("forecast_accuracy")

    rng = np.random.default_rng(0)
    runs = []
    for epochs in rng.uniform(0.5, 10.0, 40):
        guess = lambda factor: Interval(float(epochs * factor), 0.0, 50.0, 0.9)  # noqa: E731
        runs.append({
            "epochs": float(epochs), "censored": False, "cluster": "one kind/0",
            "constant": guess(rng.uniform(0.5, 2.0)), "isotonic_accuracy_drop": guess(rng.uniform(0.5, 2.0)),
            "stage0": guess(rng.uniform(0.5, 2.0)), "stage0_probe": guess(rng.uniform(0.8, 1.2)),
            "in_flight_quarter": guess(1.0), "in_flight_quarter_prior_only": guess(1.0),
        })
    scored = accuracy.metrics(runs, resamples=200)
    table = scored["predictors"]
    # One cluster: every resample draws all of it, so the CI is the sample's own difference ...
    whole = scored["stage0_probe_minus_baseline_ci95_by_cluster"]["constant"]["mdape"]
    assert whole == pytest.approx([table["stage0_probe"]["mdape"] - table["constant"]["mdape"]] * 2)
    # ... where resampling runs spreads it.
    spread = scored["stage0_probe_minus_baseline_ci95"]["constant"]["mdape"]
    assert spread[1] - spread[0] > 0.05
    # Runs that do not name their cluster get the runs' bootstrap alone.
    unnamed = [{k: v for k, v in r.items() if k != "cluster"} for r in runs]
    assert "stage0_probe_minus_baseline_ci95_by_cluster" not in accuracy.metrics(unnamed, resamples=10)


def test_forecast_accuracy_scores_each_run_against_its_batchs_other_seeds():
    from shiftcost.forecast.forecaster import Interval

    accuracy = _benchmark("forecast_accuracy")
    guess = Interval(1.0, 0.5, 2.0, 0.9)
    batches = [  # (kind, intensity): each seed's epochs, and whether it capped
        ("blur", 0.1, [(2.0, False), (3.0, False)]),
        ("blur", 0.2, [(4.0, False), (15.0, True)]),  # the reached seed is forecast at the cap; the capped one is not scored
        ("ghost", 0.1, [(1.0, False), (2.0, False), (6.0, False)]),  # the mean of the other two
        ("ghost", 0.2, [(5.0, False)]),  # no other seed: not forecast
    ]
    runs = [
        {"kind": kind, "cluster": f"{kind}/0", "intensity": intensity, "seed": seed, "epochs": epochs, "censored": capped}
        | {name: guess for name in accuracy.PREDICTORS}
        for kind, intensity, seeds in batches for seed, (epochs, capped) in enumerate(seeds)
    ]
    reference = accuracy.metrics(runs, resamples=10)["predictors"][accuracy.OTHER_SEED]
    errors = [1 / 2, 1 / 3, 11 / 4, 3 / 1, 1.5 / 2, 4.5 / 6]
    assert reference["n"] == 7 and reference["n_reached"] == 6
    assert reference["mdape"] == pytest.approx(float(np.median(errors)))
    # Seeds of the same intensity in another seed offset are another batch.
    moved = accuracy.other_seed(runs + [r | {"cluster": "blur/1", "seed": r["seed"] + 1, "epochs": 100.0} for r in runs[:2]])
    assert [r[accuracy.OTHER_SEED].median for r in moved[:2]] == [3.0, 2.0]
    assert [r[accuracy.OTHER_SEED].median for r in moved[-2:]] == [100.0, 100.0]


def _interval_result(selection, design: str, other_inside, other_capped_misses: int) -> dict:
    """One architecture's interval figures: every known-cost point of 36 (kind, sweep) clusters of
    ten inside the library's interval and every design's but ``design``, ``other_inside(cluster)``
    of each inside that one's."""
    clusters = [f"kind{k}/{s}" for k in range(9) for s in range(4)]
    inside = {d: [True] * 360 for d in selection.INTERVAL_RUNS}
    inside[design] = [j < other_inside(c) for c in range(36) for j in range(10)]
    loko = {}
    for d, hits in inside.items():
        coverage = float(np.mean(hits))
        misses = other_capped_misses if d == design else 0
        loko[selection.interval_key(d)] = {"coverage": coverage, "coverage_needed": coverage, "capped_definite_misses": misses, "n": 400}
    return {
        "loko": loko,
        "interval_hits": {"cluster": [clusters[c] for c in range(36) for _ in range(10)], "trained": [True] * 360, "inside": inside},
    }


@pytest.mark.parametrize(
    ("other_inside", "capped_misses", "adopted"),
    [
        (lambda cluster: 9, 2, True),  # 90% in every cluster: nearer the level beyond the bootstrap's noise
        (lambda cluster: 9, 30, False),  # as near, but 30 of 400 runs capped past its upper end (more than 5%)
        (lambda cluster: 9 if cluster == 0 else 10, 0, False),  # nearer in one cluster only: within the noise
    ],
)
@pytest.mark.parametrize("design", ["needing training", "stratum"])
def test_the_interval_design_changes_only_where_the_bootstrap_shows_coverage_nearer_the_level(selection, design, other_inside, capped_misses, adopted):
    assert selection.INTERVAL_SIZED_ON == "every run" and design in selection.OTHER_INTERVALS
    results = [_interval_result(selection, design, other_inside, capped_misses) for _ in range(2)]
    choice = selection.interval_choice(results)
    assert choice["chosen"] == (design if adopted else "every run")


def _probe_selection(arch: str, ape: np.ndarray, clusters: list[str], epochs: list[float]) -> dict:
    """One architecture's selection under one probe design, as much of it as ``probe_choice`` reads."""
    loko = {"stage0_probe": {"mdape": float(np.median(ape)), "c_index": 0.9, "coverage": 0.9, "mean_abs_log_error_needed": 0.3}}
    return {
        "arch": arch, "loko": loko, "points_scored": [{"epochs": e} for e in epochs],
        "stage1_errors": {"cluster": clusters, "ape": {"stage0_probe": list(map(float, ape))}},
    }


@pytest.mark.parametrize(
    ("make_other", "chosen"),
    [
        (lambda cur, rng: cur - 0.1, "other"),  # better on every cluster
        (lambda cur, rng: rng.permutation(cur) - 0.02, "current"),  # a lower median the draw explains
        (lambda cur, rng: np.where(np.arange(len(cur)) < 3, cur - 5.0, cur), "current"),  # better on one cluster only
    ],
)
def test_a_probe_design_replaces_the_current_one_only_where_the_bootstrap_shows_it(selection, make_other, chosen):
    rng = np.random.default_rng(4)
    clusters = [f"kind{k}/{s}" for k in range(9) for s in range(4) for _ in range(3)]
    epochs = list(rng.uniform(0.5, 6.0, len(clusters)))
    current, other = [], []
    for arch in ("a", "b"):
        ape = rng.uniform(0.0, 1.0, len(clusters))
        current.append(_probe_selection(arch, ape, clusters, epochs))
        other.append(_probe_selection(arch, np.clip(make_other(ape, rng), 0.0, None), clusters, epochs))
    assert selection.probe_choice(current, other, resamples=500)["chosen"] == chosen


def test_probe_designs_are_paired_only_on_the_same_retrains(selection):
    clusters = [f"kind{k}/0" for k in range(9)]
    ape = np.linspace(0.1, 0.9, 9)
    current = [_probe_selection("a", ape, clusters, [1.0] * 9)]
    with pytest.raises(SystemExit, match="same retrains"):
        selection.probe_choice(current, [_probe_selection("a", ape - 0.05, clusters, [2.0] * 9)])
    with pytest.raises(SystemExit, match="different architectures"):
        selection.probe_choice(current, [_probe_selection("b", ape, clusters, [1.0] * 9)])


def _two_probe_rows() -> list[dict]:
    """Calibration points that ran two probes: the same curve under both scalings except in kind0,
    where only the square root's follows the epochs (the retrain's rate's are kind0's curves shuffled)."""
    from tests.forecast.helpers import forecast_rows

    fields = ("curve_log_epochs", "probe_progress", "probe_loss_drop", "probe_gap", "cutoff_log_epochs")
    rows = [r | {"status": "reached", "intensity": 0.5, "runs": [], "sweep": 0} for r in forecast_rows(kinds=5, per_kind=8)]
    kind0 = [i for i, r in enumerate(rows) if r["corruption"] == "kind0"]
    shuffled = dict(zip(kind0, np.random.default_rng(4).permutation(kind0)))
    for i, row in enumerate(rows):
        own = {name: row[name] for name in fields}
        other = {name: rows[shuffled.get(i, i)][name] for name in fields}
        row["probes"] = {"none": own if i not in shuffled else other, "sqrt": own}
    for row in rows:
        row |= row["probes"]["none"]
    return rows


def test_a_fold_reads_each_sweep_under_the_probe_its_other_kinds_chose(selection):
    from tests.forecast.helpers import INDEX

    rows = _two_probe_rows()
    shuffled_none = [r["probes"]["none"]["curve_log_epochs"] for r in rows]
    # With kind0 in the fold its informative probe decides; left out, the others tie and the first is kept.
    assert [r["curve_log_epochs"] for r in selection.chosen_in_fold(rows, "kind1", list(INDEX))] == [r["probes"]["sqrt"]["curve_log_epochs"] for r in rows]
    assert [r["curve_log_epochs"] for r in selection.chosen_in_fold(rows, "kind0", list(INDEX))] == shuffled_none
    with pytest.raises(SystemExit, match="ran no probe under the rate scaling 'linear'"):
        selection.with_probe(rows, "linear")
    assert [r["curve_log_epochs"] for r in selection.with_probe(rows, "sqrt")] == [r["probes"]["sqrt"]["curve_log_epochs"] for r in rows]


def _saved_sweep(number: int, stretch: float = 1.0) -> list[dict]:
    """A saved calibration sweep's points, as :func:`each_sweep_left_out` reads them."""
    from tests.forecast.helpers import forecast_rows

    rows = []
    for r in forecast_rows(seed=number):
        epochs = stretch * r["epochs"]
        run = {"epochs": epochs, "status": "reached", "curve": [], "target_accuracy": 0.9}
        rows.append(r | {"epochs": epochs, "status": "reached", "intensity": 0.5, "runs": [run], "sweep": number,
                         "accuracy_drop": 0.97 - r["accuracy"], "probe_already_met": False, "probe_met_cutoff": 0.0})
    return rows


def test_each_sweep_is_forecast_from_its_own_other_kinds_only(selection):
    """As calibrate fits one sweep: a second sweep whose retrains ran ten times as long changes
    nothing in the first's forecasts, where the pooled leave-one-kind-out would read it."""
    from tests.forecast.helpers import INDEX

    first, second = _saved_sweep(0), _saved_sweep(1, 10.0)
    alone = selection.each_sweep_left_out(first, list(INDEX), [8.0], None)
    beside = selection.each_sweep_left_out(first + second, list(INDEX), [8.0], None)
    assert len(beside) == 2 * len(alone)
    for name in ("stage0_probe", "constant", "isotonic_accuracy_drop"):
        assert [r[name] for r in beside[: len(alone)]] == [r[name] for r in alone]
        assert [r[name].median for r in beside[len(alone):]] != [r[name].median for r in alone]


def test_each_sweep_fits_stage_1_on_the_design_it_is_told(selection):
    from shiftcost.forecast.forecaster import STAGE1_DEFAULT, STAGE1_OFFSETS_DEFAULT
    from tests.forecast.helpers import INDEX

    rows = _saved_sweep(0)
    for row in rows[::2]:  # the probe met the cutoff on every other point, whose retrain took half its epochs
        row |= {"probe_met_cutoff": 1.0, "cutoff_log_epochs": row["cutoff_log_epochs"] + math.log(2.0)}

    def medians(design: str | None) -> list[float]:
        return [r["stage0_probe"].median for r in selection.each_sweep_left_out(rows, list(INDEX), [8.0], None, stage1_design=design)]

    library_fit = {"stage1_features": STAGE1_DEFAULT, "stage1_offsets": tuple(o for o in STAGE1_OFFSETS_DEFAULT if o in STAGE1_DEFAULT)}
    library = [name for name in selection.STAGE1_DESIGNS if selection.design_fit(name) == library_fit]
    assert library == ["cutoff at slope 1"]
    assert medians(None) == medians("cutoff at slope 1")
    with_stratum = medians("cutoff at slope 1 + stratum")
    assert with_stratum != medians(None)
    truth = [r["epochs"] for r in rows]
    error = {name: float(np.median(np.abs(np.log1p(m) - np.log1p(truth)))) for name, m in (("library", medians(None)), ("stratum", with_stratum))}
    assert error["stratum"] < error["library"] / 2
