"""A pass over a batch too large for one worker: shards by row range, computed anywhere, merged.

:func:`split_batch` cuts the batch into :class:`Shard` s of consecutive rows;
:func:`index_shard` runs one shard's forward pass into the pass's accumulators and
returns their state (CPU tensors and plain values: it pickles to any process);
:func:`report_from_shards` merges the states and computes every index. Because a shard's
sample ids are its rows' positions in the whole batch and every accumulator merges
exactly (counts, sample) or up to float64 rounding (sums), the report equals a single
pass's. Nothing here knows where shards run: :func:`assess_in_shards` takes any ``map``.

A shard's state enters the merge only as a return value, so a shard that failed and was
run again contributes once, whatever its failed attempt had accumulated.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shiftcost.errors import InputError
from shiftcost.index.capture import resolve_device
from shiftcost.index.engine import IndexReport, accumulate_pass, report_from_pass
from shiftcost.index.reference import ReferenceStats
from shiftcost.index.state import AccumulatorCollection, StateDict, merge_states

__all__ = ["Shard", "assess_in_shards", "index_shard", "merge_shard_states", "report_from_shards", "split_batch"]


@dataclass(frozen=True)
class Shard:
    """Rows ``start:stop`` of a batch (images, optional labels, optional clean originals).

    In the process that split the batch a shard only refers to the batch's tensors;
    pickled (to another process or machine) it carries copies of its own rows only.
    """

    start: int
    stop: int
    x: torch.Tensor
    y: torch.Tensor | None = None
    clean_x: torch.Tensor | None = None
    offset: int = 0  # row of the batch at which the tensors above begin

    def _rows(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[self.start - self.offset : self.stop - self.offset]

    @property
    def images(self) -> torch.Tensor:
        rows = self._rows(self.x)
        assert rows is not None
        return rows

    @property
    def labels(self) -> torch.Tensor | None:
        return self._rows(self.y)

    @property
    def clean_images(self) -> torch.Tensor | None:
        return self._rows(self.clean_x)

    def __len__(self) -> int:
        return self.stop - self.start

    def __reduce__(self) -> tuple[Any, ...]:
        own = [None if t is None else t.clone() for t in (self.images, self.labels, self.clean_images)]
        return (Shard, (self.start, self.stop, *own, self.start))


def split_batch(x: torch.Tensor, y: torch.Tensor | None = None, *, shard_size: int, paired_clean_x: torch.Tensor | None = None) -> list[Shard]:
    """Consecutive shards of at most ``shard_size`` rows covering the batch ``(x, y)``."""
    if not isinstance(x, torch.Tensor):
        raise InputError("a batch is split into shards by row; give the images as one tensor N x C x H x W.")
    if int(shard_size) < 1:
        raise InputError(f"shard_size={shard_size}; a shard holds at least one image.")
    total = int(x.shape[0])
    if total == 0:
        raise InputError("The batch is empty; give at least one image.")
    for name, other in (("labels", y), ("clean originals", paired_clean_x)):
        if other is not None and (not isinstance(other, torch.Tensor) or other.shape[0] != total):
            raise InputError(f"the batch has {total} images but its {name} do not have one row per image; give them as a tensor of {total} rows.")
    return [Shard(start, min(start + shard_size, total), x, y, paired_clean_x) for start in range(0, total, int(shard_size))]


def index_shard(
    model: nn.Module,
    spec: Any,
    reference: ReferenceStats,
    shard: Shard,
    *,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    autocast: bool | None = False,
    task: bool = False,
) -> StateDict:
    """The accumulator states of one shard's forward pass (what :func:`report_from_shards` merges)."""
    parts = accumulate_pass(
        model, spec, reference, shard.images, shard.labels, first_row=shard.start, batch_size=batch_size,
        device=resolve_device(device), autocast=autocast, task=task, paired_clean_x=shard.clean_images,
    )  # fmt: skip
    return parts.state_dict()


def merge_shard_states(states: Iterable[StateDict]) -> AccumulatorCollection:
    """One set of pass accumulators holding every shard's state."""
    merged = merge_states(list(states))
    if not isinstance(merged, AccumulatorCollection):
        raise InputError("a shard state is not the state of a pass; pass what index_shard returned.")
    return merged


def report_from_shards(
    spec: Any,
    reference: ReferenceStats,
    states: Iterable[StateDict],
    *,
    task: bool = False,
    paired: bool = False,
    device: torch.device | str = "cpu",
    seconds: float = 0.0,
) -> IndexReport:
    """Every index of the batch from its shards' states (each shard's state exactly once)."""
    merged = merge_shard_states(states)
    return report_from_pass(spec, reference, merged, task=task, paired=paired, device=device, seconds=seconds)


def assess_in_shards(
    model: nn.Module,
    spec: Any,
    reference: ReferenceStats,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    shard_size: int,
    map_shards: Callable[[Callable[[Shard], StateDict], list[Shard]], Iterator[StateDict] | list[StateDict]] = map,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    autocast: bool | None = False,
    task: bool = False,
    paired_clean_x: torch.Tensor | None = None,
    check_model: bool = True,
) -> IndexReport:
    """:func:`~shiftcost.index.engine.assess` computed shard by shard; ``map_shards`` decides where shards run."""
    started = time.perf_counter()
    if check_model:
        reference.check_compatible(model)
    shards = split_batch(x, y, shard_size=shard_size, paired_clean_x=paired_clean_x)

    def one(shard: Shard) -> StateDict:
        return index_shard(model, spec, reference, shard, batch_size=batch_size, device=device, autocast=autocast, task=task)

    states = list(map_shards(one, shards))
    return report_from_shards(
        spec, reference, states, task=task, paired=paired_clean_x is not None, device=resolve_device(device),
        seconds=time.perf_counter() - started,
    )  # fmt: skip
