"""Reference stats: contents checked against the captured features, file round trip, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from shiftcost.data.models import save_model
from shiftcost.errors import InputError
from shiftcost.index.capture import capture_features
from shiftcost.index.engine import compute_reference_stats
from shiftcost.index.reference import ReferenceStats

from .engine_support import single_thread  # noqa: F401 - autouse fixture
from .engine_support import LAYERS, NUM_CLASSES, tiny_data, tiny_model


@pytest.fixture(scope="module")
def built() -> tuple:
    model, spec = tiny_model(double=True)
    x, y = tiny_data(90, double=True)
    stats = compute_reference_stats(model, spec, x, y, layers=LAYERS, batch_size=16, device="cpu", max_samples=50, seed=3)
    features, logits = capture_features(model, x, LAYERS, spec=spec, batch_size=90, device="cpu")
    return model, spec, x, y, stats, features, logits


def test_contents_match_the_features(built: tuple) -> None:
    model, spec, x, y, stats, features, logits = built
    assert stats.layers == tuple(LAYERS) and stats.primary_layer == "fc:input"
    assert stats.samples == 90
    labels = y.numpy()
    for name in LAYERS:
        values = features[name].numpy()
        classes, sums, counts = stats.class_sums[name].compute()
        assert classes == list(range(NUM_CLASSES))
        for k in classes:
            np.testing.assert_allclose(sums[k].numpy(), values[labels == k].sum(axis=0), rtol=1e-12, atol=1e-12)
            assert int(counts[k]) == int((labels == k).sum())
        # Edges span exactly the reference range, so no reference value is clipped.
        edges = stats.histograms[name].edges.numpy()
        assert edges[0] == values.min() and edges[-1] == values.max()
        counts_np, _ = np.histogram(values.ravel(), bins=edges)
        np.testing.assert_array_equal(stats.histograms[name].compute().numpy(), counts_np)
        assert stats.reference_std[name] == pytest.approx(values.std(), rel=1e-9)
    centroid_classes, centroids = stats.centroids()
    for k in centroid_classes:
        np.testing.assert_allclose(centroids[k].numpy(), features["fc:input"].numpy()[labels == k].mean(axis=0), rtol=1e-12)
    assert stats.accuracy == pytest.approx(float((logits.argmax(1) == y).double().mean()))
    sample = stats.embedding_sample.compute()
    assert sample.features.shape == (50, 64)
    np.testing.assert_array_equal(sample.features.numpy(), features["fc:input"].numpy()[sample.ids.numpy()])
    np.testing.assert_array_equal(sample.labels.numpy(), labels[sample.ids.numpy()])
    images = stats.image_stats_sample.compute()
    np.testing.assert_array_equal(images.ids.numpy(), sample.ids.numpy())
    assert images.features.shape == (50, len(stats.image_stat_names))
    assert stats.fingerprint and stats.spec == spec


def test_save_load_round_trip(built: tuple, tmp_path: Path) -> None:
    model, _, _, _, stats, _, _ = built
    path = stats.save(tmp_path / "ref.safetensors")
    loaded = ReferenceStats.load(path, model=model, layers=LAYERS)
    assert loaded.summary() == stats.summary()
    for name in LAYERS:
        for a, b in zip(loaded.class_sums[name].dense(), stats.class_sums[name].dense()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(loaded.histograms[name].compute(), stats.histograms[name].compute(), rtol=0, atol=0)
        torch.testing.assert_close(loaded.histograms[name].edges, stats.histograms[name].edges, rtol=0, atol=0)
    for a, b in zip(loaded.embedding_sample.compute(), stats.embedding_sample.compute()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(loaded.image_stats_sample.compute(), stats.image_stats_sample.compute()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert loaded.predictions.compute() == stats.predictions.compute()
    assert loaded.image_stat_names == stats.image_stat_names


def test_load_refuses_another_model_or_layer_set(built: tuple, tmp_path: Path) -> None:
    _, _, _, _, stats, _, _ = built
    path = stats.save(tmp_path / "ref.safetensors")
    other, _ = tiny_model(seed=1, double=True)
    with pytest.raises(InputError, match="another model"):
        ReferenceStats.load(path, model=other)
    with pytest.raises(InputError, match="cover layers fc:input, features.1, features.6 but layers fc:input were asked"):
        ReferenceStats.load(path, layers=["fc:input"])


def test_truncated_or_foreign_files_are_refused_by_name(built: tuple, tmp_path: Path) -> None:
    model, spec, _, _, stats, _, _ = built
    path = stats.save(tmp_path / "ref.safetensors")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated.safetensors"):
        ReferenceStats.load(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file at all")
    with pytest.raises(InputError, match="garbage.safetensors"):
        ReferenceStats.load(garbage)
    model_file = save_model(model, spec, tmp_path / "model.safetensors")
    with pytest.raises(InputError, match="holds no shiftcost reference stats"):
        ReferenceStats.load(model_file)
    with pytest.raises(InputError, match="does not exist"):
        ReferenceStats.load(tmp_path / "missing.safetensors")


def test_tampered_tensor_is_reported_as_damage(built: tuple, tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, _, _, _, stats, _, _ = built
    path = stats.save(tmp_path / "ref.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if k != "layer1/class_sums/sums"}
    damaged = tmp_path / "damaged.safetensors"
    save_file(tensors, str(damaged), metadata=metadata)
    with pytest.raises(InputError, match="damaged.safetensors is damaged"):
        ReferenceStats.load(damaged)


def test_stream_of_chunks_gives_the_same_stats_and_one_shot_iterators_are_refused() -> None:
    model, spec = tiny_model(double=True)
    x, y = tiny_data(30, double=True)
    whole = compute_reference_stats(model, spec, x, y, layers=LAYERS, device="cpu")
    chunks = [(x[:11], y[:11]), (x[11:12], y[11:12]), (x[12:], y[12:])]
    streamed = compute_reference_stats(model, spec, chunks, layers=LAYERS, device="cpu")
    for name in LAYERS:
        torch.testing.assert_close(streamed.class_sums[name].dense()[0], whole.class_sums[name].dense()[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(streamed.histograms[name].compute(), whole.histograms[name].compute())
    with pytest.raises(InputError, match="one-shot iterator"):
        compute_reference_stats(model, spec, iter(chunks), device="cpu")


def test_reference_input_errors() -> None:
    model, spec = tiny_model()
    x, y = tiny_data(12)
    with pytest.raises(InputError, match="no labels"):
        compute_reference_stats(model, spec, x, None, device="cpu")
    with pytest.raises(InputError, match="is empty"):
        compute_reference_stats(model, spec, x[:0], y[:0], device="cpu")
    with pytest.raises(InputError, match="label 9 but the model has 4 classes"):
        compute_reference_stats(model, spec, x, torch.full_like(y, 9), device="cpu")
    with pytest.raises(InputError, match="only class"):
        compute_reference_stats(model, spec, x, torch.zeros_like(y), device="cpu")
    with pytest.raises(InputError, match="expects 1x8x8"):
        compute_reference_stats(model, spec, torch.rand(4, 3, 8, 8), y[:4], device="cpu")
    poisoned = x.clone()
    poisoned[5, 0, 1, 1] = float("inf")
    with pytest.raises(InputError, match="NaN or infinite values at layer 'features.1'"):
        compute_reference_stats(model, spec, poisoned, y, layers=["features.1", "fc:input"], device="cpu")
