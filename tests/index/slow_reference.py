"""Slow, independent implementations of the index formulas, written from INDEX-SPEC.

Plain Python loops over samples and classes, ``math.fsum`` for sums, exact integer
arithmetic for pair counts. Nothing here calls ``shiftcost``; the tests compare the fast
code against these.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np

# --------------------------------------------------------------------------- RESQUE_dist


def class_sum_vectors(features, labels) -> dict[int, list[float]]:
    """Per-class feature sums with exactly rounded coordinates (math.fsum)."""
    rows_of: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        rows_of[int(y)].append(i)
    dim = len(features[0])
    return {k: [math.fsum(float(features[i][d]) for i in rows) for d in range(dim)] for k, rows in rows_of.items()}


def _norm(v: list[float]) -> float:
    return math.sqrt(math.fsum(x * x for x in v))


def angle_over_pi(a: list[float], b: list[float]) -> float:
    """angle(a, b) / π as 2·atan2(‖u − v‖, ‖u + v‖) for the unit vectors u, v (spec formula)."""
    na, nb = _norm(a), _norm(b)
    if na == 0 or nb == 0:
        raise ZeroDivisionError("zero vector")
    u = [x / na for x in a]
    v = [x / nb for x in b]
    diff = _norm([x - y for x, y in zip(u, v)])
    total = _norm([x + y for x, y in zip(u, v)])
    return 2.0 * math.atan2(diff, total) / math.pi


def resque_dist(ref_x, ref_y, new_x, new_y) -> tuple[float, dict[int, float], list[int], list[int]]:
    """(value, θ per shared class, reference-only classes, new-only classes)."""
    ref = class_sum_vectors(ref_x, ref_y)
    new = class_sum_vectors(new_x, new_y)
    shared = sorted(set(ref) & set(new))
    per_class = {k: angle_over_pi(ref[k], new[k]) for k in shared}
    value = math.fsum(per_class.values()) / len(shared)
    return value, per_class, sorted(set(ref) - set(new)), sorted(set(new) - set(ref))


# --------------------------------------------------------------------------- k-means and ARI


def adjusted_rand_index(labels_true, labels_pred) -> float:
    """Hubert–Arabie ARI from the contingency table, exact pair counts."""
    n = len(labels_true)
    cells = Counter(zip((int(a) for a in labels_true), (int(b) for b in labels_pred)))
    rows = Counter(int(a) for a in labels_true)
    cols = Counter(int(b) for b in labels_pred)

    def pairs(m: int) -> int:
        return m * (m - 1) // 2

    index = sum(pairs(c) for c in cells.values())
    sum_rows = sum(pairs(c) for c in rows.values())
    sum_cols = sum(pairs(c) for c in cols.values())
    total = pairs(n)
    expected_num = sum_rows * sum_cols  # expected index × total, kept integral
    max_num = (sum_rows + sum_cols) * total  # 2 × max index × total
    numerator = 2 * index * total - 2 * expected_num
    denominator = max_num - 2 * expected_num
    if denominator == 0:
        return 1.0  # both partitions trivial in the same way: perfect agreement by convention
    return numerator / denominator


class EmptyCluster(RuntimeError):
    """The plain Lloyd loop below does not relocate empty clusters; test data avoid them."""


def lloyd(features: np.ndarray, centers: np.ndarray, max_iter: int = 300, tol: float = 1e-4) -> list[int]:
    """Lloyd's k-means with scikit-learn's stopping rule.

    Stop when the assignment no longer changes, or when the total squared centre shift is
    at most tol × mean feature variance (then assign once more to the final centres).
    """
    x = [list(map(float, row)) for row in features]
    c = [list(map(float, row)) for row in centers]
    n, dim, k = len(x), len(x[0]), len(c)
    tol_scaled = tol * math.fsum(float(np.var(features[:, d])) for d in range(dim)) / dim

    def assign(cs: list[list[float]]) -> list[int]:
        out = []
        for row in x:
            dists = [math.fsum((row[d] - cs[j][d]) ** 2 for d in range(dim)) for j in range(k)]
            out.append(min(range(k), key=lambda j: dists[j]))
        return out

    previous: list[int] | None = None
    for _ in range(max_iter):
        labels = assign(c)
        members: dict[int, list[int]] = defaultdict(list)
        for i, j in enumerate(labels):
            members[j].append(i)
        if len(members) < k:
            raise EmptyCluster("a cluster lost all its points")
        new_c = [[math.fsum(x[i][d] for i in members[j]) / len(members[j]) for d in range(dim)] for j in range(k)]
        shift = math.fsum((new_c[j][d] - c[j][d]) ** 2 for j in range(k) for d in range(dim))
        c = new_c
        if labels == previous:
            return labels
        if shift <= tol_scaled:
            return assign(c)
        previous = labels
    return assign(c)


def class_centroids(features, labels) -> tuple[list[int], np.ndarray]:
    sums = class_sum_vectors(features, labels)
    counts = Counter(int(y) for y in labels)
    classes = sorted(sums)
    return classes, np.array([[s / counts[k] for s in sums[k]] for k in classes])


def resque_task(features: np.ndarray, labels) -> float:
    """1 − ARI(labels, Lloyd k-means started at the class centroids in sorted class order)."""
    _, centroids = class_centroids(features, labels)
    return 1.0 - adjusted_rand_index(labels, lloyd(np.asarray(features, dtype=np.float64), centroids))


def inv_ari(reference_centroids: np.ndarray, features: np.ndarray, labels) -> float:
    return 1.0 - adjusted_rand_index(labels, lloyd(np.asarray(features, dtype=np.float64), reference_centroids))


# --------------------------------------------------------------------------- sampling


def splitmix64(seed: int, index: int) -> int:
    """The index-th output (0-based) of a splitmix64 generator seeded with ``seed``."""
    mask = (1 << 64) - 1
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def stratified_bottom_k(ids, labels, seed: int, max_samples: int, min_per_class: int) -> list[int]:
    """Ids of the sample: each label's min_per_class smallest keys, then the smallest others up to max_samples."""
    key = {int(i): (splitmix64(seed, int(i)) >> 1, int(i)) for i in ids}
    by_label: dict[int, list[int]] = defaultdict(list)
    for i, y in zip(ids, labels):
        by_label[int(y)].append(int(i))
    chosen = set()
    for members in by_label.values():
        chosen.update(sorted(members, key=key.__getitem__)[:min_per_class])
    rest = sorted((int(i) for i in ids if int(i) not in chosen), key=key.__getitem__)
    chosen.update(rest[: max(max_samples - len(chosen), 0)])
    return sorted(chosen)


# --------------------------------------------------------------------------- histograms


def row_histogram(row, bins: int) -> np.ndarray:
    """numpy.histogram over the row's own range, normalised to sum 1."""
    counts, _ = np.histogram(np.asarray(row, dtype=np.float64), bins=bins)
    return counts / counts.sum()


def bhattacharyya(p, q) -> float:
    return 1.0 - math.fsum(math.sqrt(a * b) for a, b in zip(p, q))


def kl_dropping_nonfinite(p, q) -> float:
    total = []
    for a, b in zip(p, q):
        if a > 0 and b > 0:
            total.append(a * math.log(a / b))
    return math.fsum(total)


def histogram_distance(p, q, metric: str) -> float:
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import wasserstein_distance

    if metric == "wasserstein":
        return float(wasserstein_distance(p, q))
    if metric == "bhattacharyya":
        return bhattacharyya(p, q)
    if metric == "jensen_shannon":
        return float(jensenshannon(p, q))
    if metric == "kl":
        return kl_dropping_nonfinite(p, q)
    raise ValueError(metric)


def preindex_p(clean_layers, shifted_layers, num_classes: int, bins: int, metric: str) -> float:
    per_layer = []
    n = None
    for clean, shifted in zip(clean_layers, shifted_layers):
        n = len(clean)
        if len(clean[0]) <= num_classes:
            continue
        per_layer.append(
            math.fsum(histogram_distance(row_histogram(a, bins), row_histogram(b, bins), metric) for a, b in zip(clean, shifted))
        )
    return math.fsum(per_layer) / len(per_layer) / n


def layer_histogram(values, edges) -> np.ndarray:
    """Counts on fixed edges with out-of-range values folded into the outer bins."""
    v = np.clip(np.asarray(values, dtype=np.float64).ravel(), edges[0], edges[-1])
    counts, _ = np.histogram(v, bins=np.asarray(edges, dtype=np.float64))
    return counts


def wasserstein_1_weighted(values, u_weights, v_weights) -> float:
    """W1 between two weighted point sets on the same sorted support: ∫ |F_u − F_v|."""
    su, sv = math.fsum(u_weights), math.fsum(v_weights)
    cu = cv = 0.0
    total = []
    for i in range(len(values) - 1):
        cu += u_weights[i] / su
        cv += v_weights[i] / sv
        total.append(abs(cu - cv) * (values[i + 1] - values[i]))
    return math.fsum(total)


def layer_shift(ref_counts, new_counts, edges, ref_std: float) -> float:
    centres = [(edges[i] + edges[i + 1]) / 2 for i in range(len(edges) - 1)]
    return wasserstein_1_weighted(centres, list(ref_counts), list(new_counts)) / ref_std


# --------------------------------------------------------------------------- prediction stats


def prediction_stats(logits, labels) -> dict:
    n = len(logits)
    losses, entropies, confidences, correct = [], [], [], 0
    predicted = Counter()
    for i, row in enumerate(logits):
        row = [float(v) for v in row]
        top = max(row)
        log_z = top + math.log(math.fsum(math.exp(v - top) for v in row))
        log_p = [v - log_z for v in row]
        entropies.append(-math.fsum(math.exp(lp) * lp for lp in log_p))
        confidences.append(math.exp(max(log_p)))
        guess = row.index(top)  # first maximum, as argmax
        predicted[guess] += 1
        if labels is not None:
            losses.append(-log_p[int(labels[i])])
            correct += int(guess == int(labels[i]))
    return {
        "accuracy": correct / n if labels is not None else None,
        "mean_loss": math.fsum(losses) / n if labels is not None else None,
        "mean_entropy": math.fsum(entropies) / n,
        "mean_confidence": math.fsum(confidences) / n,
        "predicted_counts": [predicted[k] for k in range(len(logits[0]))],
    }
