"""What the sweep shows: correlations, the best index, the fitted cost model and its held-out error."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from shiftcost.calibrate.helpers import _describe, _finite
from shiftcost.calibrate.result import SweepResult
from shiftcost.calibrate.settings import COST_FEATURES, CORRELATION_FEATURES, CORRELATION_MEASURES, GROUP_KEY, INDEX_FEATURES, LABEL_FREE_FEATURES
from shiftcost.forecast import protocol
from shiftcost.forecast.probe import PROBE_FEATURES, PROBE_STRATUM


def label_free_analysis(rows: Sequence[Mapping[str, Any]], level: float) -> dict[str, Any]:
    """The label-free cost model fitted on the sweep's runs, and its leave-one-corruption-out figures."""
    found = analyse(list(rows), level=level, features=LABEL_FREE_FEATURES)
    return {
        "features": list(LABEL_FREE_FEATURES),
        "cost_model": found.cost_model,
        "error": found.cost_model_error,
        "note": found.cost_model_note,
        "loco": found.loco,
        "loco_error": found.loco_error,
    }


def analyse(
    rows: list[dict[str, Any]],
    *,
    settings: Mapping[str, Any] | None = None,
    probe: Mapping[str, Any] | None = None,
    level: float = 0.90,
    features: Sequence[str] = COST_FEATURES,
    max_epochs: float | None = None,
) -> SweepResult:
    """Correlations, cost model, leave-one-corruption-out evaluation and plot curve of sweep rows.

    ``max_epochs`` is the sweep's epoch cap (default: ``settings["max_epochs"]``, else the
    protocol's): the cost model's "not to converge" flag is judged against it, whether or
    not any run was capped. Alongside the index cost model a
    :class:`~shiftcost.forecast.forecaster.Forecaster` is fitted (stage 0, stage 1 when the
    rows carry the probe's features, and the host's energy rate from the measured runs).
    """
    if max_epochs is None:
        max_epochs = (settings or {}).get("max_epochs") or protocol.MAX_EPOCHS

    usable = [row for row in rows if row["status"] != "failed"]
    settings = dict(settings or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        scaling_choice = choose_rate_scaling(usable, settings, features, level, max_epochs)
    if scaling_choice is not None:
        settings |= {"probe_rate_scaling": scaling_choice["chosen"], "probe_rate_scaling_choice": scaling_choice}
    correlations = correlate(usable)
    fit_rows = [_fit_row(row) for row in usable if _fit_ready(row, features)]
    sweep_joules = _sweep_joules(usable)
    probe_joules = None if not probe or "joules_per_sample_epoch" not in probe else float(probe["joules_per_sample_epoch"])

    # The analysis never loses the measured rows: a part that cannot be computed records why.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        cost_model, cost_model_error, folds_note = _fit_cost_model(fit_rows, features, level, max_epochs)
        forecaster = loco_stages = None
        if cost_model is not None:
            group_key = GROUP_KEY if folds_note is None else None
            forecaster, forecaster_error = _fit_forecaster(usable, fit_rows, features, level, max_epochs, settings, group_key)
            cost_model_error = forecaster_error or cost_model_error
            if forecaster is not None and group_key is not None:
                # Saved with the forecaster: whether a probe is worth running is decided on it.
                try:
                    loco_stages = forecaster.left_out = forecaster.leave_one_kind_out(fit_rows, group_key=group_key)
                    if loco_stages is not None and scaling_choice is not None:
                        loco_stages["rate_scaling"] = scaling_choice
                except Exception as error:  # noqa: BLE001 - the forecaster stands and probes; only the comparison is lost
                    loco_stages = {"error": _describe(error)}
        loco, loco_probe, loco_error = _group_out(fit_rows, features, level, probe_joules, max_epochs)

        plot_curve, plot_error = _single_index_curve(fit_rows, level)

    return SweepResult(
        rows=rows,
        correlations=correlations,
        cost_model=cost_model,
        cost_model_error=cost_model_error,
        loco=loco,
        loco_probe=loco_probe,
        loco_error=loco_error,
        loco_stages=loco_stages,
        plot_curve=plot_curve if plot_curve is not None else {"error": plot_error},
        joules_per_sample_epoch={
            "probe": probe_joules,
            "sweep": sweep_joules,
            "loco": "per held-out kind: median J per sample-epoch of the training kinds' runs that reached the cutoff",
        },
        probe=dict(probe) if probe else None,
        best_index=best_index(correlations),
        settings=settings,
        timing={},
        forecaster=forecaster,
        cost_model_note=folds_note,
    )


def choose_rate_scaling(
    usable: Sequence[dict[str, Any]], settings: Mapping[str, Any], features: Sequence[str], level: float, max_epochs: float
) -> dict[str, Any] | None:
    """Which of the probes each point ran (``row["probes"]``, one per rate scaling the sweep
    recorded in ``settings["probe_rate_scalings"]``, see ``probe.calibration_scalings``) the forecast
    reads, and how each did; ``None`` where the sweep recorded fewer than two. Kept: the scaling whose
    probe stage forecast the sweep's own batches that needed training best, each kind left out, by
    MdAPE of epochs, the measure the shipped design was chosen by; the first (``probe.RATE_SCALING``)
    on a tie, or where no stage could be scored. Every probed row's own probe fields are set to the
    kept probe's. Sweeps run several probes only where ``probe.CHOOSE_RATE_SCALING`` is set (its
    comment says why it is not)."""
    probed = [row for row in usable if row.get("probes")]
    scalings = [name for name in settings.get("probe_rate_scalings") or () if probed and all(name in row["probes"] for row in probed)]
    if len(scalings) < 2:
        return None
    scores: dict[str, float | None] = {}
    for scaling in scalings:
        for row in probed:
            row.update(row["probes"][scaling])
        fit_rows = [_fit_row(row) for row in usable if _fit_ready(row, features)]
        forecaster, _ = _fit_forecaster(usable, fit_rows, features, level, max_epochs, {**settings, "probe_rate_scaling": scaling})
        try:
            stages = forecaster.leave_one_kind_out(fit_rows, group_key=GROUP_KEY) if forecaster is not None else None
        except Exception:  # noqa: BLE001 - a probe its kinds cannot score is not chosen
            stages = None
        scores[scaling] = ((stages or {}).get("probe") or {}).get("mdape_epochs")
    scored = [name for name in scalings if scores[name] is not None]
    chosen = min(scored, key=lambda name: scores[name]) if scored else scalings[0]
    for row in probed:
        row.update(row["probes"][chosen])
    return {"chosen": chosen, "mdape_epochs_probe": scores, "rule": "the lowest probe-stage MdAPE of epochs, each kind left out"}


def _fit_cost_model(
    fit_rows: list[dict[str, Any]], features: Sequence[str], level: float, max_epochs: float
) -> tuple[Any, str | None, str | None]:
    """The cost model with intervals from leaving one corruption kind out; when a kind holds
    every run of known cost (a robust model that only some kinds make retrain), leaving it
    out leaves nothing to fit, so the intervals fall back to leaving one run out rather than
    refusing. Returns the model (or ``None``), why not, and the note of that fallback."""
    from shiftcost.costmodel import CostModel

    def fit(groups: str | None) -> Any:
        return CostModel(level=level, features=list(features), max_epochs=max_epochs).fit(fit_rows, groups=groups, note="calibration sweep")

    try:
        return fit(GROUP_KEY), None, None
    except Exception as error:  # noqa: BLE001 - the analysis records why and goes on
        by_kind = _describe(error)
    try:
        model = fit(None)
    except Exception as error:  # noqa: BLE001
        return None, _describe(error), None
    return model, None, f"intervals from leaving one run out, not one kind ({by_kind})"


def _fit_forecaster(
    usable: list[dict[str, Any]],
    fit_rows: list[dict[str, Any]],
    features: Sequence[str],
    level: float,
    max_epochs: float,
    settings: Mapping[str, Any],
    group_key: str | None = GROUP_KEY,
) -> tuple[Any, str | None]:
    """The forecaster fitted beside the index cost model, with the host's energy rate; or why not."""
    import torch

    from shiftcost.energy import HostEnergyRate, device_kind, run_work
    from shiftcost.forecast.forecaster import Forecaster

    # The clean batch is measured once and copied under every kind; its runs count once.
    runs = [run_work(run) for row in usable if not row.get("copy_of") for run in row.get("runs", [])]
    # A sweep without its own device or thread count ran on the CPU at torch's default, which this process still has.
    device = device_kind(settings.get("device") or "cpu")
    meter = "gpu_model" if device == "cuda" else "cpu_model"
    hardware = next((run["energy"].get(meter) for row in usable for run in row.get("runs", []) if run.get("energy")), None)
    threads = int(settings.get("threads") or torch.get_num_threads())
    try:
        rate = HostEnergyRate.fit(runs, hardware=hardware, threads=threads, device=device)
    except Exception:  # noqa: BLE001 - no measured energy: epochs are still forecast
        rate = None
    try:
        forecaster = Forecaster.fit(
            fit_rows, features=list(features), level=level, max_epochs=max_epochs, group_key=group_key,
            energy_rate=rate, batch_size=int(settings.get("batch_size") or 64),
            probe_settings=_probe_settings(settings),
            retrain_settings=_retrain_settings(settings),
            architecture=settings.get("architecture"),
            input_shape=settings.get("input_shape"),
        )
    except Exception as error:  # noqa: BLE001
        return None, _describe(error)
    return forecaster, None


def _recorded(settings: Mapping[str, Any], name: str) -> Any:
    """A retrain setting the sweep recorded: at the top level, or in the recipe it recorded whole
    (``None`` where neither holds it, as in settings from before the recipe was kept)."""
    return settings.get(name, ((settings.get("retrain") or {}).get("recipe") or {}).get(name))


def _retrain_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The sweep's :data:`~shiftcost.forecast.forecaster.EPOCH_SETTINGS`: a recipe recorded whole
    without a training step trained on plain cross-entropy (``NO_TRAIN_STEP``)."""
    from shiftcost.forecast.forecaster import EPOCH_SETTINGS, NO_TRAIN_STEP

    recorded = {name: _recorded(settings, name) for name in EPOCH_SETTINGS}
    if "train_step" in ((settings.get("retrain") or {}).get("recipe") or {}):
        recorded["train_step"] = recorded["train_step"] or NO_TRAIN_STEP
    return recorded


def _probe_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """How the sweep's probes ran (see ``sweep._probe_point``): the probe's own steps, sample and
    batch, whether they stopped at the cutoff (sweeps from before they did ran every step), the
    held-out images they evaluated at most (none recorded: the whole holdout, as before the cap), whether
    their rate and clock followed their batch (none recorded: they did not, see ``probe.RATE_SCALING``),
    under the retrains' learning rate, optimizer, weight decay and momentum."""
    from shiftcost.forecast import probe
    from shiftcost.forecast.forecaster import PROBE_RECIPE

    sized = {
        "steps": settings.get("probe_steps"), "samples": probe.DEFAULT_SAMPLES, "batch_size": probe.DEFAULT_BATCH_SIZE,
        "stop_at_cutoff": bool(settings.get("probe_stops_at_cutoff", False)), "max_holdout": settings.get("probe_max_holdout"),
        "rate_scaling": settings.get("probe_rate_scaling", "none"),
    }
    return sized | {name: _recorded(settings, name) for name in PROBE_RECIPE}


def _group_out(
    fit_rows: list[dict[str, Any]], features: Sequence[str], level: float, probe_joules: float | None, max_epochs: float
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str | None]:
    """Leave-one-corruption-out evaluation (and again with the probe's joules); or why not.

    Predictions are held at the forecast horizon, as ``forecast`` and ``assess`` hold them."""
    from shiftcost.costmodel import leave_one_group_out
    from shiftcost.forecast.probe import horizon_epochs

    options = {"level": level, "features": list(features), "horizon_epochs": horizon_epochs(max_epochs)}
    try:
        loco = leave_one_group_out(fit_rows, GROUP_KEY, **options).to_dict()
        loco_probe = None
        if probe_joules is not None:
            loco_probe = leave_one_group_out(fit_rows, GROUP_KEY, joules_per_sample_epoch=probe_joules, **options).to_dict()
    except Exception as error:  # noqa: BLE001
        return None, None, _describe(error)
    return loco, loco_probe, None


def correlate(
    rows: Sequence[Mapping[str, Any]],
    features: Sequence[str] = CORRELATION_FEATURES,
    measures: Sequence[str] = CORRELATION_MEASURES,
    group_key: str = GROUP_KEY,
) -> dict[str, Any]:
    """Pearson and Spearman correlation of each feature with each measure.

    ``{"overall": {feature: {measure: cell}}, "per_type": {kind: {feature: {measure: cell}}}}``
    with ``cell = {"n", "pearson", "pearson_p", "spearman", "spearman_p"}``. Each pair uses
    the rows where both values are finite numbers; a capped run enters with what it spent
    (a lower bound of its cost). With fewer than 3 such rows, or a constant column, the
    coefficients are ``None`` and ``reason`` says why.
    """
    kinds = list(dict.fromkeys(row[group_key] for row in rows))
    return {
        "n_rows": len(rows),
        "features": list(features),
        "measures": list(measures),
        "overall": _correlation_grid(rows, features, measures),
        "per_type": {
            kind: _correlation_grid([row for row in rows if row[group_key] == kind], features, measures) for kind in kinds
        },
    }


def _correlation_grid(
    rows: Sequence[Mapping[str, Any]], features: Sequence[str], measures: Sequence[str]
) -> dict[str, dict[str, dict[str, Any]]]:
    from scipy import stats

    grid: dict[str, dict[str, dict[str, Any]]] = {}
    for feature in features:
        grid[feature] = {}
        for measure in measures:
            pairs = [(float(r[feature]), float(r[measure])) for r in rows if _finite(r.get(feature)) and _finite(r.get(measure))]
            cell: dict[str, Any] = {"n": len(pairs), "pearson": None, "pearson_p": None, "spearman": None, "spearman_p": None}
            if len(pairs) < 3:
                cell["reason"] = f"{len(pairs)} points with both values (need 3)"
            else:
                a = [p[0] for p in pairs]
                b = [p[1] for p in pairs]
                if len(set(a)) < 2 or len(set(b)) < 2:
                    cell["reason"] = "constant " + (feature if len(set(a)) < 2 else measure)
                else:
                    pearson = stats.pearsonr(a, b)
                    spearman = stats.spearmanr(a, b)
                    cell.update(
                        pearson=float(pearson.statistic),
                        pearson_p=float(pearson.pvalue),
                        spearman=float(spearman.statistic),
                        spearman_p=float(spearman.pvalue),
                    )
            grid[feature][measure] = cell
    return grid


def best_index(correlations: Mapping[str, Any], measure: str = "energy_kwh") -> dict[str, Any]:
    """Which feature ranks ``measure`` best: by Spearman over the whole sweep, and by the
    mean Spearman within corruption kinds (kinds where it is undefined are skipped)."""
    overall = {f: correlations["overall"][f][measure]["spearman"] for f in correlations["features"]}
    within: dict[str, float | None] = {}
    for feature in correlations["features"]:
        values = [
            grid[feature][measure]["spearman"]
            for grid in correlations["per_type"].values()
            if grid[feature][measure]["spearman"] is not None
        ]
        within[feature] = sum(values) / len(values) if values else None

    def top(scores: Mapping[str, float | None], names: Sequence[str]) -> str | None:
        ranked = [n for n in names if scores.get(n) is not None]
        return max(ranked, key=lambda n: scores[n]) if ranked else None

    def tied(names: Sequence[str]) -> list[str]:
        ranked = [n for n in names if within.get(n) is not None]
        if not ranked:
            return []
        best = max(within[n] for n in ranked)
        return [n for n in ranked if abs(within[n] - best) <= 1e-9]

    def top_within(names: Sequence[str]) -> str | None:
        # Within kinds every index is often a perfect 1.0 (intensity orders each kind's
        # points); then the pick is only a tie-break, by the overall Spearman.
        candidates = tied(names)
        if len(candidates) < 2:
            return candidates[0] if candidates else None
        return max(candidates, key=lambda n: (overall.get(n) is not None, overall.get(n) or 0.0))

    indices = [f for f in correlations["features"] if f in INDEX_FEATURES]
    index_ties = tied(indices)
    return {
        "within_type_tie": index_ties if len(index_ties) > 1 else [],
        "within_type_rule": "highest mean within-kind Spearman; ties broken by the overall Spearman",
        "measure": measure,
        "overall_spearman": overall,
        "mean_within_type_spearman": within,
        "best_index_overall": top(overall, indices),
        "best_index_within_type": top_within(indices),
        "best_feature_overall": top(overall, correlations["features"]),
        "best_feature_within_type": top_within(correlations["features"]),
    }


def _fit_ready(row: Mapping[str, Any], features: Sequence[str]) -> bool:
    needed = list(features) + ["epochs", "samples"]
    return row["status"] != "failed" and all(_finite(row.get(name)) for name in needed)


def _fit_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """The cost model's view of a point: features, target epochs, censoring, energy."""
    keys = set(COST_FEATURES) | set(LABEL_FREE_FEATURES) | set(INDEX_FEATURES) | set(PROBE_FEATURES) | {PROBE_STRATUM, "accuracy_drop"}
    out = {name: row[name] for name in keys if _finite(row.get(name))}
    out.update(
        corruption=row[GROUP_KEY],
        intensity=row["intensity"],
        epochs=float(row["epochs"]),
        reached_cutoff=bool(row["reached_cutoff"]),
        samples=float(row["samples"]),
        energy_kwh=row.get("energy_kwh"),
    )
    if "probe_already_met" in row:
        out["probe_already_met"] = bool(row["probe_already_met"])
    return out


def _sweep_joules(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """All measured joules over all sample-epochs trained (evaluation energy included)."""
    joules = sample_epochs = 0.0
    for row in rows:
        for run in row.get("runs", []):
            energy = run.get("energy")
            if energy is None or not run.get("epochs"):
                continue
            joules += energy["energy_kwh"] * 3.6e6
            sample_epochs += run["epochs"] * (run["train_samples"] + run["replay_samples"])
    return joules / sample_epochs if sample_epochs > 0 else None


def _single_index_curve(fit_rows: Sequence[Mapping[str, Any]], level: float) -> tuple[dict[str, Any] | None, str | None]:
    """Cost model on RESQUE_dist alone, over a grid spanning the sweep, for the plot."""
    from shiftcost.costmodel import CostModel, estimate_joules_per_sample_epoch

    try:
        model = CostModel(level=level, features=["resque_dist"]).fit(list(fit_rows), groups=GROUP_KEY)
        joules = estimate_joules_per_sample_epoch(fit_rows)
    except Exception as error:  # noqa: BLE001 - the plot then shows the points only
        return None, _describe(error)
    values = [row["resque_dist"] for row in fit_rows]
    samples = sorted(row["samples"] for row in fit_rows)[len(fit_rows) // 2]
    lo, hi = min(values), max(values)
    grid = [lo + (hi - lo) * i / 60 for i in range(61)]
    predictions = model.predict_costs([{"resque_dist": v} for v in grid], samples=samples, joules_per_sample_epoch=joules)
    return {
        "feature": "resque_dist",
        "level": level,
        "samples": samples,
        "joules_per_sample_epoch": joules,
        "x": grid,
        "energy_kwh": [p.energy_kwh for p in predictions],
        "energy_kwh_lower": [p.energy_kwh_lower for p in predictions],
        "energy_kwh_upper": [p.energy_kwh_upper for p in predictions],
        "loo": model.loo_,
    }, None
