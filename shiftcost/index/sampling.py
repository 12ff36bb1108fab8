"""The seeded, stratified sample that RESQUE_task and inv_ARI cluster on large inputs.

Each sample id gets a pseudo-random key from (seed, id) alone; the sample is the
smallest keys, with a floor per class. Because keys never depend on arrival order, the
one-call path (:func:`stratified_sample_indices`) and the streamed ``EmbeddingSample``
select the same rows for the same data and seed, whatever the batching or sharding.
"""

from __future__ import annotations

import numpy as np
import torch

from shiftcost.index.arrays import ArrayLike, as_labels, to_numpy

DEFAULT_MAX_SAMPLES = 20_000

_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MIX_1 = 0xBF58476D1CE4E5B9
_MIX_2 = 0x94D049BB133111EB


def _signed64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= (1 << 63) else value


def _logical_shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    # torch shifts int64 arithmetically; masking off the copied sign bits makes it logical.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def sample_keys(ids: torch.Tensor, seed: int) -> torch.Tensor:
    """Seeded pseudo-random key of each sample id: the id-th output of splitmix64(seed).

    Keys depend only on (seed, id), never on arrival order, which is what makes a
    bottom-k sample identical whatever the batching and sharding. Returned as
    non-negative int64 (the top 63 bits of the 64-bit output). int64 arithmetic in
    torch wraps around, which is the modulo-2^64 arithmetic splitmix64 needs.
    """
    ids = ids.to(torch.int64)
    z = (ids + 1) * _signed64(_GOLDEN_GAMMA) + _signed64(seed)
    z = (z ^ _logical_shift_right(z, 30)) * _signed64(_MIX_1)
    z = (z ^ _logical_shift_right(z, 27)) * _signed64(_MIX_2)
    z = z ^ _logical_shift_right(z, 31)
    return _logical_shift_right(z, 1)


def _key_order(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Permutation sorting by (key, id); ids break the (rare) key ties deterministically."""
    by_id = torch.argsort(ids, stable=True)
    by_key = torch.argsort(keys[by_id], stable=True)
    return by_id[by_key]


def _rank_within_label(labels_sorted: torch.Tensor) -> torch.Tensor:
    """For labels already grouped by a stable sort, each item's position inside its group."""
    n = labels_sorted.shape[0]
    position = torch.arange(n, device=labels_sorted.device)
    new_group = torch.ones(n, dtype=torch.bool, device=labels_sorted.device)
    new_group[1:] = labels_sorted[1:] != labels_sorted[:-1]
    group_start = torch.cummax(torch.where(new_group, position, torch.zeros_like(position)), dim=0).values
    return position - group_start


def bottom_k_candidates(
    keys: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor, max_samples: int, min_per_class: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows to keep while streaming, and which of them are per-class guarantees.

    Keeps the ``max_samples`` smallest keys overall plus the ``min_per_class`` smallest
    of every label. Both are decomposable (the bottom-k of a union is the bottom-k of the
    union of bottom-ks), so applying this after any split of the data and once more after
    merging gives the same rows as one pass. Returns (keep mask, guaranteed mask).
    """
    order = _key_order(keys, ids)
    n = keys.shape[0]
    global_rank = torch.empty(n, dtype=torch.int64, device=keys.device)
    global_rank[order] = torch.arange(n, device=keys.device)
    by_label = torch.argsort(labels[order], stable=True)
    grouped = order[by_label]  # grouped by label, keys ascending inside each group
    class_rank = torch.empty(n, dtype=torch.int64, device=keys.device)
    class_rank[grouped] = _rank_within_label(labels[grouped])
    guaranteed = class_rank < min_per_class
    return guaranteed | (global_rank < max_samples), guaranteed


def final_sample_mask(
    keys: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor, max_samples: int, min_per_class: int
) -> torch.Tensor:
    """The sample itself: every label's ``min_per_class`` smallest keys, then the smallest
    remaining keys until ``max_samples`` rows (more only if the guarantees alone exceed it).

    Correct on the streamed candidates because a row of the final sample that is not a
    guarantee ranks at most ``max_samples`` overall, so it is among the kept candidates.
    """
    keep, guaranteed = bottom_k_candidates(keys, ids, labels, max_samples, min_per_class)
    room = max(max_samples - int(guaranteed.sum()), 0)
    rest = torch.nonzero(~guaranteed).flatten()
    rest = rest[_key_order(keys[rest], ids[rest])][:room]
    chosen = guaranteed.clone()
    chosen[rest] = True
    return chosen


def stratified_sample_indices(
    labels: ArrayLike, max_samples: int = DEFAULT_MAX_SAMPLES, *, seed: int = 0, min_per_class: int = 1
) -> np.ndarray:
    """Sorted row indices of the seeded, stratified sample used for large inputs.

    Row i gets the key ``sample_keys(i, seed)``; the sample is every class's
    ``min_per_class`` smallest keys plus the smallest other keys up to ``max_samples``
    rows: a uniform draw without replacement (so classes appear in proportion to their
    size, in expectation) in which no class is missing. ``EmbeddingSample`` streams the
    same rule, so both select the same rows for the same data and seed.
    """
    y = as_labels(labels, "labels")
    n = y.shape[0]
    if n <= max_samples:
        return np.arange(n)
    ids = torch.arange(n, dtype=torch.int64)
    mask = final_sample_mask(sample_keys(ids, seed), ids, y, max_samples, min_per_class)
    return to_numpy(torch.nonzero(mask).flatten())
