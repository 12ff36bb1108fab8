"""Declared accumulator state: one base class gives every accumulator its state dict and merge.

An accumulator declares each piece of its state once, as torchmetrics' ``Metric.add_state``
does: a name, a default and the rule that combines two values of it. ``reset``,
``state_dict``, ``load_state_dict`` and ``merge`` then follow from the declarations, so
a new accumulator writes only ``update`` and ``compute``. Constructor arguments that two
shards must share (bins, edges, seeds, class counts) are listed in ``settings``; they are
saved with the state, rebuild the accumulator on load, and must agree before a merge.

Merge rules:

- ``"sum"``: element-wise sum (counts, float64 sums);
- ``"padded_sum"``: sum along a first axis that grows with the largest class id seen;
- ``"cat"``: rows appended (an accumulator that keeps rows filters them after a merge);
- ``"max"``: the larger value (a size that one side may not know yet, marked −1).

An update folds a batch's contribution in with the same rules: a batch is a tiny shard.
State tensors live on the device of the batches (moved there, once, by ``_place``); the
state dict holds CPU tensors and plain Python values only, so it survives
``torch.load(weights_only=True)``, safetensors plus JSON, and pickling to another process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import reduce
from typing import Any, ClassVar

import numpy as np
import torch

from shiftcost.errors import InputError
from shiftcost.index.functional import pad_rows

StateDict = dict[str, Any]
StateValue = Any  # torch.Tensor, int or float

__all__ = ["Accumulator", "AccumulatorCollection", "StateDict"]

STATE_VERSION = 1


def _padded_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if b.shape[0] == 0:
        return a
    if a.shape[0] == 0:
        return b.clone()
    rows = max(a.shape[0], b.shape[0])
    return pad_rows(a, rows) + pad_rows(b, rows)


def _cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if b.shape[0] == 0:
        return a
    if a.shape[0] == 0:
        return b.clone()
    return torch.cat([a, b])


def _max(a: StateValue, b: StateValue) -> StateValue:
    return torch.maximum(a, b) if isinstance(a, torch.Tensor) else max(a, b)


MERGE_RULES: dict[str, Callable[[StateValue, StateValue], StateValue]] = {
    "sum": lambda a, b: a + b,
    "padded_sum": _padded_sum,
    "cat": _cat,
    "max": _max,
}


@dataclass(frozen=True)
class _Declared:
    default: StateValue
    merge: Callable[[StateValue, StateValue], StateValue]
    saved_as: type | None  # int or float: a 0-d tensor kept on the device, saved as a number

    @property
    def fixed_shape(self) -> bool:
        """Tensors whose shape the settings decide (not rows that grow with the data)."""
        return isinstance(self.default, torch.Tensor) and self.default.numel() > 0


def _fresh(value: StateValue) -> StateValue:
    return value.clone() if isinstance(value, torch.Tensor) else value


class Accumulator:
    """Base of every streaming accumulator: declared state, state dicts, merges.

    Subclasses call :meth:`add_state` in ``__init__`` (after storing their settings) and
    write ``update`` and ``compute``. A declared state ``name`` is the attribute
    ``_name`` and the key ``name`` of the state dict. Hooks, all optional:
    ``_sync`` (bring transient buffers into the declared state before it is read),
    ``_check_mergeable(other)``, ``_after_merge()`` and ``_check_loaded()``.
    """

    #: constructor arguments saved in the state dict; shards must agree on them.
    settings: ClassVar[tuple[str, ...]] = ()

    _kinds: ClassVar[dict[str, type[Accumulator]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Accumulator._kinds[cls.__name__] = cls

    # ------------------------------------------------------------------ declarations

    def add_state(self, name: str, default: StateValue, merge: str = "sum", *, saved_as: type | None = None) -> None:
        """Declare a piece of state: its default (a CPU tensor or a number) and merge rule."""
        if merge not in MERGE_RULES:
            raise ValueError(f"unknown merge rule {merge!r}")
        declared = self.__dict__.setdefault("_declared", {})
        declared[name] = _Declared(default, MERGE_RULES[merge], saved_as)
        setattr(self, f"_{name}", _fresh(default))

    @property
    def _states(self) -> dict[str, _Declared]:
        return self.__dict__.get("_declared", {})

    def reset(self) -> None:
        """Forget everything seen; settings stay."""
        for name, declared in self._states.items():
            setattr(self, f"_{name}", _fresh(declared.default))

    def _place(self, device: torch.device) -> None:
        """Move the state to ``device`` (a no-op when it is already there)."""
        for name in self._states:
            value = getattr(self, f"_{name}")
            if isinstance(value, torch.Tensor) and value.device != device:
                setattr(self, f"_{name}", value.to(device))

    @property
    def _device(self) -> torch.device:
        for name in self._states:
            value = getattr(self, f"_{name}")
            if isinstance(value, torch.Tensor):
                return value.device
        return torch.device("cpu")

    def _fold(self, **parts: StateValue) -> None:
        """Combine ``parts`` (a batch's or another shard's values) into the state by the declared rules."""
        device = self._device
        for name, value in parts.items():
            if isinstance(value, torch.Tensor):
                # asynchronous only towards an accelerator: a non-blocking copy to the host may be read unfinished
                value = value.to(device, non_blocking=device.type != "cpu")
            setattr(self, f"_{name}", self._states[name].merge(getattr(self, f"_{name}"), value))

    # ------------------------------------------------------------------ hooks

    def _sync(self) -> None:
        """Bring transient buffers into the declared state (called before it is read)."""

    def _check_mergeable(self, other: Any) -> None:
        """Raise ``InputError`` when ``other``'s state cannot be added to this one."""

    def _after_merge(self) -> None:
        """Restore invariants the merge rules alone do not keep."""

    def _check_loaded(self) -> None:
        """Raise ``InputError`` when a loaded state is inconsistent."""

    # ------------------------------------------------------------------ merge

    def merge(self, other: Any) -> Any:
        """Add another shard's state into this one (in place); returns self."""
        if type(other) is not type(self):
            raise InputError(f"cannot merge a {type(other).__name__} into a {type(self).__name__}; merge accumulators of the same kind.")
        self._check_settings(other)
        self._check_mergeable(other)
        self._sync()
        other._sync()
        self._fold(**{name: getattr(other, f"_{name}") for name in self._states})
        self._after_merge()
        return self

    def _check_settings(self, other: Accumulator) -> None:
        differing = [name for name in self.settings if not _same(getattr(self, name), getattr(other, name))]
        if not differing:
            return
        kind = type(self).__name__
        tensors = [name for name in differing if isinstance(getattr(self, name), torch.Tensor)]
        if tensors:
            raise InputError(f"cannot merge a {kind} with different {', '.join(tensors)} into this one; use the same settings on every shard.")
        mine = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.settings)
        theirs = ", ".join(f"{name}={getattr(other, name)!r}" for name in self.settings)
        raise InputError(f"cannot merge a {kind} with {theirs} into one with {mine}; use the same settings on every shard.")

    # ------------------------------------------------------------------ state dicts

    def _header(self) -> StateDict:
        return {"kind": type(self).__name__, "version": STATE_VERSION}

    def state_dict(self) -> StateDict:
        """Settings and state: CPU tensors and plain Python values only."""
        self._sync()
        state = self._header()
        for name in self.settings:
            state[name] = _saved(getattr(self, name))
        for name, declared in self._states.items():
            value = getattr(self, f"_{name}")
            if declared.saved_as is not None:
                state[name] = declared.saved_as(value.item())
            else:
                state[name] = _saved(value)
        return state

    def _check_header(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise InputError(f"the state for {type(self).__name__} is a {type(state).__name__}, not a dict; pass what state_dict() returned.")
        kind = state.get("kind")
        if kind != type(self).__name__:
            raise InputError(f"the state belongs to {kind!r}, not {type(self).__name__}; load it into the matching accumulator.")
        if state.get("version") != STATE_VERSION:
            raise InputError(f"the {kind} state has version {state.get('version')!r}; this build reads version {STATE_VERSION}.")

    def load_state_dict(self, state: StateDict) -> None:
        """Replace settings and state by ``state`` (what :meth:`state_dict` returned)."""
        self._check_header(state)
        kind = type(self).__name__
        blank = type(self).__new__(type(self))
        settings = {name: _read_like(state, name, kind, getattr(self, name, None)) for name in self.settings}
        values = {}
        blank.__init__(**settings)  # type: ignore[misc]
        for name, declared in blank._states.items():
            values[name] = _read_state(state, name, kind, declared)
        self.__init__(**settings)  # type: ignore[misc]
        for name, value in values.items():
            setattr(self, f"_{name}", value)
        self._check_loaded()

    @classmethod
    def from_state_dict(cls, state: StateDict) -> Accumulator:
        """A new accumulator of the kind named in ``state``, holding that state."""
        kind = state.get("kind") if isinstance(state, dict) else None
        klass = Accumulator._kinds.get(str(kind))
        if klass is None or not issubclass(klass, cls):
            raise InputError(f"the state names the accumulator kind {kind!r}, which this build does not know; the data is truncated or foreign.")
        accumulator = klass.__new__(klass)
        accumulator.load_state_dict(state)
        return accumulator


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
    return bool(a == b)


def _saved(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, tuple):
        return list(value)
    return value


def _truncated(kind: str, what: str) -> InputError:
    return InputError(f"the {kind} state lacks {what}; the file is truncated or foreign.")


def read_tensor(state: StateDict, key: str, kind: str, dtype: torch.dtype, ndim: int) -> torch.Tensor:
    value = state.get(key)
    if not isinstance(value, torch.Tensor) or value.ndim != ndim:
        raise _truncated(kind, f"a {ndim}-D tensor '{key}'")
    return value.to("cpu", dtype).clone()


def read_int(state: StateDict, key: str, kind: str) -> int:
    value = state.get(key)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise _truncated(kind, f"the integer '{key}'")
    return int(value)


def read_float(state: StateDict, key: str, kind: str) -> float:
    value = state.get(key)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise _truncated(kind, f"the number '{key}'")
    return float(value)


def _read_like(state: StateDict, key: str, kind: str, example: Any) -> Any:
    """A setting read back as the type the accumulator holds it in."""
    if isinstance(example, torch.Tensor):
        return read_tensor(state, key, kind, example.dtype, example.ndim)
    if isinstance(example, bool):
        value = state.get(key)
        if not isinstance(value, bool):
            raise _truncated(kind, f"the flag '{key}'")
        return value
    if isinstance(example, int):
        return read_int(state, key, kind)
    if isinstance(example, float):
        return read_float(state, key, kind)
    value = state.get(key)
    if isinstance(example, str) and not isinstance(value, str):
        raise _truncated(kind, f"the text '{key}'")
    if isinstance(example, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            raise _truncated(kind, f"the list '{key}'")
        return type(example)(value)
    if key not in state:
        raise _truncated(kind, f"'{key}'")
    return value


def _read_state(state: StateDict, key: str, kind: str, declared: _Declared) -> StateValue:
    default = declared.default
    if declared.saved_as is not None:
        number = read_int(state, key, kind) if declared.saved_as is int else read_float(state, key, kind)
        return torch.tensor(number, dtype=default.dtype)
    value = _read_like(state, key, kind, default)
    if declared.fixed_shape and value.shape != default.shape:
        raise InputError(
            f"the {kind} state has '{key}' of shape {tuple(value.shape)} where its settings give {tuple(default.shape)}; the file is corrupt."
        )
    return value


# --------------------------------------------------------------------------- collections


class AccumulatorCollection(Accumulator):
    """Accumulators under names, merged and saved together (as torchmetrics' ``MetricCollection``).

    ``state_dict()`` nests each member's state dict under ``members``;
    :meth:`Accumulator.from_state_dict` rebuilds the whole collection from it, which is how
    a shard's result travels to the process that merges it.
    """

    def __init__(self, members: Mapping[str, Accumulator] | None = None) -> None:
        self._members: dict[str, Accumulator] = dict(members or {})

    def __getitem__(self, key: str) -> Any:
        return self._members[key]

    def __setitem__(self, key: str, accumulator: Accumulator) -> None:
        self._members[key] = accumulator

    def __contains__(self, key: object) -> bool:
        return key in self._members

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(self._members.items())

    def reset(self) -> None:
        for member in self._members.values():
            member.reset()

    def merge(self, other: Any) -> AccumulatorCollection:
        if type(other) is not type(self):
            raise InputError(f"cannot merge a {type(other).__name__} into a {type(self).__name__}; merge accumulators of the same kind.")
        if set(other._members) != set(self._members):
            raise InputError(
                f"cannot merge a collection of {sorted(other._members)} into one of {sorted(self._members)}; "
                "every shard must keep the same accumulators."
            )
        for key, member in self._members.items():
            member.merge(other._members[key])
        return self

    def state_dict(self) -> StateDict:
        return {**self._header(), "members": {key: member.state_dict() for key, member in self._members.items()}}

    def load_state_dict(self, state: StateDict) -> None:
        self._check_header(state)
        members = state.get("members")
        if not isinstance(members, dict):
            raise _truncated("AccumulatorCollection", "its members")
        self.__init__({str(key): Accumulator.from_state_dict(member) for key, member in members.items()})  # type: ignore[misc]


def merge_states(states: list[StateDict]) -> Accumulator:
    """One accumulator holding the merge of state dicts (shards' results), in the order given."""
    if not states:
        raise InputError("there is no shard state to merge; compute at least one shard.")
    return reduce(lambda merged, state: merged.merge(Accumulator.from_state_dict(state)), states[1:], Accumulator.from_state_dict(states[0]))
