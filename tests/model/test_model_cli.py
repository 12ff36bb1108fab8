"""Your own model, commands only: import, reference, calibrate, register, assess, audit.

The model is trained here in plain PyTorch (``tests/model/story.py`` never imports
shiftcost); everything after that is the ``shiftcost`` command line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from shiftcost.cli import app
from shiftcost.errors import ShiftcostError
from tests.model import story

MEAN = ",".join(str(v) for v in story.IMAGENET_MEAN)
STD = ",".join(str(v) for v in story.IMAGENET_STD)
# Shifts strong enough that retraining is needed, and enough of them (>= 9 runs of known
# cost) for the conformal cost model to fit.
SWEEP = ["--sweep", "gaussian_noise=0,0.6,0.65,0.7,0.75,0.8,0.9", "--sweep", "contrast=0,0.5,0.55,0.6,0.65,0.7,0.8"]
SMALL = ["--repeats", "1", "--max-epochs", "4", "--device", "cpu", "--threads", "1"]
# The model's own recipe, carried by its file: calibrate and the pipeline both use it.
RECIPE = "[recipe]\noptimizer = \"adam\"\nlr = 0.001\nbatch_size = 16\n"


def run(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) as `shiftcost` gives them: a ShiftcostError is one sentence and its code."""
    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    if isinstance(result.exception, ShiftcostError):
        return result.exception.exit_code, result.stdout, str(result.exception)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """What the user brings: ImageFolders, a resnet18 trained with Normalize, a custom module's weights."""
    from safetensors.torch import save_file

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("user")
    x_ref, y_ref = story.stripes(96, 0)
    x_new, y_new = story.stripes(96, 1)
    story.write_folder(root / "ref", x_ref, y_ref)
    story.write_folder(root / "new", x_new, y_new)
    x_shift, y_shift = story.stripes(96, 2, noise=0.45)
    story.write_folder(root / "shifted", x_shift, y_shift)

    x, y = story.read_folder(root / "ref", normalize=True)
    torch.manual_seed(0)  # the initial weights, whatever ran before in this process
    resnet = story.train(torchvision.models.resnet18(num_classes=4), x, y, epochs=8, lr=0.01)
    torch.save(resnet.state_dict(), root / "resnet18.pt")
    x_plain, _ = story.read_folder(root / "ref", normalize=False)
    torch.manual_seed(0)
    tiny = story.train(story.build_tiny(), x_plain, y, epochs=8)
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(root / "tiny.safetensors"))
    accuracies = {"resnet18": story.accuracy(resnet, x, y), "tiny": story.accuracy(tiny, x_plain, y)}
    yield root, accuracies
    torch.set_num_threads(threads)


def _env(root: Path, name: str) -> dict[str, str]:
    return {
        "SHIFTCOST_DATABASE_URL": f"sqlite:///{root / name}.db",
        "SHIFTCOST_ARTIFACTS_DIR": str(root / f"{name}-artifacts"),
        "SHIFTCOST_DEVICE": "cpu",
        "SHIFTCOST_MODEL_NAME": name,
        "SHIFTCOST_DRIFT_MAX_ROWS": "50",
    }


def _story(root: Path, name: str, import_flags: list[str], pytorch_accuracy: float) -> None:
    env = _env(root, name)
    model = root / f"{name}.safetensors"
    (root / "recipe.toml").write_text(RECIPE)
    code, out, err = run(["model", "import", *import_flags, "--recipe", root / "recipe.toml", "--data", root / "ref", "-o", model, "--json"], env)
    assert code == 0, err
    imported = json.loads(out)
    assert imported["accuracy"]["accuracy"] == pytest.approx(pytorch_accuracy, abs=0.01)
    assert imported["accuracy"]["suggestion"] is None
    assert imported["spec"]["recipe"]["batch_size"] == 16

    code, out, err = run(["reference", "-m", model, "-d", root / "ref", "-o", root / f"{name}-ref.safetensors", "--device", "cpu", "--json"], env)
    assert code == 0, err
    assert json.loads(out)["accuracy"] == pytest.approx(pytorch_accuracy, abs=0.01)

    calibration = root / f"{name}-calibration"
    code, out, err = run(["calibrate", "-m", model, "-r", root / "ref", "-d", root / "new", *SWEEP, *SMALL, "--out", calibration, "--json"], env)
    assert code == 0, err
    assert (calibration / "costmodel.json").is_file(), json.loads(out).get("cost_model_error")

    code, out, err = run(["model", "register", "-m", model, "-r", root / "ref", "--cost-model", calibration / "costmodel.json", "--json"], env)
    assert code == 0, err
    registered = json.loads(out)
    assert registered["version"] == 1 and registered["cost_model_version"] is not None
    assert registered["reference_accuracy"] == pytest.approx(pytorch_accuracy, abs=0.01)
    # The pipeline prices with the rate calibration fitted on its measured retrains, as `forecast` does.
    fitted_rate = json.loads((calibration / "forecaster.json").read_text())["energy_rate"]
    assert registered["joules_per_sample_epoch"] == pytest.approx(fitted_rate["joules_per_sample"])

    code, out, err = run(["assess", root / "shifted", "--no-retrain", "--json"], env)
    assert code == 0, err
    assessed = json.loads(out)
    assessment = assessed["assessment"]
    assert assessment["processed"] and assessment["action"] in ("retrain", "skip", "defer")
    assert assessment["prediction"] is not None and assessment["prediction"]["energy_kwh"] is not None

    code, out, err = run(["audit", "decisions", "--json"], env)
    assert code == 0, err
    assert str(root / "shifted") in out

    code, out, err = run(["model", "list", "--json"], env)
    assert code == 0, err
    (version,) = json.loads(out)
    assert version["current"] and version["status"] == "active"


def test_resnet18_trained_with_normalize_goes_through_the_commands(user) -> None:
    root, accuracies = user
    flags = [root / "resnet18.pt", "--arch", "resnet18", "--image-size", "32", "--mean", MEAN, "--std", STD]
    _story(root, "resnet", flags, accuracies["resnet18"])


def test_a_custom_module_through_a_factory_goes_through_the_commands(user) -> None:
    root, accuracies = user
    flags = [root / "tiny.safetensors", "--factory", "tests.model.story:build_tiny", "--image-size", "32"]
    _story(root, "tiny", flags, accuracies["tiny"])


def test_the_resnet18_imported_without_its_normalisation_gets_the_sentence(user) -> None:
    root, accuracies = user
    out = root / "plain.safetensors"
    code, stdout, err = run(["model", "import", root / "resnet18.pt", "--arch", "resnet18", "--image-size", "32", "--data", root / "ref", "-o", out, "--json"])
    # Either common normalisation may fix it (on these stripes [-1, 1] does nearly as well as ImageNet's),
    # and so may the images' own per-channel statistics, to 4 significant digits (on some CPUs they
    # score a little above ImageNet's).
    pixels, _ = story.read_folder(root / "ref", normalize=False)
    own_std, own_mean = torch.std_mean(pixels, dim=(0, 2, 3), correction=0)
    own = (tuple(float(f"{v:.4g}") for v in own_mean.tolist()), tuple(float(f"{v:.4g}") for v in own_std.tolist()))
    fixes = [f"--mean {','.join(f'{v:g}' for v in mean)} --std {','.join(f'{v:g}' for v in std)}" for mean, std in (
        (story.IMAGENET_MEAN, story.IMAGENET_STD), ((0.5,) * 3, (0.5,) * 3), own)]  # fmt: skip
    if code == 2:  # fed raw pixels the model is at chance: refused, with the fix named
        sentence = err
        assert "no better than chance" in sentence and not out.exists()
    else:  # above chance but much worse: imported, with the sentence
        assert code == 0, err
        check = json.loads(stdout)["accuracy"]
        assert check["accuracy"] < accuracies["resnet18"] - 0.1
        assert check["alternatives"]["ImageNet's mean/std"] == pytest.approx(accuracies["resnet18"], abs=0.01)
        sentence = check["suggestion"]
    assert any(fix in sentence for fix in fixes)
    named = float(sentence.split(" it is ")[-1][:4]) if " it is " in sentence else float(sentence.split(", but ")[1][:4])
    assert named >= accuracies["resnet18"] - 0.02  # the named normalisation does fix it
    assert sentence.count(". ") == 0 and sentence.endswith(".")  # one sentence


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--arch", "resnet81"], "Unknown model architecture 'resnet81'"),
        (["--factory", "tests.model.no_such_module:build"], "does not import"),
        (["--factory", "tests.model.story:not_a_module"], "not a torch nn.Module"),
        (["--arch", "resnet18", "--mean", "0.5,0.5", "--std", "0.2,0.2"], "mean has 2 values but the model takes 3 input channels"),
        (["--arch", "resnet18", "--mean", "0.5", "--std", "0.2"], "--channels of shiftcost model import"),
        (["--arch", "resnet34"], "does not match architecture 'resnet34'"),
    ],
)
def test_bad_imports_are_one_sentence_exit_2_and_write_nothing(user, flags, fragment) -> None:
    root, _ = user
    out = root / "bad.safetensors"
    code, _, err = run(["model", "import", root / "resnet18.pt", *flags, "--image-size", "32", "--classes", "4", "-o", out])
    assert code == 2
    assert fragment in err and "\n" not in err.strip() and "Traceback" not in err
    assert not out.exists()


def test_a_whole_saved_model_and_weights_without_a_spec_get_sentences_that_name_the_fix(user, tmp_path) -> None:
    root, _ = user
    whole = tmp_path / "whole.pt"
    torch.save(torchvision.models.resnet18(num_classes=4), whole)
    code, _, err = run(["model", "import", whole, "--arch", "resnet18", "--image-size", "32", "--classes", "4", "-o", tmp_path / "o.safetensors"])
    assert code == 2 and "\n" not in err.strip() and "\x1b" not in err
    assert "a whole model saved with torch.save(model)" in err and "torch.save(model.state_dict(), path)" in err
    # Weights with no spec given to a command that takes no architecture: the fix is `model import`.
    code, _, err = run(["reference", "-m", root / "resnet18.pt", "-d", root / "ref", "-o", tmp_path / "ref.safetensors"])
    assert code == 2 and "holds weights but no model spec" in err and "`shiftcost model import`" in err


def test_a_wrong_weights_path_is_said_before_any_missing_option(tmp_path) -> None:
    code, _, err = run(["model", "import", tmp_path / "nothere.pt", "--arch", "resnet18", "--image-size", "32", "-o", tmp_path / "o.safetensors"])
    assert code == 2 and "Weights file" in err and "does not exist" in err and "--classes" not in err


def test_classes_read_from_data_folders_that_disagree_with_the_weights_say_where_they_came_from(user, tmp_path) -> None:
    import shutil

    root, _ = user
    two = tmp_path / "two"
    for name in sorted(p.name for p in (root / "ref").iterdir())[:2]:
        shutil.copytree(root / "ref" / name, two / name)
    out = tmp_path / "resnet.safetensors"
    code, _, err = run(["model", "import", root / "resnet18.pt", "--arch", "resnet18", "--image-size", "32", "--data", two, "-o", out])
    assert code == 2 and not out.exists()
    assert f"has 4 outputs but 2 classes come from the sub-folders of {two}; give --classes with the model's 4 class names" in err
    assert "\n" not in err.strip() and "Traceback" not in err



def test_class_names_come_from_a_tensor_files_classes_array_and_one_sentence_says_when_there_is_none(user, tmp_path) -> None:
    import numpy as np

    root, accuracies = user
    x, y = story.read_folder(root / "ref", normalize=False)
    named, unnamed = tmp_path / "ref.npz", tmp_path / "ref-unnamed.npz"
    np.savez(named, x=x.numpy(), y=y.numpy(), classes=np.array(story.CLASSES))
    np.savez(unnamed, x=x.numpy(), y=y.numpy())
    flags = [root / "tiny.safetensors", "--factory", "tests.model.story:build_tiny", "--image-size", "32", "--json"]

    code, out, err = run(["model", "import", *flags, "--data", named, "-o", tmp_path / "tiny.safetensors"])
    assert code == 0, err
    imported = json.loads(out)
    assert imported["spec"]["classes"] == list(story.CLASSES)
    assert imported["accuracy"]["accuracy"] == pytest.approx(accuracies["tiny"], abs=0.01)

    code, _, err = run(["model", "import", *flags, "--data", unnamed, "-o", tmp_path / "unnamed.safetensors"])
    assert code == 2 and not (tmp_path / "unnamed.safetensors").exists()
    assert "or an .npz/.pt file with a classes array" in err and "\n" not in err.strip()
