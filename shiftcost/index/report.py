"""The report of one pass over a batch: every index and the inputs of the drift tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["IndexReport"]


@dataclass
class IndexReport:
    """Every index and free feature from one pass over a batch.

    ``to_dict()`` gives the JSON view. ``embedding_sample`` (features, labels, ids of the
    sampled rows of the primary layer) and ``image_stats`` (per-image pixel statistics
    of the same rows, columns named by ``image_stat_names``) are kept as attributes for
    the drift detector and are not part of the JSON.
    """

    resque_dist: float | None
    resque_dist_variant: str
    resque_dist_by_layer: dict[str, float]
    excluded_classes: list[int]
    inv_ari: float | None
    layer_shift: float | None
    layer_shift_by_layer: dict[str, float]
    resque_task: float | None
    task_change: bool
    new_classes: list[int]
    preindex_p: float | None
    accuracy: float | None
    mean_loss: float | None
    mean_entropy: float
    predicted_counts: list[int]
    reference_accuracy: float | None
    samples: int
    embedding_samples: int
    seconds: float
    device: str
    layers: list[str]
    notes: list[str] = field(default_factory=list)
    embedding_sample: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    image_stats: torch.Tensor | None = field(default=None, repr=False)
    image_stat_names: tuple[str, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``resque_task`` and ``preindex_p`` appear only when computed."""
        data: dict[str, Any] = {
            "resque_dist": self.resque_dist,
            "resque_dist_variant": self.resque_dist_variant,
            "resque_dist_by_layer": dict(self.resque_dist_by_layer),
            "excluded_classes": list(self.excluded_classes),
            "inv_ari": self.inv_ari,
            "layer_shift": self.layer_shift,
            "layer_shift_by_layer": dict(self.layer_shift_by_layer),
        }
        if self.resque_task is not None:
            data["resque_task"] = self.resque_task
        if self.preindex_p is not None:
            data["preindex_p"] = self.preindex_p
        data.update(
            {
                "task_change": self.task_change,
                "new_classes": list(self.new_classes),
                "accuracy": self.accuracy,
                "mean_loss": self.mean_loss,
                "mean_entropy": self.mean_entropy,
                "predicted_counts": list(self.predicted_counts),
                "reference_accuracy": self.reference_accuracy,
                "samples": self.samples,
                "embedding_samples": self.embedding_samples,
                "seconds": self.seconds,
                "device": self.device,
                "layers": list(self.layers),
                "notes": list(self.notes),
            }
        )
        return data
