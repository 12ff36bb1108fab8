"""RESQUE_task and inv_ARI: k-means started at class centroids, scored by adjusted Rand index.

RESQUE_task clusters the new task's embeddings starting at their own class centroids;
inv_ARI clusters the shifted embeddings starting at the stored reference centroids
(INDEX-SPEC). Both run scikit-learn's KMeans with a single initialisation on at most
``max_samples`` rows drawn by :mod:`shiftcost.index.sampling`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from shiftcost.errors import InputError
from shiftcost.index.arrays import ArrayLike, as_float64, as_labels, as_matrix, require_finite, to_numpy
from shiftcost.index.sampling import DEFAULT_MAX_SAMPLES, stratified_sample_indices

KMeansInit = Literal["centroids", "k-means++"]
KMEANS_INITS: tuple[str, ...] = ("centroids", "k-means++")


@dataclass(frozen=True)
class ResqueTaskResult:
    """RESQUE_task = 1 − ARI(labels, k-means clusters), with how it was obtained."""

    value: float
    samples_used: int
    num_classes: int
    init: str


@dataclass(frozen=True)
class InvAriResult:
    """inv_ARI = 1 − ARI(labels, k-means clusters started at reference centroids)."""

    value: float
    samples_used: int
    num_clusters: int


def kmeans_ari_distance(features: np.ndarray, labels: np.ndarray, init: np.ndarray | str, n_clusters: int) -> float:
    """1 − ARI(labels, KMeans(n_clusters, init, n_init=1, random_state=0, Lloyd) clusters)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    km = KMeans(n_clusters=n_clusters, init=init, n_init=1, random_state=0, algorithm="lloyd")
    clusters = km.fit_predict(features)
    return float(1.0 - adjusted_rand_score(labels, clusters))


def class_centroids(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted class ids, float64 centroid per class in that order)."""
    classes, inverse = np.unique(labels, return_inverse=True)
    sums = np.zeros((classes.shape[0], features.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, features)
    counts = np.bincount(inverse, minlength=classes.shape[0]).astype(np.float64)
    return classes, sums / counts[:, None]


def _embedding_matrix(features: ArrayLike, name: str, flatten: bool) -> torch.Tensor:
    t = as_float64(features, name)
    if t.ndim > 2:
        # (N, C, *spatial): flatten keeps every position, otherwise average positions per channel.
        t = t.reshape(t.shape[0], -1) if flatten else t.mean(dim=tuple(range(2, t.ndim)))
    return require_finite(as_matrix(t, name), name)


def resque_task_details(
    features: ArrayLike,
    labels: ArrayLike,
    *,
    init: KMeansInit = "centroids",
    max_samples: int = DEFAULT_MAX_SAMPLES,
    seed: int = 0,
    flatten: bool = False,
    min_per_class: int = 1,
) -> ResqueTaskResult:
    """RESQUE_task with the sample size used (see ``resque_task``)."""
    if init not in KMEANS_INITS:
        raise InputError(f"init={init!r} is not supported; use one of {', '.join(KMEANS_INITS)}.")
    if max_samples < 2:
        raise InputError(f"max_samples={max_samples} is too small; RESQUE_task needs at least 2 samples.")
    x = _embedding_matrix(features, "features", flatten)
    y = as_labels(labels, "labels", x.shape[0])
    num_classes = int(torch.unique(y).numel())
    if num_classes < 2:
        raise InputError(f"the labels hold {num_classes} class; RESQUE_task needs at least 2 classes.")
    if num_classes * min_per_class > max_samples:
        raise InputError(
            f"max_samples={max_samples} cannot hold {min_per_class} sample(s) of each of the {num_classes} classes; raise max_samples."
        )
    rows = stratified_sample_indices(y.cpu(), max_samples, seed=seed, min_per_class=min_per_class)
    x_np = to_numpy(x)[rows]
    y_np = to_numpy(y)[rows]
    return resque_task_on_sample(x_np, y_np, init=init)


def resque_task_on_sample(features: np.ndarray, labels: np.ndarray, *, init: KMeansInit = "centroids") -> ResqueTaskResult:
    """RESQUE_task on exactly the given rows (already sampled), float64 numpy inputs."""
    classes, centroids = class_centroids(features, labels)
    if classes.shape[0] < 2:
        raise InputError(f"the labels hold {classes.shape[0]} class; RESQUE_task needs at least 2 classes.")
    start = centroids if init == "centroids" else init
    value = kmeans_ari_distance(features, labels, start, classes.shape[0])
    return ResqueTaskResult(value, int(features.shape[0]), int(classes.shape[0]), init)


def resque_task(
    features: ArrayLike,
    labels: ArrayLike,
    *,
    init: KMeansInit = "centroids",
    max_samples: int = DEFAULT_MAX_SAMPLES,
    seed: int = 0,
    flatten: bool = False,
) -> float:
    """RESQUE_task = 1 − ARI(labels, k-means clusters) on the new task's embeddings.

    ``init="centroids"`` starts scikit-learn's KMeans (K clusters, n_init=1,
    random_state=0, Lloyd) at the class centroids in sorted class order; ``"k-means++"``
    uses scikit-learn's seeding instead. Inputs above ``max_samples`` rows are reduced to a
    seeded, stratified, uniform sample (``stratified_sample_indices``). Features of more than
    two dimensions are (N, C, *spatial) maps: averaged over positions, or flattened when
    ``flatten=True``.
    """
    return resque_task_details(features, labels, init=init, max_samples=max_samples, seed=seed, flatten=flatten).value


def inv_ari_details(
    reference_centroids: ArrayLike,
    reference_classes: ArrayLike,
    features: ArrayLike,
    labels: ArrayLike,
    *,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    seed: int = 0,
) -> InvAriResult:
    """inv_ARI with the sample size used (see ``inv_ari``)."""
    centroids = require_finite(as_matrix(reference_centroids, "reference_centroids"), "reference_centroids")
    classes = as_labels(reference_classes, "reference_classes", centroids.shape[0])
    if classes.numel() > 1 and not bool(torch.all(classes[1:] > classes[:-1])):
        raise InputError("reference_classes must be sorted and unique, one per row of reference_centroids.")
    x = require_finite(as_matrix(features, "features"), "features")
    y = as_labels(labels, "labels", x.shape[0])
    if x.shape[1] != centroids.shape[1]:
        raise InputError(
            f"features have {x.shape[1]} dimensions but the reference centroids have {centroids.shape[1]}; use the same layer."
        )
    k = centroids.shape[0]
    if k < 2:
        raise InputError("inv_ARI needs reference centroids of at least 2 classes.")
    rows = stratified_sample_indices(y.cpu(), max_samples, seed=seed)
    if rows.shape[0] < k:
        raise InputError(f"inv_ARI needs at least as many samples ({rows.shape[0]}) as reference classes ({k}).")
    return inv_ari_on_sample(to_numpy(centroids), to_numpy(x)[rows], to_numpy(y)[rows])


def inv_ari_on_sample(reference_centroids: np.ndarray, features: np.ndarray, labels: np.ndarray) -> InvAriResult:
    """inv_ARI on exactly the given rows, float64 numpy inputs."""
    k = reference_centroids.shape[0]
    value = kmeans_ari_distance(features, labels, reference_centroids, k)
    return InvAriResult(value, int(features.shape[0]), int(k))


def inv_ari(
    reference_centroids: ArrayLike,
    reference_classes: ArrayLike,
    features: ArrayLike,
    labels: ArrayLike,
    *,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    seed: int = 0,
) -> float:
    """inv_ARI = 1 − ARI(labels, k-means on ``features`` started at the reference centroids).

    ``reference_centroids`` has one row per reference class in the order of the sorted
    ``reference_classes``; KMeans runs with n_init=1, random_state=0 (Lloyd). Inputs above
    ``max_samples`` rows use the same stratified sample as ``resque_task``.
    """
    return inv_ari_details(reference_centroids, reference_classes, features, labels, max_samples=max_samples, seed=seed).value
