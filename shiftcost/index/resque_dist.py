"""RESQUE_dist: the angle between per-class feature sums of the reference and new data.

θ_k = angle(Σ reference features of class k, Σ new features of class k) / π, averaged
over the classes both sides share (INDEX-SPEC). ``ClassSums`` streams the same sums, and
both paths end in :func:`resque_dist_from_class_sums`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from shiftcost.errors import InputError
from shiftcost.index.arrays import ArrayLike, as_labels, as_matrix, at_layer


@dataclass(frozen=True)
class ResqueDistResult:
    """RESQUE_dist with the per-class angles behind it.

    ``per_class`` maps each shared class to θ_k = angle(s_k, s'_k) / π; ``value`` is their
    mean. Classes seen on only one side are listed, not used.
    """

    value: float
    per_class: dict[int, float]
    shared_classes: list[int]
    reference_only: list[int] = field(default_factory=list)
    new_only: list[int] = field(default_factory=list)


def per_class_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 per-class sums (num_classes, D) and int64 counts on the features' device.

    ``features`` must already be float64 (N, D); ``labels`` int64 with values below
    ``num_classes``. CPU uses ``index_add_`` (sequential, exact order); CUDA uses a one-hot
    matrix product because ``index_add_`` there relies on atomics whose order, and so
    the last bits of the sum, vary from run to run.
    """
    device = features.device
    labels = labels.to(device, non_blocking=True)
    if device.type == "cpu":
        sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, device=device)
        sums.index_add_(0, labels, features)
    else:
        one_hot = torch.nn.functional.one_hot(labels, num_classes).to(torch.float64)
        sums = one_hot.T @ features
    counts = torch.bincount(labels, minlength=num_classes)
    return sums, counts


def class_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """θ = angle(a_k, b_k) / π per row, via 2·atan2(‖u−v‖, ‖u+v‖) on unit vectors.

    arccos of a dot product loses half the digits near 0; this form is exact for equal
    rows (0.0) and for orthogonal axis-aligned rows (0.5). Rows must be non-zero.
    """
    u = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True)
    v = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True)
    diff = torch.linalg.vector_norm(u - v, dim=-1)
    total = torch.linalg.vector_norm(u + v, dim=-1)
    return 2.0 * torch.atan2(diff, total) / math.pi


def resque_dist_from_class_sums(
    reference_sums: torch.Tensor,
    reference_counts: torch.Tensor,
    new_sums: torch.Tensor,
    new_counts: torch.Tensor,
    *,
    layer: str | None = None,
) -> ResqueDistResult:
    """RESQUE_dist from dense per-class sums (row k = class k) and counts.

    The two sides may hold different numbers of rows (each as many as its largest class
    id + 1); only classes present on both are indexed. A class is present on a side when its count is positive. Shared classes are scored,
    the others reported. Raises ``InputError`` when no class is shared, when a shared
    class sums to the zero vector, or when a sum is not finite.
    """
    reference_sums = reference_sums.detach().to("cpu", torch.float64)
    new_sums = new_sums.detach().to("cpu", torch.float64)
    if reference_sums.shape[1] != new_sums.shape[1]:
        raise InputError(
            f"the reference features{at_layer(layer)} have {reference_sums.shape[1]} dimensions but the new ones have "
            f"{new_sums.shape[1]}; compare features from the same layer."
        )
    ref_present = set(torch.nonzero(reference_counts.cpu() > 0).flatten().tolist())
    new_present = set(torch.nonzero(new_counts.cpu() > 0).flatten().tolist())
    shared = sorted(ref_present & new_present)
    reference_only = sorted(ref_present - new_present)
    new_only = sorted(new_present - ref_present)
    if not shared:
        raise InputError(
            f"the reference and new data{at_layer(layer)} share no class (reference classes {sorted(ref_present)}, "
            f"new classes {sorted(new_present)}); RESQUE_dist needs labels from the same label space."
        )
    index = torch.tensor(shared, dtype=torch.int64)
    a = reference_sums.index_select(0, index)
    b = new_sums.index_select(0, index)
    for side, sums in (("reference", a), ("new", b)):
        if not bool(torch.isfinite(sums).all()):
            bad = shared[int(torch.nonzero(~torch.isfinite(sums).all(dim=1))[0])]
            raise InputError(
                f"the {side} features of class {bad}{at_layer(layer)} contain non-finite values; check the model and the input data."
            )
        zero = torch.linalg.vector_norm(sums, dim=1) == 0
        if bool(zero.any()):
            bad = shared[int(torch.nonzero(zero)[0])]
            raise InputError(
                f"the {side} features of class {bad}{at_layer(layer)} sum to the zero vector, so their direction is "
                "undefined; pick a layer whose activations are not all zero for that class."
            )
    theta = class_angles(a, b)
    per_class = {k: float(t) for k, t in zip(shared, theta.tolist())}
    value = float(theta.mean())
    return ResqueDistResult(value, per_class, shared, reference_only, new_only)


def _sums_of(features: ArrayLike, labels: ArrayLike, side: str, layer: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    x = as_matrix(features, f"{side}_features", layer=layer)
    y = as_labels(labels, f"{side}_labels", x.shape[0])
    return per_class_sums(x, y, int(y.max()) + 1)


def resque_dist_details(
    ref_features: ArrayLike,
    ref_labels: ArrayLike,
    new_features: ArrayLike,
    new_labels: ArrayLike,
    *,
    layer: str | None = None,
) -> ResqueDistResult:
    """RESQUE_dist with per-class angles and the classes left out (see ``ResqueDistResult``).

    ``*_features`` are (N, D) matrices of one layer's vectors, ``*_labels`` integer class ids.
    ``layer`` only names the layer in error messages.
    """
    ref_sums, ref_counts = _sums_of(ref_features, ref_labels, "reference", layer)
    new_sums, new_counts = _sums_of(new_features, new_labels, "new", layer)
    return resque_dist_from_class_sums(ref_sums, ref_counts, new_sums, new_counts, layer=layer)


def resque_dist(
    ref_features: ArrayLike,
    ref_labels: ArrayLike,
    new_features: ArrayLike,
    new_labels: ArrayLike,
    *,
    layer: str | None = None,
) -> float:
    """RESQUE_dist: mean over shared classes of angle(Σ reference, Σ new) / π, in [0, 1]."""
    return resque_dist_details(ref_features, ref_labels, new_features, new_labels, layer=layer).value
