"""Streaming, mergeable accumulators for every index (torchmetrics-style contract).

Each class offers ``update(...)`` per batch, ``merge(other)`` (in place, returns self),
``compute()``, ``state_dict()`` / ``load_state_dict(state)`` and ``reset()``. Sums are kept
in float64 whatever the input dtype. State lives on the device of the batches (set by the
first update and moved, once, when batches arrive on another device), and updates avoid
host synchronisation where the result does not need it: problems such as non-finite
activations are counted on the device and reported by ``compute()``. ``state_dict()``
holds only tensors (on CPU) and plain Python values, so it survives
``torch.load(weights_only=True)``, and safetensors (tensors) plus JSON (the rest).

Merging any split of the data gives the result of one pass: exactly for counts and for
the embedding sample, up to float64 rounding for sums.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch

from shiftcost.errors import InputError
from shiftcost.index.functional import (
    DEFAULT_MAX_SAMPLES,
    HISTOGRAM_METRICS,
    ArrayLike,
    HistogramMetric,
    InvAriResult,
    KMeansInit,
    ResqueDistResult,
    ResqueTaskResult,
    as_float64,
    as_labels,
    as_matrix,
    bottom_k_candidates,
    final_sample_mask,
    inv_ari_on_sample,
    paired_distance_sum,
    per_class_sums,
    resque_dist_from_class_sums,
    resque_task_on_sample,
    sample_keys,
)

StateDict = dict[str, Any]

__all__ = [
    "ClassSums",
    "ClassSumsResult",
    "EmbeddingSample",
    "EmbeddingSampleResult",
    "LayerHistogram",
    "PairedHistogramDistance",
    "PredictionStats",
    "edges_from_range",
    "inv_ari_from_sample",
    "resque_dist_from_sums",
    "resque_task_from_sample",
]

_STATE_VERSION = 1


class _Accumulator:
    """Shared bookkeeping: state-dict header checks and device placement."""

    def _header(self) -> StateDict:
        return {"kind": type(self).__name__, "version": _STATE_VERSION}

    def _check_header(self, state: StateDict) -> None:
        if not isinstance(state, dict):
            raise InputError(f"the state for {type(self).__name__} is a {type(state).__name__}, not a dict; pass what state_dict() returned.")
        kind = state.get("kind")
        if kind != type(self).__name__:
            raise InputError(f"the state belongs to {kind!r}, not {type(self).__name__}; load it into the matching accumulator.")
        if state.get("version") != _STATE_VERSION:
            raise InputError(f"the {kind} state has version {state.get('version')!r}; this build reads version {_STATE_VERSION}.")

    def _check_same_kind(self, other: object) -> None:
        if type(other) is not type(self):
            raise InputError(f"cannot merge a {type(other).__name__} into a {type(self).__name__}; merge accumulators of the same kind.")


def _state_tensor(state: StateDict, key: str, kind: str, dtype: torch.dtype, ndim: int) -> torch.Tensor:
    value = state.get(key)
    if not isinstance(value, torch.Tensor) or value.ndim != ndim:
        raise InputError(f"the {kind} state lacks a {ndim}-D tensor '{key}'; the file is truncated or foreign.")
    return value.to("cpu", dtype)


def _state_int(state: StateDict, key: str, kind: str) -> int:
    value = state.get(key)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"the {kind} state lacks the integer '{key}'; the file is truncated or foreign.")
    return int(value)


def _state_float(state: StateDict, key: str, kind: str) -> float:
    value = state.get(key)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InputError(f"the {kind} state lacks the number '{key}'; the file is truncated or foreign.")
    return float(value)


# --------------------------------------------------------------------------- ClassSums


class ClassSumsResult(NamedTuple):
    """Classes seen (sorted), their float64 feature sums (K, D) and int64 counts (K,), on CPU."""

    classes: list[int]
    sums: torch.Tensor
    counts: torch.Tensor


class ClassSums(_Accumulator):
    """Per-class float64 feature sums and int64 counts: the whole state of RESQUE_dist.

    Storage is dense by class id and grows with the largest label seen. Labels on CPU cost
    no device synchronisation; labels on CUDA cost one per batch (their maximum).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None

    @property
    def num_features(self) -> int | None:
        return None if self._sums is None else int(self._sums.shape[1])

    @property
    def samples(self) -> int:
        return 0 if self._counts is None else int(self._counts.sum())

    def _grow(self, rows: int, dim: int, device: torch.device) -> None:
        if self._sums is None:
            self._sums = torch.zeros(rows, dim, dtype=torch.float64, device=device)
            self._counts = torch.zeros(rows, dtype=torch.int64, device=device)
            return
        assert self._counts is not None
        if self._sums.device != device:
            self._sums = self._sums.to(device)
            self._counts = self._counts.to(device)
        if rows > self._sums.shape[0]:
            extra = rows - self._sums.shape[0]
            self._sums = torch.cat([self._sums, self._sums.new_zeros(extra, dim)])
            self._counts = torch.cat([self._counts, self._counts.new_zeros(extra)])

    def update(self, features: ArrayLike, labels: ArrayLike, *, layer: str | None = None) -> None:
        """Add a batch: ``features`` (N, D), ``labels`` (N,) non-negative class ids."""
        x = as_matrix(features, "features", layer=layer)
        y = as_labels(labels, "labels", x.shape[0])
        if self._sums is not None and x.shape[1] != self._sums.shape[1]:
            raise InputError(
                f"features{_at(layer)} have {x.shape[1]} dimensions but earlier batches had {self._sums.shape[1]}; feed one layer per accumulator."
            )
        rows = max(int(y.max()) + 1, 0 if self._sums is None else self._sums.shape[0])
        self._grow(rows, x.shape[1], x.device)
        sums, counts = per_class_sums(x, y, rows)
        assert self._sums is not None and self._counts is not None
        self._sums += sums
        self._counts += counts

    def merge(self, other: ClassSums) -> ClassSums:
        """Add another shard's sums and counts into this one (in place)."""
        self._check_same_kind(other)
        if other._sums is None:
            return self
        assert other._counts is not None
        if self._sums is not None and self._sums.shape[1] != other._sums.shape[1]:
            raise InputError(
                f"cannot merge class sums of {other._sums.shape[1]} dimensions into ones of {self._sums.shape[1]}; merge shards of the same layer."
            )
        device = other._sums.device if self._sums is None else self._sums.device
        self._grow(other._sums.shape[0], other._sums.shape[1], device)
        assert self._sums is not None and self._counts is not None
        k = other._sums.shape[0]
        self._sums[:k] += other._sums.to(device)
        self._counts[:k] += other._counts.to(device)
        return self

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense (sums, counts) indexed by class id, on CPU; empty when nothing was seen."""
        if self._sums is None:
            return torch.zeros(0, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)
        assert self._counts is not None
        return self._sums.detach().cpu(), self._counts.detach().cpu()

    def compute(self) -> ClassSumsResult:
        sums, counts = self.dense()
        present = torch.nonzero(counts > 0).flatten()
        return ClassSumsResult(present.tolist(), sums.index_select(0, present), counts.index_select(0, present))

    def centroids(self) -> tuple[list[int], torch.Tensor]:
        """Sorted class ids and their float64 mean feature vectors (the inv_ARI reference)."""
        classes, sums, counts = self.compute()
        return classes, sums / counts.to(torch.float64)[:, None]

    def state_dict(self) -> StateDict:
        sums, counts = self.dense()
        return {**self._header(), "sums": sums.clone(), "counts": counts.clone()}

    def load_state_dict(self, state: StateDict) -> None:
        self._check_header(state)
        sums = _state_tensor(state, "sums", "ClassSums", torch.float64, 2)
        counts = _state_tensor(state, "counts", "ClassSums", torch.int64, 1)
        if sums.shape[0] != counts.shape[0]:
            raise InputError("the ClassSums state has sums and counts of different lengths; the file is corrupt.")
        self.reset()
        if sums.shape[0]:
            self._sums, self._counts = sums.clone(), counts.clone()


def resque_dist_from_sums(reference: ClassSums, new: ClassSums, *, layer: str | None = None) -> ResqueDistResult:
    """RESQUE_dist between two ``ClassSums`` (same formula as ``functional.resque_dist``)."""
    for side, acc in (("reference", reference), ("new", new)):
        if acc.samples == 0:
            raise InputError(f"the {side} class sums{_at(layer)} are empty; update them with at least one batch.")
    ref_sums, ref_counts = reference.dense()
    new_sums, new_counts = new.dense()
    k = max(ref_sums.shape[0], new_sums.shape[0])
    return resque_dist_from_class_sums(
        _pad(ref_sums, k), _pad(ref_counts, k), _pad(new_sums, k), _pad(new_counts, k), layer=layer
    )


def _pad(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] >= rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])


def _at(layer: str | None) -> str:
    return f" of layer '{layer}'" if layer else ""


# --------------------------------------------------------------------------- EmbeddingSample


class EmbeddingSampleResult(NamedTuple):
    """The sample, sorted by id: float64 features (M, D), int64 labels (−1 = unlabelled), int64 ids."""

    features: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor


class EmbeddingSample(_Accumulator):
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
        self.reset()

    def reset(self) -> None:
        self._features: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._ids: torch.Tensor | None = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending_rows = 0
        self.seen = 0

    @property
    def num_features(self) -> int | None:
        if self._features is not None:
            return int(self._features.shape[1])
        return int(self._pending[0][0].shape[1]) if self._pending else None

    @property
    def _device(self) -> torch.device | None:
        if self._features is not None:
            return self._features.device
        return self._pending[0][0].device if self._pending else None

    def update(
        self, features: ArrayLike, labels: ArrayLike | None = None, ids: ArrayLike | None = None, *, layer: str | None = None
    ) -> None:
        """Offer a batch: ``features`` (N, D), ``labels`` (N,) or None, ``ids`` (N,) global sample indices."""
        x = as_matrix(features, "features", layer=layer)
        n = x.shape[0]
        if labels is None:
            y = torch.full((n,), -1, dtype=torch.int64, device=x.device)
        else:
            y = as_labels(labels, "labels", n).to(x.device, non_blocking=True)
        if ids is None:
            i = torch.arange(self.seen, self.seen + n, dtype=torch.int64, device=x.device)
        else:
            i = _as_ids(ids, n).to(x.device, non_blocking=True)
        self._append(x, y, i)
        self.seen += n

    def _append(self, x: torch.Tensor, y: torch.Tensor, i: torch.Tensor) -> None:
        dim = self.num_features
        if dim is not None and x.shape[1] != dim:
            raise InputError(f"features have {x.shape[1]} dimensions but earlier batches had {dim}; feed one layer per sample.")
        device = self._device
        if device is not None and x.device != device:
            self._move_to(x.device)
        self._pending.append((x, y, i))
        self._pending_rows += x.shape[0]
        if self._pending_rows >= max(self.max_samples, self.compact_min_rows):
            self._compact()

    @property
    def kept_rows(self) -> int:
        """Rows held right now (candidates plus pending), the memory this sample uses."""
        return (0 if self._features is None else int(self._features.shape[0])) + self._pending_rows

    def _move_to(self, device: torch.device) -> None:
        if self._features is not None:
            assert self._labels is not None and self._ids is not None
            self._features, self._labels, self._ids = (t.to(device) for t in (self._features, self._labels, self._ids))
        self._pending = [tuple(t.to(device) for t in chunk) for chunk in self._pending]  # type: ignore[misc]

    def _compact(self) -> None:
        if not self._pending:
            return
        chunks = self._pending
        if self._features is not None:
            assert self._labels is not None and self._ids is not None
            chunks = [(self._features, self._labels, self._ids), *chunks]
        x = torch.cat([c[0] for c in chunks])
        y = torch.cat([c[1] for c in chunks])
        i = torch.cat([c[2] for c in chunks])
        keys = sample_keys(i, self.seed)
        keep, _ = bottom_k_candidates(keys, i, y, self.max_samples, self.min_per_class)
        rows = torch.nonzero(keep).flatten()
        kept_ids = i[rows]
        sorted_ids = torch.sort(kept_ids).values
        if sorted_ids.numel() > 1 and bool((sorted_ids[1:] == sorted_ids[:-1]).any()):
            dup = int(sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]][0])
            raise InputError(f"sample id {dup} was given twice; ids must be unique positions across all batches and shards.")
        self._features, self._labels, self._ids = x[rows], y[rows], kept_ids
        self._pending = []
        self._pending_rows = 0

    def merge(self, other: EmbeddingSample) -> EmbeddingSample:
        """Fold another shard's candidates into this sample (in place)."""
        self._check_same_kind(other)
        mine = (self.max_samples, self.seed, self.min_per_class)
        theirs = (other.max_samples, other.seed, other.min_per_class)
        if mine != theirs:
            raise InputError(
                f"cannot merge embedding samples with (max_samples, seed, min_per_class) {theirs} into {mine}; use the same settings on every shard."
            )
        other._compact()
        if other._features is not None:
            assert other._labels is not None and other._ids is not None
            device = self._device or other._features.device
            self._append(*(t.to(device) for t in (other._features, other._labels, other._ids)))
            self._compact()
        self.seen += other.seen
        return self

    def compute(self) -> EmbeddingSampleResult:
        """The final sample on CPU, rows sorted by id."""
        self._compact()
        if self._features is None:
            return EmbeddingSampleResult(
                torch.zeros(0, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
            )
        assert self._labels is not None and self._ids is not None
        keys = sample_keys(self._ids, self.seed)
        chosen = torch.nonzero(final_sample_mask(keys, self._ids, self._labels, self.max_samples, self.min_per_class)).flatten()
        chosen = chosen[torch.argsort(self._ids[chosen])]
        return EmbeddingSampleResult(
            self._features[chosen].cpu(), self._labels[chosen].cpu(), self._ids[chosen].cpu()
        )

    def state_dict(self) -> StateDict:
        self._compact()
        if self._features is None:
            x = torch.zeros(0, 0, dtype=torch.float64)
            y = i = torch.zeros(0, dtype=torch.int64)
        else:
            assert self._labels is not None and self._ids is not None
            x, y, i = self._features.cpu().clone(), self._labels.cpu().clone(), self._ids.cpu().clone()
        return {
            **self._header(),
            "max_samples": self.max_samples,
            "seed": self.seed,
            "min_per_class": self.min_per_class,
            "seen": self.seen,
            "features": x,
            "labels": y,
            "ids": i,
        }

    def load_state_dict(self, state: StateDict) -> None:
        self._check_header(state)
        kind = "EmbeddingSample"
        settings = tuple(_state_int(state, k, kind) for k in ("max_samples", "seed", "min_per_class"))
        x = _state_tensor(state, "features", kind, torch.float64, 2)
        y = _state_tensor(state, "labels", kind, torch.int64, 1)
        i = _state_tensor(state, "ids", kind, torch.int64, 1)
        if not (x.shape[0] == y.shape[0] == i.shape[0]):
            raise InputError("the EmbeddingSample state has features, labels and ids of different lengths; the file is corrupt.")
        self.max_samples, self.seed, self.min_per_class = settings
        self.reset()
        self.seen = _state_int(state, "seen", kind)
        if x.shape[0]:
            self._features, self._labels, self._ids = x.clone(), y.clone(), i.clone()


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


# --------------------------------------------------------------------------- LayerHistogram


def edges_from_range(lo: float, hi: float, bins: int = 128) -> torch.Tensor:
    """``bins + 1`` evenly spaced float64 edges from ``lo`` to ``hi``.

    A degenerate range (lo == hi, e.g. a constant reference layer) is widened to
    [lo − 0.5, hi + 0.5], as numpy.histogram does.
    """
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
        raise InputError(f"the histogram range [{lo}, {hi}] is not a finite, increasing interval.")
    if int(bins) < 1:
        raise InputError(f"bins={bins}; a histogram needs at least one bin.")
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    return torch.linspace(lo, hi, int(bins) + 1, dtype=torch.float64)


class LayerHistogram(_Accumulator):
    """Histogram of every activation value of one layer on fixed edges, plus its moments.

    Bins are half-open [e_i, e_{i+1}) except the last, which is closed. Values below the
    first edge count in the first bin and values above the last edge in the last bin, so
    no value is lost when the new data reach beyond the reference range. Non-finite
    values are not binned; ``compute()`` reports them. Moments are accumulated about the
    centre of the edges (float64 count, Σ(x − c), Σ(x − c)²), which keeps the variance
    accurate and the state additive.
    """

    def __init__(self, edges: ArrayLike) -> None:
        e = as_float64(edges, "edges").detach().cpu()
        if e.ndim != 1 or e.shape[0] < 2 or not bool(torch.all(e[1:] > e[:-1])):
            raise InputError("edges must be a strictly increasing 1-D sequence of at least 2 finite values.")
        if not bool(torch.isfinite(e).all()):
            raise InputError("edges must be finite.")
        self.edges = e
        self._pivot = float((e[0] + e[-1]) / 2)
        self.reset()

    edges_from_range = staticmethod(edges_from_range)

    @classmethod
    def from_range(cls, lo: float, hi: float, bins: int = 128) -> LayerHistogram:
        return cls(edges_from_range(lo, hi, bins))

    @property
    def bins(self) -> int:
        return int(self.edges.shape[0] - 1)

    def reset(self) -> None:
        self._counts: torch.Tensor | None = None
        self._moments: torch.Tensor | None = None  # float64 [n, Σ(x−c), Σ(x−c)²]
        self._nonfinite: torch.Tensor | None = None
        self._device_edges: torch.Tensor | None = None

    def _ensure(self, device: torch.device) -> None:
        if self._counts is None:
            self._counts = torch.zeros(self.bins, dtype=torch.int64, device=device)
            self._moments = torch.zeros(3, dtype=torch.float64, device=device)
            self._nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        elif self._counts.device != device:
            assert self._moments is not None and self._nonfinite is not None
            self._counts, self._moments, self._nonfinite = (t.to(device) for t in (self._counts, self._moments, self._nonfinite))
        if self._device_edges is None or self._device_edges.device != device:
            self._device_edges = self.edges.to(device)

    def update(self, features: ArrayLike, *, layer: str | None = None) -> None:
        """Add every value of ``features`` (any shape, usually (N, D))."""
        x = as_float64(features, "features", layer=layer).reshape(-1)
        if x.numel() == 0:
            raise InputError(f"features{_at(layer)} are empty; pass at least one value.")
        self._ensure(x.device)
        assert self._counts is not None and self._moments is not None and self._nonfinite is not None
        assert self._device_edges is not None
        finite = torch.isfinite(x)
        index = torch.bucketize(x, self._device_edges, right=True) - 1
        index = index.clamp_(0, self.bins - 1)
        index = torch.where(finite, index, torch.full_like(index, self.bins))  # spill slot, dropped
        self._counts += torch.bincount(index, minlength=self.bins + 1)[: self.bins]
        centred = torch.where(finite, x - self._pivot, torch.zeros_like(x))
        self._moments += torch.stack([finite.sum().to(torch.float64), centred.sum(), (centred * centred).sum()])
        self._nonfinite += (~finite).sum()

    def merge(self, other: LayerHistogram) -> LayerHistogram:
        """Add another shard's histogram (same edges required) into this one."""
        self._check_same_kind(other)
        if not torch.equal(self.edges, other.edges):
            raise InputError("cannot merge layer histograms with different edges; every shard must use the reference edges.")
        if other._counts is None:
            return self
        assert other._moments is not None and other._nonfinite is not None
        self._ensure(self._counts.device if self._counts is not None else other._counts.device)
        assert self._counts is not None and self._moments is not None and self._nonfinite is not None
        self._counts += other._counts.to(self._counts.device)
        self._moments += other._moments.to(self._counts.device)
        self._nonfinite += other._nonfinite.to(self._counts.device)
        return self

    def _check_finite(self) -> None:
        if self._nonfinite is not None and int(self._nonfinite) > 0:
            raise InputError(f"{int(self._nonfinite)} activation values were NaN or infinite; check the model and the input data.")

    def compute(self) -> torch.Tensor:
        """Float64 counts per bin (CPU)."""
        self._check_finite()
        if self._counts is None:
            return torch.zeros(self.bins, dtype=torch.float64)
        return self._counts.detach().cpu().to(torch.float64)

    def _moment_values(self) -> tuple[float, float, float]:
        if self._moments is None:
            return 0.0, 0.0, 0.0
        n, s1, s2 = self._moments.detach().cpu().tolist()
        return n, s1, s2

    @property
    def count(self) -> int:
        return int(self._moment_values()[0])

    def mean(self) -> float:
        self._check_finite()
        n, s1, _ = self._moment_values()
        if n == 0:
            raise InputError("the layer histogram is empty; update it with at least one batch.")
        return self._pivot + s1 / n

    def std(self) -> float:
        """Population standard deviation (ddof = 0) of all values seen."""
        self._check_finite()
        n, s1, s2 = self._moment_values()
        if n == 0:
            raise InputError("the layer histogram is empty; update it with at least one batch.")
        return math.sqrt(max(s2 / n - (s1 / n) ** 2, 0.0))

    def state_dict(self) -> StateDict:
        counts = self._counts.detach().cpu().clone() if self._counts is not None else torch.zeros(self.bins, dtype=torch.int64)
        n, s1, s2 = self._moment_values()
        nonfinite = 0 if self._nonfinite is None else int(self._nonfinite)
        return {
            **self._header(),
            "edges": self.edges.clone(),
            "counts": counts,
            "count": int(n),
            "sum_centred": s1,
            "sumsq_centred": s2,
            "nonfinite": nonfinite,
        }

    def load_state_dict(self, state: StateDict) -> None:
        self._check_header(state)
        kind = "LayerHistogram"
        edges = _state_tensor(state, "edges", kind, torch.float64, 1)
        counts = _state_tensor(state, "counts", kind, torch.int64, 1)
        if counts.shape[0] != edges.shape[0] - 1:
            raise InputError("the LayerHistogram state has counts that do not match its edges; the file is corrupt.")
        moments = [float(_state_int(state, "count", kind)), _state_float(state, "sum_centred", kind), _state_float(state, "sumsq_centred", kind)]
        nonfinite = _state_int(state, "nonfinite", kind)
        self.__init__(edges)  # type: ignore[misc]
        self._counts = counts.clone()
        self._moments = torch.tensor(moments, dtype=torch.float64)
        self._nonfinite = torch.tensor(nonfinite, dtype=torch.int64)


# --------------------------------------------------------------------------- PairedHistogramDistance


class PairedHistogramDistance(_Accumulator):
    """PreIndex p for one layer in its paired form: mean per-sample histogram distance.

    ``update(clean, shifted)`` takes two (N, D) matrices whose rows are pairs (a sample and
    its corrupted copy). ``compute()`` = Σ distances / number of samples; the engine
    averages it over the layers wider than the number of classes.
    """

    def __init__(self, bins: int = 32, metric: HistogramMetric = "wasserstein") -> None:
        if metric not in HISTOGRAM_METRICS:
            raise InputError(f"metric={metric!r} is not supported; use one of {', '.join(HISTOGRAM_METRICS)}.")
        if int(bins) < 1:
            raise InputError(f"bins={bins}; the histogram needs at least one bin.")
        self.bins = int(bins)
        self.metric: HistogramMetric = metric
        self.reset()

    def reset(self) -> None:
        self._sum: torch.Tensor | None = None
        self._nonfinite: torch.Tensor | None = None  # counted on the device, reported by compute()
        self.count = 0
        self.num_features: int | None = None

    def update(self, clean: ArrayLike, shifted: ArrayLike, *, layer: str | None = None) -> None:
        c = as_matrix(clean, "clean features", layer=layer)
        s = as_matrix(shifted, "shifted features", layer=layer).to(c.device, non_blocking=True)
        if c.shape != s.shape:
            raise InputError(
                f"clean and shifted features{_at(layer)} have shapes {tuple(c.shape)} and {tuple(s.shape)}; pass one shifted copy per clean sample."
            )
        if self.num_features is not None and c.shape[1] != self.num_features:
            raise InputError(f"features{_at(layer)} have {c.shape[1]} dimensions but earlier batches had {self.num_features}.")
        total = paired_distance_sum(c, s, self.bins, self.metric)
        bad = (~torch.isfinite(c)).sum() + (~torch.isfinite(s)).sum()
        if self._sum is None:
            self._sum, self._nonfinite = total, bad
        else:
            assert self._nonfinite is not None
            self._sum = self._sum + total.to(self._sum.device)
            self._nonfinite = self._nonfinite + bad.to(self._sum.device)
        self.count += c.shape[0]
        self.num_features = c.shape[1]

    def merge(self, other: PairedHistogramDistance) -> PairedHistogramDistance:
        self._check_same_kind(other)
        if (self.bins, self.metric) != (other.bins, other.metric):
            raise InputError(
                f"cannot merge paired distances with bins={other.bins}, metric={other.metric!r} into bins={self.bins}, metric={self.metric!r}."
            )
        if self.num_features is not None and other.num_features is not None and self.num_features != other.num_features:
            raise InputError(f"cannot merge paired distances of {other.num_features} features into {self.num_features}; merge shards of one layer.")
        if other._sum is None:
            return self
        assert other._nonfinite is not None
        if self._sum is None:
            self._sum, self._nonfinite = other._sum.clone(), other._nonfinite.clone()
        else:
            assert self._nonfinite is not None
            self._sum = self._sum + other._sum.to(self._sum.device)
            self._nonfinite = self._nonfinite + other._nonfinite.to(self._sum.device)
        self.count += other.count
        self.num_features = other.num_features if self.num_features is None else self.num_features
        return self

    @property
    def total(self) -> float:
        return 0.0 if self._sum is None else float(self._sum)

    @property
    def nonfinite(self) -> int:
        return 0 if self._nonfinite is None else int(self._nonfinite)

    def compute(self) -> float:
        if self.count == 0:
            raise InputError("no sample pair was seen; update the paired distance with at least one batch.")
        total = self.total
        if self.nonfinite or not math.isfinite(total):
            raise InputError("the clean or shifted activations contain NaN or infinite values; check the model and the input data.")
        return total / self.count

    def state_dict(self) -> StateDict:
        return {
            **self._header(),
            "bins": self.bins,
            "metric": self.metric,
            "sum": self.total,
            "count": self.count,
            "nonfinite": self.nonfinite,
            "num_features": -1 if self.num_features is None else self.num_features,
        }

    def load_state_dict(self, state: StateDict) -> None:
        self._check_header(state)
        kind = "PairedHistogramDistance"
        metric = state.get("metric")
        if metric not in HISTOGRAM_METRICS:
            raise InputError(f"the {kind} state names metric {metric!r}; the file is truncated or foreign.")
        bins = _state_int(state, "bins", kind)
        total = _state_float(state, "sum", kind)
        count = _state_int(state, "count", kind)
        features = _state_int(state, "num_features", kind)
        nonfinite = _state_int(state, "nonfinite", kind)
        self.__init__(bins, metric)  # type: ignore[misc]
        if count:
            self._sum = torch.tensor(total, dtype=torch.float64)
            self._nonfinite = torch.tensor(nonfinite, dtype=torch.int64)
        self.count = count
        self.num_features = None if features < 0 else features


# --------------------------------------------------------------------------- PredictionStats


class PredictionStats(_Accumulator):
    """What the same forward pass says about the model's outputs on the new data.

    Counts samples and, when labels are given, correct predictions and the summed
    cross-entropy loss; always the summed prediction entropy (natural log) and how often
    each class was predicted. Batches with and without labels may be mixed: accuracy and
    loss then cover the labelled samples only.
    """

    def __init__(self, num_classes: int) -> None:
        if int(num_classes) < 1:
            raise InputError(f"num_classes={num_classes}; the model needs at least one class.")
        self.num_classes = int(num_classes)
        self.reset()

    def reset(self) -> None:
        self.samples = 0
        self.labelled = 0
        self._sums: torch.Tensor | None = None  # float64 [correct, Σ loss, Σ entropy]
        self._predicted: torch.Tensor | None = None

    def _ensure(self, device: torch.device) -> None:
        if self._sums is None:
            self._sums = torch.zeros(3, dtype=torch.float64, device=device)
            self._predicted = torch.zeros(self.num_classes, dtype=torch.int64, device=device)
        elif self._sums.device != device:
            assert self._predicted is not None
            self._sums, self._predicted = self._sums.to(device), self._predicted.to(device)

    def update(self, logits: ArrayLike, labels: ArrayLike | None = None) -> None:
        """Add a batch of logits (N, num_classes) and optional labels (N,)."""
        z = as_matrix(logits, "logits")
        if z.shape[1] != self.num_classes:
            raise InputError(f"logits have {z.shape[1]} columns but the model has {self.num_classes} classes.")
        self._ensure(z.device)
        assert self._sums is not None and self._predicted is not None
        log_p = torch.log_softmax(z, dim=1)
        p = log_p.exp()
        # p = 0 only where a logit is -inf; its term is 0, not 0·(−inf).
        entropy = -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum()
        predicted = z.argmax(dim=1)
        self._predicted += torch.bincount(predicted, minlength=self.num_classes)
        if labels is None:
            self._sums[2] += entropy
        else:
            y = as_labels(labels, "labels", z.shape[0])
            if int(y.max()) >= self.num_classes:
                raise InputError(f"labels hold class {int(y.max())} but the model has only {self.num_classes} classes (0..{self.num_classes - 1}).")
            y = y.to(z.device, non_blocking=True)
            loss = -log_p.gather(1, y[:, None]).sum()
            correct = (predicted == y).sum().to(torch.float64)
            self._sums += torch.stack([correct, loss, entropy])
            self.labelled += z.shape[0]
        self.samples += z.shape[0]

    def merge(self, other: PredictionStats) -> PredictionStats:
        self._check_same_kind(other)
        if other.num_classes != self.num_classes:
            raise InputError(f"cannot merge prediction stats of {other.num_classes} classes into {self.num_classes}.")
        if other._sums is None:
            return self
        assert other._predicted is not None
        self._ensure(self._sums.device if self._sums is not None else other._sums.device)
        assert self._sums is not None and self._predicted is not None
        self._sums += other._sums.to(self._sums.device)
        self._predicted += other._predicted.to(self._sums.device)
        self.samples += other.samples
        self.labelled += other.labelled
        return self

    def _values(self) -> tuple[list[float], list[int]]:
        if self._sums is None:
            return [0.0, 0.0, 0.0], [0] * self.num_classes
        assert self._predicted is not None
        return self._sums.detach().cpu().tolist(), self._predicted.detach().cpu().tolist()

    def compute(self) -> dict[str, Any]:
        """accuracy and mean_loss (None without labels), mean_entropy, predicted_counts, samples."""
        if self.samples == 0:
            raise InputError("no prediction was seen; update the prediction stats with at least one batch.")
        (correct, loss, entropy), predicted = self._values()
        if not (math.isfinite(loss) and math.isfinite(entropy)):
            raise InputError("the model's logits contain NaN or infinite values; check the model and the input data.")
        return {
            "accuracy": correct / self.labelled if self.labelled else None,
            "mean_loss": loss / self.labelled if self.labelled else None,
            "mean_entropy": entropy / self.samples,
            "predicted_counts": predicted,
            "samples": self.samples,
            "labelled": self.labelled,
        }

    def state_dict(self) -> StateDict:
        (correct, loss, entropy), predicted = self._values()
        return {
            **self._header(),
            "num_classes": self.num_classes,
            "samples": self.samples,
            "labelled": self.labelled,
            "correct": int(correct),
            "loss_sum": loss,
            "entropy_sum": entropy,
            "predicted_counts": torch.tensor(predicted, dtype=torch.int64),
        }

    def load_state_dict(self, state: StateDict) -> None:
        self._check_header(state)
        kind = "PredictionStats"
        num_classes = _state_int(state, "num_classes", kind)
        predicted = _state_tensor(state, "predicted_counts", kind, torch.int64, 1)
        if predicted.shape[0] != num_classes:
            raise InputError("the PredictionStats state has predicted counts that do not match its classes; the file is corrupt.")
        sums = [float(_state_int(state, "correct", kind)), _state_float(state, "loss_sum", kind), _state_float(state, "entropy_sum", kind)]
        samples, labelled = _state_int(state, "samples", kind), _state_int(state, "labelled", kind)
        self.__init__(num_classes)  # type: ignore[misc]
        self.samples, self.labelled = samples, labelled
        if samples:
            self._sums = torch.tensor(sums, dtype=torch.float64)
            self._predicted = predicted.clone()
