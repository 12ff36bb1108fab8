"""Index formulas for callers that already hold feature matrices.

Every function accepts numpy arrays or torch tensors of any float dtype on any device
and computes in float64. The definitions follow INDEX-SPEC and live one family per
module, gathered here under one name:

- :mod:`~shiftcost.index.resque_dist`: RESQUE_dist (angle between per-class feature sums);
- :mod:`~shiftcost.index.clustering`: RESQUE_task and inv_ARI (k-means started at class
  centroids, scored by adjusted Rand index), on the sample of :mod:`~shiftcost.index.sampling`;
- :mod:`~shiftcost.index.histograms`: the unpaired layer shift and the paired PreIndex p;
- :mod:`~shiftcost.index.arrays`: the input conversion they share.

The streaming accumulators in :mod:`shiftcost.index.accumulators` reuse the same helpers,
so a merged stream and a single call share one implementation of each formula.
"""

from __future__ import annotations

from shiftcost.index.arrays import ArrayLike, as_float64, as_labels, as_matrix, pad_rows, require_finite
from shiftcost.index.clustering import (
    KMEANS_INITS,
    InvAriResult,
    KMeansInit,
    ResqueTaskResult,
    class_centroids,
    inv_ari,
    inv_ari_details,
    inv_ari_on_sample,
    kmeans_ari_distance,
    resque_task,
    resque_task_details,
    resque_task_on_sample,
)
from shiftcost.index.histograms import (
    HISTOGRAM_METRICS,
    HistogramMetric,
    bin_centres,
    histogram_distance,
    layer_shift,
    paired_distance_sum,
    per_sample_histograms,
    preindex_p,
)
from shiftcost.index.resque_dist import (
    ResqueDistResult,
    class_angles,
    per_class_sums,
    resque_dist,
    resque_dist_details,
    resque_dist_from_class_sums,
)
from shiftcost.index.sampling import (
    DEFAULT_MAX_SAMPLES,
    bottom_k_candidates,
    final_sample_mask,
    sample_keys,
    stratified_sample_indices,
)

__all__ = [
    "DEFAULT_MAX_SAMPLES",
    "HISTOGRAM_METRICS",
    "KMEANS_INITS",
    "ArrayLike",
    "HistogramMetric",
    "InvAriResult",
    "KMeansInit",
    "ResqueDistResult",
    "ResqueTaskResult",
    "as_float64",
    "as_labels",
    "as_matrix",
    "bin_centres",
    "bottom_k_candidates",
    "class_angles",
    "class_centroids",
    "final_sample_mask",
    "histogram_distance",
    "inv_ari",
    "inv_ari_details",
    "inv_ari_on_sample",
    "kmeans_ari_distance",
    "layer_shift",
    "pad_rows",
    "paired_distance_sum",
    "per_class_sums",
    "per_sample_histograms",
    "preindex_p",
    "require_finite",
    "resque_dist",
    "resque_dist_details",
    "resque_dist_from_class_sums",
    "resque_task",
    "resque_task_details",
    "resque_task_on_sample",
    "sample_keys",
    "stratified_sample_indices",
]
