"""``shiftcost index`` and ``shiftcost reference`` on a tiny real model and real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from shiftcost.cli import app
from shiftcost.data import Batch, build_model, load_batch, load_model, save_batch, save_model
from shiftcost.data.demo import train_classifier
from shiftcost.errors import InputError
from shiftcost.index.engine import assess
from shiftcost.index.reference import ReferenceStats

REQUIRED_KEYS = {"resque_dist", "inv_ari", "layer_shift", "samples", "seconds", "device"}


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    # Tiny models: a second intra-op thread only adds scheduling waits on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-index")
    torch.manual_seed(0)
    model, spec = build_model("digits_cnn", 4, image_size=8)
    generator = torch.Generator().manual_seed(1)
    y = torch.arange(64) % 4
    x = (torch.rand(64, 1, 8, 8, generator=generator) * 0.5 + y[:, None, None, None] / 8).clamp(0, 1)
    shifted = (x * 0.6 + 0.3).clamp(0, 1)
    # `reference` refuses a model no better than chance, so the model learns the classes first.
    train_classifier(model, x, y, epochs=30, batch_size=16, seed=0)
    paths = {
        "model": save_model(model, spec, root / "model.safetensors"),
        "ref_batch": save_batch(Batch(x=x, y=y, source="reference"), root / "reference.pt"),
        "new": save_batch(Batch(x=shifted, y=y, source="new"), root / "new.npz"),
        "unlabelled": save_batch(Batch(x=shifted, y=None, source="new"), root / "unlabelled.pt"),
        "root": root,
    }
    result = CliRunner().invoke(
        app,
        ["reference", "--model", str(paths["model"]), "--data", str(paths["ref_batch"]), "--out", str(root / "ref.safetensors"), "--device", "cpu", "--json"],
    )
    assert result.exit_code == 0, result.output
    paths["stats"] = root / "ref.safetensors"
    assert json.loads(result.stdout)["accuracy"] > 0.5
    return paths


def test_reference_refuses_a_model_no_better_than_chance_unless_allowed(files: dict[str, Path], tmp_path: Path) -> None:
    torch.manual_seed(0)
    untrained = save_model(*build_model("digits_cnn", 4, image_size=8), tmp_path / "untrained.safetensors")
    out = tmp_path / "untrained-ref.safetensors"
    command = [*_shiftcost_command(), "reference", "-m", str(untrained), "-d", str(files["ref_batch"]), "-o", str(out), "--device", "cpu"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300, env=os.environ | {"COLUMNS": "400"})
    assert refused.returncode == 2, refused.stderr
    assert "no better than chance" in refused.stderr and "--allow-chance" in refused.stderr and "Traceback" not in refused.stderr
    assert not out.exists()
    allowed = invoke(*command[len(_shiftcost_command()) :], "--allow-chance", "--json")
    assert allowed.exit_code == 0, allowed.output
    assert out.exists() and "no better than chance" in json.loads(allowed.stdout)["suggestion"]


def invoke(*args: str) -> object:
    return CliRunner().invoke(app, list(args))


def test_reference_command_writes_stats_for_the_model(files: dict[str, Path]) -> None:
    model, _ = load_model(files["model"])
    stats = ReferenceStats.load(files["stats"], model=model)
    assert stats.samples == 64 and stats.layers == ("fc:input",)


def test_index_json_equals_the_library_result(files: dict[str, Path]) -> None:
    result = invoke("index", "--model", str(files["model"]), "--reference", str(files["stats"]), "--batch", str(files["new"]), "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert REQUIRED_KEYS <= set(data)
    assert "resque_task" not in data
    model, spec = load_model(files["model"])
    stats = ReferenceStats.load(files["stats"])
    batch = load_batch(files["new"], spec=spec)
    expected = assess(model, spec, stats, batch.x, batch.y, device="cpu")
    for key in ("resque_dist", "inv_ari", "layer_shift", "accuracy", "mean_entropy"):
        assert data[key] == pytest.approx(getattr(expected, key), abs=1e-12), key
    assert data["samples"] == 64 and data["device"] == "cpu"


def test_index_table_and_reference_batch_on_the_fly(files: dict[str, Path]) -> None:
    out = files["root"] / "on-the-fly.safetensors"
    result = invoke(
        "index", "--model", str(files["model"]), "--reference", str(files["ref_batch"]), "--batch", str(files["unlabelled"]),
        "--save-reference", str(out), "--layer", "fc:input", "--layer", "features.6", "--device", "cpu",
    )
    assert result.exit_code == 0, result.output
    for label in ("RESQUE_dist (predicted)", "inv_ARI", "layer shift", "features.6"):
        assert label in result.stdout
    assert ReferenceStats.load(out).layers == ("fc:input", "features.6")


def test_task_flag(files: dict[str, Path]) -> None:
    result = invoke("index", "-m", str(files["model"]), "-r", str(files["stats"]), "-b", str(files["new"]), "--task", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["task_change"] is True and 0.0 <= data["resque_task"] <= 2.0
    result = invoke("index", "-m", str(files["model"]), "-r", str(files["stats"]), "-b", str(files["unlabelled"]), "--task", "--device", "cpu")
    assert isinstance(result.exception, InputError) and "labels" in str(result.exception)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layer", "features.66"], "Close matches"),
        (["--reference", "STATS", "--layer", "features.6"], "cover layers fc:input but layers features.6"),
        (["--batch", "MISSING"], "does not exist"),
        (["--reference", "MODEL"], "holds no shiftcost reference stats"),
        (["--reference", "STATS", "--save-reference", "x.safetensors"], "already a stats file"),
    ],
)
def test_bad_input_raises_input_error(files: dict[str, Path], args: list[str], message: str) -> None:
    replace = {"STATS": str(files["stats"]), "MISSING": str(files["root"] / "missing.pt"), "MODEL": str(files["model"])}
    base = {"--model": str(files["model"]), "--reference": str(files["ref_batch"]), "--batch": str(files["new"])}
    given = [replace.get(a, a) for a in args]
    for flag in list(base):
        if flag in given:
            base.pop(flag)
    command = ["index", *[item for pair in base.items() for item in pair], *given, "--device", "cpu"]
    result = invoke(*command)
    assert result.exit_code != 0
    assert isinstance(result.exception, InputError), result.output
    assert message in str(result.exception)


def test_help_texts() -> None:
    for command in ("index", "reference"):
        result = invoke(command, "--help")
        assert result.exit_code == 0 and "--model" in result.stdout
    for command in (["model", "import"], ["retrain"]):
        result = invoke(*command, "--help")
        assert result.exit_code == 0 and "[recipe] table" in " ".join(result.stdout.replace("│", " ").split())


def _shiftcost_command() -> list[str]:
    script = Path(sys.executable).with_name("shiftcost")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from shiftcost.cli import main; main()"]


def test_real_process_json_and_clean_failure(files: dict[str, Path]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*_shiftcost_command(), "index", "--model", str(files["model"]), "--reference", str(files["stats"]), "--batch", str(files["new"]), "--json", "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert REQUIRED_KEYS <= set(data) and data["samples"] == 64

    # Brackets in a file name are text, not a console style tag.
    broken = files["root"] / "broken[v1].safetensors"
    broken.write_bytes(files["stats"].read_bytes()[:100])
    failed = subprocess.run(
        [*_shiftcost_command(), "index", "--model", str(files["model"]), "--reference", str(broken), "--batch", str(files["new"]), "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert failed.returncode != 0
    assert failed.stdout == ""
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1, failed.stderr
    assert "Traceback" not in failed.stderr and "broken[v1].safetensors" in lines[0]
