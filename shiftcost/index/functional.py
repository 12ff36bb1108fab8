"""Index formulas for callers that already hold feature matrices.

Every function accepts numpy arrays or torch tensors of any float dtype on any device
and computes in float64. The definitions follow INDEX-SPEC: RESQUE_dist (angle between
per-class feature sums), RESQUE_task (k-means started at the class centroids, scored by
adjusted Rand index), inv_ARI, the unpaired layer shift and the paired PreIndex p.

The streaming accumulators in :mod:`shiftcost.index.accumulators` reuse the helpers here,
so a merged stream and a single call share one implementation of each formula.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from shiftcost.errors import InputError

ArrayLike = Any  # numpy array, torch tensor or nested sequence
HistogramMetric = Literal["wasserstein", "bhattacharyya", "jensen_shannon", "kl"]
KMeansInit = Literal["centroids", "k-means++"]

HISTOGRAM_METRICS: tuple[str, ...] = ("wasserstein", "bhattacharyya", "jensen_shannon", "kl")
KMEANS_INITS: tuple[str, ...] = ("centroids", "k-means++")
DEFAULT_MAX_SAMPLES = 20_000


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ResqueDistResult:
    """RESQUE_dist with the per-class angles behind it.

    ``per_class`` maps each shared class to θ_k = angle(s_k, s'_k) / π; ``value`` is their
    mean. Classes seen on only one side are listed, not used.
    """

    value: float
    per_class: dict[int, float]
    shared_classes: list[int]
    reference_only: list[int] = field(default_factory=list)
    new_only: list[int] = field(default_factory=list)


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


# --------------------------------------------------------------------------- conversion


def _where(name: str, layer: str | None) -> str:
    return f"{name} of layer '{layer}'" if layer else name


def as_float64(x: ArrayLike, name: str, *, layer: str | None = None) -> torch.Tensor:
    """Return ``x`` as a float64 torch tensor on its own device (numpy → CPU)."""
    if isinstance(x, torch.Tensor):
        t = x
    else:
        try:
            t = torch.from_numpy(np.ascontiguousarray(x))  # torch refuses negative strides
        except (TypeError, ValueError) as exc:
            raise InputError(f"{_where(name, layer)} is not a numeric array ({exc}); pass a numpy array or torch tensor.") from None
    if t.dtype == torch.bool or t.is_complex():
        raise InputError(f"{_where(name, layer)} has dtype {t.dtype}; pass real-valued features.")
    return t.to(torch.float64)


def as_matrix(x: ArrayLike, name: str, *, layer: str | None = None) -> torch.Tensor:
    """Float64 (N, D) view of ``x``; rejects other ranks and empty input."""
    t = as_float64(x, name, layer=layer)
    if t.ndim != 2:
        raise InputError(
            f"{_where(name, layer)} has shape {tuple(t.shape)}; expected a 2-D (samples, features) matrix."
        )
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise InputError(f"{_where(name, layer)} is empty (shape {tuple(t.shape)}); pass at least one sample and one feature.")
    return t


def as_labels(y: ArrayLike, name: str, n: int | None = None) -> torch.Tensor:
    """Int64 1-D label tensor (own device); rejects non-integral or negative values."""
    try:
        t = y if isinstance(y, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(y))
    except (TypeError, ValueError):
        raise InputError(f"{name} is not an array of integer class ids; pass a numpy array or torch tensor.") from None
    if t.ndim != 1:
        raise InputError(f"{name} has shape {tuple(t.shape)}; expected a 1-D vector of class ids.")
    if n is not None and t.shape[0] != n:
        raise InputError(f"{name} has {t.shape[0]} entries but the features have {n} rows; pass one label per sample.")
    if t.dtype.is_floating_point:
        if t.numel() and not bool(torch.all(t == torch.round(t))):
            raise InputError(f"{name} holds non-integer values; pass integer class ids.")
    elif t.dtype == torch.bool or t.is_complex():
        raise InputError(f"{name} has dtype {t.dtype}; pass integer class ids.")
    t = t.to(torch.int64)
    if t.numel() and int(t.min()) < 0:
        raise InputError(f"{name} holds negative class ids; class ids must be 0 or larger.")
    return t


def require_finite(t: torch.Tensor, name: str, *, layer: str | None = None) -> torch.Tensor:
    """Raise ``InputError`` when ``t`` holds NaN or infinity (costs one device sync)."""
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{_where(name, layer)} contain NaN or infinite values; check the model and the input data.")
    return t


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


# --------------------------------------------------------------------------- RESQUE_dist


def per_class_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 per-class sums (num_classes, D) and int64 counts on the features' device.

    ``features`` must already be float64 (N, D); ``labels`` int64 with values below
    ``num_classes``. CPU uses ``index_add_`` (sequential, exact order); CUDA uses a one-hot
    matrix product because ``index_add_`` there relies on atomics whose order, and so
    the last bits of the sum, vary from run to run.
    """
    device = features.device
    labels = labels.to(device, non_blocking=True)
    if device.type == "cpu":
        sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, device=device)
        sums.index_add_(0, labels, features)
    else:
        one_hot = torch.nn.functional.one_hot(labels, num_classes).to(torch.float64)
        sums = one_hot.T @ features
    counts = torch.bincount(labels, minlength=num_classes)
    return sums, counts


def class_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """θ = angle(a_k, b_k) / π per row, via 2·atan2(‖u−v‖, ‖u+v‖) on unit vectors.

    arccos of a dot product loses half the digits near 0; this form is exact for equal
    rows (0.0) and for orthogonal axis-aligned rows (0.5). Rows must be non-zero.
    """
    u = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True)
    v = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True)
    diff = torch.linalg.vector_norm(u - v, dim=-1)
    total = torch.linalg.vector_norm(u + v, dim=-1)
    return 2.0 * torch.atan2(diff, total) / math.pi


def resque_dist_from_class_sums(
    reference_sums: torch.Tensor,
    reference_counts: torch.Tensor,
    new_sums: torch.Tensor,
    new_counts: torch.Tensor,
    *,
    layer: str | None = None,
) -> ResqueDistResult:
    """RESQUE_dist from dense per-class sums (row k = class k) and counts.

    A class is present on a side when its count is positive. Shared classes are scored,
    the others reported. Raises ``InputError`` when no class is shared, when a shared
    class sums to the zero vector, or when a sum is not finite.
    """
    reference_sums = reference_sums.detach().to("cpu", torch.float64)
    new_sums = new_sums.detach().to("cpu", torch.float64)
    if reference_sums.shape[1] != new_sums.shape[1]:
        raise InputError(
            f"the reference features{_in_layer(layer)} have {reference_sums.shape[1]} dimensions but the new ones have "
            f"{new_sums.shape[1]}; compare features from the same layer."
        )
    ref_present = set(torch.nonzero(reference_counts.cpu() > 0).flatten().tolist())
    new_present = set(torch.nonzero(new_counts.cpu() > 0).flatten().tolist())
    shared = sorted(ref_present & new_present)
    reference_only = sorted(ref_present - new_present)
    new_only = sorted(new_present - ref_present)
    if not shared:
        raise InputError(
            f"the reference and new data{_in_layer(layer)} share no class (reference classes {sorted(ref_present)}, "
            f"new classes {sorted(new_present)}); RESQUE_dist needs labels from the same label space."
        )
    index = torch.tensor(shared, dtype=torch.int64)
    a = reference_sums.index_select(0, index)
    b = new_sums.index_select(0, index)
    for side, sums in (("reference", a), ("new", b)):
        if not bool(torch.isfinite(sums).all()):
            bad = shared[int(torch.nonzero(~torch.isfinite(sums).all(dim=1))[0])]
            raise InputError(
                f"the {side} features of class {bad}{_in_layer(layer)} contain non-finite values; check the model and the input data."
            )
        zero = torch.linalg.vector_norm(sums, dim=1) == 0
        if bool(zero.any()):
            bad = shared[int(torch.nonzero(zero)[0])]
            raise InputError(
                f"the {side} features of class {bad}{_in_layer(layer)} sum to the zero vector, so their direction is "
                "undefined; pick a layer whose activations are not all zero for that class."
            )
    theta = class_angles(a, b)
    per_class = {k: float(t) for k, t in zip(shared, theta.tolist())}
    value = float(theta.mean())
    return ResqueDistResult(value, per_class, shared, reference_only, new_only)


def _in_layer(layer: str | None) -> str:
    return f" at layer '{layer}'" if layer else ""


def _sums_of(features: ArrayLike, labels: ArrayLike, side: str, layer: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    x = as_matrix(features, f"{side}_features", layer=layer)
    y = as_labels(labels, f"{side}_labels", x.shape[0])
    return per_class_sums(x, y, int(y.max()) + 1)


def resque_dist_details(
    ref_features: ArrayLike,
    ref_labels: ArrayLike,
    new_features: ArrayLike,
    new_labels: ArrayLike,
    *,
    layer: str | None = None,
) -> ResqueDistResult:
    """RESQUE_dist with per-class angles and the classes left out (see ``ResqueDistResult``).

    ``*_features`` are (N, D) matrices of one layer's vectors, ``*_labels`` integer class ids.
    ``layer`` only names the layer in error messages.
    """
    ref_sums, ref_counts = _sums_of(ref_features, ref_labels, "reference", layer)
    new_sums, new_counts = _sums_of(new_features, new_labels, "new", layer)
    k = max(ref_sums.shape[0], new_sums.shape[0])
    return resque_dist_from_class_sums(
        pad_rows(ref_sums, k), pad_rows(ref_counts, k), pad_rows(new_sums, k), pad_rows(new_counts, k), layer=layer
    )


def resque_dist(
    ref_features: ArrayLike,
    ref_labels: ArrayLike,
    new_features: ArrayLike,
    new_labels: ArrayLike,
    *,
    layer: str | None = None,
) -> float:
    """RESQUE_dist: mean over shared classes of angle(Σ reference, Σ new) / π, in [0, 1]."""
    return resque_dist_details(ref_features, ref_labels, new_features, new_labels, layer=layer).value


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] >= rows:
        return t
    pad = torch.zeros((rows - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    return torch.cat([t, pad])


# --------------------------------------------------------------------------- sampling

_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MIX_1 = 0xBF58476D1CE4E5B9
_MIX_2 = 0x94D049BB133111EB


def _signed64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= (1 << 63) else value


def _logical_shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    # torch shifts int64 arithmetically; masking off the copied sign bits makes it logical.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def sample_keys(ids: torch.Tensor, seed: int) -> torch.Tensor:
    """Seeded pseudo-random key of each sample id: the id-th output of splitmix64(seed).

    Keys depend only on (seed, id), never on arrival order, which is what makes a
    bottom-k sample identical whatever the batching and sharding. Returned as
    non-negative int64 (the top 63 bits of the 64-bit output). int64 arithmetic in
    torch wraps around, which is the modulo-2^64 arithmetic splitmix64 needs.
    """
    ids = ids.to(torch.int64)
    z = (ids + 1) * _signed64(_GOLDEN_GAMMA) + _signed64(seed)
    z = (z ^ _logical_shift_right(z, 30)) * _signed64(_MIX_1)
    z = (z ^ _logical_shift_right(z, 27)) * _signed64(_MIX_2)
    z = z ^ _logical_shift_right(z, 31)
    return _logical_shift_right(z, 1)


def _key_order(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Permutation sorting by (key, id); ids break the (rare) key ties deterministically."""
    by_id = torch.argsort(ids, stable=True)
    by_key = torch.argsort(keys[by_id], stable=True)
    return by_id[by_key]


def _rank_within_label(labels_sorted: torch.Tensor) -> torch.Tensor:
    """For labels already grouped by a stable sort, each item's position inside its group."""
    n = labels_sorted.shape[0]
    position = torch.arange(n, device=labels_sorted.device)
    new_group = torch.ones(n, dtype=torch.bool, device=labels_sorted.device)
    new_group[1:] = labels_sorted[1:] != labels_sorted[:-1]
    group_start = torch.cummax(torch.where(new_group, position, torch.zeros_like(position)), dim=0).values
    return position - group_start


def bottom_k_candidates(
    keys: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor, max_samples: int, min_per_class: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows to keep while streaming, and which of them are per-class guarantees.

    Keeps the ``max_samples`` smallest keys overall plus the ``min_per_class`` smallest
    of every label. Both are decomposable (the bottom-k of a union is the bottom-k of the
    union of bottom-ks), so applying this after any split of the data and once more after
    merging gives the same rows as one pass. Returns (keep mask, guaranteed mask).
    """
    order = _key_order(keys, ids)
    n = keys.shape[0]
    global_rank = torch.empty(n, dtype=torch.int64, device=keys.device)
    global_rank[order] = torch.arange(n, device=keys.device)
    by_label = torch.argsort(labels[order], stable=True)
    grouped = order[by_label]  # grouped by label, keys ascending inside each group
    class_rank = torch.empty(n, dtype=torch.int64, device=keys.device)
    class_rank[grouped] = _rank_within_label(labels[grouped])
    guaranteed = class_rank < min_per_class
    return guaranteed | (global_rank < max_samples), guaranteed


def final_sample_mask(
    keys: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor, max_samples: int, min_per_class: int
) -> torch.Tensor:
    """The sample itself: every label's ``min_per_class`` smallest keys, then the smallest
    remaining keys until ``max_samples`` rows (more only if the guarantees alone exceed it).

    Correct on the streamed candidates because a row of the final sample that is not a
    guarantee ranks at most ``max_samples`` overall, so it is among the kept candidates.
    """
    keep, guaranteed = bottom_k_candidates(keys, ids, labels, max_samples, min_per_class)
    room = max(max_samples - int(guaranteed.sum()), 0)
    rest = torch.nonzero(~guaranteed).flatten()
    rest = rest[_key_order(keys[rest], ids[rest])][:room]
    chosen = guaranteed.clone()
    chosen[rest] = True
    return chosen


def stratified_sample_indices(
    labels: ArrayLike, max_samples: int = DEFAULT_MAX_SAMPLES, *, seed: int = 0, min_per_class: int = 1
) -> np.ndarray:
    """Sorted row indices of the seeded, stratified sample used for large inputs.

    Row i gets the key ``sample_keys(i, seed)``; the sample is every class's
    ``min_per_class`` smallest keys plus the smallest other keys up to ``max_samples``
    rows: a uniform draw without replacement (so classes appear in proportion to their
    size, in expectation) in which no class is missing. ``EmbeddingSample`` streams the
    same rule, so both select the same rows for the same data and seed.
    """
    y = as_labels(labels, "labels")
    n = y.shape[0]
    if n <= max_samples:
        return np.arange(n)
    ids = torch.arange(n, dtype=torch.int64)
    mask = final_sample_mask(sample_keys(ids, seed), ids, y, max_samples, min_per_class)
    return _to_numpy(torch.nonzero(mask).flatten())


# --------------------------------------------------------------------------- k-means + ARI


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
    x_np = _to_numpy(x)[rows]
    y_np = _to_numpy(y)[rows]
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
    return inv_ari_on_sample(_to_numpy(centroids), _to_numpy(x)[rows], _to_numpy(y)[rows])


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


# --------------------------------------------------------------------------- layer shift


def bin_centres(edges: torch.Tensor) -> torch.Tensor:
    return (edges[:-1] + edges[1:]) / 2


def layer_shift(
    reference_counts: ArrayLike,
    new_counts: ArrayLike,
    edges: ArrayLike,
    reference_std: float,
    *,
    layer: str | None = None,
) -> float:
    """Wasserstein-1 between two histograms on the same edges, divided by the reference std.

    Uses ``scipy.stats.wasserstein_distance`` with the bin centres as values and the counts
    as weights. The engine averages this over layers.
    """
    from scipy.stats import wasserstein_distance

    e = as_float64(edges, "edges", layer=layer).cpu()
    ref = as_float64(reference_counts, "reference_counts", layer=layer).cpu()
    new = as_float64(new_counts, "new_counts", layer=layer).cpu()
    if e.ndim != 1 or e.shape[0] < 2 or not bool(torch.all(e[1:] > e[:-1])):
        raise InputError(f"{_where('edges', layer)} must be a strictly increasing 1-D sequence of at least 2 values.")
    bins = e.shape[0] - 1
    for name, counts in (("reference_counts", ref), ("new_counts", new)):
        if counts.shape != (bins,):
            raise InputError(f"{_where(name, layer)} has shape {tuple(counts.shape)}; expected ({bins},) to match the edges.")
        if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
            raise InputError(f"{_where(name, layer)} must hold finite, non-negative counts.")
        if float(counts.sum()) <= 0:
            raise InputError(f"{_where(name, layer)} is an empty histogram; it needs at least one value.")
    std = float(reference_std)
    if not math.isfinite(std) or std <= 0:
        raise InputError(
            f"the reference standard deviation{_in_layer(layer)} is {std}; layer shift needs a layer whose reference activations vary."
        )
    centres = bin_centres(e).numpy()
    distance = wasserstein_distance(centres, centres, u_weights=ref.numpy(), v_weights=new.numpy())
    return float(distance / std)


# --------------------------------------------------------------------------- PreIndex p


def per_sample_histograms(features: ArrayLike, bins: int, *, layer: str | None = None) -> torch.Tensor:
    """Each row's histogram over that row's own [min, max], normalised to sum 1, float64 (N, bins).

    Binning follows ``numpy.histogram(row, bins)`` exactly: edges min + k·(max−min)/bins with
    the last edge equal to max, bins half-open except the last, which includes max. A
    constant row c uses numpy's range [c − 0.5, c + 0.5], so all its mass lands in bin
    ``bins // 2``. Vectorised over rows on the input's device.
    """
    x = require_finite(as_matrix(features, "features", layer=layer), "features", layer=layer)
    return _row_histograms(x, _check_bins(bins))


def _check_bins(bins: int) -> int:
    if int(bins) < 1:
        raise InputError(f"bins={bins}; the histogram needs at least one bin.")
    return int(bins)


def _row_histograms(x: torch.Tensor, bins: int) -> torch.Tensor:
    """``per_sample_histograms`` without input checks (rows with NaN or inf give garbage)."""
    lo = x.min(dim=1, keepdim=True).values
    hi = x.max(dim=1, keepdim=True).values
    flat = lo == hi
    lo = torch.where(flat, lo - 0.5, lo)
    hi = torch.where(flat, hi + 0.5, hi)
    step = (hi - lo) / bins
    k = torch.arange(bins + 1, dtype=torch.float64, device=x.device)
    edges = k * step + lo  # same operations, in the same order, as numpy.linspace
    edges[:, -1:] = hi
    index = torch.searchsorted(edges.contiguous(), x.contiguous(), right=True) - 1
    index = index.clamp_(0, bins - 1)
    counts = torch.zeros(x.shape[0], bins, dtype=torch.float64, device=x.device)
    counts.scatter_add_(1, index, torch.ones_like(x))
    return counts / x.shape[1]


def histogram_distance(p: ArrayLike, q: ArrayLike, metric: HistogramMetric = "wasserstein") -> torch.Tensor:
    """Distance between paired histograms, row by row; 1-D inputs give a 0-d tensor.

    - ``wasserstein``: ``scipy.stats.wasserstein_distance(p, q)`` on the histograms'
      values (bin heights taken as samples, as in the PreIndex code); for rows of equal
      length that is mean(|sort(p) − sort(q)|).
    - ``bhattacharyya``: 1 − Σ √(p·q).
    - ``jensen_shannon``: ``scipy.spatial.distance.jensenshannon(p, q)`` (natural log, rows
      normalised to sum 1, square root of the divergence).
    - ``kl``: Σ p·log(p/q), dropping non-finite terms (p = 0 or q = 0).
    """
    if metric not in HISTOGRAM_METRICS:
        raise InputError(f"metric={metric!r} is not supported; use one of {', '.join(HISTOGRAM_METRICS)}.")
    a = as_float64(p, "p")
    b = as_float64(q, "q").to(a.device)
    if a.shape != b.shape or a.ndim not in (1, 2) or a.shape[-1] == 0:
        raise InputError(f"p and q must have the same (rows, bins) or (bins,) shape; got {tuple(a.shape)} and {tuple(b.shape)}.")
    if metric == "wasserstein":
        return (torch.sort(a, dim=-1).values - torch.sort(b, dim=-1).values).abs().mean(dim=-1)
    if metric == "bhattacharyya":
        return 1.0 - torch.sqrt(a * b).sum(dim=-1)
    if metric == "jensen_shannon":
        a = a / a.sum(dim=-1, keepdim=True)
        b = b / b.sum(dim=-1, keepdim=True)
        m = (a + b) / 2
        divergence = _relative_entropy(a, m).sum(dim=-1) + _relative_entropy(b, m).sum(dim=-1)
        return torch.sqrt(divergence / 2)
    terms = a * torch.log(a / b)  # inf where q = 0, nan where p = 0: both dropped below
    return torch.where(torch.isfinite(terms), terms, torch.zeros_like(terms)).sum(dim=-1)


def _relative_entropy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # scipy.special.rel_entr for y > 0 wherever x > 0 (true for the mixture m).
    safe = torch.where(x > 0, x / y, torch.ones_like(x))
    return torch.where(x > 0, x * torch.log(safe), torch.zeros_like(x))


def paired_distance_sum(clean: torch.Tensor, shifted: torch.Tensor, bins: int, metric: HistogramMetric) -> torch.Tensor:
    """Σ over samples of the histogram distance between clean and shifted rows (0-d float64).

    Takes float64 (N, D) matrices on one device and checks nothing, so that a streaming
    caller pays no device synchronisation; callers check finiteness themselves.
    """
    bins = _check_bins(bins)
    return histogram_distance(_row_histograms(clean, bins), _row_histograms(shifted, bins), metric).sum()


def preindex_p(
    clean_features: Sequence[ArrayLike] | Mapping[str, ArrayLike],
    shifted_features: Sequence[ArrayLike] | Mapping[str, ArrayLike],
    *,
    num_classes: int,
    bins: int = 32,
    metric: HistogramMetric = "wasserstein",
) -> float:
    """PreIndex p in its paired form: row i of ``shifted`` is a corrupted copy of row i of ``clean``.

    Per layer (one (N, D_l) matrix each, given as a sequence or a name → matrix mapping),
    only layers with D_l > ``num_classes`` count: sum over samples of the distance between
    the two per-sample histograms, averaged over layers, divided by the number of samples.
    """
    if metric not in HISTOGRAM_METRICS:
        raise InputError(f"metric={metric!r} is not supported; use one of {', '.join(HISTOGRAM_METRICS)}.")
    clean_items = _named_layers(clean_features, "clean_features")
    shifted_items = _named_layers(shifted_features, "shifted_features")
    if [n for n, _ in clean_items] != [n for n, _ in shifted_items]:
        raise InputError("clean_features and shifted_features must list the same layers in the same order.")
    totals = []
    samples = None
    for (name, clean), (_, shifted) in zip(clean_items, shifted_items):
        c = as_matrix(clean, "clean_features", layer=name)
        s = as_matrix(shifted, "shifted_features", layer=name).to(c.device)
        if c.shape != s.shape:
            raise InputError(
                f"clean and shifted features of layer '{name}' have shapes {tuple(c.shape)} and {tuple(s.shape)}; "
                "the paired form needs one shifted copy per clean sample."
            )
        if samples is not None and c.shape[0] != samples:
            raise InputError(f"layer '{name}' has {c.shape[0]} samples but earlier layers have {samples}; pass the same samples for every layer.")
        samples = c.shape[0]
        if c.shape[1] <= num_classes:
            continue
        for side, t in (("clean_features", c), ("shifted_features", s)):
            require_finite(t, side, layer=name)
        totals.append(float(paired_distance_sum(c, s, bins, metric)))
    if not totals:
        raise InputError(f"no layer has more than num_classes={num_classes} features; PreIndex p uses only wider layers.")
    return float(np.mean(totals) / samples)


def _named_layers(layers: Sequence[ArrayLike] | Mapping[str, ArrayLike], name: str) -> list[tuple[str, ArrayLike]]:
    if isinstance(layers, Mapping):
        items = [(str(k), v) for k, v in layers.items()]
    elif isinstance(layers, (np.ndarray, torch.Tensor)):
        raise InputError(f"{name} must be a sequence of per-layer matrices, not a single array; wrap one layer in a list.")
    else:
        items = [(str(i), v) for i, v in enumerate(layers)]
    if not items:
        raise InputError(f"{name} lists no layer; pass at least one (samples, features) matrix.")
    return items
