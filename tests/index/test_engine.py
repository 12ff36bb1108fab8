"""The one-pass engine against the functional API applied to directly captured features.

The model runs in float64 so that its features do not depend on the batch size; the
engine's results must then match the functional formulas to 1e-9 whatever the batch
size or the chunking of a stream.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shiftcost.errors import InputError
from shiftcost.imagestats import image_stats
from shiftcost.index import functional
from shiftcost.index.capture import capture_features
from shiftcost.index.engine import assess, compute_reference_stats
from shiftcost.index.functional import inv_ari, layer_shift, preindex_p, resque_dist, resque_task

from .engine_support import single_thread  # noqa: F401 - autouse fixture
from .engine_support import LAYERS, NUM_CLASSES, tiny_data, tiny_model

TOL = 1e-9
MAX_SAMPLES = 40
SEED = 2


@pytest.fixture(scope="module")
def world() -> dict:
    model, spec = tiny_model(double=True)
    x_ref, y_ref = tiny_data(80, seed=0, double=True)
    reference = compute_reference_stats(
        model, spec, x_ref, y_ref, layers=LAYERS, batch_size=32, device="cpu", max_samples=MAX_SAMPLES, seed=SEED
    )
    x_new, y_new = tiny_data(60, seed=1, double=True, shift=0.15)
    ref_features, _ = capture_features(model, x_ref, LAYERS, spec=spec, batch_size=128, device="cpu")
    new_features, new_logits = capture_features(model, x_new, LAYERS, spec=spec, batch_size=128, device="cpu")
    return {
        "model": model,
        "spec": spec,
        "reference": reference,
        "x_ref": x_ref,
        "y_ref": y_ref,
        "x_new": x_new,
        "y_new": y_new,
        "ref_features": ref_features,
        "new_features": new_features,
        "new_logits": new_logits,
    }


def expected_layer_shift(ref_values: np.ndarray, new_values: np.ndarray, bins: int = 128) -> float:
    """Histogram on edges spanning the reference range; new values beyond it count in the end bins."""
    edges = np.linspace(ref_values.min(), ref_values.max(), bins + 1)
    ref_counts, _ = np.histogram(ref_values.ravel(), bins=edges)
    new_counts, _ = np.histogram(np.clip(new_values.ravel(), edges[0], edges[-1]), bins=edges)
    return layer_shift(ref_counts, new_counts, edges, float(ref_values.std()))


def class_centroids(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    classes = np.unique(labels)
    return classes, np.stack([features[labels == k].mean(axis=0) for k in classes])


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_engine_equals_functional_api_for_any_batch_size(world: dict, batch_size: int) -> None:
    report = assess(
        world["model"], world["spec"], world["reference"], world["x_new"], world["y_new"], batch_size=batch_size, device="cpu"
    )
    ref_f = {k: v.numpy() for k, v in world["ref_features"].items()}
    new_f = {k: v.numpy() for k, v in world["new_features"].items()}
    y_ref, y_new = world["y_ref"].numpy(), world["y_new"].numpy()

    for name in LAYERS:
        assert report.resque_dist_by_layer[name] == pytest.approx(resque_dist(ref_f[name], y_ref, new_f[name], y_new), abs=TOL)
        assert report.layer_shift_by_layer[name] == pytest.approx(expected_layer_shift(ref_f[name], new_f[name]), abs=TOL)
    assert report.resque_dist == report.resque_dist_by_layer["fc:input"]
    assert report.layer_shift == pytest.approx(np.mean([expected_layer_shift(ref_f[n], new_f[n]) for n in LAYERS]), abs=TOL)
    classes, centroids = class_centroids(ref_f["fc:input"], y_ref)
    expected_inv_ari = inv_ari(centroids, classes, new_f["fc:input"], y_new, max_samples=MAX_SAMPLES, seed=SEED)
    assert report.inv_ari == pytest.approx(expected_inv_ari, abs=TOL)

    logits = world["new_logits"]
    assert report.accuracy == pytest.approx(float((logits.argmax(1) == world["y_new"]).double().mean()), abs=TOL)
    assert report.mean_loss == pytest.approx(float(F.cross_entropy(logits, world["y_new"])), abs=TOL)
    log_p = torch.log_softmax(logits, 1)
    assert report.mean_entropy == pytest.approx(float(-(log_p.exp() * log_p).sum(1).mean()), abs=TOL)
    assert report.mean_confidence == pytest.approx(float(log_p.exp().max(1).values.mean()), abs=TOL)
    assert report.predicted_counts == torch.bincount(logits.argmax(1), minlength=NUM_CLASSES).tolist()
    assert report.resque_dist_variant == "labels"
    assert report.resque_task is None and not report.task_change
    assert report.samples == 60 and report.embedding_samples == MAX_SAMPLES
    assert report.reference_accuracy == world["reference"].accuracy

    features, labels, ids = report.embedding_sample
    np.testing.assert_array_equal(features.numpy(), new_f["fc:input"][ids.numpy()])
    np.testing.assert_array_equal(labels.numpy(), y_new[ids.numpy()])
    np.testing.assert_array_equal(ids.numpy(), functional.stratified_sample_indices(y_new, MAX_SAMPLES, seed=SEED))
    assert report.image_stats is not None and report.image_stats.shape == (MAX_SAMPLES, len(report.image_stat_names))
    expected_stats = image_stats(world["x_new"][ids])
    for column, name in enumerate(report.image_stat_names):
        torch.testing.assert_close(report.image_stats[:, column], expected_stats[name].double(), rtol=1e-12, atol=1e-12)


def test_label_free_variant_groups_by_predicted_class(world: dict) -> None:
    report = assess(world["model"], world["spec"], world["reference"], world["x_new"], None, batch_size=16, device="cpu")
    predicted = world["new_logits"].argmax(1).numpy()
    ref_f = world["ref_features"]["fc:input"].numpy()
    new_f = world["new_features"]["fc:input"].numpy()
    y_ref = world["y_ref"].numpy()
    assert report.resque_dist_variant == "predicted"
    assert any("predicted class" in note for note in report.notes)
    shared = sorted(set(predicted) & set(y_ref))
    assert shared, "the check needs at least one predicted class"
    assert report.resque_dist == pytest.approx(resque_dist(ref_f, y_ref, new_f, predicted), abs=TOL)
    assert report.excluded_classes == sorted(set(y_ref) - set(predicted))
    classes, centroids = class_centroids(ref_f, y_ref)
    assert report.inv_ari == pytest.approx(inv_ari(centroids, classes, new_f, predicted, max_samples=MAX_SAMPLES, seed=SEED), abs=TOL)
    assert report.accuracy is None and report.mean_loss is None
    assert "accuracy" in report.to_dict() and report.to_dict()["accuracy"] is None


def test_reference_data_against_itself_gives_exact_zeros(world: dict) -> None:
    # Same data in the same batches as the reference pass: bit-identical sums, so exactly 0.
    report = assess(world["model"], world["spec"], world["reference"], world["x_ref"], world["y_ref"], batch_size=32, device="cpu")
    assert report.resque_dist == 0.0
    assert all(value == 0.0 for value in report.resque_dist_by_layer.values())
    assert report.layer_shift == 0.0
    # Other batches only change the summation order: zero up to float64 rounding.
    rebatched = assess(world["model"], world["spec"], world["reference"], world["x_ref"], world["y_ref"], batch_size=13, device="cpu")
    assert rebatched.resque_dist < 1e-12 and rebatched.layer_shift == 0.0


def test_labels_outside_the_reference_classes_are_a_task_change(world: dict) -> None:
    model, spec = world["model"], world["spec"]
    keep = world["y_ref"] < 3
    reference = compute_reference_stats(
        model, spec, world["x_ref"][keep], world["y_ref"][keep], layers=LAYERS, device="cpu", max_samples=MAX_SAMPLES, seed=SEED
    )
    report = assess(model, spec, reference, world["x_new"], world["y_new"], batch_size=16, device="cpu")
    new_f = world["new_features"]["fc:input"].numpy()
    y_new = world["y_new"].numpy()
    assert report.task_change and report.new_classes == [3]
    assert 3 in report.excluded_classes
    assert any("Task change" in note for note in report.notes)
    assert report.resque_task == pytest.approx(resque_task(new_f, y_new, max_samples=MAX_SAMPLES, seed=SEED), abs=TOL)
    ref_f = world["ref_features"]["fc:input"].numpy()[keep.numpy()]
    assert report.resque_dist == pytest.approx(resque_dist(ref_f, world["y_ref"].numpy()[keep.numpy()], new_f, y_new), abs=TOL)
    assert report.to_dict()["resque_task"] == report.resque_task


def test_task_mode_takes_any_label_ids(world: dict) -> None:
    model, spec, reference = world["model"], world["spec"], world["reference"]
    task_labels = world["y_new"] + 10
    with pytest.raises(InputError, match="pass task=True"):
        assess(model, spec, reference, world["x_new"], task_labels, device="cpu")
    report = assess(model, spec, reference, world["x_new"], task_labels, task=True, batch_size=16, device="cpu")
    new_f = world["new_features"]["fc:input"].numpy()
    assert report.resque_task == pytest.approx(resque_task(new_f, task_labels.numpy(), max_samples=MAX_SAMPLES, seed=SEED), abs=TOL)
    assert report.task_change and report.accuracy is None
    assert report.resque_dist_variant == "predicted"
    with pytest.raises(InputError, match="needs the new task's labels"):
        assess(model, spec, reference, world["x_new"], None, task=True, device="cpu")


def test_preindex_p_with_paired_clean_originals(world: dict) -> None:
    model, spec, reference = world["model"], world["spec"], world["reference"]
    clean = world["x_ref"][:30]
    shifted = (clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)).clamp(0, 1)
    report = assess(model, spec, reference, shifted, world["y_ref"][:30], paired_clean_x=clean, batch_size=8, device="cpu")
    clean_f, _ = capture_features(model, clean, LAYERS, spec=spec, device="cpu")
    shifted_f, _ = capture_features(model, shifted, LAYERS, spec=spec, device="cpu")
    expected = preindex_p(clean_f, shifted_f, num_classes=NUM_CLASSES)
    assert report.preindex_p == pytest.approx(expected, abs=TOL)
    assert report.samples == 30
    plain = assess(model, spec, reference, shifted, world["y_ref"][:30], batch_size=8, device="cpu")
    assert plain.preindex_p is None and "preindex_p" not in plain.to_dict()
    assert report.resque_dist == pytest.approx(plain.resque_dist, abs=TOL)
    with pytest.raises(InputError, match="do not pair up"):
        assess(model, spec, reference, shifted, None, paired_clean_x=clean[:20], device="cpu")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(1, 59), max_size=5, unique=True), batch_size=st.integers(1, 64))
def test_stream_chunks_and_batch_size_do_not_change_the_result(world: dict, cuts: list[int], batch_size: int) -> None:
    x, y = world["x_new"], world["y_new"]
    bounds = [0, *sorted(cuts), 60]
    stream = [(x[a:b], y[a:b]) for a, b in zip(bounds, bounds[1:])]
    streamed = assess(world["model"], world["spec"], world["reference"], stream, batch_size=batch_size, device="cpu")
    whole = assess(world["model"], world["spec"], world["reference"], x, y, batch_size=64, device="cpu")
    for key in ("resque_dist", "inv_ari", "layer_shift", "accuracy", "mean_loss", "mean_entropy", "mean_confidence"):
        assert getattr(streamed, key) == pytest.approx(getattr(whole, key), abs=TOL), key


def test_report_json(world: dict) -> None:
    report = assess(world["model"], world["spec"], world["reference"], world["x_new"], world["y_new"], device="cpu")
    data = json.loads(json.dumps(report.to_dict()))
    for key in ("resque_dist", "inv_ari", "layer_shift", "samples", "seconds", "device", "layers", "notes"):
        assert key in data
    assert "resque_task" not in data and "embedding_sample" not in data
    assert data["device"] == "cpu" and data["samples"] == 60


def test_bad_input_is_one_clear_sentence(world: dict) -> None:
    model, spec, reference = world["model"], world["spec"], world["reference"]
    x, y = world["x_new"], world["y_new"]
    cases = [
        (torch.rand(4, 3, 8, 8, dtype=torch.float64), None, "shape \\(3, 8, 8\\) but the model expects 1x8x8"),
        (torch.rand(4, 1, 9, 9, dtype=torch.float64), None, "expects 1x8x8"),
        (x[:0], None, "is empty"),
        (x, y[:5], "labels have shape \\(5,\\) but there are 60 images"),
        (x, y.double(), "integer class ids"),
        (x, y - 1, "negative label"),
        (x, y + NUM_CLASSES, f"label {2 * NUM_CLASSES - 1} but the model has {NUM_CLASSES} classes"),
        ([], None, "is empty"),
        ([(x[:5], y[:5]), (x[5:], None)], None, "mixes chunks"),
    ]
    for images, labels, message in cases:
        with pytest.raises(InputError, match=message):
            assess(model, spec, reference, images, labels, device="cpu")
    poisoned = x.clone()
    poisoned[3, 0, 2, 2] = float("nan")
    with pytest.raises(InputError, match="NaN or infinite values at layer 'fc:input'"):
        assess(model, spec, reference, poisoned, y, device="cpu")
    other, _ = tiny_model(seed=9, double=True)
    with pytest.raises(InputError, match="another model"):
        assess(other, spec, reference, x, y, device="cpu")


def test_layered_histograms_bin_like_layer_histogram_on_edges_outliers_and_nan() -> None:
    from shiftcost.index.accumulators import LayerHistogram, edges_from_range
    from shiftcost.index.layered import LayeredHistograms, join_layers

    generator = torch.Generator().manual_seed(0)
    edges = {"a": edges_from_range(-1.0, 3.0, 16), "b": edges_from_range(0.0, 0.7, 16)}
    a = torch.rand(50, 3, generator=generator, dtype=torch.float64) * 6 - 2  # beyond both ends
    b = torch.rand(50, 5, generator=generator, dtype=torch.float64)
    a[:17, 0] = edges["a"]  # every edge exactly, first and last included
    b[:17, 1] = edges["b"]
    b[3, 2] = float("nan")
    b[4, 3] = float("inf")
    layered = LayeredHistograms(["a", "b"], [3, 5], edges)
    for rows in (slice(0, 20), slice(20, 50)):
        layered.update(join_layers({"a": a[rows], "b": b[rows]}, ["a", "b"]))
    got = layered.compute()
    for name, values in (("a", a), ("b", b)):
        expected = LayerHistogram(edges[name])
        expected.update(values)
        state, want = got[name].state_dict(), expected.state_dict()
        torch.testing.assert_close(state["counts"], want["counts"], rtol=0, atol=0)
        assert state["count"] == want["count"] and state["nonfinite"] == want["nonfinite"]
        assert state["sum_centred"] == pytest.approx(want["sum_centred"], rel=1e-12, abs=1e-12)
        assert state["sumsq_centred"] == pytest.approx(want["sumsq_centred"], rel=1e-12)
    assert got["b"].state_dict()["nonfinite"] == 2 and got["a"].state_dict()["nonfinite"] == 0
    assert layered.nonfinite_columns().tolist() == [False] * 3 + [False, False, True, True, False]
