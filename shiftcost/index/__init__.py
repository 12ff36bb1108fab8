"""Retraining-cost indices: RESQUE_dist, RESQUE_task, inv_ARI, layer shift, PreIndex p.

Two ways in: the functional API for feature matrices already in memory
(``resque_dist``, ``resque_task``, ``inv_ari``, ``layer_shift``, ``preindex_p``), and the
streaming accumulators that the one-pass engine feeds batch by batch and merges across
shards (``ClassSums``, ``EmbeddingSample``, ``LayerHistogram``,
``PairedHistogramDistance``, ``PredictionStats``).

Every accumulator declares its state once (``state.Accumulator``); ``layered`` holds the
accumulators of all hooked layers at once, keyed by layer, and ``shards`` splits a pass
over a large batch into shards computed anywhere and merged.

Importing this package needs only torch, numpy, scipy and scikit-learn. Public names of
the sibling modules ``capture``, ``reference``, ``engine``, ``shards``, ``layered`` and
``state`` are reachable from here too, imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from shiftcost.index.accumulators import (
    ClassSums,
    ClassSumsResult,
    EmbeddingSample,
    EmbeddingSampleResult,
    LayerHistogram,
    PairedHistogramDistance,
    PredictionStats,
    edges_from_range,
    inv_ari_from_sample,
    resque_dist_from_sums,
    resque_task_from_sample,
)
from shiftcost.index.functional import (
    InvAriResult,
    ResqueDistResult,
    ResqueTaskResult,
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

__all__ = [
    "ClassSums",
    "ClassSumsResult",
    "EmbeddingSample",
    "EmbeddingSampleResult",
    "InvAriResult",
    "LayerHistogram",
    "PairedHistogramDistance",
    "PredictionStats",
    "ResqueDistResult",
    "ResqueTaskResult",
    "edges_from_range",
    "histogram_distance",
    "inv_ari",
    "inv_ari_details",
    "inv_ari_from_sample",
    "layer_shift",
    "per_sample_histograms",
    "preindex_p",
    "resque_dist",
    "resque_dist_details",
    "resque_dist_from_sums",
    "resque_task",
    "resque_task_details",
    "resque_task_from_sample",
    "stratified_sample_indices",
]

# Sibling modules whose public names this package forwards on first access.
_LAZY_MODULES = ("engine", "reference", "capture", "shards", "layered", "state")


def __getattr__(name: str) -> Any:
    if name.startswith("_"):
        raise AttributeError(name)
    for module_name in _LAZY_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{module_name}":
                continue  # that module is not part of this build
            raise
        exported = getattr(module, "__all__", None)
        if (exported is None or name in exported) and hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
