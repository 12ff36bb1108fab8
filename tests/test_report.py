"""The HTML report, rendered from seeded SQLite and PostgreSQL databases.

Expected figures come from the seed below, not from the report code: each embedded plot
must decode to a real, non-blank PNG, and the tables must show the seeded numbers.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest

from shiftcost.report import PLOTS, batch_overview, burn_down, ledger_timeline, write_report
from shiftcost.store import audit, ledger
from shiftcost.store import repository as repo

KWH_CAP, CO2_CAP = 0.005, 0.002
INTENSITY = 0.4  # kg CO2e per kWh in the seed


@dataclass
class Seeded:
    """What was written, for the assertions."""

    model: str = "digits"
    names: dict[str, int] = field(default_factory=dict)  # file name -> batch id
    predicted: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # kWh point, lower, upper
    actual: dict[str, float] = field(default_factory=dict)  # kWh measured
    indices: dict[str, float] = field(default_factory=dict)  # resque_dist
    failure: str = ""
    defer_reason: str = ""


def _seed(db) -> Seeded:
    """A small stream: clean (skip), two retrains (one outside its interval), a deferral, a failed file."""
    seeded = Seeded()
    with db.session() as session:
        ledger.create_budget(session, "monthly-demo", period="monthly", kwh_cap=KWH_CAP, co2_cap=CO2_CAP)
    plan = [
        # name, resque_dist, drifted, predicted (point, lower, upper) or None, action, actual kWh
        ("01-clean.npz", 0.02, False, None, "skip", None),
        ("02-gaussian_noise-0.2.npz", 0.41, True, (0.0010, 0.0005, 0.0020), "retrain", 0.0012),
        ("03-gaussian_blur-1.25.npz", 0.58, True, (0.0015, 0.0008, 0.0022), "retrain", 0.0025),
        ("04-contrast-0.4.npz", 0.66, True, (0.0020, 0.0011, 0.0040), "defer", None),
    ]
    with db.session() as session:
        model = repo.register_model(session, seeded.model, "digits_cnn", layers=["fc1"], classes=list(range(10)))
        calibration = repo.add_calibration(session, "digits_cnn", "sweep", {"rows": []}, {"format": 1}, n_points=12,
                                           model_id=model.id, loo_error=23.5, interval_level=0.9)
        calibration_id = calibration.id
        model_id = model.id
    for number, (name, dist, drifted, predicted, action, actual) in enumerate(plan):
        with db.session() as session:
            batch, _ = repo.register_batch(session, model_id, f"/data/landing/{name}", f"fp-{number}", 200, True)
            seeded.names[name] = batch.id
            seeded.indices[name] = dist
            for feature_set in ("embeddings", "image_stats"):
                repo.add_drift_report(session, batch.id, "model", feature_set, drifted, score=dist, threshold=0.55)
            run = repo.add_index_run(session, batch.id, model_id, 200, resque_dist=dist, inv_ari=dist / 2,
                                     layer_shift=dist * 3, preindex_p=1 - dist, accuracy=0.98 - dist)
            prediction_id = None
            if predicted is not None:
                point, low, high = predicted
                seeded.predicted[name] = predicted
                prediction_id = repo.add_cost_prediction(
                    session, run.id, 2.0, point, point * INTENSITY, energy_kwh_lower=low, energy_kwh_upper=high,
                    emissions_kg_lower=low * INTENSITY, emissions_kg_upper=high * INTENSITY, interval_level=0.9,
                    epochs_lower=1.0, epochs_upper=4.0, calibration_id=calibration_id,
                ).id
            if action == "skip":
                reasons = [{"code": "no_drift", "message": "No drift was detected in the batch.", "effect": "skip",
                            "blocking": True, "budget": None}]
            elif action == "defer":
                seeded.defer_reason = "Budget monthly-demo has too little left this month, so the batch is deferred."
                reasons = [{"code": "drift_detected", "message": "Drift was detected.", "effect": "allow", "blocking": False},
                           {"code": "budget", "message": seeded.defer_reason, "effect": "defer", "blocking": True,
                            "budget": "monthly-demo"}]
            else:
                reasons = [{"code": "drift_detected", "message": "Drift was detected.", "effect": "allow", "blocking": False}]
            decision = repo.record_decision(session, batch.id, action, reasons, cost_prediction_id=prediction_id,
                                            blocked_by_budget=action == "defer")
            if action == "retrain":
                point, _, high = predicted
                reservation = ledger.reserve(session, "monthly-demo", high, high * INTENSITY, decision.id)
                retrain = repo.start_retrain_run(session, model_id, decision_id=decision.id, batch_id=batch.id)
                repo.finish_retrain_run(session, retrain.id, "succeeded", epochs=2.5, energy_kwh=actual,
                                        emissions_kg=actual * INTENSITY, energy_method="estimated")
                ledger.settle(session, reservation, actual, actual * INTENSITY)
                seeded.actual[name] = actual
    with db.session() as session:
        failed, _ = repo.register_batch(session, model_id, "/data/landing/05-corrupt.npz", "fp-bad", 0, False)
        seeded.failure = "Batch 05-corrupt.npz is not a readable .npz archive; save it with numpy.savez."
        repo.set_batch_status(session, failed.id, "failed", seeded.failure)
        seeded.names["05-corrupt.npz"] = failed.id
    return seeded


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, str] = {}
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img" and values.get("id", "").startswith("plot-"):
            self.images[values["id"].removeprefix("plot-")] = values.get("src") or ""
        if tag == "script":
            self.text.append("<script>")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(path: Path) -> _Images:
    parser = _Images()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _check_png(src: str, name: str) -> None:
    from PIL import Image

    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), f"{name} is not an embedded PNG"
    raw = base64.b64decode(src[len(prefix):], validate=True)
    with Image.open(io.BytesIO(raw)) as image:
        image.load()
        assert image.format == "PNG"
        assert image.width >= 400 and image.height >= 200, f"{name} is only {image.size}"
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        # Blank or single-colour images have one colour; drawn axes, text and markers have many.
        assert colours is None or len(colours) > 20, f"{name} has {len(colours or [])} colours"
        # Not almost all background: some share of the pixels must be drawn.
        background = max(colours)[0] if colours else 0
        assert background < 0.995 * image.width * image.height, f"{name} is nearly blank"


@pytest.fixture
def seeded(db) -> Seeded:
    return _seed(db)


def test_report_embeds_every_plot_as_a_decodable_png(db, seeded, tmp_path):
    summary = write_report(db, tmp_path / "report.html")
    parsed = _parse(summary.path)
    assert set(parsed.images) == set(PLOTS)
    for name, src in parsed.images.items():
        _check_png(src, name)
    assert "<script>" not in parsed.text
    assert summary.batches == 5 and summary.decisions == 4 and summary.retrain_runs == 2


def test_report_tables_show_the_seeded_figures(db, seeded, tmp_path):
    path = write_report(db, tmp_path / "report.html").path
    text = " ".join(_parse(path).text)
    for name in seeded.names:
        assert name in text
    for point, low, high in seeded.predicted.values():
        assert f"[{low:.4g}, {high:.4g}]" in text
        assert f"{point:.4g}" in text
    for name, actual in seeded.actual.items():
        point = seeded.predicted[name][0]
        assert f"{actual:.4g}" in text
        assert f"{100 * (point - actual) / actual:+.1f}%" in text
    remaining = KWH_CAP - sum(seeded.actual.values())
    assert f"{remaining:.4g}" in text
    assert seeded.failure in text
    assert seeded.defer_reason in text
    assert f"{seeded.indices['03-gaussian_blur-1.25.npz']:.4g}" in text


def test_batch_overview_pairs_each_batch_with_its_own_prediction_and_run(db, seeded):
    with db.session(readonly=True) as session:
        rows = {row["name"]: row for row in batch_overview(session)}
    assert list(rows) == list(seeded.names)
    for name, row in rows.items():
        assert row["batch_id"] == seeded.names[name]
        expected = seeded.predicted.get(name)
        got = None if row["predicted_kwh"] is None else (row["predicted_kwh"], row["predicted_kwh_lower"], row["predicted_kwh_upper"])
        assert got == (pytest.approx(expected) if expected else None)
        assert row["actual_kwh"] == (pytest.approx(seeded.actual[name]) if name in seeded.actual else None)
    assert rows["01-clean.npz"]["drift"] is False and rows["02-gaussian_noise-0.2.npz"]["drift"] is True
    assert rows["05-corrupt.npz"]["drift"] is None and rows["05-corrupt.npz"]["status"] == "failed"
    assert rows["04-contrast-0.4.npz"]["action"] == "defer"


def test_burn_down_ends_where_the_audit_says_the_budget_stands(db, seeded):
    with db.session(readonly=True) as session:
        series = burn_down(ledger_timeline(session))
        burn = audit.budget_burn(session)
    points = series["monthly-demo"]
    assert [p["kind"] for p in points] == ["reserve", "settle", "reserve", "settle"]
    expected_kwh = KWH_CAP - sum(seeded.actual.values())
    assert points[-1]["remaining_kwh"] == pytest.approx(expected_kwh)
    assert points[-1]["remaining_co2"] == pytest.approx(CO2_CAP - INTENSITY * sum(seeded.actual.values()))
    # After the first reservation only its upper bound is held.
    first_upper = seeded.predicted["02-gaussian_noise-0.2.npz"][2]
    assert points[0]["remaining_kwh"] == pytest.approx(KWH_CAP - first_upper)
    assert burn.rows[-1]["remaining_kwh"] == pytest.approx(points[-1]["remaining_kwh"])


def test_report_filters_by_model_and_time(db, seeded, tmp_path):
    other = write_report(db, tmp_path / "other.html", model="no-such-model")
    assert other.batches == 0 and other.decisions == 0
    for name, src in _parse(other.path).images.items():
        _check_png(src, name)  # placeholders are drawn, not blank
    future = datetime.now(UTC) + timedelta(days=1)
    assert write_report(db, tmp_path / "future.html", since=future).batches == 0
    assert write_report(db, tmp_path / "all.html", model="digits", until=future).batches == 5


def test_report_escapes_text_from_the_database(db, tmp_path):
    with db.session() as session:
        model = repo.register_model(session, "m", "digits_cnn")
        batch, _ = repo.register_batch(session, model.id, "/in/<img src=x onerror=alert(1)>.npz", "fp", 1, False)
        repo.set_batch_status(session, batch.id, "failed", "bad <b>file</b>")
    path = write_report(db, tmp_path / "r.html").path
    raw = path.read_text(encoding="utf-8")
    assert "<img src=x" not in raw and "&lt;img src=x onerror=alert(1)&gt;.npz" in raw
    assert "bad &lt;b&gt;file&lt;/b&gt;" in raw


def test_a_script_in_a_table_cell_or_note_comes_out_as_text(db, tmp_path):
    with db.session() as session:
        model = repo.register_model(session, "m", "digits_cnn")
        batch, _ = repo.register_batch(session, model.id, "/in/x.npz", "fp", 1, False)
        repo.set_batch_status(session, batch.id, "failed", "<script>alert('cell')</script>")
    path = write_report(db, tmp_path / "r.html", title="<script>t</script>", notes=["<script>alert('note')</script>"]).path
    raw = path.read_text(encoding="utf-8")
    assert "<script>" not in raw
    assert "<td class=\"failed\">failed: &lt;script&gt;alert(&#39;cell&#39;)&lt;/script&gt;</td>" in raw
    assert "&lt;script&gt;alert(&#39;note&#39;)&lt;/script&gt;" in raw and "<title>&lt;script&gt;t&lt;/script&gt;</title>" in raw
    assert "<script>" not in _parse(path).text


def test_report_refuses_a_folder_as_output(db, tmp_path):
    from shiftcost.errors import InputError

    with pytest.raises(InputError, match="is a folder"):
        write_report(db, tmp_path)


def test_cli_report_writes_the_file_and_prints_json(database_url, tmp_path):
    from typer.testing import CliRunner

    from shiftcost.cli import app
    from shiftcost.store import open_database

    database = open_database(database_url)
    try:
        seeded = _seed(database)
    finally:
        database.dispose()
    out = tmp_path / "cli.html"
    result = CliRunner().invoke(app, ["report", "--out", str(out), "--json", "--database-url", database_url,
                                      "--model", seeded.model])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["path"] == str(out.resolve()) and payload["plots"] == list(PLOTS)
    assert payload["batches"] == 5 and payload["retrain_runs"] == 2
    assert set(_parse(out).images) == set(PLOTS)
    for wrong, sentence in ((["--model", "no-such-model"], "No model is named 'no-such-model'"),
                            (["--since", "2027-01-01", "--until", "2026-01-01"], "is not before --until")):
        refused = CliRunner().invoke(app, ["report", "--out", str(tmp_path / "no.html"), "--database-url", database_url, *wrong])
        assert refused.exit_code != 0 and sentence in str(refused.exception) and not (tmp_path / "no.html").exists()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # a browser check needs one backend
def test_report_renders_in_headless_chromium(db, seeded, tmp_path):
    """Optional: the images really display in a browser (skipped when Chromium is absent)."""
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if browser is None:
        pytest.skip("Chromium is not installed")
    path = write_report(db, tmp_path / "report.html").path
    script = ("Array.from(document.images).map(i => i.complete && i.naturalWidth > 0).every(Boolean) "
              "&& document.images.length")
    probe = tmp_path / "probe.html"
    probe.write_text(path.read_text(encoding="utf-8").replace(
        "</body>", f"<p id=ok></p><script>document.getElementById('ok').textContent = 'images:' + ({script});</script></body>"))
    result = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", probe.as_uri()],
                            capture_output=True, text=True, timeout=60)
    assert f"images:{len(PLOTS)}" in result.stdout
