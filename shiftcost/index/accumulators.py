"""Streaming, mergeable accumulators for every index (torchmetrics-style contract).

Each class offers ``update(...)`` per batch, ``merge(other)`` (in place, returns self),
``compute()``, ``state_dict()`` / ``load_state_dict(state)`` and ``reset()``; all but
``update`` and ``compute`` come from :class:`~shiftcost.index.state.Accumulator`, from the
state each class declares once with ``add_state``. Sums are kept in float64 whatever the
input dtype. State lives on the device of the batches (set by the first update and moved,
once, when batches arrive on another device), and updates avoid host synchronisation
where the result does not need it: problems such as non-finite activations are counted
on the device and reported by ``compute()``.

Merging any split of the data gives the result of one pass: exactly for counts and for
the embedding sample, up to float64 rounding for sums. The histogram accumulators
(``LayerHistogram``, ``PairedHistogramDistance``) are in
:mod:`shiftcost.index.histogram_accumulators` and importable from here too; the ones that
serve every hooked layer at once are in :mod:`shiftcost.index.layered`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch

from shiftcost.errors import InputError
from shiftcost.index.arrays import ArrayLike, as_labels, as_matrix, of_layer, require_same_width, zero_scalar
from shiftcost.index.clustering import InvAriResult, KMeansInit, ResqueTaskResult, inv_ari_on_sample, resque_task_on_sample
from shiftcost.index.histogram_accumulators import LayerHistogram, PairedHistogramDistance, edges_from_range
from shiftcost.index.resque_dist import ResqueDistResult, per_class_sums, resque_dist_from_class_sums
from shiftcost.index.sampling import DEFAULT_MAX_SAMPLES, bottom_k_candidates, final_sample_mask, sample_keys
from shiftcost.index.state import Accumulator, StateDict

# Formula helpers this module once imported for its own use; callers may have taken them
# from here, so they stay reachable (their home is shiftcost.index.functional).
from shiftcost.index.arrays import as_float64, pad_rows  # noqa: E402, F401
from shiftcost.index.histograms import HISTOGRAM_METRICS, HistogramMetric, paired_distance_sum  # noqa: E402, F401

__all__ = [
    "ClassSums",
    "ClassSumsResult",
    "EmbeddingSample",
    "EmbeddingSampleResult",
    "LayerHistogram",
    "PairedHistogramDistance",
    "PredictionStats",
    "StateDict",
    "edges_from_range",
    "inv_ari_from_sample",
    "resque_dist_from_sums",
    "resque_task_from_sample",
]

_F64, _I64 = torch.float64, torch.int64


# --------------------------------------------------------------------------- ClassSums


class ClassSumsResult(NamedTuple):
    """Classes seen (sorted), their float64 feature sums (K, D) and int64 counts (K,), on CPU."""

    classes: list[int]
    sums: torch.Tensor
    counts: torch.Tensor


class ClassSums(Accumulator):
    """Per-class float64 feature sums and int64 counts: the whole state of RESQUE_dist.

    Storage is dense by class id and grows with the largest label seen. Labels on CPU cost
    no device synchronisation; labels on CUDA cost one per batch (their maximum).
    """

    def __init__(self) -> None:
        self.add_state("sums", torch.zeros(0, 0, dtype=_F64), "padded_sum")
        self.add_state("counts", torch.zeros(0, dtype=_I64), "padded_sum")

    @classmethod
    def of(cls, sums: torch.Tensor, counts: torch.Tensor) -> ClassSums:
        """Class sums holding dense ``sums`` (K, D) and ``counts`` (K,) indexed by class id."""
        accumulator = cls()
        accumulator._place(sums.device)
        accumulator._fold(sums=sums.to(_F64), counts=counts.to(_I64))
        return accumulator

    @property
    def num_features(self) -> int | None:
        return None if self._sums.shape[0] == 0 else int(self._sums.shape[1])

    @property
    def samples(self) -> int:
        return int(self._counts.sum())

    def update(self, features: ArrayLike, labels: ArrayLike, *, layer: str | None = None) -> None:
        """Add a batch: ``features`` (N, D), ``labels`` (N,) non-negative class ids."""
        x = as_matrix(features, "features", layer=layer)
        y = as_labels(labels, "labels", x.shape[0])
        dim = self.num_features
        if dim is not None and x.shape[1] != dim:
            raise InputError(f"features{of_layer(layer)} have {x.shape[1]} dimensions but earlier batches had {dim}; feed one layer per accumulator.")
        self._place(x.device)
        sums, counts = per_class_sums(x, y, int(y.max()) + 1)
        self._fold(sums=sums, counts=counts)

    def _check_mergeable(self, other: ClassSums) -> None:
        require_same_width(self.num_features, other.num_features, "class sums")

    def _check_loaded(self) -> None:
        if self._sums.shape[0] != self._counts.shape[0]:
            raise InputError("the ClassSums state has sums and counts of different lengths; the file is corrupt.")

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense (sums, counts) indexed by class id, on CPU; empty when nothing was seen."""
        if self._sums.shape[0] == 0:
            return torch.zeros(0, 0, dtype=_F64), torch.zeros(0, dtype=_I64)
        return self._sums.detach().cpu(), self._counts.detach().cpu()

    def compute(self) -> ClassSumsResult:
        sums, counts = self.dense()
        present = torch.nonzero(counts > 0).flatten()
        return ClassSumsResult(present.tolist(), sums.index_select(0, present), counts.index_select(0, present))

    def centroids(self) -> tuple[list[int], torch.Tensor]:
        """Sorted class ids and their float64 mean feature vectors (the inv_ARI reference)."""
        classes, sums, counts = self.compute()
        return classes, sums / counts.to(_F64)[:, None]


def resque_dist_from_sums(reference: ClassSums, new: ClassSums, *, layer: str | None = None) -> ResqueDistResult:
    """RESQUE_dist between two ``ClassSums`` (same formula as ``functional.resque_dist``)."""
    for side, acc in (("reference", reference), ("new", new)):
        if acc.samples == 0:
            raise InputError(f"the {side} class sums{of_layer(layer)} are empty; update them with at least one batch.")
    return resque_dist_from_class_sums(*reference.dense(), *new.dense(), layer=layer)


# --------------------------------------------------------------------------- EmbeddingSample


class EmbeddingSampleResult(NamedTuple):
    """The sample, sorted by id: float64 features (M, D), int64 labels (−1 = unlabelled), int64 ids."""

    features: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor


class EmbeddingSample(Accumulator):
    """Bounded, seeded, stratified sample of embeddings, identical under any batching or sharding.

    Each sample id (its global position in the data set) gets a key that depends only on
    the id and the seed (``functional.sample_keys``). The sample is the ``min_per_class``
    smallest keys of every class plus the smallest remaining keys up to ``max_samples``
    rows: a uniform draw without replacement in which no class is missing. While
    streaming, only the ``max_samples`` smallest keys overall and the ``min_per_class``
    smallest per class are kept; both survive any split and merge, so the result equals
    one pass exactly. With at most ``max_samples`` samples seen the sample is all of them.

    Memory: at most ``max_samples + K·min_per_class`` kept rows plus a pending buffer of
    about ``max_samples`` rows that is compacted when full (one device sync per compaction).
    Ids must be unique across everything merged (a repeated id is reported when both
    copies are among the kept rows); ``ids=None`` numbers the samples in arrival order,
    which is only order-invariant for a single stream.
    """

    settings = ("max_samples", "seed", "min_per_class")

    #: pending rows are compacted once they reach max(max_samples, this); a floor keeps
    #: compactions (each one sort plus one device sync) rare when max_samples is small.
    compact_min_rows: int = 1024

    def __init__(self, max_samples: int = DEFAULT_MAX_SAMPLES, seed: int = 0, min_per_class: int = 1) -> None:
        if int(max_samples) < 1:
            raise InputError(f"max_samples={max_samples}; the embedding sample needs room for at least one row.")
        if int(min_per_class) < 0:
            raise InputError(f"min_per_class={min_per_class}; it must be 0 or larger.")
        self.max_samples = int(max_samples)
        self.seed = int(seed)
        self.min_per_class = int(min_per_class)
        # Candidate rows; merged shards' candidates are appended, then filtered again.
        self.add_state("features", torch.zeros(0, 0, dtype=_F64), "cat")
        self.add_state("labels", torch.zeros(0, dtype=_I64), "cat")
        self.add_state("ids", torch.zeros(0, dtype=_I64), "cat")
        self.add_state("seen", 0)
        self._clear_pending()

    def _clear_pending(self) -> None:
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending_rows = 0

    def reset(self) -> None:
        super().reset()
        self._clear_pending()

    @property
    def seen(self) -> int:
        """Samples offered so far (over every merged shard)."""
        return self._seen

    @property
    def num_features(self) -> int | None:
        if self._ids.shape[0]:
            return int(self._features.shape[1])
        return int(self._pending[0][0].shape[1]) if self._pending else None

    def with_columns(self, columns: slice) -> EmbeddingSample:
        """The same rows with only ``columns`` of their features (a sample of joined features, split)."""
        self._sync()
        part = EmbeddingSample(self.max_samples, self.seed, self.min_per_class)
        part._place(self._device)
        part._fold(features=self._features[:, columns].contiguous(), labels=self._labels, ids=self._ids, seen=self._seen)
        return part

    def update(
        self, features: ArrayLike, labels: ArrayLike | None = None, ids: ArrayLike | None = None, *, layer: str | None = None
    ) -> None:
        """Offer a batch: ``features`` (N, D), ``labels`` (N,) or None, ``ids`` (N,) global sample indices."""
        x = as_matrix(features, "features", layer=layer)
        n = x.shape[0]
        if labels is None:
            y = torch.full((n,), -1, dtype=_I64, device=x.device)
        else:
            y = as_labels(labels, "labels", n).to(x.device, non_blocking=True)
        if ids is None:
            i = torch.arange(self._seen, self._seen + n, dtype=_I64, device=x.device)
        else:
            i = _as_ids(ids, n).to(x.device, non_blocking=True)
        dim = self.num_features
        if dim is not None and x.shape[1] != dim:
            raise InputError(f"features have {x.shape[1]} dimensions but earlier batches had {dim}; feed one layer per sample.")
        self._place(x.device)
        self._pending.append((x, y, i))
        self._pending_rows += n
        self._fold(seen=n)
        if self._pending_rows >= max(self.max_samples, self.compact_min_rows):
            self._sync()

    @property
    def kept_rows(self) -> int:
        """Rows held right now (candidates plus pending), the memory this sample uses."""
        return int(self._ids.shape[0]) + self._pending_rows

    def _place(self, device: torch.device) -> None:
        super()._place(device)
        self._pending = [tuple(t.to(device) for t in chunk) for chunk in self._pending]  # type: ignore[misc]

    def _sync(self) -> None:
        """Fold the pending rows into the candidates (one sort and one device sync)."""
        if not self._pending:
            return
        pending = self._pending
        self._clear_pending()
        self._fold(
            features=torch.cat([chunk[0] for chunk in pending]),
            labels=torch.cat([chunk[1] for chunk in pending]),
            ids=torch.cat([chunk[2] for chunk in pending]),
        )
        self._keep_candidates()

    def _keep_candidates(self) -> None:
        keep, _ = bottom_k_candidates(sample_keys(self._ids, self.seed), self._ids, self._labels, self.max_samples, self.min_per_class)
        rows = torch.nonzero(keep).flatten()
        kept_ids = self._ids[rows]
        sorted_ids = torch.sort(kept_ids).values
        if sorted_ids.numel() > 1 and bool((sorted_ids[1:] == sorted_ids[:-1]).any()):
            dup = int(sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]][0])
            raise InputError(f"sample id {dup} was given twice; ids must be unique positions across all batches and shards.")
        self._features, self._labels, self._ids = self._features[rows], self._labels[rows], kept_ids

    def _check_mergeable(self, other: EmbeddingSample) -> None:
        require_same_width(self.num_features, other.num_features, "an embedding sample")

    def _after_merge(self) -> None:
        if self._ids.shape[0]:
            self._keep_candidates()

    def _check_loaded(self) -> None:
        if not (self._features.shape[0] == self._labels.shape[0] == self._ids.shape[0]):
            raise InputError("the EmbeddingSample state has features, labels and ids of different lengths; the file is corrupt.")

    def compute(self) -> EmbeddingSampleResult:
        """The final sample on CPU, rows sorted by id."""
        self._sync()
        if self._ids.shape[0] == 0:
            return EmbeddingSampleResult(torch.zeros(0, 0, dtype=_F64), torch.zeros(0, dtype=_I64), torch.zeros(0, dtype=_I64))
        keys = sample_keys(self._ids, self.seed)
        chosen = torch.nonzero(final_sample_mask(keys, self._ids, self._labels, self.max_samples, self.min_per_class)).flatten()
        chosen = chosen[torch.argsort(self._ids[chosen])]
        return EmbeddingSampleResult(self._features[chosen].cpu(), self._labels[chosen].cpu(), self._ids[chosen].cpu())


def _as_ids(ids: ArrayLike, n: int) -> torch.Tensor:
    try:
        t = ids if isinstance(ids, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(ids))
    except (TypeError, ValueError):
        raise InputError("ids is not an array of integers; pass the samples' positions as a numpy array or torch tensor.") from None
    if t.ndim != 1 or t.shape[0] != n:
        raise InputError(f"ids has shape {tuple(t.shape)}; pass one integer id per sample ({n}).")
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise InputError(f"ids has dtype {t.dtype}; pass integer sample positions.")
    return t.to(torch.int64)


def resque_task_from_sample(sample: EmbeddingSample, *, init: KMeansInit = "centroids") -> ResqueTaskResult:
    """RESQUE_task on the streamed sample (equals ``functional.resque_task`` on the same data and seed)."""
    features, labels, _ = sample.compute()
    if features.shape[0] and bool((labels < 0).any()):
        raise InputError("the embedding sample holds unlabelled rows; RESQUE_task needs the new task's labels.")
    return resque_task_on_sample(features.numpy(), labels.numpy(), init=init)


def inv_ari_from_sample(reference: ClassSums, sample: EmbeddingSample) -> InvAriResult:
    """inv_ARI: k-means on the streamed sample started at the reference class centroids."""
    classes, centroids = reference.centroids()
    features, labels, _ = sample.compute()
    if len(classes) < 2:
        raise InputError("the reference class sums hold fewer than 2 classes; inv_ARI needs at least 2.")
    if features.shape[0] < len(classes):
        raise InputError(f"inv_ARI needs at least as many sampled rows ({features.shape[0]}) as reference classes ({len(classes)}).")
    if features.shape[1] != centroids.shape[1]:
        raise InputError(f"the sample has {features.shape[1]} dimensions but the reference centroids have {centroids.shape[1]}; use the same layer.")
    if bool((labels < 0).any()):
        raise InputError("the embedding sample holds unlabelled rows; inv_ARI needs labels for the new data.")
    return inv_ari_on_sample(centroids.numpy(), features.numpy(), labels.numpy())


# --------------------------------------------------------------------------- PredictionStats


class PredictionStats(Accumulator):
    """What the same forward pass says about the model's outputs on the new data.

    Counts samples and, when labels are given, correct predictions and the summed
    cross-entropy loss; always the summed prediction entropy (natural log), the summed
    max-softmax confidence and how often each class was predicted. Batches with and without labels may be mixed: accuracy and
    loss then cover the labelled samples only.
    """

    settings = ("num_classes",)

    def __init__(self, num_classes: int) -> None:
        if int(num_classes) < 1:
            raise InputError(f"num_classes={num_classes}; the model needs at least one class.")
        self.num_classes = int(num_classes)
        self.add_state("samples", 0)
        self.add_state("labelled", 0)
        self.add_state("correct", zero_scalar(_F64), saved_as=int)
        self.add_state("loss_sum", zero_scalar(_F64), saved_as=float)
        self.add_state("entropy_sum", zero_scalar(_F64), saved_as=float)
        self.add_state("confidence_sum", zero_scalar(_F64), saved_as=float)
        self.add_state("predicted_counts", torch.zeros(self.num_classes, dtype=_I64))

    @property
    def samples(self) -> int:
        return self._samples

    @property
    def labelled(self) -> int:
        return self._labelled

    def update(self, logits: ArrayLike, labels: ArrayLike | None = None) -> None:
        """Add a batch of logits (N, num_classes) and optional labels (N,)."""
        z = as_matrix(logits, "logits")
        if z.shape[1] != self.num_classes:
            raise InputError(f"logits have {z.shape[1]} columns but the model has {self.num_classes} classes.")
        self._place(z.device)
        log_p = torch.log_softmax(z, dim=1)
        p = log_p.exp()
        # p = 0 only where a logit is -inf; its term is 0, not 0·(−inf).
        entropy = -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum()
        predicted = z.argmax(dim=1)
        if labels is not None:
            y = as_labels(labels, "labels", z.shape[0])
            if int(y.max()) >= self.num_classes:
                raise InputError(f"labels hold class {int(y.max())} but the model has only {self.num_classes} classes (0..{self.num_classes - 1}).")
            y = y.to(z.device, non_blocking=True)
            self._fold(
                correct=(predicted == y).sum().to(_F64), loss_sum=-log_p.gather(1, y[:, None]).sum(), labelled=z.shape[0]
            )
        self._fold(
            predicted_counts=torch.bincount(predicted, minlength=self.num_classes),
            entropy_sum=entropy,
            confidence_sum=p.max(dim=1).values.sum(),
            samples=z.shape[0],
        )

    def load_state_dict(self, state: StateDict) -> None:
        if isinstance(state, dict) and "confidence_sum" not in state:
            # Saved before the confidence was kept: unknown (NaN, so mean_confidence is None), not 0.
            state = {**state, "confidence_sum": math.nan}
        super().load_state_dict(state)

    def compute(self) -> dict[str, Any]:
        """accuracy and mean_loss (None without labels), mean_entropy, mean_confidence
        (mean max-softmax probability; None for stats saved before it was kept),
        predicted_counts, samples."""
        if self._samples == 0:
            raise InputError("no prediction was seen; update the prediction stats with at least one batch.")
        correct, loss, entropy, confidence = torch.stack([self._correct, self._loss_sum, self._entropy_sum, self._confidence_sum]).cpu().tolist()
        if not (math.isfinite(loss) and math.isfinite(entropy) and not math.isinf(confidence)):
            raise InputError("the model's logits contain NaN or infinite values; check the model and the input data.")
        labelled = self._labelled
        return {
            "accuracy": correct / labelled if labelled else None,
            "mean_loss": loss / labelled if labelled else None,
            "mean_entropy": entropy / self._samples,
            "mean_confidence": None if math.isnan(confidence) else confidence / self._samples,
            "predicted_counts": self._predicted_counts.cpu().tolist(),
            "samples": self._samples,
            "labelled": labelled,
        }
