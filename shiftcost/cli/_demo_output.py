"""What ``shiftcost demo`` shows: each scenario step joined with its stored outcome, the
terminal table and the HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from shiftcost.errors import InputError

if TYPE_CHECKING:
    from rich.console import Console

    from shiftcost.cli.demo import DemoRun
    from shiftcost.config import Settings


def fill_rows(run: DemoRun, settings: Settings) -> None:
    """Join each scenario step with what the database says happened to its batch."""
    from shiftcost import landing
    from shiftcost.pipeline import connect
    from shiftcost.report import batch_overview, reason_text
    from shiftcost.store import repository

    with connect(settings) as db, db.session(readonly=True) as session:
        overview = {row["batch_id"]: row for row in batch_overview(session, model=settings.model_name, limit=None)}
        first_step: dict[int, int] = {}
        for row in run.rows:
            path = row.pop("file")
            fingerprint = landing.placeholder_fingerprint(str(path)) if row["kind"] == "corrupt" else None
            try:
                fingerprint = landing.fingerprint(path)
            except InputError:
                pass
            batch = repository.find_batch(session, settings.model_name, fingerprint)
            if batch is None:  # unreadable bytes are registered under a stand-in fingerprint
                batch = repository.find_batch(session, settings.model_name, landing.placeholder_fingerprint(str(path)))
            row["batch"] = Path(path).name
            if batch is None:
                row.update(status="not registered")
                continue
            stored = overview.get(batch.id, {})
            if batch.id in first_step:
                words = f"same bytes as #{first_step[batch.id]}: not processed again"
                row.update(status="duplicate", decision="", reason=words, why=words)
                continue
            first_step[batch.id] = row["step"]
            row.update(
                batch_id=batch.id,
                status=stored.get("status"),
                drift=stored.get("drift"),
                resque_dist=stored.get("resque_dist"),
                inv_ari=stored.get("inv_ari"),
                layer_shift=stored.get("layer_shift"),
                accuracy=stored.get("accuracy"),
                predicted_kwh=stored.get("predicted_kwh"),
                predicted_kwh_lower=stored.get("predicted_kwh_lower"),
                predicted_kwh_upper=stored.get("predicted_kwh_upper"),
                predicted_epochs=stored.get("predicted_epochs"),
                decision=stored.get("action"),
                reason=reason_text(stored.get("reasons")) or stored.get("failure_reason") or row.get("flow_error") or "",
                why=with_outcome(short_reason(stored.get("reasons")), stored.get("run_status"))
                or _failure_words(stored.get("failure_reason"), path) or row.get("flow_error") or "",
                actual_kwh=stored.get("actual_kwh"),
                actual_epochs=stored.get("actual_epochs"),
                run_status=stored.get("run_status"),
            )


#: Short words for the stored reason codes, for the terminal table.
SHORT_REASONS = {
    "no_drift": "no drift",
    "not_converging": "predicted not to converge",
    "over_budget_now": "budget used up this month",
    "over_budget_cap": "over the budget cap",
    "cost_unknown": "cost unknown",
    "below_min_benefit": "too little benefit",
    "within_budget": "fits the budget",
    "no_budget": "no budget applies",
}


#: How a retrain that the decision allowed ended, where that is not a plain success: a row
#: reading only "fits the budget" beside a run the guard stopped would say the opposite of what happened.
SHORT_OUTCOMES = {
    "stopped_by_budget": "then stopped by the budget guard",
    "cap_reached": "then hit its training cap",
    "failed": "then the retrain failed",
}


def with_outcome(why: str, run_status: str | None) -> str:
    """``why`` followed by how the retrain ended, when it did not simply succeed."""
    outcome = SHORT_OUTCOMES.get(run_status or "")
    return f"{why}; {outcome}" if why and outcome else why


def short_reason(reasons: Any) -> str:
    """The deciding reason codes of a stored decision in a few words (blocking ones first)."""
    dicts = [reason for reason in reasons or [] if isinstance(reason, dict)]
    deciding = [r for r in dicts if r.get("blocking")] or [r for r in dicts if r.get("effect") == "allow" and r.get("code") != "drift_detected"]
    words = dict.fromkeys(SHORT_REASONS.get(r.get("code"), str(r.get("code", "")).replace("_", " ")) for r in deciding)
    return "; ".join(words)


def write_demo_report(run: DemoRun, settings: Settings) -> Path:
    from shiftcost.pipeline import connect
    from shiftcost.report import write_report

    budget = run.budget
    notes = [
        f"Demo on scikit-learn's digits: base model, calibration sweep of {run.calibration.get('points')} real retrains "
        f"({', '.join(run.calibration.get('kinds', []))}), cost model on {', '.join(run.calibration.get('features', []))}.",
        f"Budget {budget.get('name')}: {budget.get('kwh_cap', 0):.3g} kWh and {budget.get('co2_cap', 0):.3g} kg CO2e per month "
        f"({budget.get('retrains')} x the median predicted upper bound of a retrain).",
    ]
    with connect(settings) as db:
        summary = write_report(db, run.workdir / "report.html", model=settings.model_name, limit=None,
                               title="shiftcost demo", notes=notes)
    return summary.path


def _failure_words(reason: str | None, path: Path) -> str:
    """A failure reason with the batch named by its file name, cut to fit a table cell."""
    if not reason:
        return ""
    reason = reason.replace(str(path), Path(path).name)
    return reason if len(reason) <= 70 else reason[:69] + "…"


# ----------------------------------------------------------------------------- output


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def print_summary(console: Console, run: DemoRun) -> None:
    """The batch table, predicted vs measured energy of each retrain, timings and the report path."""
    from rich.table import Table
    from rich.text import Text

    level = run.calibration.get("interval_level")
    interval = f"{level:.0%} interval" if level else "interval"
    table = Table(title="shiftcost demo: the stream, batch by batch", title_justify="left")
    for name, justify in (("#", "right"), ("shift", "left"), ("drift", "left"), ("RESQUE_dist", "right"),
                          ("inv_ARI", "right"), ("acc.", "right"), (f"predicted kWh [{interval}]", "right"),
                          ("decision", "left"), ("actual kWh", "right"), ("why", "left")):
        table.add_column(name, justify=justify, overflow="fold")
    colours = {"retrain": "green", "defer": "yellow", "skip": "bright_black", "failed": "red", "duplicate": "cyan"}
    for row in run.rows:
        drift = "" if row.get("drift") is None else ("yes" if row["drift"] else "no")
        predicted = ""
        if row.get("predicted_kwh") is not None:
            predicted = f"{_fmt(row['predicted_kwh'], 2)} [{_fmt(row.get('predicted_kwh_lower'), 2)}, {_fmt(row.get('predicted_kwh_upper'), 2)}]"
        decision = row.get("decision") or row.get("status") or ""
        style = colours.get(decision, "")
        shift = row["shift"] + (" (unseen kind)" if row.get("unseen") else "")
        table.add_row(str(row["step"]), shift, drift, _fmt(row.get("resque_dist")), _fmt(row.get("inv_ari")),
                      _fmt(row.get("accuracy"), 2), predicted, Text(decision, style=style),
                      _fmt(row.get("actual_kwh"), 2), row.get("why", ""))
    console.print(table)
    if run.retrains:
        console.print("Retrains: predicted vs measured energy", style="bold")
        for row in run.retrains:
            low, high, actual = row.get("predicted_kwh_lower"), row.get("predicted_kwh_upper"), row["actual_kwh"]
            inside = low is not None and high is not None and low <= actual <= high
            console.print(
                f"  #{row['step']} {row['shift']}: predicted {_fmt(row.get('predicted_kwh'))} kWh [{_fmt(low)}, {_fmt(high)}], "
                f"measured {_fmt(actual)} kWh, {'inside' if inside else 'outside'} the interval "
                f"(epochs: predicted {_fmt(row.get('predicted_epochs'))}, ran {_fmt(row.get('actual_epochs'))}, {row.get('run_status')})",
                highlight=False,
            )
    budget = run.budget
    console.print(
        f"Budget {budget.get('name')}: {_fmt(budget.get('kwh_cap'))} kWh and {_fmt(budget.get('co2_cap'))} kg CO2e per month "
        f"({budget.get('retrains')} x a typical retrain's upper bound). Calibration: {run.calibration.get('points')} "
        f"retrains in {_fmt(run.calibration.get('wall_s'))} s; cost model on {', '.join(run.calibration.get('features', []))}.",
        highlight=False,
    )
    console.print(
        f"Wall time {run.wall_s:.0f} s; CPU time {run.cpu_s:.0f} s in this process and {run.cpu_children_s:.0f} s in child "
        "processes (Prefect's ephemeral API). "
        + "Stages: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in run.stages.items()) + ".",
        highlight=False,
    )
    console.print(Text.assemble("Report: ", (str(run.report), "bold")), highlight=False)
