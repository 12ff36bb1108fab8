"""Files a sweep writes: plot, Markdown report, CSV and partial results."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shiftcost.calibrate.helpers import _cost_model_summary, _count, _finite, _fmt, _fmt_load, _pct
from shiftcost.calibrate.settings import COLUMNS, GROUP_KEY
from shiftcost.forecast.forecaster import naive_did_better
from shiftcost.jsonsafe import json_safe


if TYPE_CHECKING:
    from shiftcost.calibrate.result import SweepResult


def plot_sweep(result: SweepResult, path: str | os.PathLike[str]) -> Path:
    """PNG of RESQUE_dist against measured energy, one colour per corruption, with the
    single-index cost model's curve and interval band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    try:
        kinds = list(dict.fromkeys(row[GROUP_KEY] for row in result.rows))
        colours = plt.get_cmap("tab10")
        for number, kind in enumerate(kinds):
            points = [r for r in result.rows if r[GROUP_KEY] == kind and _finite(r.get("resque_dist")) and _finite(r.get("energy_kwh"))]
            for censored, marker in ((False, "o"), (True, "^")):
                chosen = [r for r in points if bool(r.get("censored")) == censored]
                if chosen:
                    ax.scatter(
                        [r["resque_dist"] for r in chosen],
                        [r["energy_kwh"] * 1000 for r in chosen],
                        color=colours(number % 10),
                        marker=marker,
                        facecolors="none" if censored else colours(number % 10),
                        s=42,
                        label=kind if not censored else None,
                    )
        if any(r.get("censored") for r in result.rows):
            ax.scatter([], [], marker="^", facecolors="none", edgecolors="grey", label="cap reached (lower bound)")
        measured = [r["energy_kwh"] * 1000 for r in result.rows if _finite(r.get("energy_kwh"))]
        curve = result.plot_curve or {}
        if "x" in curve:
            level = f"{curve['level']:.0%}"
            lower = [v * 1000 if v is not None else math.nan for v in curve["energy_kwh_lower"]]
            upper = [v * 1000 if v is not None and math.isfinite(v) else math.nan for v in curve["energy_kwh_upper"]]
            ax.fill_between(curve["x"], lower, upper, color="grey", alpha=0.2, label=f"{level} CV+ interval")
            ax.plot(curve["x"], [v * 1000 for v in curve["energy_kwh"]], color="black", lw=1.5, label="cost model on RESQUE_dist alone")
            caption = (
                f"Curve: censored cost model fitted on RESQUE_dist only (epochs x {curve['samples']:g} samples x "
                f"{curve['joules_per_sample_epoch']:.3g} J/sample-epoch); the multi-feature model is evaluated in report.md. "
                "Hollow triangles: cap reached (energy is a lower bound)."
            )
        else:
            caption = f"No fitted curve: {curve.get('error', 'not enough points')}. Hollow triangles: cap reached (lower bound)."
        if measured:
            # The band widens fast beyond the data; keep the measured points readable.
            ax.set_ylim(bottom=0.0, top=1.6 * max(measured) if max(measured) > 0 else None)
        ax.set_xlabel("RESQUE_dist (penultimate layer)")
        ax.set_ylabel("measured retraining energy (Wh)")
        ax.set_title("Calibration sweep: index vs energy to reach the cutoff")
        ax.legend(fontsize=8, loc="upper left")
        fig.text(0.01, 0.01, caption, fontsize=7, wrap=True)
        fig.subplots_adjust(bottom=0.18)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def markdown_report(result: SweepResult) -> str:
    """A readable summary: settings, timing, correlation tables, best index, cost model, LOCO."""
    lines: list[str] = ["# Calibration sweep", ""]
    s, t = result.settings, result.timing
    ok = [r for r in result.rows if r["status"] != "failed"]
    lines += [
        f"- model: {s.get('architecture')}, reference accuracy {_fmt(s.get('reference_accuracy'), '.4f')}, "
        f"target = reference - {s.get('tolerance')}; {s.get('reference_samples')} reference / {s.get('new_samples')} new samples",
        f"- points: {len(result.rows)} ({len(result.rows) - len(ok)} failed); retraining runs per point: {s.get('repeats')} "
        f"(seeds {s.get('seed')}..); eval every {s.get('eval_every')} steps; cap {s.get('max_epochs')} epochs / {s.get('max_steps')} steps; "
        f"batch {s.get('batch_size')}, lr {s.get('lr')}, {s.get('optimizer')}; device {s.get('device')}, {s.get('threads')} torch thread(s)",
        "- statuses: " + ", ".join(f"{k} {v}" for k, v in _count(r["status"] for r in result.rows).items()),
    ]
    if t:
        lines.append(
            f"- time: {_fmt(t.get('wall_s'), '.1f')} s wall, {_fmt(t.get('cpu_s'), '.1f')} s CPU "
            f"(load average {_fmt_load(t.get('load_average_start'))} at start, {_fmt_load(t.get('load_average_end'))} at end, "
            f"{t.get('cpu_count')} CPUs)"
        )
    j = result.joules_per_sample_epoch
    lines.append(
        f"- joules per sample-epoch: probe {_fmt(j.get('probe'), '.4g')} (training only), sweep {_fmt(j.get('sweep'), '.4g')} "
        "(all measured joules / all sample-epochs, evaluations included)"
    )
    methods = sorted({r["energy_method"] for r in ok if r.get("energy_method")})
    if methods:
        lines.append(f"- energy measured by: {'; '.join(methods)}")
    lines += ["", "Capped runs enter the correlations with what they spent (a lower bound of their cost).", ""]

    corr = result.correlations
    lines += ["## Correlations over the whole sweep (Spearman rho / Pearson r)", ""]
    lines += _grid_table(corr["overall"], corr["features"], corr["measures"])
    lines += ["", "## Spearman rho with energy, per corruption kind", ""]
    kinds = list(corr["per_type"])
    lines.append("| feature | " + " | ".join(kinds) + " |")
    lines.append("|---" * (len(kinds) + 1) + "|")
    for feature in corr["features"]:
        cells = [_fmt(corr["per_type"][k][feature]["energy_kwh"]["spearman"], "+.2f") for k in kinds]
        lines.append(f"| {feature} | " + " | ".join(cells) + " |")
    b = result.best_index
    lines += [
        "",
        f"Best index for energy: {b.get('best_index_overall')} over the whole sweep, {b.get('best_index_within_type')} within kinds "
        f"(best feature of all: {b.get('best_feature_overall')} overall, {b.get('best_feature_within_type')} within kinds).",
        *(
            [f"Within kinds the indices {', '.join(b['within_type_tie'])} tie; the pick among them is only a tie-break by the overall Spearman."]
            if b.get("within_type_tie")
            else []
        ),
        "",
        "## Cost model",
        "",
    ]
    if result.cost_model is not None:
        summary = _cost_model_summary(result.cost_model)
        coef = ", ".join(f"{k} {v:+.3g}" for k, v in summary["coefficients"].items())
        loo = summary["loo"]
        lines.append(
            f"Fitted on {summary['n_train']} points ({summary['n_censored']} censored): log(epochs + 1) = "
            f"{summary['intercept']:.3g} + {coef}; sigma {summary['sigma']:.3g}. "
            f"CV+ over {'runs' if result.cost_model_note else 'kinds'}: MdAPE epochs {_pct(loo.get('mdape_epochs'))}, "
            f"coverage {_pct(loo.get('coverage'))}."
        )
        if result.cost_model_note:
            lines.append(f"Note: {result.cost_model_note}.")
    else:
        lines.append(f"Not fitted: {result.cost_model_error}")
    lines += ["", "## Leave one corruption kind out (energy through epochs x samples x J/sample-epoch)", ""]
    if result.loco is not None:
        lines += _loco_table(result.loco["summary"], "J/sample-epoch from the training kinds")
        if result.loco_probe is not None:
            lines += ["", *_loco_table(result.loco_probe["summary"], "J/sample-epoch from the hardware probe")]
    else:
        lines.append(f"Not evaluated: {result.loco_error}")
    if result.loco_stages is not None:
        lines += ["", "## Forecast stages on the batches that needed training (each kind left out, as `forecast` makes them)", ""]
        compared = "error" not in result.loco_stages
        lines += _stages_table(result.loco_stages) if compared else [f"Not compared: {result.loco_stages['error']}"]
        naive = naive_did_better(result.loco_stages) if compared else None
        if naive:
            lines += ["", f"{naive[0].upper()}{naive[1:]}."]
        reason = result.forecaster.probe_not_worth() if result.forecaster is not None else None
        if reason:
            lines += ["", f"No probe with this cost model: {reason}."]
        elif compared:
            lines += ["", "The probe stage did better than the index stage: `forecast` and the pipeline probe."]
    failed = result.failed
    if failed:
        lines += ["", "## Failed points", ""]
        lines += [f"- {r[GROUP_KEY]} {r['intensity']:g}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def _grid_table(grid: Mapping[str, Any], features: Sequence[str], measures: Sequence[str]) -> list[str]:
    lines = ["| feature | " + " | ".join(measures) + " |", "|---" * (len(measures) + 1) + "|"]
    for feature in features:
        cells = [f"{_fmt(grid[feature][m]['spearman'], '+.2f')} / {_fmt(grid[feature][m]['pearson'], '+.2f')}" for m in measures]
        lines.append(f"| {feature} | " + " | ".join(cells) + " |")
    return lines


def _loco_table(summary: Mapping[str, Any], title: str) -> list[str]:
    lines = [
        f"{title}:",
        "",
        "| held-out kind | n | censored | MdAPE energy | MdAPE epochs | coverage energy | coverage epochs |",
        "|---|---|---|---|---|---|---|",
    ]
    groups = dict(summary.get("per_group", {}))
    groups["**all**"] = summary
    for name, g in groups.items():
        lines.append(
            f"| {name} | {g['n']} | {g['n_censored']} | {_pct(g['mdape_energy'])} | {_pct(g['mdape_epochs'])} | "
            f"{_pct(g['coverage_energy'])} | {_pct(g['coverage_epochs'])} |"
        )
    return lines


def _stages_table(stages: Mapping[str, Any]) -> list[str]:
    lines = [
        "| stage | batches | capped | MdAPE epochs | mean abs log error (capped as bounds) | coverage epochs (reached) | capped past the upper end |",
        "|---|---|---|---|---|---|---|",
    ]
    labels = {"index": "index", "probe": "probe", "constant": "median of the other kinds (naive)"}
    for name, label in labels.items():
        s = stages[name]
        lines.append(
            f"| {label} | {s['n']} | {s['n_censored']} | {_pct(s['mdape_epochs'])} | {_fmt(s['mean_abs_log_error'], '.2f')} | "
            f"{_pct(s['coverage_epochs'])} | {s['censored_definite_misses']} |"
        )
    lines += ["", f"{stages['needing_none']} more needed no training; the probe's first evaluation put {stages['needing_none_forecast_at_zero']} of them at zero."]
    if "rate_scaling" in stages:
        lines += ["", f"{describe_rate_scaling(stages['rate_scaling'])}."]
    return lines


def describe_rate_scaling(choice: Mapping[str, Any]) -> str:
    """One sentence on the probe's rate scaling the analysis kept (``analysis.choose_rate_scaling``)."""
    scores = ", ".join(f"{name} {_pct(mdape)}" for name, mdape in choice["mdape_epochs_probe"].items())
    return f"probe's rate scaling: {choice['chosen']}, of the probes every point ran ({choice['rule']}: {scores})"


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
    tmp.replace(path)


def _write_partial(out: Path, rows: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "points.json", json.dumps(json_safe(rows), indent=1, allow_nan=False))
    _write_csv(out / "points.csv", rows)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
