"""What one pass over a batch yields: the facts it gathers on the way, and the report at the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from shiftcost.errors import InputError
from shiftcost.index.state import Accumulator

__all__ = ["IndexReport", "PassFacts"]


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
    #: Mean max-softmax probability over the batch (label-free, from the same forward pass).
    mean_confidence: float | None = None

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
                "mean_confidence": self.mean_confidence,
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


class PassFacts(Accumulator):
    """What a pass learns about the batch besides the indices.

    Images seen, how many chunks came with and without labels, how often each label
    occurred (labels the reference never had mean a task change) and whether any logit
    was NaN or infinite (flagged on the device, checked once at the end).
    """

    def __init__(self) -> None:
        self.add_state("samples", 0)
        self.add_state("labelled_chunks", 0)
        self.add_state("unlabelled_chunks", 0)
        self.add_state("label_counts", torch.zeros(0, dtype=torch.int64), "padded_sum")
        self.add_state("nonfinite_logits", torch.zeros((), dtype=torch.int64), saved_as=int)

    def update(self, logits: torch.Tensor, labels: torch.Tensor | None, *, source: str) -> None:
        self._place(logits.device)
        if labels is None:
            self._fold(unlabelled_chunks=1)
        else:
            self._fold(labelled_chunks=1, label_counts=torch.bincount(labels.to(logits.device)))
        self.labelled_or_raise(source)
        self._fold(samples=int(logits.shape[0]), nonfinite_logits=(~torch.isfinite(logits)).sum())

    @property
    def samples(self) -> int:
        return self._samples

    def labelled_or_raise(self, source: str) -> bool | None:
        """Whether the chunks had labels (None before any chunk); mixed chunks are an error."""
        if self._labelled_chunks and self._unlabelled_chunks:
            raise InputError(f"{source} mixes chunks with and without labels; label every chunk or none.")
        return bool(self._labelled_chunks) if self._labelled_chunks or self._unlabelled_chunks else None

    @property
    def labels_seen(self) -> set[int]:
        return set(torch.nonzero(self._label_counts).flatten().tolist())

    def check_finite(self, layout: Any, bad_columns: torch.Tensor, source: str) -> None:
        """One sentence naming the first layer (or the logits) where NaN or inf appeared."""
        columns = torch.nonzero(bad_columns).flatten().tolist()
        if columns:
            where = f"layer '{layout.layer_of(columns[0])}'"
        elif int(self._nonfinite_logits):
            where = "the logits"
        else:
            return
        raise InputError(
            f"The model produced NaN or infinite values at {where} on {source}; check the images for NaN/inf "
            "pixels and the model weights."
        )
