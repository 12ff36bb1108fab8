"""The names of the figures measured on a batch: the cost model's inputs and the report's columns.

The string values are stored in the database and in JSON files, so they never change.
"""

from __future__ import annotations

from enum import StrEnum


class Feature(StrEnum):
    """One figure measured on a new batch."""

    RESQUE_DIST = "resque_dist"
    INV_ARI = "inv_ari"
    LAYER_SHIFT = "layer_shift"
    RESQUE_TASK = "resque_task"
    PREINDEX_P = "preindex_p"
    ACCURACY = "accuracy"
    MEAN_LOSS = "mean_loss"
    MEAN_ENTROPY = "mean_entropy"
    MEAN_CONFIDENCE = "mean_confidence"


#: Shift indices, in the order the cost model's feature vector uses when they are present.
SHIFT_FEATURES: tuple[Feature, ...] = (
    Feature.RESQUE_DIST,
    Feature.INV_ARI,
    Feature.LAYER_SHIFT,
    Feature.RESQUE_TASK,
    Feature.PREINDEX_P,
)
#: Figures from the same forward pass over the new batch (accuracy and loss need labels).
FREE_FEATURES: tuple[Feature, ...] = (Feature.ACCURACY, Feature.MEAN_LOSS, Feature.MEAN_ENTROPY, Feature.MEAN_CONFIDENCE)
#: The cost model's features by default. PreIndex p is left out (it needs the clean originals
#: of each shifted image, which production batches never have) and so is ResQue task.
COST_FEATURES: tuple[Feature, ...] = (
    Feature.RESQUE_DIST,
    Feature.INV_ARI,
    Feature.LAYER_SHIFT,
    Feature.ACCURACY,
    Feature.MEAN_LOSS,
    Feature.MEAN_ENTROPY,
)
#: Every feature, shift indices first.
KNOWN_FEATURES: tuple[Feature, ...] = SHIFT_FEATURES + FREE_FEATURES

__all__ = ["COST_FEATURES", "FREE_FEATURES", "KNOWN_FEATURES", "SHIFT_FEATURES", "Feature"]
