"""``shiftcost demo``: the scenario's batches, the work folder, and one real run end to end."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from shiftcost.errors import InputError
from shiftcost.scenario import CLEAN, CORRUPT, DUPLICATE, Step, build_scenario, default_steps, demo_pools


def _stream(n: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.rand(n, 1, 8, 8, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def _arrays(payload: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def test_scenario_batches_carry_their_shift_and_labels():
    x, y = _stream()
    steps = [Step(CLEAN), Step("contrast", 0.5), Step(DUPLICATE, of=2), Step(CORRUPT)]
    built = build_scenario((x, y), steps, batch_size=20, seed=1)
    assert [b.file_name for b in built] == ["01-clean.npz", "02-contrast-0.5.npz", "03-duplicate-of-02.npz", "04-corrupt.npz"]
    clean, shifted = _arrays(built[0].payload), _arrays(built[1].payload)
    # A clean batch is a subset of the stream, untouched, with its labels.
    rows = {tuple(image.ravel().round(6)): label for image, label in zip(x.numpy(), y.numpy())}
    assert all(rows[tuple(image.ravel().round(6))] == label for image, label in zip(clean["x"], clean["y"]))
    # Contrast 0.5 halves each image's deviation from its mean: the spread shrinks by half.
    assert shifted["x"].shape == (20, 1, 8, 8) and shifted["y"].shape == (20,)
    assert shifted["x"].std(axis=(1, 2, 3)).mean() < 0.6 * clean["x"].std(axis=(1, 2, 3)).mean()
    # The duplicate is the same bytes (so the same content fingerprint), the corrupt file no archive.
    assert built[2].payload == built[1].payload
    with pytest.raises(Exception):
        _arrays(built[3].payload)


def test_scenario_is_reproducible_and_refuses_bad_steps(tmp_path):
    x, y = _stream()
    first = build_scenario((x, y), [Step("gaussian_noise", 0.1)], batch_size=10, seed=5)[0]
    again = build_scenario((x, y), [Step("gaussian_noise", 0.1)], batch_size=10, seed=5)[0]
    np.testing.assert_array_equal(_arrays(first.payload)["x"], _arrays(again.payload)["x"])
    path = first.write(tmp_path / "landing")
    assert path.read_bytes() == first.payload and not list((tmp_path / "landing").glob(".*"))
    with pytest.raises(InputError, match="not an earlier data batch"):
        build_scenario((x, y), [Step(DUPLICATE, of=1)], batch_size=10)
    with pytest.raises(InputError, match="unknown kind"):
        build_scenario((x, y), [Step("snow", 0.1)], batch_size=10)
    with pytest.raises(InputError, match="batch_size"):
        build_scenario((x, y), [Step(CLEAN)], batch_size=100)


def test_default_steps_mark_kinds_outside_the_calibration():
    steps = default_steps(["gaussian_noise", "contrast"])
    unseen = {step.kind for step in steps if step.unseen}
    assert unseen == {"gaussian_blur", "frost"}
    assert [step.kind for step in steps].count(CLEAN) == 2
    assert any(step.kind == DUPLICATE for step in steps) and steps[-1].kind == CORRUPT
    assert "impulse_noise" in {step.kind for step in default_steps(["frost", "gaussian_noise"]) if step.unseen}


def test_demo_pools_are_disjoint_parts_of_the_stream():
    (cx, cy), (sx, sy) = demo_pools(0, calibration_images=100)
    assert len(cy) == 100 and len(cy) + len(sy) == 540
    calibration = {tuple(image.ravel().tolist()) for image in cx}
    assert not any(tuple(image.ravel().tolist()) in calibration for image in sx)


def test_workdir_is_cleaned_on_rerun_and_foreign_folders_refused(tmp_path):
    from shiftcost.cli.demo import MARKER, prepare_workdir

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    with pytest.raises(InputError, match="not made by shiftcost demo"):
        prepare_workdir(foreign)
    assert (foreign / "thesis.tex").exists()

    work = prepare_workdir(tmp_path / "demo")
    (work / "landing").mkdir()
    (work / "landing" / "01-clean.npz").write_bytes(b"old")
    (work / "shiftcost.db").write_bytes(b"old")
    (work / "notes.txt").write_text("not the demo's")
    assert prepare_workdir(work) == work
    assert not (work / "landing").exists() and not (work / "shiftcost.db").exists()
    assert (work / "notes.txt").exists() and (work / MARKER).exists()


def _pngs(html: str) -> dict[str, bytes]:
    found = re.findall(r'<img id="plot-(\w+)"[^>]*src="data:image/png;base64,([^"]+)"', html)
    return {name: base64.b64decode(data, validate=True) for name, data in found}


@pytest.mark.slow
def test_demo_runs_end_to_end_in_a_fresh_folder(tmp_path):
    """A reduced demo (3 batches, quick calibration) through the real flows, in a subprocess."""
    from PIL import Image

    from shiftcost.report import PLOTS

    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "work"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SHIFTCOST_", "PREFECT_"))}
    env.update(HOME=str(home), PREFECT_API_URL="http://127.0.0.1:9/api", COLUMNS="200")
    # A caller's PREFECT_API_URL must not pull the demo off Prefect's ephemeral API.
    command = [sys.executable, "-c", "from shiftcost.cli import main; main()",
               "demo", "--workdir", str(work), "--batches", "3", "--quick"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    out = result.stdout
    assert "shiftcost demo: the stream" in out and "Wall time" in out
    report = work / "report.html"
    assert f"Report: {report}" in " ".join(out.split())
    summary = json.loads((work / "summary.json").read_text())
    assert [row["batch"] for row in summary["batches"]] == ["01-clean.npz", "02-gaussian_noise-0.08.npz", "03-clean.npz"]
    for row in summary["batches"]:
        assert row["status"] in ("done", "assessed") and row["decision"] in ("retrain", "skip", "defer")
        assert row["resque_dist"] is not None and row["drift"] in (True, False)
        if row["decision"] == "retrain":
            assert row["predicted_kwh_upper"] >= row["predicted_kwh"] >= 0 and row["actual_kwh"] > 0
            assert f"{row['actual_kwh']:.3g}" in out  # each retrain's measured energy is printed
    assert summary["budget"]["kwh_cap"] > 0 and summary["wall_s"] > 0

    pngs = _pngs(report.read_text(encoding="utf-8"))
    assert set(pngs) == set(PLOTS)
    for name, data in pngs.items():
        with Image.open(io.BytesIO(data)) as image:
            assert image.width >= 400 and len(image.convert("RGB").getcolors(1 << 16) or range(99)) > 20, name

    # Everything stayed in the work folder: Prefect's home included, nothing under ~/.prefect.
    assert (work / "prefect").is_dir() and not (home / ".prefect").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("timeout", "sentence"),
    [("x", r"Prefect refused a setting from the environment \(.*startup_timeout_seconds.*\); correct or unset"),
     # One second is too short for the API's subprocess to run its migrations on a fresh home.
     ("1", r"Prefect's ephemeral API did not answer within PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=1 s "
           r"\(Timed out .*\); run the demo again")],
)
def test_demo_that_cannot_start_prefect_says_why_in_one_sentence(tmp_path, timeout, sentence):
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SHIFTCOST_", "PREFECT_"))}
    env.update(HOME=str(tmp_path), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=timeout)
    command = [sys.executable, "-c", "from shiftcost.cli import main; main()",
               "demo", "--workdir", str(tmp_path / "work"), "--batches", "1", "--quick"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    [message] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert re.fullmatch(f"error: {sentence}.*", message), message


def test_a_retrain_that_did_not_simply_succeed_says_how_it_ended():
    from shiftcost.cli._demo_output import SHORT_OUTCOMES, short_reason, with_outcome
    from shiftcost.statuses import RetrainStatus

    allowed = short_reason([{"code": "within_budget", "effect": "allow", "blocking": False}])
    assert with_outcome(allowed, RetrainStatus.STOPPED_BY_BUDGET) == "fits the budget; then stopped by the budget guard"
    assert with_outcome(allowed, RetrainStatus.SUCCEEDED) == "fits the budget"
    assert with_outcome(allowed, None) == "fits the budget"
    # Every way a run can end other than success has its words.
    assert set(SHORT_OUTCOMES) == set(RetrainStatus) - {RetrainStatus.RUNNING, RetrainStatus.SUCCEEDED}
