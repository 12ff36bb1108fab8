"""Artifacts at any fsspec URL, and a model version's stored data bounded whatever its history."""

from __future__ import annotations

import dataclasses
import importlib
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch

from shiftcost.artifacts import reading, writing

IMAGE_SIZE = 8


def images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator), torch.randint(0, 10, (count,), generator=generator)


@pytest.fixture(params=["memory", "file"])
def artifacts_url(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "memory":
        folder = f"/artifacts-{uuid.uuid4().hex}"
        yield f"memory://{folder}"
        memory = fsspec.filesystem("memory")
        if memory.exists(folder):
            memory.rm(folder, recursive=True)
    else:
        yield f"file://{tmp_path / 'artifacts'}"


def test_a_failed_write_leaves_nothing_and_a_written_artifact_reads_back(artifacts_url: str) -> None:
    target = f"{artifacts_url}/reports/a.html"
    with pytest.raises(RuntimeError), writing(target) as path:
        path.write_text("half")
        raise RuntimeError("the writer crashed")
    if artifacts_url.startswith("memory://"):  # a local writer is atomic on its own; the upload must be too
        assert not fsspec.filesystem("memory").exists(target.removeprefix("memory://"))

    with writing(target) as path:
        path.write_text("whole")
    with reading(target) as path:
        assert path.read_text() == "whole"
    fs, stored = fsspec.core.url_to_fs(target)
    assert fs.cat_file(stored) == b"whole"


def test_model_versions_live_at_the_artifacts_url_and_store_a_bounded_replay_sample(
    db: Any, database_url: str, artifacts_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    from shiftcost.config import load_settings
    from shiftcost.data import build_model, load_batch
    from shiftcost.data.batches import Batch
    # The modules themselves: the package exports functions of the same names.
    bootstrap_steps = importlib.import_module("shiftcost.pipeline.bootstrap")
    retrain_steps = importlib.import_module("shiftcost.pipeline.retrain")
    from shiftcost.pipeline.assess import load_model_and_reference
    from shiftcost.pipeline.claims import Claim
    from shiftcost.store.models import utcnow

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SHIFTCOST_CONFIG", raising=False)
    limit = 100
    settings = load_settings(database_url=database_url, artifacts_dir=artifacts_url, model_name="digits", device="cpu", reference_replay_samples=limit)
    torch.manual_seed(0)
    model, spec = build_model("digits_cnn", 10, in_channels=1, image_size=IMAGE_SIZE)
    x_ref, y_ref = images(150, seed=1)

    version = bootstrap_steps.register_model_version(db, settings, model, spec, x_ref, y_ref)

    for uri in (version.weights_uri, version.reference_uri, version.reference_data_uri):
        assert uri.startswith(artifacts_url.removeprefix("file://"))
        fs, path = fsspec.core.url_to_fs(uri)
        assert fs.exists(path)
    loaded_model, loaded_spec, reference = load_model_and_reference("digits", version.version, version.weights_uri, version.reference_uri)
    assert loaded_spec == spec and reference.fingerprint
    with reading(version.reference_data_uri) as path:
        stored = load_batch(path)
    assert len(stored) == limit  # 150 given, 100 kept

    parent_uri, parent = version.reference_data_uri, stored
    stored_sizes, concatenated = [], limit
    for run_id, seed in ((1, 2), (2, 3), (3, 4)):
        x_new, y_new = images(80, seed=seed)
        inputs = retrain_steps.RetrainInputs(
            job=retrain_steps.RetrainJob(Claim(run_id, "retraining", utcnow()), decision_id=run_id, run_id=run_id),
            model_id=version.model_id, model_name="digits", model_version=run_id, model=loaded_model, spec=spec,
            reference=reference, reference_data_uri=parent_uri, data=Batch(x_new, y_new, f"batch-{run_id}"),
            features={}, source_uri=f"batch-{run_id}.npz",
        )  # fmt: skip
        result = _reached(loaded_model)

        new_version = retrain_steps.build_new_version(settings, inputs, result)

        with reading(new_version.reference_data_path) as path:
            sample = load_batch(path)
        stored_sizes.append(len(sample))
        concatenated += 80
        pool = torch.cat([parent.x, x_new]).flatten(1)
        assert all(bool((pool == row).all(dim=1).any()) for row in sample.x.flatten(1))  # drawn from parent and batch
        assert new_version.reference.samples <= limit
        assert new_version.weights_path.startswith(artifacts_url.removeprefix("file://"))
        parent_uri, parent = new_version.reference_data_path, sample
    assert stored_sizes == [limit] * 3 and concatenated == 340  # the old concatenation would keep 180, 260, 340


def _reached(model: Any) -> Any:
    """A retraining that reached its cutoff by training (what build_new_version needs to know)."""
    from shiftcost.retrain import RetrainResult

    required = {f.name: None for f in dataclasses.fields(RetrainResult) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    return RetrainResult(**(required | {"status": "reached", "reached_cutoff": True, "steps": 3}), model=model)
