"""The functional index API against the slow reference, exact edge cases and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr
from scipy.stats import wasserstein_distance
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from shiftcost.errors import InputError
from shiftcost.index import (
    histogram_distance,
    inv_ari,
    inv_ari_details,
    layer_shift,
    per_sample_histograms,
    preindex_p,
    resque_dist,
    resque_dist_details,
    resque_task,
    resque_task_details,
    stratified_sample_indices,
)
from shiftcost.index.functional import sample_keys

from . import slow_reference as ref

METRICS = ["wasserstein", "bhattacharyya", "jensen_shannon", "kl"]


def blobs(n: int, dim: int, classes: int, seed: int, spread: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian class clusters whose means overlap enough to make clustering imperfect."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=spread, size=(classes, dim))
    y = rng.integers(0, classes, n)
    y[:classes] = np.arange(classes)  # every class present
    return means[y] + rng.normal(size=(n, dim)), y


# --------------------------------------------------------------------------- RESQUE_dist


@pytest.mark.parametrize(
    ("n_ref", "n_new", "dim", "classes", "seed"),
    [(50, 40, 3, 2, 0), (300, 200, 16, 5, 1), (1000, 700, 64, 10, 2), (120, 500, 7, 4, 3)],
)
def test_resque_dist_matches_slow_reference(n_ref, n_new, dim, classes, seed):
    rng = np.random.default_rng(seed)
    ref_x = rng.normal(loc=0.5, size=(n_ref, dim))
    ref_y = rng.integers(0, classes, n_ref)
    new_x = ref_x[rng.integers(0, n_ref, n_new)] + rng.normal(scale=0.7, size=(n_new, dim))
    new_y = rng.integers(0, classes, n_new)
    expected, per_class, _, _ = ref.resque_dist(ref_x, ref_y, new_x, new_y)
    result = resque_dist_details(ref_x, ref_y, new_x, new_y)
    assert abs(result.value - expected) <= 1e-9
    assert result.per_class.keys() == per_class.keys()
    for k, theta in per_class.items():
        assert abs(result.per_class[k] - theta) <= 1e-9


def test_resque_dist_with_classes_missing_on_either_side_matches_reference():
    rng = np.random.default_rng(7)
    ref_x, new_x = rng.normal(size=(400, 12)) + 1.0, rng.normal(size=(300, 12)) + 1.0
    ref_y = rng.choice([0, 1, 2, 3, 5], 400)  # 4 never seen, 5 only here
    new_y = rng.choice([0, 1, 2, 4, 7], 300)  # 3 and 5 absent, 4 and 7 only here
    expected, per_class, ref_only, new_only = ref.resque_dist(ref_x, ref_y, new_x, new_y)
    result = resque_dist_details(ref_x, ref_y, new_x, new_y)
    assert result.shared_classes == [0, 1, 2] == sorted(per_class)
    assert result.reference_only == ref_only == [3, 5]
    assert result.new_only == new_only == [4, 7]
    assert abs(result.value - expected) <= 1e-9
    assert result.value == pytest.approx(np.mean([result.per_class[k] for k in (0, 1, 2)]), abs=1e-15)


def test_identical_reference_and_new_data_give_exactly_zero():
    x, y = blobs(500, 32, 6, seed=4)
    assert resque_dist(x, y, x.copy(), y.copy()) == 0.0
    as_float32 = torch.from_numpy(x).to(torch.float32)
    assert resque_dist(as_float32, torch.from_numpy(y), as_float32.clone(), torch.from_numpy(y)) == 0.0
    details = resque_dist_details(x, y, x, y)
    assert all(theta == 0.0 for theta in details.per_class.values())


def test_orthogonal_class_sums_give_one_half():
    # class 0: reference along e0, new along e1; class 1: reference along e2, new along e3.
    ref_x = np.array([[1.0, 0, 0, 0], [2.0, 0, 0, 0], [0, 0, 3.0, 0]])
    new_x = np.array([[0, 5.0, 0, 0], [0, 0, 0, 0.5], [0, 0, 0, 2.0]])
    result = resque_dist_details(ref_x, [0, 0, 1], new_x, [0, 1, 1])
    assert result.per_class == {0: 0.5, 1: 0.5}
    assert result.value == 0.5


def test_orthogonal_in_a_rotated_basis_gives_one_half():
    q, _ = np.linalg.qr(np.random.default_rng(5).normal(size=(10, 10)))
    value = resque_dist(q[:1] * 3.0, [0], q[1:2] * 0.25, [0])
    assert abs(value - 0.5) <= 1e-15
    assert resque_dist(q[:1], [0], -q[:1], [0]) == 1.0


def test_resque_dist_ignores_scale_and_row_order_up_to_rounding():
    x, y = blobs(300, 8, 4, seed=6)
    x2 = x + np.random.default_rng(1).normal(scale=0.5, size=x.shape)
    base = resque_dist(x, y, x2, y)
    perm = np.random.default_rng(2).permutation(len(y))
    assert resque_dist(x[perm] * 7.5, y[perm], x2, y) == pytest.approx(base, abs=1e-12)


def test_zero_class_sum_is_an_error_naming_class_and_layer():
    ref_x = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    new_x = np.array([[1.0, 1.0], [2.0, 0.5], [0.0, 0.0]])
    with pytest.raises(InputError, match=r"class 1 at layer 'fc1'"):
        resque_dist(ref_x, [0, 1, 1], new_x, [0, 1, 1], layer="fc1")
    with pytest.raises(InputError, match=r"class 1"):
        resque_dist(new_x, [0, 0, 1], ref_x, [0, 1, 1])
    # a zero sum in a class that is not shared is excluded, not an error
    assert resque_dist(ref_x, [0, 1, 1], ref_x[:1] * 2, [0]) == 0.0


def test_no_shared_class_is_an_error():
    with pytest.raises(InputError, match="share no class"):
        resque_dist(np.ones((2, 3)), [0, 0], np.ones((2, 3)), [1, 2])


@pytest.mark.parametrize(
    ("features", "labels", "message"),
    [
        (np.ones(5), [0] * 5, "2-D"),
        (np.ones((5, 2)), [0] * 4, "one label per sample"),
        (np.ones((2, 2)), [0, -1], "negative"),
        (np.ones((2, 2)), [0.0, 0.5], "non-integer"),
        (np.ones((0, 2)), [], "empty"),
    ],
)
def test_resque_dist_rejects_bad_input(features, labels, message):
    with pytest.raises(InputError, match=message):
        resque_dist(features, labels, np.ones((2, 2)), [0, 0])


def test_resque_dist_reports_nonfinite_features():
    x = np.ones((3, 2))
    x[1, 0] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        resque_dist(x, [0, 0, 1], np.ones((3, 2)), [0, 0, 1])


# --------------------------------------------------------------------------- RESQUE_task


@pytest.mark.parametrize(
    ("n", "dim", "classes", "seed", "spread"),
    [(60, 2, 2, 0, 1.0), (200, 5, 3, 1, 1.5), (400, 16, 6, 2, 1.2), (300, 3, 4, 3, 0.8), (250, 32, 10, 4, 0.6)],
)
def test_resque_task_matches_slow_reference(n, dim, classes, seed, spread):
    x, y = blobs(n, dim, classes, seed, spread)
    expected = ref.resque_task(x, y)
    result = resque_task_details(x, y)
    assert abs(result.value - expected) <= 1e-9
    assert 0.0 < result.value < 1.0  # the data are meant to overlap: a non-trivial figure
    assert (result.samples_used, result.num_classes, result.init) == (n, classes, "centroids")


def test_resque_task_is_zero_for_separated_classes_and_accepts_any_label_ids():
    x, y = blobs(300, 4, 3, seed=9, spread=40.0)
    labels = np.array([3, 17, 42])[y]
    assert resque_task(x, labels) == 0.0
    assert resque_task(torch.from_numpy(x).float(), torch.from_numpy(labels)) == 0.0


def test_resque_task_kmeans_plus_plus_follows_scikit_learn():
    x, y = blobs(300, 6, 4, seed=11, spread=1.0)
    clusters = KMeans(n_clusters=4, init="k-means++", n_init=1, random_state=0).fit_predict(x)
    assert resque_task(x, y, init="k-means++") == pytest.approx(1 - adjusted_rand_score(y, clusters), abs=1e-12)


def test_resque_task_conv_maps_are_averaged_or_flattened():
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(3), 40)
    maps = rng.normal(size=(120, 4, 3, 3)) + rng.normal(scale=1.5, size=(3, 4, 1, 1))[y]
    assert resque_task(maps, y) == pytest.approx(ref.resque_task(maps.mean(axis=(2, 3)), y), abs=1e-9)
    assert resque_task(maps, y, flatten=True) == pytest.approx(ref.resque_task(maps.reshape(120, -1), y), abs=1e-9)


def test_resque_task_samples_large_input_stratified_and_seeded():
    x, y = blobs(3000, 5, 4, seed=12, spread=1.0)
    y[:2] = 9  # a tiny class that a plain uniform sample of 200 would likely miss
    rows = stratified_sample_indices(y, 200, seed=5)
    assert rows.tolist() == ref.stratified_bottom_k(range(3000), y, 5, 200, 1)
    assert len(rows) == 200 and set(y[rows]) == set(y)
    result = resque_task_details(x, y, max_samples=200, seed=5)
    assert result.samples_used == 200 and result.num_classes == 5
    assert abs(result.value - ref.resque_task(x[rows], y[rows])) <= 1e-9
    assert stratified_sample_indices(y, 200, seed=6).tolist() != rows.tolist()
    # classes keep roughly their share of the data
    share = np.bincount(y[rows], minlength=10)[:4] / 200
    assert np.allclose(share, np.bincount(y, minlength=10)[:4] / 3000, atol=0.1)


def test_small_input_is_used_whole():
    _, y = blobs(150, 2, 3, seed=1)
    assert stratified_sample_indices(y, 150).tolist() == list(range(150))


def test_task_indices_reject_nonfinite_features():
    x, y = blobs(40, 3, 2, seed=0)
    x[5, 1] = np.nan
    with pytest.raises(InputError, match="NaN or infinite"):
        resque_task(x, y)
    with pytest.raises(InputError, match="NaN or infinite"):
        inv_ari(np.eye(2, 3), [0, 1], x, y)
    with pytest.raises(InputError, match="NaN or infinite"):
        per_sample_histograms(x, 8)


def test_resque_task_rejects_single_class_and_bad_init():
    with pytest.raises(InputError, match="at least 2 classes"):
        resque_task(np.random.default_rng(0).normal(size=(10, 2)), [4] * 10)
    with pytest.raises(InputError, match="init"):
        resque_task(np.ones((4, 2)), [0, 0, 1, 1], init="random")


def test_sample_keys_are_splitmix64():
    ids = torch.tensor([0, 1, 2, 7, 123_456_789, 2**40 + 3, 2**62, -5], dtype=torch.int64)
    for seed in (0, 1, 2**33 + 17):
        keys = sample_keys(ids, seed).tolist()
        expected = [ref.splitmix64(seed, int(i) % 2**64) >> 1 for i in ids]
        assert keys == expected


# --------------------------------------------------------------------------- inv_ARI


def test_inv_ari_matches_slow_reference():
    x, y = blobs(400, 8, 5, seed=13, spread=1.5)
    classes, centroids = ref.class_centroids(x, y)
    shifted = x + np.random.default_rng(4).normal(scale=0.8, size=x.shape) + 0.3
    expected = ref.inv_ari(centroids, shifted, y)
    assert abs(inv_ari(centroids, classes, shifted, y) - expected) <= 1e-9
    details = inv_ari_details(torch.from_numpy(centroids), classes, torch.from_numpy(shifted).float(), y)
    assert details.samples_used == 400 and details.num_clusters == 5
    assert abs(details.value - ref.inv_ari(centroids, shifted.astype(np.float32).astype(np.float64), y)) <= 1e-9


def test_inv_ari_rejects_mismatched_inputs():
    c = np.eye(3)
    with pytest.raises(InputError, match="dimensions"):
        inv_ari(c, [0, 1, 2], np.ones((5, 4)), [0] * 5)
    with pytest.raises(InputError, match="sorted"):
        inv_ari(c, [2, 1, 0], np.ones((5, 3)), [0] * 5)
    with pytest.raises(InputError, match="one label per sample"):
        inv_ari(c, [0, 1], np.ones((5, 3)), [0] * 5)


# --------------------------------------------------------------------------- layer shift


def test_layer_shift_matches_reference_and_scipy():
    rng = np.random.default_rng(14)
    edges = np.linspace(-2.0, 3.0, 41)
    ref_counts = ref.layer_histogram(rng.normal(size=5000), edges)
    new_counts = ref.layer_histogram(rng.normal(loc=0.4, scale=1.3, size=3000), edges)
    value = layer_shift(ref_counts, new_counts, edges, 0.9)
    assert abs(value - ref.layer_shift(ref_counts, new_counts, edges, 0.9)) <= 1e-9
    centres = (edges[:-1] + edges[1:]) / 2
    assert value == pytest.approx(wasserstein_distance(centres, centres, ref_counts, new_counts) / 0.9, abs=1e-12)
    assert layer_shift(ref_counts, ref_counts * 3, edges, 0.9) == 0.0


def test_layer_shift_rejects_bad_histograms():
    edges = np.linspace(0, 1, 5)
    with pytest.raises(InputError, match="expected"):
        layer_shift([1, 2, 3], [1, 2, 3, 4], edges, 1.0)
    with pytest.raises(InputError, match="empty histogram"):
        layer_shift([0, 0, 0, 0], [1, 2, 3, 4], edges, 1.0)
    with pytest.raises(InputError, match="vary"):
        layer_shift([1, 0, 0, 0], [1, 2, 3, 4], edges, 0.0, layer="conv2")
    with pytest.raises(InputError, match="increasing"):
        layer_shift([1, 2, 3, 4], [1, 2, 3, 4], edges[::-1], 1.0)
    # An infinite last edge is increasing but has no bin centre; LayerHistogram refuses it too.
    with pytest.raises(InputError, match="finite values"):
        layer_shift([1, 2, 3, 4], [1, 2, 3, 4], np.append(edges[:-1], np.inf), 1.0, layer="conv2")


# --------------------------------------------------------------------------- histograms


def awkward_rows(seed: int) -> np.ndarray:
    """Rows with ties on bin edges, constant rows, negative and tiny ranges."""
    rng = np.random.default_rng(seed)
    rows = [
        rng.normal(size=50),
        rng.integers(0, 8, 50).astype(float),  # many values exactly on edges
        np.full(50, 3.25),
        np.full(50, 0.0),
        rng.uniform(-1e-9, 1e-9, 50),
        np.linspace(-5, 5, 50),
        rng.exponential(size=50) * 1e6,
        np.maximum(rng.normal(size=50), 0.0),  # ReLU-like, many zeros
    ]
    return np.stack(rows)


@pytest.mark.parametrize("bins", [1, 7, 16, 32, 64])
def test_per_sample_histograms_match_numpy_per_row(bins):
    rows = np.concatenate([awkward_rows(bins), np.random.default_rng(bins).normal(size=(40, 50))])
    got = per_sample_histograms(rows, bins)
    assert got.dtype == torch.float64 and got.shape == (len(rows), bins)
    expected = np.stack([ref.row_histogram(r, bins) for r in rows])
    assert np.array_equal(got.numpy(), expected)


def test_per_sample_histograms_constant_row_lands_in_the_middle_bin():
    got = per_sample_histograms(np.full((2, 9), -1.5), 16)
    assert got[:, 8].tolist() == [1.0, 1.0] and float(got.sum()) == 2.0


def test_per_sample_histograms_float32_input_is_binned_as_float64():
    rows = np.random.default_rng(3).normal(size=(10, 30)).astype(np.float32)
    expected = np.stack([ref.row_histogram(r.astype(np.float64), 32) for r in rows])
    assert np.array_equal(per_sample_histograms(torch.from_numpy(rows), 32).numpy(), expected)


def histogram_pairs(seed: int, bins: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = per_sample_histograms(rng.normal(size=(30, 40)), bins).numpy()
    q = per_sample_histograms(rng.normal(size=(30, 40)) ** 2, bins).numpy()
    return p, q


@pytest.mark.parametrize("metric", METRICS)
def test_histogram_distance_matches_scipy_per_row(metric):
    p, q = histogram_pairs(21)
    got = histogram_distance(p, q, metric).numpy()
    for i in range(len(p)):
        if metric == "wasserstein":
            expected = wasserstein_distance(p[i], q[i])
        elif metric == "jensen_shannon":
            expected = jensenshannon(p[i], q[i])
        elif metric == "kl":
            terms = rel_entr(p[i], q[i])
            expected = terms[np.isfinite(terms)].sum()
        else:
            expected = ref.bhattacharyya(p[i], q[i])
        assert abs(got[i] - expected) <= 1e-9, (metric, i)
    assert histogram_distance(p[0], q[0], metric).ndim == 0


@pytest.mark.parametrize("metric", METRICS)
def test_histogram_distance_of_identical_rows_is_zero(metric):
    p, _ = histogram_pairs(22)
    assert np.allclose(histogram_distance(p, p, metric).numpy(), 0.0, atol=1e-7)


def test_histogram_distance_rejects_unknown_metric_and_shapes():
    with pytest.raises(InputError, match="metric"):
        histogram_distance(np.ones(3), np.ones(3), "cosine")
    with pytest.raises(InputError, match="same"):
        histogram_distance(np.ones((2, 3)), np.ones((2, 4)), "kl")


# --------------------------------------------------------------------------- PreIndex p


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("bins", [16, 32, 64])
def test_preindex_p_matches_slow_reference(metric, bins):
    rng = np.random.default_rng(bins)
    clean = [np.maximum(rng.normal(size=(25, 48)), 0), rng.normal(size=(25, 20)), rng.normal(size=(25, 4))]
    shifted = [c + rng.normal(scale=0.5, size=c.shape) for c in clean]
    got = preindex_p(clean, shifted, num_classes=10, bins=bins, metric=metric)
    assert abs(got - ref.preindex_p(clean, shifted, 10, bins, metric)) <= 1e-9


def test_preindex_p_skips_layers_no_wider_than_the_classes():
    rng = np.random.default_rng(1)
    clean = {"wide": rng.normal(size=(20, 30)), "narrow": rng.normal(size=(20, 10))}
    shifted = {k: v * 2 + 1 for k, v in clean.items()}
    only_wide = preindex_p([clean["wide"]], [shifted["wide"]], num_classes=10)
    assert preindex_p(clean, shifted, num_classes=10) == only_wide
    with pytest.raises(InputError, match="no layer"):
        preindex_p([clean["narrow"]], [shifted["narrow"]], num_classes=10)


def test_preindex_p_rejects_unpaired_shapes():
    with pytest.raises(InputError, match="layer '0'"):
        preindex_p([np.ones((4, 20))], [np.ones((5, 20))], num_classes=2)


def test_angle_is_stable_near_zero():
    # arccos(dot) would return exactly 0 (or garbage ~1e-8) here; the spec formula keeps it.
    a = np.array([[1.0, 0.0, 0.0]])
    b = np.array([[1.0, 1e-9, 0.0]])
    assert resque_dist(a, [0], b, [0]) == pytest.approx(math.atan(1e-9) / math.pi, rel=1e-12)
