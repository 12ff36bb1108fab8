"""Fitted versions of a cost model and the history that keeps them, as plain JSON."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from shiftcost.costmodel.checks import CostModelInputError

FORMAT = "shiftcost.costmodel/1"


@dataclass
class CostModelVersion:
    """One fitted version: what it learned from, how, and how well (leave-one-out)."""

    version: int
    created_at: str
    params: dict[str, Any]
    features: list[str]
    signs: list[int]
    rows: list[dict[str, Any]]
    state: dict[str, Any]
    loo: dict[str, Any]
    parent: int | None = None
    note: str = ""
    group_key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CostModelVersion:
        return cls(**dict(data))


class CostModelHistory:
    """Every fitted version of a cost model, oldest first; versions are never changed."""

    def __init__(self, versions: Iterable[CostModelVersion] = ()) -> None:
        self.versions: list[CostModelVersion] = list(versions)

    def __len__(self) -> int:
        return len(self.versions)

    def __iter__(self):
        return iter(self.versions)

    @property
    def latest(self) -> CostModelVersion:
        if not self.versions:
            raise CostModelInputError("the cost model has no fitted version yet; call fit() with calibration runs first.")
        return self.versions[-1]

    def get(self, version: int | None = None) -> CostModelVersion:
        """The version with this number (the latest when ``None``)."""
        if version is None:
            return self.latest
        for candidate in self.versions:
            if candidate.version == version:
                return candidate
        known = [v.version for v in self.versions]
        raise CostModelInputError(f"cost model version {version} does not exist (known versions: {known}); pick one of those.")

    def append(self, version: CostModelVersion) -> None:
        self.versions.append(version)

    def next_number(self) -> int:
        return self.versions[-1].version + 1 if self.versions else 1

    def to_list(self) -> list[dict[str, Any]]:
        return [v.to_dict() for v in self.versions]

    def to_json(self) -> str:
        return json.dumps(self.to_list(), allow_nan=False)

    @classmethod
    def from_list(cls, data: Iterable[Mapping[str, Any]]) -> CostModelHistory:
        return cls(CostModelVersion.from_dict(item) for item in data)

    @classmethod
    def from_json(cls, text: str) -> CostModelHistory:
        return cls.from_list(json.loads(text))
