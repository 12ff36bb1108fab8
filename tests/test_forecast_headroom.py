"""``benchmarks/forecast_headroom.py``: its fits on made-up runs whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.test_selection_rule import _benchmark


@pytest.fixture(scope="module")
def headroom():
    return _benchmark("forecast_headroom")


def _run(kind: str, cutoff: float, epochs: float, *, offset: int = 0, intensity: float = 0.5, censored: bool = False) -> dict:
    return {
        "kind": kind, "intensity": intensity, "offset": offset, "cluster": f"{kind}/{offset}", "epochs": epochs, "censored": censored,
        "accuracy_drop": 0.1, "cutoff": cutoff, "stage0_log": 1.0, "already_met": False,
    }  # fmt: skip


def _slow_mdape(runs: list[dict], b: float) -> float:
    errors = [abs(max(math.exp(r["cutoff"] + b) - 1.0, 0.0) - r["epochs"]) / r["epochs"] for r in runs if not r["censored"] and r["epochs"] > 0]
    return sorted(errors)[len(errors) // 2] if len(errors) % 2 else sum(sorted(errors)[len(errors) // 2 - 1 : len(errors) // 2 + 1]) / 2


def test_the_fitted_offset_is_the_one_that_makes_these_runs_exact(headroom):
    rng = np.random.default_rng(1)
    runs = [_run("a", c, math.exp(c + 0.37) - 1.0) for c in rng.uniform(0.2, 2.5, 25)]
    # A capped run is a lower bound and must not move the offset.
    runs.append(_run("a", 0.1, 15.0, censored=True))
    assert headroom.best_offset(runs) == pytest.approx(0.37)


def test_the_fitted_offset_minimises_mdape_on_the_grid(headroom):
    rng = np.random.default_rng(2)
    runs = [_run("a", c, math.exp(c + rng.normal(0.2, 0.5)) - 1.0) for c in rng.uniform(0.2, 2.5, 31)]
    runs = [r for r in runs if r["epochs"] > 0]
    chosen = headroom.best_offset(runs)
    grid = np.round(np.arange(-2.0, 2.0 + 1e-9, 0.01), 2)
    assert _slow_mdape(runs, chosen) == pytest.approx(min(_slow_mdape(runs, b) for b in grid))


def test_a_kind_is_forecast_only_from_the_other_kinds(headroom):
    # Kind "b" runs far longer than its cutoff says; fitted on "a" and "c" alone, its forecast
    # is their law's, so it misses by that factor, whatever "b"'s own runs say.
    runs = [_run(k, c, math.exp(c) - 1.0) for k in ("a", "c") for c in np.linspace(0.3, 2.0, 8)]
    runs += [_run("b", c, math.exp(c + 1.0) - 1.0) for c in np.linspace(0.5, 1.5, 5)]
    headroom.add_headroom(runs)
    for r in runs:
        if r["kind"] == "b":
            assert r[headroom.ISOTONIC].median == pytest.approx(math.exp(r["cutoff"]) - 1.0, rel=1e-6)
            assert r[headroom.LINEAR].median == pytest.approx(math.exp(r["cutoff"]) - 1.0, rel=1e-6)


def test_replicates_are_the_same_shift_at_the_other_seed_offsets(headroom):
    runs = [_run("a", 1.0, e, offset=k) for k, e in enumerate((2.0, 4.0, 6.0, 100.0))]
    runs.append(_run("a", 1.0, 50.0, offset=1, intensity=0.9))
    runs += [_run("b", 1.0, 1.0, offset=k) for k in range(2)]
    headroom.add_headroom(runs)
    assert runs[0][headroom.REPLICATES].median == pytest.approx(6.0)  # median of 4, 6, 100
    assert runs[3][headroom.REPLICATES].median == pytest.approx(4.0)  # median of 2, 4, 6
    assert runs[4][headroom.REPLICATES] is None  # no other offset drew that intensity


def test_each_kind_gets_its_own_offset(headroom):
    runs = [_run("a", c, math.exp(c + 0.2) - 1.0) for c in np.linspace(0.3, 2.0, 9)]
    runs += [_run("b", c, math.exp(c - 0.5) - 1.0) for c in np.linspace(0.8, 2.0, 9)]
    headroom.add_headroom(runs)
    for r in runs:
        assert r[headroom.KIND_OFFSET].median == pytest.approx(r["epochs"], abs=0.02)
    # One offset for both kinds cannot make both exact.
    assert max(abs(r[headroom.OFFSET].median - r["epochs"]) for r in runs) > 0.1
