"""The histogram indices: the unpaired layer shift and PreIndex p in its paired form.

Layer shift compares one layer's pooled activation histograms (reference edges, so the
new side streams) by Wasserstein-1 over the reference std; PreIndex p compares each
sample's own histogram with its corrupted copy's (INDEX-SPEC). ``LayerHistogram`` and
``PairedHistogramDistance`` stream the same quantities.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch

from shiftcost.errors import InputError
from shiftcost.index.arrays import ArrayLike, as_float64, as_matrix, at_layer, of_layer, require_finite

HistogramMetric = Literal["wasserstein", "bhattacharyya", "jensen_shannon", "kl"]
HISTOGRAM_METRICS: tuple[str, ...] = ("wasserstein", "bhattacharyya", "jensen_shannon", "kl")


def check_metric(metric: str) -> HistogramMetric:
    if metric not in HISTOGRAM_METRICS:
        raise InputError(f"metric={metric!r} is not supported; use one of {', '.join(HISTOGRAM_METRICS)}.")
    return metric  # type: ignore[return-value]


def check_bins(bins: int) -> int:
    if int(bins) < 1:
        raise InputError(f"bins={bins}; the histogram needs at least one bin.")
    return int(bins)


def check_edges(edges: ArrayLike, *, layer: str | None = None) -> torch.Tensor:
    """Histogram edges as a float64 CPU vector; refuses fewer than 2, unsorted or non-finite edges."""
    e = as_float64(edges, "edges", layer=layer).detach().cpu()
    if e.ndim != 1 or e.shape[0] < 2 or not bool(torch.isfinite(e).all()) or not bool(torch.all(e[1:] > e[:-1])):
        raise InputError(f"edges{of_layer(layer)} must be a strictly increasing 1-D sequence of at least 2 finite values.")
    return e


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

    e = check_edges(edges, layer=layer)
    ref = as_float64(reference_counts, "reference_counts", layer=layer).cpu()
    new = as_float64(new_counts, "new_counts", layer=layer).cpu()
    bins = e.shape[0] - 1
    for name, counts in (("reference_counts", ref), ("new_counts", new)):
        if counts.shape != (bins,):
            raise InputError(f"{name}{of_layer(layer)} has shape {tuple(counts.shape)}; expected ({bins},) to match the edges.")
        if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
            raise InputError(f"{name}{of_layer(layer)} must hold finite, non-negative counts.")
        if float(counts.sum()) <= 0:
            raise InputError(f"{name}{of_layer(layer)} is an empty histogram; it needs at least one value.")
    std = float(reference_std)
    if not math.isfinite(std) or std <= 0:
        raise InputError(
            f"the reference standard deviation{at_layer(layer)} is {std}; layer shift needs a layer whose reference activations vary."
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
    return _row_histograms(x, check_bins(bins))


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
    check_metric(metric)
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
    bins = check_bins(bins)
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
    check_metric(metric)
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
