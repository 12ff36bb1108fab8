"""Streaming accumulators of the histogram indices: layer shift and PreIndex p.

``LayerHistogram`` bins every activation value of one layer on fixed edges (taken from
the reference, so the new data stream onto the same bins); ``PairedHistogramDistance``
sums the per-sample histogram distances of clean/shifted pairs. Both follow the contract
described in :mod:`shiftcost.index.accumulators`.
"""

from __future__ import annotations

import math

import torch

from shiftcost.errors import InputError
from shiftcost.index.arrays import ArrayLike, as_float64, as_matrix, of_layer, require_same_width, zero_scalar
from shiftcost.index.histograms import HistogramMetric, check_bins, check_edges, check_metric, paired_distance_sum
from shiftcost.index.state import Accumulator

_F64, _I64 = torch.float64, torch.int64


def edges_from_range(lo: float, hi: float, bins: int = 128) -> torch.Tensor:
    """``bins + 1`` evenly spaced float64 edges from ``lo`` to ``hi``.

    A degenerate range (lo == hi, e.g. a constant reference layer) is widened to
    [lo − 0.5, hi + 0.5], as numpy.histogram does.
    """
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
        raise InputError(f"the histogram range [{lo}, {hi}] is not a finite, increasing interval.")
    bins = check_bins(bins)
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    return torch.linspace(lo, hi, bins + 1, dtype=torch.float64)


# --------------------------------------------------------------------------- LayerHistogram


class LayerHistogram(Accumulator):
    """Histogram of every activation value of one layer on fixed edges, plus its moments.

    Bins are half-open [e_i, e_{i+1}) except the last, which is closed. Values below the
    first edge count in the first bin and values above the last edge in the last bin, so
    no value is lost when the new data reach beyond the reference range. Non-finite
    values are not binned; ``compute()`` reports them. Moments are accumulated about the
    centre of the edges (float64 count, Σ(x − c), Σ(x − c)²), which keeps the variance
    accurate and the state additive.
    """

    settings = ("edges",)

    def __init__(self, edges: ArrayLike) -> None:
        e = check_edges(edges)
        self.edges = e
        self._pivot = float((e[0] + e[-1]) / 2)
        self._device_edges: torch.Tensor | None = None
        self.add_state("counts", torch.zeros(self.bins, dtype=_I64))
        self.add_state("count", zero_scalar(_F64), saved_as=int)
        self.add_state("sum_centred", zero_scalar(_F64), saved_as=float)
        self.add_state("sumsq_centred", zero_scalar(_F64), saved_as=float)
        self.add_state("nonfinite", zero_scalar(_I64), saved_as=int)

    edges_from_range = staticmethod(edges_from_range)

    @classmethod
    def from_range(cls, lo: float, hi: float, bins: int = 128) -> LayerHistogram:
        return cls(edges_from_range(lo, hi, bins))

    @classmethod
    def of(cls, edges: ArrayLike, counts: torch.Tensor, moments: torch.Tensor, nonfinite: torch.Tensor) -> LayerHistogram:
        """A histogram holding ``counts`` per bin, moments [n, Σ(x−c), Σ(x−c)²] about the edges' centre, NaN/inf count."""
        histogram = cls(edges)
        histogram._place(counts.device)
        n, s1, s2 = moments.to(_F64)
        histogram._fold(counts=counts.to(_I64), count=n, sum_centred=s1, sumsq_centred=s2, nonfinite=nonfinite.to(_I64))
        return histogram

    @property
    def bins(self) -> int:
        return int(self.edges.shape[0] - 1)

    @property
    def pivot(self) -> float:
        """The centre of the edges, about which the moments are kept."""
        return self._pivot

    def update(self, features: ArrayLike, *, layer: str | None = None) -> None:
        """Add every value of ``features`` (any shape, usually (N, D))."""
        x = as_float64(features, "features", layer=layer).reshape(-1)
        if x.numel() == 0:
            raise InputError(f"features{of_layer(layer)} are empty; pass at least one value.")
        self._place(x.device)
        if self._device_edges is None or self._device_edges.device != x.device:
            self._device_edges = self.edges.to(x.device)
        finite = torch.isfinite(x)
        index = torch.bucketize(x, self._device_edges, right=True) - 1
        index = index.clamp_(0, self.bins - 1)
        index = torch.where(finite, index, torch.full_like(index, self.bins))  # spill slot, dropped
        centred = torch.where(finite, x - self._pivot, torch.zeros_like(x))
        self._fold(
            counts=torch.bincount(index, minlength=self.bins + 1)[: self.bins],
            count=finite.sum().to(_F64),
            sum_centred=centred.sum(),
            sumsq_centred=(centred * centred).sum(),
            nonfinite=(~finite).sum(),
        )

    def _check_finite(self) -> None:
        if int(self._nonfinite) > 0:
            raise InputError(f"{int(self._nonfinite)} activation values were NaN or infinite; check the model and the input data.")

    def compute(self) -> torch.Tensor:
        """Float64 counts per bin (CPU)."""
        self._check_finite()
        return self._counts.detach().cpu().to(_F64)

    def _moment_values(self) -> tuple[float, float, float]:
        n, s1, s2 = torch.stack([self._count, self._sum_centred, self._sumsq_centred]).cpu().tolist()
        return n, s1, s2

    def _moments_of_values(self) -> tuple[float, float, float]:
        """The moments, refused when a value was not finite or none was seen."""
        self._check_finite()
        n, s1, s2 = self._moment_values()
        if n == 0:
            raise InputError("the layer histogram is empty; update it with at least one batch.")
        return n, s1, s2

    @property
    def count(self) -> int:
        return int(self._moment_values()[0])

    def mean(self) -> float:
        n, s1, _ = self._moments_of_values()
        return self._pivot + s1 / n

    def std(self) -> float:
        """Population standard deviation (ddof = 0) of all values seen."""
        n, s1, s2 = self._moments_of_values()
        return math.sqrt(max(s2 / n - (s1 / n) ** 2, 0.0))


# --------------------------------------------------------------------------- PairedHistogramDistance


class PairedHistogramDistance(Accumulator):
    """PreIndex p for one layer in its paired form: mean per-sample histogram distance.

    ``update(clean, shifted)`` takes two (N, D) matrices whose rows are pairs (a sample and
    its corrupted copy). ``compute()`` = Σ distances / number of samples; the engine
    averages it over the layers wider than the number of classes.
    """

    settings = ("bins", "metric")

    def __init__(self, bins: int = 32, metric: HistogramMetric = "wasserstein") -> None:
        self.metric: HistogramMetric = check_metric(metric)
        self.bins = check_bins(bins)
        self.add_state("sum", zero_scalar(_F64), saved_as=float)
        self.add_state("count", 0)
        self.add_state("nonfinite", zero_scalar(_I64), saved_as=int)  # counted on the device, reported by compute()
        self.add_state("num_features", -1, "max")  # −1: no batch seen yet

    @property
    def count(self) -> int:
        return self._count

    @property
    def num_features(self) -> int | None:
        return None if self._num_features < 0 else self._num_features

    def update(self, clean: ArrayLike, shifted: ArrayLike, *, layer: str | None = None) -> None:
        c = as_matrix(clean, "clean features", layer=layer)
        s = as_matrix(shifted, "shifted features", layer=layer).to(c.device, non_blocking=True)
        if c.shape != s.shape:
            raise InputError(
                f"clean and shifted features{of_layer(layer)} have shapes {tuple(c.shape)} and {tuple(s.shape)}; pass one shifted copy per clean sample."
            )
        if self.num_features is not None and c.shape[1] != self.num_features:
            raise InputError(f"features{of_layer(layer)} have {c.shape[1]} dimensions but earlier batches had {self.num_features}.")
        self._place(c.device)
        self._fold(
            sum=paired_distance_sum(c, s, self.bins, self.metric),
            nonfinite=(~torch.isfinite(c)).sum() + (~torch.isfinite(s)).sum(),
            count=c.shape[0],
            num_features=c.shape[1],
        )

    def _check_mergeable(self, other: PairedHistogramDistance) -> None:
        require_same_width(self.num_features, other.num_features, "paired distances")

    @property
    def total(self) -> float:
        return float(self._sum)

    @property
    def nonfinite(self) -> int:
        return int(self._nonfinite)

    def compute(self) -> float:
        if self._count == 0:
            raise InputError("no sample pair was seen; update the paired distance with at least one batch.")
        total = self.total
        if self.nonfinite or not math.isfinite(total):
            raise InputError("the clean or shifted activations contain NaN or infinite values; check the model and the input data.")
        return total / self._count
