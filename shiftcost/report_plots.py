"""The report's plots, drawn with matplotlib's object API and returned as PNG bytes.

matplotlib is imported inside the plotting functions (``Figure`` + the Agg canvas), so no
global backend is switched, no window opens, and importing this module stays cheap.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from shiftcost.features import Feature
from shiftcost.store.report_queries import short_name

#: Shift indices shown, as stored in ``index_runs``, with their display names.
INDEX_COLUMNS = {
    Feature.RESQUE_DIST: "RESQUE_dist",
    Feature.INV_ARI: "inv_ARI",
    Feature.LAYER_SHIFT: "layer shift",
    Feature.RESQUE_TASK: "RESQUE_task",
    Feature.PREINDEX_P: "PreIndex p",
}

ACTIONS = ("retrain", "defer", "skip")
_ACTION_COLOURS = {"retrain": "#2b8a3e", "defer": "#e8890c", "skip": "#868e96"}


def _figure(height: float, rows: int = 1, sharex: bool = True) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, height), dpi=100, layout="constrained")
    axes = figure.subplots(rows, 1, sharex=sharex, squeeze=False)[:, 0]
    return figure, axes


def _time_axis(axes: Any) -> None:
    """Readable time ticks whatever the span (seconds of a demo or months of production)."""
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

    locator = AutoDateLocator()
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    axes.set_xlabel("time (UTC)", fontsize=9)


def _png(figure: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", facecolor="white")
    return buffer.getvalue()


def _empty(axes: Any, message: str) -> None:
    axes.text(0.5, 0.5, message, ha="center", va="center", fontsize=13, color="#495057", transform=axes.transAxes)
    axes.set_xticks([])
    axes.set_yticks([])
    for side in ("top", "right", "bottom", "left"):
        axes.spines[side].set_color("#ced4da")


def _batch_ticks(axes: Any, names: Sequence[str]) -> None:
    axes.set_xticks(range(len(names)))
    if len(names) <= 40:
        axes.set_xticklabels([_abbreviate(name) for name in names], rotation=35, ha="right", fontsize=8)
    else:
        axes.set_xticklabels([])
        axes.set_xlabel(f"{len(names)} batches in arrival order")


def _abbreviate(name: str, width: int = 28) -> str:
    name = name.removesuffix(".npz").removesuffix(".pt")
    return name if len(name) <= width else name[: width - 1] + "…"


def plot_indices(batches: Sequence[dict[str, Any]]) -> bytes:
    """Shift indices per batch, one panel per index with data; drifted batches in red."""
    present = [column for column in INDEX_COLUMNS if any(row.get(column) is not None for row in batches)]
    figure, axes = _figure(2.0 + 1.6 * max(len(present), 1), rows=max(len(present), 1))
    if not present:
        _empty(axes[0], "No index runs in this selection")
        return _png(figure)
    names = [row["name"] for row in batches]
    for panel, column in zip(axes, present):
        xs = [i for i, row in enumerate(batches) if row.get(column) is not None]
        ys = [float(batches[i][column]) for i in xs]
        panel.plot(xs, ys, color="#adb5bd", linewidth=1, zorder=1)
        colours = ["#c92a2a" if batches[i]["drift"] else "#1c7ed6" if batches[i]["drift"] is False else "#868e96" for i in xs]
        panel.scatter(xs, ys, c=colours, s=36, zorder=2)
        panel.set_ylabel(INDEX_COLUMNS[column], fontsize=9)
        panel.grid(True, axis="y", alpha=0.3)
    axes[0].set_title("Shift indices per batch (red: drift detected, blue: no drift)", fontsize=11)
    _batch_ticks(axes[-1], names)
    return _png(figure)


def plot_energy(batches: Sequence[dict[str, Any]]) -> bytes:
    """Predicted kWh (point and interval) of every assessed batch and measured kWh of each retrain."""
    assessed = [row for row in batches if row.get("predicted_kwh") is not None or row.get("actual_kwh") is not None]
    figure, (axes,) = _figure(4.6)
    if not assessed:
        _empty(axes, "No cost predictions or retrain runs in this selection")
        return _png(figure)
    for i, row in enumerate(assessed):
        predicted = row.get("predicted_kwh")
        if predicted is not None:
            low = row.get("predicted_kwh_lower")
            high = row.get("predicted_kwh_upper")
            colour = _ACTION_COLOURS.get(row.get("action") or "", "#495057")
            error = None
            if low is not None and high is not None:
                error = [[max(predicted - low, 0.0)], [max(high - predicted, 0.0)]]
            axes.errorbar([i - 0.08], [predicted], yerr=error, fmt="o", color=colour, ecolor=colour,
                          elinewidth=2, capsize=5, markersize=7, label="_predicted")
        actual = row.get("actual_kwh")
        if actual is not None:
            capped = row.get("run_status") == "cap_reached"
            axes.scatter([i + 0.08], [actual], marker="D", s=60, zorder=3,
                         facecolors="none" if capped else "#000000", edgecolors="#000000")
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=_ACTION_COLOURS[a], marker="o", linewidth=2, label=f"predicted, {a} (interval bars)")
        for a in ACTIONS if any(row.get("action") == a and row.get("predicted_kwh") is not None for row in assessed)
    ]
    handles.append(Line2D([], [], color="#000000", marker="D", linestyle="none", label="measured (hollow: cap reached)"))
    axes.legend(handles=handles, fontsize=8, loc="upper left")
    axes.set_ylabel("energy (kWh)")
    positive = [v for row in assessed for v in (row.get("predicted_kwh"), row.get("predicted_kwh_upper"), row.get("actual_kwh"))
                if v is not None and v > 0]
    if positive and max(positive) / min(positive) > 30:
        # Costs of different shifts span orders of magnitude; a linear axis flattens the small ones.
        axes.set_yscale("log")
        axes.set_ylim(bottom=min(positive) / 3)
        axes.set_ylabel("energy (kWh, log scale)")
    else:
        axes.set_ylim(bottom=0)
    axes.grid(True, axis="y", alpha=0.3)
    axes.set_title("Predicted vs measured retraining energy", fontsize=11)
    _batch_ticks(axes, [row["name"] for row in assessed])
    return _png(figure)


def plot_budget(series: dict[str, list[dict[str, Any]]], end: datetime | None = None) -> bytes:
    """Remaining (or spent) kWh and kg CO2e of each budget after every ledger entry.

    With ``end`` (e.g. the last decision), each line is carried on to that time, so the
    decisions taken after the last ledger entry can be read against what was left.
    """
    figure, axes = _figure(6.0, rows=2)
    if not series:
        for panel in axes:
            _empty(panel, "No budget ledger entries in this selection")
        return _png(figure)
    palette = ["#1c7ed6", "#c92a2a", "#2b8a3e", "#e8890c", "#7048e8", "#0c8599"]
    for panel, measure, unit in ((axes[0], "kwh", "kWh"), (axes[1], "co2", "kg CO2e")):
        drawn = False
        for colour, (name, points) in zip(palette * 10, sorted(series.items())):
            times = [point["at"] for point in points]
            remaining = [point[f"remaining_{measure}"] for point in points]
            if all(value is not None for value in remaining):
                values, what = remaining, "remaining"
                cap = points[-1][f"{measure}_cap"]
                panel.axhline(0.0, color="#495057", linewidth=0.8)
                panel.axhline(cap, color=colour, linestyle=":", linewidth=1)
            else:
                values, what = [point[f"spent_{measure}"] for point in points], "spent"
            line_times, line_values = list(times), list(values)
            if end is not None and end > times[-1]:
                line_times.append(end)
                line_values.append(values[-1])
            panel.step(line_times, line_values, where="post", color=colour, linewidth=2, label=f"{name}: {what}")
            markers = {"reserve": "v", "settle": "o", "release": "^"}
            for kind, marker in markers.items():
                chosen = [(t, v) for t, v, p in zip(times, values, points) if p["kind"] == kind]
                if chosen:
                    panel.scatter(*zip(*chosen), marker=marker, color=colour, s=30, zorder=3)
            drawn = True
        if drawn:
            panel.legend(fontsize=8, loc="best")
        panel.set_ylabel(unit)
        panel.grid(True, alpha=0.3)
    axes[0].set_title("Budget burn-down (▼ reserve, ● settle, ▲ release; dotted: cap)", fontsize=11)
    _time_axis(axes[1])
    return _png(figure)


def plot_decisions(decision_rows: Sequence[dict[str, Any]]) -> bytes:
    """Decisions over time, one lane per action, labelled with their batch when few."""
    rows = sorted(decision_rows, key=lambda row: (row["created_at"], row["decision_id"]))
    figure, (axes,) = _figure(3.4)
    if not rows:
        _empty(axes, "No decisions in this selection")
        return _png(figure)
    lanes = {action: position for position, action in enumerate(reversed(ACTIONS))}
    for action in ACTIONS:
        chosen = [row for row in rows if row["action"] == action]
        if chosen:
            axes.scatter([row["created_at"] for row in chosen], [lanes[action]] * len(chosen), s=80,
                         color=_ACTION_COLOURS[action], edgecolors=["#c92a2a" if row["blocked_by_budget"] else "none" for row in chosen],
                         linewidths=2, zorder=3, label=action)
    if len(rows) <= 30:
        for number, row in enumerate(rows):
            axes.annotate(_abbreviate(short_name(row.get("source_uri")), 18), (row["created_at"], lanes[row["action"]]),
                          xytext=(0, 9 if number % 2 else -14), textcoords="offset points", ha="center", fontsize=7)
    axes.set_yticks(list(lanes.values()))
    axes.set_yticklabels(list(lanes))
    axes.set_ylim(-0.7, len(lanes) - 0.3)
    axes.grid(True, axis="x", alpha=0.3)
    axes.set_title("Decisions over time (red ring: held back by a budget)", fontsize=11)
    _time_axis(axes)
    return _png(figure)
