"""A model's calibration replaced with the commands only: `shiftcost model cost-model`.

Each model forecasts with its own calibration, never with that of another model of its
architecture registered later.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from shiftcost.data import Batch, save_batch, save_model
from shiftcost.shifts import corrupt
from tests.forecast.helpers import bars, trained_bars
from tests.model.test_model_cli import run


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Path:
    """A small model, its reference data, a shifted batch, and one `shiftcost calibrate` folder."""
    root = tmp_path_factory.mktemp("rotation")
    model, spec, x, y = trained_bars()
    save_model(model, spec, root / "model.safetensors")
    save_batch(Batch(x, y, "reference"), root / "reference.npz")
    x_new, y_new = bars(seed=1)
    save_batch(Batch(corrupt(x_new, "gaussian_noise", 0.8, seed=1, clamp=True), y_new, "noisy"), root / "noisy.npz")
    code, _, err = run([
        "calibrate", "-m", root / "model.safetensors", "-r", root / "reference.npz", "-d", root / "reference.npz",
        "--sweep", "gaussian_noise=0,0.75,0.85", "--sweep", "contrast=0,0.72,0.78", "--repeats", "1", "--max-epochs", "4",
        "--device", "cpu", "--threads", "1", "--out", root / "calibration",
    ])  # fmt: skip
    assert code == 0, err
    assert (root / "calibration" / "costmodel.json").is_file()
    # What forecast and retrain --cost-model check a model file against.
    saved = json.loads((root / "calibration" / "forecaster.json").read_text())
    assert (saved["architecture"], saved["input_shape"]) == ("digits_cnn", "1x8x8")
    return root


def _edited_copy(root: Path, name: str, edit) -> Path:
    """The calibration folder as another sweep would have written it: ``edit`` changes its sweep settings."""
    copy = root / name
    shutil.copytree(root / "calibration", copy, dirs_exist_ok=True)
    sweep = json.loads((copy / "sweep.json").read_text())
    edit(sweep["settings"])
    (copy / "sweep.json").write_text(json.dumps(sweep))
    return copy


def test_a_new_calibration_replaces_the_models_own_and_a_later_sibling_does_not(calibrated: Path, tmp_path: Path) -> None:
    root = calibrated
    env = {
        "SHIFTCOST_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "SHIFTCOST_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
        "SHIFTCOST_DEVICE": "cpu",
        "SHIFTCOST_MODEL_NAME": "bars",
    }
    calibration = root / "calibration"

    def calibrations() -> list[dict]:
        code, out, err = run(["audit", "calibrations", "--json"], env)
        assert code == 0, err
        return [(row["architecture"], row["version"], row["model"]) for row in json.loads(out)["rows"]]

    code, _, err = run(["model", "cost-model", calibration], env)
    assert code == 2 and err.startswith("No model named bars is registered; register it first with `shiftcost model register")
    code, _, err = run(["model", "register", "-m", root / "model.safetensors", "-r", root / "reference.npz", "--cost-model", calibration], env)
    assert code == 0, err
    registered = calibrations()

    foreign = _edited_copy(root, "foreign", lambda settings: settings.update(architecture="resnet18"))
    other_recipe = _edited_copy(root, "other-recipe", lambda settings: settings["retrain"]["recipe"].update(lr=0.5))
    for folder, sentence in (
        (foreign, f"The cost model in {foreign / 'costmodel.json'} was calibrated on resnet18 at 1x8x8, not on digits_cnn at 1x8x8 like this model file"),
        (other_recipe, f"The cost model in {other_recipe / 'costmodel.json'} was calibrated with another recipe than the model's (lr differ)"),
        (tmp_path / "nowhere", f"Cost model file {tmp_path / 'nowhere'} does not exist"),
    ):
        code, _, err = run(["model", "cost-model", folder], env)
        assert code == 2 and err.startswith(sentence), err
        assert "\n" not in err.strip()
    assert calibrations() == registered  # nothing written

    code, out, err = run(["model", "cost-model", calibration / "costmodel.json", "--json"], env)
    assert code == 0, err
    attached = json.loads(out)
    assert (attached["name"], attached["version"], attached["architecture"]) == ("bars", 1, "digits_cnn")
    assert (attached["replaced_calibration_version"], attached["calibration_version"]) == (1, 2)
    assert attached["joules_per_sample_epoch"] > 0
    # Another model of the same architecture, registered afterwards: its calibration is the architecture's newest.
    code, _, err = run(["model", "register", "-m", root / "model.safetensors", "-r", root / "reference.npz", "--cost-model", calibration, "--name", "sibling"], env)
    assert code == 0, err
    newest = [row for row in calibrations() if row[0] == "digits_cnn"]
    assert newest == [("digits_cnn", 1, "bars"), ("digits_cnn", 2, "bars"), ("digits_cnn", 3, "sibling")]

    code, out, err = run(["assess", root / "noisy.npz", "--no-retrain", "--json"], env)
    assert code == 0, err
    assert json.loads(out)["assessment"]["prediction"] is not None
    code, out, err = run(["audit", "decisions", "--json"], env)
    (decision,) = json.loads(out)["rows"]
    code, out, err = run(["audit", "calibrations", "--model", "bars", "--json"], env)
    used = {row["calibration_id"]: (row["version"], row["model"]) for row in json.loads(out)["rows"]}
    assert used[decision["calibration_id"]] == (2, "bars")
