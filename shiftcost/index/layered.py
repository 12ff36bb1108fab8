"""Accumulators of every hooked layer at once, keyed by layer.

The engine puts the hooked layers side by side in one (N, ΣD) matrix (:func:`join_layers`)
so that per-batch work costs a few large tensor operations instead of a few per layer,
which matters for small models whose forward pass is itself cheap. These accumulators
take that joined matrix; indexing one by a layer name gives that layer's
:class:`ClassSums` or :class:`LayerHistogram`, equal to one fed the layer alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from shiftcost.errors import InputError
from shiftcost.index.accumulators import ClassSums, LayerHistogram
from shiftcost.index.state import Accumulator

__all__ = ["LayeredClassSums", "LayeredHistograms", "join_layers"]


def join_layers(features: Mapping[str, torch.Tensor], layers: Sequence[str]) -> torch.Tensor:
    """The ``layers``' features side by side, in that order: one (N, ΣD) matrix."""
    parts = [features[name] for name in layers]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class _ByLayer(Accumulator):
    """Column bookkeeping shared by the layered accumulators: layer ``i`` owns ``widths[i]`` columns."""

    layers: list[str]
    widths: list[int]

    def _set_layout(self, layers: Sequence[str], widths: Sequence[int]) -> None:
        if len(layers) != len(widths) or not layers or len(set(layers)) != len(layers):
            raise InputError("give each hooked layer once, with the number of its feature columns.")
        self.layers, self.widths = [str(name) for name in layers], [int(width) for width in widths]
        starts = [sum(self.widths[:index]) for index in range(len(self.widths))]
        self._columns = {name: slice(start, start + width) for name, start, width in zip(self.layers, starts, self.widths)}

    @property
    def num_columns(self) -> int:
        return sum(self.widths)

    def columns(self, layer: str) -> slice:
        """The columns of ``layer`` in the joined matrix."""
        return self._columns[layer]

    def layer_of(self, column: int) -> str:
        return next(name for name, cols in self._columns.items() if cols.start <= column < cols.stop)

    def _check_width(self, joined: torch.Tensor) -> None:
        if joined.ndim != 2 or joined.shape[1] != self.num_columns:
            raise InputError(
                f"the joined features have shape {tuple(joined.shape)} but layers {', '.join(self.layers)} have "
                f"{self.num_columns} columns together; feed the features of the layers these statistics were built for."
            )

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: str) -> Accumulator:
        raise NotImplementedError

    def items(self) -> Iterator[tuple[str, Accumulator]]:
        return ((name, self[name]) for name in self.layers)

    def by_layer(self) -> dict[str, Accumulator]:
        return dict(self.items())


class LayeredClassSums(_ByLayer):
    """Per-class sums of every layer's features and per-class counts, for a fixed class count.

    One scatter per batch for all layers, with no host synchronisation (the number of
    rows is the model's class count, fixed in advance). CPU accumulates in sample order
    (``index_put_`` with ``accumulate=True`` runs sequentially there); CUDA uses a one-hot
    product, whose result, unlike atomic adds, does not change from run to run.
    ``layered[name]`` is that layer's :class:`ClassSums`.
    """

    settings = ("num_classes", "layers", "widths")

    def __init__(self, num_classes: int, layers: Sequence[str], widths: Sequence[int]) -> None:
        if int(num_classes) < 1:
            raise InputError(f"num_classes={num_classes}; the model needs at least one class.")
        self.num_classes = int(num_classes)
        self._set_layout(layers, widths)
        self.add_state("sums", torch.zeros(self.num_classes, self.num_columns, dtype=torch.float64))
        self.add_state("counts", torch.zeros(self.num_classes, dtype=torch.int64))

    def update(self, joined: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: joined float64 features (N, ΣD) and class ids (N,) below ``num_classes``."""
        self._check_width(joined)
        self._place(joined.device)
        labels = labels.to(joined.device, non_blocking=True)
        if joined.device.type == "cpu":
            self._sums.index_put_((labels,), joined, accumulate=True)
        else:
            one_hot = torch.nn.functional.one_hot(labels, self.num_classes).to(joined.dtype)
            self._sums.addmm_(one_hot.T, joined)
        self._counts += torch.bincount(labels, minlength=self.num_classes)

    def __getitem__(self, layer: str) -> ClassSums:
        return ClassSums.of(self._sums[:, self.columns(layer)].contiguous().cpu(), self._counts.cpu())

    def compute(self) -> dict[str, ClassSums]:
        return {name: self[name] for name in self.layers}


class LayeredHistograms(_ByLayer):
    """The fixed-edge histogram and moments of every layer, from the joined feature matrix.

    Bins are those of :class:`LayerHistogram` (half-open, the last one closed; values
    beyond the edges count in the end bins; NaN/inf are not binned but counted): the bin
    is first guessed from the uniform bin width, then corrected against the stored edges,
    so a value on an edge lands exactly where ``torch.bucketize`` would put it. Moments
    and NaN/inf counts are kept per column, so a bad value can be traced to its layer.
    ``layered[name]`` is that layer's :class:`LayerHistogram`.
    """

    settings = ("layers", "widths", "edges")

    def __init__(self, layers: Sequence[str], widths: Sequence[int], edges: torch.Tensor | Mapping[str, torch.Tensor]) -> None:
        self._set_layout(layers, widths)
        if isinstance(edges, Mapping):
            if len({int(edges[name].shape[0]) for name in self.layers}) != 1:
                raise InputError("the layers' histograms have different bin counts; build the reference stats again with `shiftcost reference`.")
            edges = torch.stack([torch.as_tensor(edges[name]) for name in self.layers])
        self.edges = edges.to("cpu", torch.float64)
        if self.edges.ndim != 2 or self.edges.shape[0] != len(self.layers) or self.edges.shape[1] < 2:
            raise InputError("give one row of histogram edges per layer.")
        for row in self.edges:
            LayerHistogram(row)  # the same checks of each row
        self.bins = int(self.edges.shape[1]) - 1
        self._constants: dict[str, torch.Tensor] = {}
        self.add_state("counts", torch.zeros(len(self.layers), self.bins, dtype=torch.int64))
        self.add_state("moments", torch.zeros(3, self.num_columns, dtype=torch.float64))  # n, Σ(x−c), Σ(x−c)²
        self.add_state("nonfinite", torch.zeros(self.num_columns, dtype=torch.int64))

    def _column_constants(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Per column: its layer, where its edges start, its range and centre (once per device)."""
        if self._constants and self._constants["lo"].device == device:
            return self._constants
        layer_of = torch.repeat_interleave(torch.arange(len(self.layers)), torch.tensor(self.widths))
        lo, hi = self.edges[:, 0][layer_of], self.edges[:, -1][layer_of]
        self._constants = {
            name: value.to(device)
            for name, value in {
                "edge_base": layer_of * (self.bins + 1),
                "bin_base": layer_of * self.bins,
                "lo": lo,
                "scale": self.bins / (hi - lo),
                "pivot": (lo + hi) / 2,
                "flat_edges": self.edges.reshape(-1),
            }.items()
        }
        return self._constants

    def update(self, joined: torch.Tensor) -> None:
        """Add a batch of joined float64 features (N, ΣD)."""
        self._check_width(joined)
        self._place(joined.device)
        c = self._column_constants(joined.device)
        finite = torch.isfinite(joined)
        safe = torch.where(finite, joined, c["lo"])
        guess = ((safe - c["lo"]) * c["scale"]).floor_().clamp_(0, self.bins - 1).to(torch.int64)
        position = guess + c["edge_base"]
        below = safe < c["flat_edges"][position]
        above = (safe >= c["flat_edges"][position + 1]) & (guess < self.bins - 1)
        guess = (guess - below.to(torch.int64) + above.to(torch.int64)).clamp_(0, self.bins - 1)
        spill = len(self.layers) * self.bins
        flat = torch.where(finite, guess + c["bin_base"], spill)
        self._counts += torch.bincount(flat.reshape(-1), minlength=spill + 1)[:spill].view(len(self.layers), self.bins)
        centred = torch.where(finite, joined - c["pivot"], 0.0)
        self._moments += torch.stack([finite.sum(dim=0).to(torch.float64), centred.sum(dim=0), (centred * centred).sum(dim=0)])
        self._nonfinite += (~finite).sum(dim=0)

    def nonfinite_columns(self) -> torch.Tensor:
        """Which joined columns held NaN or inf values (on the device)."""
        return self._nonfinite > 0

    def __getitem__(self, layer: str) -> LayerHistogram:
        index, cols = self.layers.index(layer), self.columns(layer)
        return LayerHistogram.of(
            self.edges[index], self._counts[index].cpu(), self._moments[:, cols].sum(dim=1).cpu(), self._nonfinite[cols].sum().cpu()
        )

    def compute(self) -> dict[str, LayerHistogram]:
        return {name: self[name] for name in self.layers}
