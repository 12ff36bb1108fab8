"""Streaming accumulators: merge of shards == one pass, whatever the batching and order."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from functools import reduce

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shiftcost.errors import InputError
from shiftcost.index import (
    ClassSums,
    EmbeddingSample,
    LayerHistogram,
    PairedHistogramDistance,
    PredictionStats,
    edges_from_range,
    inv_ari,
    inv_ari_from_sample,
    preindex_p,
    resque_dist,
    resque_dist_from_sums,
    resque_task,
    resque_task_details,
    resque_task_from_sample,
    stratified_sample_indices,
)

from . import slow_reference as ref

PROPERTY = settings(max_examples=40, deadline=None)
METRICS = ["wasserstein", "bhattacharyya", "jensen_shannon", "kl"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_shards(rng: np.random.Generator, n: int, max_shards: int = 4) -> list[list[np.ndarray]]:
    """A random permutation of range(n), cut into shards (some maybe empty), each cut into random batches."""
    order = rng.permutation(n)
    shards = np.array_split(order, np.sort(rng.integers(0, n + 1, rng.integers(0, max_shards))))
    batched = []
    for shard in shards:
        batches, start = [], 0
        while start < len(shard):
            size = int(rng.integers(1, max(2, len(shard) // 2 + 2)))
            batches.append(shard[start : start + size])
            start += size
        batched.append(batches)
    return batched


def stream(rng: np.random.Generator, n: int, make: Callable, feed: Callable):
    """Feed every shard's batches into its own accumulator, then merge the shards in random order."""
    accumulators = []
    for batches in random_shards(rng, n):
        acc = make()
        for rows in batches:
            feed(acc, rows)
        accumulators.append(acc)
    accumulators = [accumulators[i] for i in rng.permutation(len(accumulators))]
    return reduce(lambda a, b: a.merge(b), accumulators[1:], accumulators[0])


def round_trip(acc, fresh):
    """state_dict → torch.save → torch.load(weights_only=True) → load_state_dict into ``fresh``."""
    buffer = io.BytesIO()
    torch.save(acc.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


def f32_exact(x: np.ndarray) -> np.ndarray:
    """Float64 values that float32 represents exactly, so every input dtype carries the same numbers."""
    return x.astype(np.float32).astype(np.float64)


def as_input(rng: np.random.Generator, x: np.ndarray):
    """The same numbers as numpy float64, torch float64 or torch float32 (exactly representable)."""
    kind = int(rng.integers(0, 3))
    if kind == 0:
        return x
    t = torch.from_numpy(x)
    return t if kind == 1 else t.to(torch.float32)


# --------------------------------------------------------------------------- ClassSums


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 300), dim=st.integers(1, 12), classes=st.integers(1, 6))
def test_class_sums_merged_shards_equal_one_pass(seed, n, dim, classes):
    rng = np.random.default_rng(seed)
    x = f32_exact(rng.normal(size=(n, dim)) + 0.5)
    y = rng.integers(0, classes, n)
    x_new, y_new = rng.normal(size=(50, dim)) + 0.5, rng.integers(0, classes, 50)
    y[0] = y_new[0] = 0  # at least one shared class

    merged = stream(rng, n, ClassSums, lambda acc, rows: acc.update(as_input(rng, x[rows]), y[rows]))
    classes_seen, sums, counts = merged.compute()
    assert classes_seen == sorted(set(y.tolist()))
    assert counts.tolist() == [int((y == k).sum()) for k in classes_seen]
    expected_sums = np.stack([x[y == k].sum(axis=0) for k in classes_seen])
    assert np.allclose(sums.numpy(), expected_sums, rtol=0, atol=1e-9)

    new = ClassSums()
    new.update(x_new, y_new)
    streamed = resque_dist_from_sums(merged, new)
    assert abs(streamed.value - resque_dist(x, y, x_new, y_new)) <= 1e-9
    assert abs(streamed.value - ref.resque_dist(x, y, x_new, y_new)[0]) <= 1e-9


def test_class_sums_of_identical_streams_give_exactly_zero():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 5)), rng.integers(0, 4, 200)
    a, b = ClassSums(), ClassSums()
    for start in range(0, 200, 32):
        a.update(x[start : start + 32], y[start : start + 32])
        b.update(x[start : start + 32], y[start : start + 32])
    assert resque_dist_from_sums(a, b).value == 0.0


def test_class_sums_centroids_and_errors():
    acc = ClassSums()
    acc.update(np.array([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]), [2, 2, 5])
    classes, centroids = acc.centroids()
    assert classes == [2, 5] and centroids.tolist() == [[2.0, 3.0], [0.0, 0.0]]
    other = ClassSums()
    other.update(np.ones((2, 2)), [2, 5])
    with pytest.raises(InputError, match="class 5 at layer 'head'"):
        resque_dist_from_sums(acc, other, layer="head")
    with pytest.raises(InputError, match="dimensions"):
        acc.update(np.ones((1, 3)), [0])
    wide = ClassSums()
    wide.update(np.ones((1, 3)), [0])
    with pytest.raises(InputError, match="dimensions"):
        acc.merge(wide)
    with pytest.raises(InputError, match="empty"):
        resque_dist_from_sums(acc, ClassSums())
    with pytest.raises(InputError, match="same kind"):
        acc.merge(LayerHistogram(edges_from_range(0, 1)))


# --------------------------------------------------------------------------- EmbeddingSample


@PROPERTY
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 400),
    max_samples=st.integers(1, 120),
    min_per_class=st.integers(0, 3),
    labelled=st.booleans(),
    eager=st.booleans(),
    sample_seed=st.integers(0, 2**40),
)
def test_embedding_sample_is_the_same_whatever_the_batching(seed, n, max_samples, min_per_class, labelled, eager, sample_seed):
    rng = np.random.default_rng(seed)
    x = f32_exact(rng.normal(size=(n, 3)))
    y = rng.integers(0, 5, n) if labelled else None

    def make():
        acc = EmbeddingSample(max_samples, seed=sample_seed, min_per_class=min_per_class)
        if eager:
            acc.compact_min_rows = 1  # compact every max_samples rows: exercise the streaming filter
        return acc

    classes_seen: set[int] = set()

    def feed(acc, rows):
        acc.update(as_input(rng, x[rows]), None if y is None else y[rows], torch.from_numpy(rows))
        classes_seen.update([-1] if y is None else y[rows].tolist())
        pending_limit = max(max_samples, acc.compact_min_rows)  # pending rows stay below it
        assert acc.kept_rows < max_samples + len(classes_seen) * min_per_class + pending_limit

    merged = stream(rng, n, make, feed)
    features, labels, ids = merged.compute()
    labels_all = np.full(n, -1) if y is None else y
    expected = ref.stratified_bottom_k(range(n), labels_all, sample_seed, max_samples, min_per_class)
    assert ids.tolist() == expected
    assert features.dtype == torch.float64 and np.array_equal(features.numpy(), x[expected])
    assert labels.tolist() == labels_all[expected].tolist()
    assert merged.seen == n
    if min_per_class == 1 and y is not None:
        assert ids.tolist() == stratified_sample_indices(y, max_samples, seed=sample_seed).tolist()


def test_embedding_sample_keeps_exact_features_and_everything_when_small():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(90, 4)), rng.integers(0, 3, 90)
    acc = EmbeddingSample(max_samples=100, seed=9)
    for start in (60, 0, 30):  # out of order on purpose
        acc.update(x[start : start + 30], y[start : start + 30], np.arange(start, start + 30))
    features, labels, ids = acc.compute()
    assert ids.tolist() == list(range(90))
    assert np.array_equal(features.numpy(), x) and np.array_equal(labels.numpy(), y)
    assert resque_task_from_sample(acc) == resque_task_details(x, y)


def test_streamed_task_and_inv_ari_equal_the_functional_form_when_sampling():
    rng = np.random.default_rng(4)
    means = rng.normal(scale=1.5, size=(4, 6))
    y = rng.integers(0, 4, 2500)
    x = means[y] + rng.normal(size=(2500, 6))
    acc = EmbeddingSample(max_samples=300, seed=2)
    for start in range(0, 2500, 128):
        acc.update(torch.from_numpy(x[start : start + 128]), torch.from_numpy(y[start : start + 128]), torch.arange(start, min(start + 128, 2500)))
    streamed = resque_task_from_sample(acc)
    assert streamed == resque_task_details(x, y, max_samples=300, seed=2)
    assert streamed.samples_used == 300
    assert resque_task(x, y, max_samples=300, seed=2) == streamed.value

    reference = ClassSums()
    reference.update(x, y)
    classes, centroids = reference.centroids()
    shifted = EmbeddingSample(max_samples=300, seed=2)
    shifted.update(x + 0.7, y, np.arange(2500))
    assert inv_ari_from_sample(reference, shifted).value == inv_ari(centroids, classes, x + 0.7, y, max_samples=300, seed=2)


def test_embedding_sample_memory_stays_bounded_on_a_long_stream():
    acc = EmbeddingSample(max_samples=500, seed=1)
    rng = np.random.default_rng(5)
    for start in range(0, 20_000, 250):
        acc.update(rng.normal(size=(250, 2)), rng.integers(0, 10, 250), np.arange(start, start + 250))
        assert acc.kept_rows <= 500 + 10 + 1024 + 250
    assert acc.compute().ids.shape[0] == 500


def test_embedding_sample_rejects_bad_use():
    acc = EmbeddingSample(max_samples=10, seed=0)
    acc.compact_min_rows = 1
    acc.update(np.ones((3, 2)), [0, 1, 0], [1, 2, 3])
    acc.update(np.ones((2, 2)), [0, 1], [2, 9])
    with pytest.raises(InputError, match="id 2 was given twice"):
        acc.compute()
    acc.reset()
    acc.update(np.ones((3, 2)), [0, 1, 0], [1, 2, 3])
    with pytest.raises(InputError, match="dimensions"):
        acc.update(np.ones((2, 5)), [0, 1], [10, 11])
    with pytest.raises(InputError, match="one integer id per sample"):
        acc.update(np.ones((2, 2)), [0, 1], [10])
    with pytest.raises(InputError, match="same settings"):
        acc.merge(EmbeddingSample(max_samples=10, seed=1))
    unlabelled = EmbeddingSample(max_samples=10)
    unlabelled.update(np.ones((3, 2)))
    assert unlabelled.compute().labels.tolist() == [-1, -1, -1]
    with pytest.raises(InputError, match="unlabelled"):
        resque_task_from_sample(unlabelled)


# --------------------------------------------------------------------------- LayerHistogram


@PROPERTY
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 200),
    dim=st.integers(1, 8),
    bins=st.integers(1, 40),
    lo=st.floats(-3, 0),
    width=st.floats(0.1, 4),
)
def test_layer_histogram_merged_shards_equal_one_pass(seed, n, dim, bins, lo, width):
    rng = np.random.default_rng(seed)
    x = f32_exact(rng.normal(size=(n, dim)) * 1.5)
    lo = float(np.float32(lo))
    x[rng.random(size=x.shape) < 0.1] = lo  # values exactly on the first edge
    edges = edges_from_range(lo, lo + width, bins)
    merged = stream(rng, n, lambda: LayerHistogram(edges), lambda acc, rows: acc.update(as_input(rng, x[rows])))
    counts = merged.compute()
    assert counts.dtype == torch.float64
    assert counts.tolist() == ref.layer_histogram(x, edges.numpy()).tolist()  # exact
    assert merged.count == x.size
    assert abs(merged.mean() - x.mean()) <= 1e-9
    assert abs(merged.std() - x.std()) <= 1e-9


def test_layer_histogram_feeds_layer_shift_and_checks_edges():
    rng = np.random.default_rng(6)
    reference = LayerHistogram.from_range(-4, 4, 64)
    reference.update(rng.normal(size=(400, 16)))
    new = LayerHistogram(reference.edges)
    new.update(rng.normal(loc=0.5, size=(300, 16)))
    with pytest.raises(InputError, match="different edges"):
        new.merge(LayerHistogram(edges_from_range(-4, 4, 32)))
    nan_batch = np.ones((2, 2))
    nan_batch[0, 1] = np.nan
    broken = LayerHistogram(reference.edges)
    broken.update(nan_batch)
    with pytest.raises(InputError, match="1 activation values were NaN"):
        broken.compute()
    assert edges_from_range(2.0, 2.0, 4).tolist() == [1.5, 1.75, 2.0, 2.25, 2.5]


# --------------------------------------------------------------------------- PairedHistogramDistance


@settings(max_examples=25, deadline=None)  # the slow reference histograms every row in Python
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 60),
    dim=st.integers(2, 24),
    bins=st.sampled_from([16, 32, 64]),
    metric=st.sampled_from(METRICS),
)
def test_paired_distance_merged_shards_equal_one_pass(seed, n, dim, bins, metric):
    rng = np.random.default_rng(seed)
    clean = f32_exact(np.maximum(rng.normal(size=(n, dim)), 0))
    shifted = clean + rng.normal(scale=0.4, size=(n, dim))
    merged = stream(
        rng,
        n,
        lambda: PairedHistogramDistance(bins, metric),
        lambda acc, rows: acc.update(as_input(rng, clean[rows]), torch.from_numpy(shifted[rows])),
    )
    assert merged.count == n
    value = merged.compute()
    assert abs(value - preindex_p([clean], [shifted], num_classes=1, bins=bins, metric=metric)) <= 1e-9
    assert abs(value - ref.preindex_p([clean], [shifted], 1, bins, metric)) <= 1e-9


def test_paired_distance_rejects_mismatch():
    acc = PairedHistogramDistance(16, "kl")
    with pytest.raises(InputError, match="shapes"):
        acc.update(np.ones((3, 4)), np.ones((2, 4)))
    with pytest.raises(InputError, match="bins=32"):
        acc.merge(PairedHistogramDistance(32, "kl"))
    with pytest.raises(InputError, match="metric"):
        PairedHistogramDistance(16, "cosine")
    with pytest.raises(InputError, match="no sample"):
        acc.compute()


def test_paired_distance_reports_nonfinite_activations_at_compute():
    clean = np.random.default_rng(2).normal(size=(6, 20))
    broken = clean.copy()
    broken[3, 7] = np.inf
    acc = PairedHistogramDistance(16)
    acc.update(clean, clean + 1)
    acc.update(clean, broken)  # no error yet: the batch is not inspected on the host
    restored = round_trip(acc, PairedHistogramDistance(16))
    for a in (acc, restored):
        with pytest.raises(InputError, match="NaN or infinite"):
            a.compute()
    with pytest.raises(InputError, match="shifted_features of layer 'fc'"):
        preindex_p({"fc": clean}, {"fc": broken}, num_classes=2)


# --------------------------------------------------------------------------- PredictionStats


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 200), classes=st.integers(1, 7), labelled=st.booleans())
def test_prediction_stats_merged_shards_equal_one_pass(seed, n, classes, labelled):
    rng = np.random.default_rng(seed)
    logits = f32_exact(rng.normal(scale=3.0, size=(n, classes)))
    y = rng.integers(0, classes, n) if labelled else None
    merged = stream(
        rng,
        n,
        lambda: PredictionStats(classes),
        lambda acc, rows: acc.update(as_input(rng, logits[rows]), None if y is None else torch.from_numpy(y[rows])),
    )
    got = merged.compute()
    expected = ref.prediction_stats(logits, y)
    assert got["samples"] == n
    assert got["predicted_counts"] == expected["predicted_counts"]
    assert abs(got["mean_entropy"] - expected["mean_entropy"]) <= 1e-9
    assert abs(got["mean_confidence"] - expected["mean_confidence"]) <= 1e-9
    if labelled:
        assert abs(got["accuracy"] - expected["accuracy"]) <= 1e-9
        assert abs(got["mean_loss"] - expected["mean_loss"]) <= 1e-9
    else:
        assert got["accuracy"] is None and got["mean_loss"] is None


def test_prediction_stats_mixes_labelled_and_unlabelled_batches():
    rng = np.random.default_rng(8)
    logits, y = rng.normal(size=(60, 4)), rng.integers(0, 4, 60)
    acc = PredictionStats(4)
    acc.update(logits[:40], y[:40])
    acc.update(logits[40:])
    got = acc.compute()
    on_labelled = ref.prediction_stats(logits[:40], y[:40])
    assert got["labelled"] == 40 and got["samples"] == 60
    assert abs(got["accuracy"] - on_labelled["accuracy"]) <= 1e-12
    assert abs(got["mean_loss"] - on_labelled["mean_loss"]) <= 1e-9
    assert abs(got["mean_entropy"] - ref.prediction_stats(logits, None)["mean_entropy"]) <= 1e-9
    with pytest.raises(InputError, match="only 4 classes"):
        acc.update(logits[:2], [0, 4])
    with pytest.raises(InputError, match="columns"):
        acc.update(np.ones((2, 3)))


# --------------------------------------------------------------------------- state dicts


def filled_accumulators(device: str = "cpu"):
    """One accumulator of each kind with some data in it, plus a function that adds more."""
    rng = np.random.default_rng(10)
    x = torch.from_numpy(rng.normal(size=(120, 6)) + 0.3).to(device)
    y = torch.from_numpy(rng.integers(0, 3, 120))
    logits = torch.from_numpy(rng.normal(size=(120, 3))).to(device)
    ids = torch.arange(120)

    def feed(kind, acc, rows):
        if kind == "class_sums":
            acc.update(x[rows], y[rows])
        elif kind == "sample":
            acc.update(x[rows], y[rows], ids[rows])
        elif kind == "histogram":
            acc.update(x[rows])
        elif kind == "paired":
            acc.update(x[rows], x[rows] * 1.5 + 0.1)
        else:
            acc.update(logits[rows], y[rows])

    makers = {
        "class_sums": ClassSums,
        "sample": lambda: EmbeddingSample(max_samples=50, seed=3, min_per_class=2),
        "histogram": lambda: LayerHistogram(edges_from_range(-2, 2, 16)),
        "paired": lambda: PairedHistogramDistance(16, "jensen_shannon"),
        "predictions": lambda: PredictionStats(3),
    }
    return makers, feed


def results_of(acc):
    out = acc.compute()
    if isinstance(acc, LayerHistogram):
        return out.tolist(), acc.mean(), acc.std(), acc.count
    if isinstance(out, tuple):
        return tuple(v if isinstance(v, list) else v.tolist() for v in out)
    return out


@pytest.mark.parametrize("kind", ["class_sums", "sample", "histogram", "paired", "predictions"])
def test_state_dict_round_trip_with_weights_only_load(kind):
    makers, feed = filled_accumulators()
    original = makers[kind]()
    feed(kind, original, slice(0, 80))
    restored = round_trip(original, makers[kind]())
    assert results_of(restored) == results_of(original)
    # a restored accumulator keeps streaming exactly like the original
    feed(kind, original, slice(80, 120))
    feed(kind, restored, slice(80, 120))
    assert results_of(restored) == results_of(original)


@pytest.mark.parametrize("kind", ["class_sums", "sample", "histogram", "paired", "predictions"])
def test_state_dict_splits_into_safetensors_and_json(kind):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    makers, feed = filled_accumulators()
    original = makers[kind]()
    feed(kind, original, slice(0, 120))
    state = original.state_dict()
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    plain = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    restored_state = {**json.loads(json.dumps(plain)), **safetensors_torch.load(safetensors_torch.save(tensors))}
    restored = makers[kind]()
    restored.load_state_dict(restored_state)
    assert results_of(restored) == results_of(original)


@pytest.mark.parametrize("kind", ["class_sums", "sample", "histogram", "paired", "predictions"])
def test_state_dict_from_another_accumulator_or_truncated_is_refused(kind):
    makers, feed = filled_accumulators()
    acc = makers[kind]()
    feed(kind, acc, slice(0, 40))
    other_kind = "paired" if kind != "paired" else "histogram"
    foreign = makers[other_kind]()
    feed(other_kind, foreign, slice(0, 40))
    with pytest.raises(InputError, match="belongs to"):
        acc.load_state_dict(foreign.state_dict())
    truncated = {k: v for k, v in acc.state_dict().items() if k in ("kind", "version")}
    with pytest.raises(InputError, match="truncated or foreign"):
        makers[kind]().load_state_dict(truncated)
    with pytest.raises(InputError, match="not a dict"):
        acc.load_state_dict([1, 2])


def test_reset_forgets_everything():
    makers, feed = filled_accumulators()
    for kind, make in makers.items():
        acc, fresh = make(), make()
        feed(kind, acc, slice(0, 60))
        acc.reset()
        feed(kind, acc, slice(60, 120))
        feed(kind, fresh, slice(60, 120))
        assert results_of(acc) == results_of(fresh), kind


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["class_sums", "sample", "histogram", "paired", "predictions"])
def test_accumulators_on_any_device_agree_with_cpu(device, kind):
    makers_dev, feed_dev = filled_accumulators(device)
    makers_cpu, feed_cpu = filled_accumulators("cpu")
    on_device, on_cpu = makers_dev[kind](), makers_cpu[kind]()
    for rows in (slice(0, 50), slice(50, 120)):
        feed_dev(kind, on_device, rows)
        feed_cpu(kind, on_cpu, rows)
    got, expected = results_of(on_device), results_of(on_cpu)
    assert np.allclose(np.asarray(_flatten(got), dtype=float), np.asarray(_flatten(expected), dtype=float), rtol=0, atol=1e-9)
    for value in on_device.state_dict().values():
        assert not isinstance(value, torch.Tensor) or value.device.type == "cpu"


def _flatten(value):
    if isinstance(value, dict):
        return [x for k in sorted(value) for x in _flatten(value[k])]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flatten(v)]
    return [float("nan") if value is None else value]
