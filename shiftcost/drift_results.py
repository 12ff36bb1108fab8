"""What a drift test takes and gives: the thresholds, one side's inputs and the results.

Kept apart from :mod:`shiftcost.drift` (which runs the tests and re-exports these) so
that the result types import without Evidently or pandas.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shiftcost.errors import ConfigError
from shiftcost.jsonsafe import json_safe

__all__ = ["DriftInputs", "DriftResult", "DriftThresholds", "FeatureResult", "GroupResult"]


@dataclass(frozen=True)
class DriftThresholds:
    """Thresholds and rules of the three test groups; ``None`` takes the documented default."""

    embeddings: float | None = None
    """Drift when the embedding score exceeds this (default per method, see the module notes)."""
    embeddings_quantile: float = 0.95
    """Quantile of the reference bootstrap that sets the ``distance`` threshold when none is given."""
    image_stats: float | None = None
    """Per-column threshold of the image-statistics test (default: Evidently's for the test used)."""
    image_stats_method: str | None = None
    """Evidently stat test for image statistics, e.g. 'ks', 'wasserstein', 'psi' (default: automatic)."""
    image_stats_share: float = 0.5
    """The image-statistics group drifts when at least this share of its columns drift."""
    predictions: float | None = None
    """Threshold of the prediction-distribution test (default: Evidently's for the test used)."""
    predictions_method: str | None = None
    """Evidently stat test for predicted classes, e.g. 'chisquare', 'jensenshannon' (default: automatic)."""
    min_drifted_groups: int = 1
    """The batch drifts when at least this many of the tested groups drift."""

    def __post_init__(self) -> None:
        if not 0.0 < self.embeddings_quantile < 1.0:
            raise ConfigError(f"embeddings_quantile is {self.embeddings_quantile}; set a probability strictly between 0 and 1.")
        if not 0.0 < self.image_stats_share <= 1.0:
            raise ConfigError(f"image_stats_share is {self.image_stats_share}; set a share in (0, 1].")
        if self.min_drifted_groups < 1:
            raise ConfigError(f"min_drifted_groups is {self.min_drifted_groups}; set at least 1.")

    @classmethod
    def coerce(cls, value: DriftThresholds | Mapping[str, Any] | None) -> DriftThresholds:
        if value is None:
            return cls()
        if isinstance(value, DriftThresholds):
            return value
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown drift threshold setting(s) {sorted(unknown)}; use {sorted(cls.__dataclass_fields__)}.")
        return cls(**value)


@dataclass
class DriftInputs:
    """One side (reference or current) of a drift test: outputs of the single forward pass.

    ``embeddings``: ``N x D`` embedding sample (numpy array or torch tensor).
    ``image_stats``: columns of per-image statistics (mapping of 1-D arrays or a data
    frame), e.g. ``shiftcost.imagestats.stats_table(...)``.
    ``predictions``: 1-D predicted classes, one per image.
    Any of them may be None; a group is tested only when both sides have it.
    """

    embeddings: Any = None
    image_stats: Any = None
    predictions: Any = None


@dataclass(frozen=True)
class FeatureResult:
    """One tested feature (a column, or the embedding set as a whole)."""

    name: str
    test: str
    score: float
    threshold: float
    drifted: bool
    drift_when: str
    """The rule that made the verdict, e.g. 'score > threshold', or 'score <= threshold' for a p-value."""

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


@dataclass(frozen=True)
class GroupResult:
    """One test group: its verdict, the rule that made it, and its per-feature results."""

    name: str
    tested: bool
    drifted: bool
    method: str
    score: float | None
    threshold: float | None
    rows: tuple[int, int]
    """Rows used (reference, current), after any subsampling."""
    features: tuple[FeatureResult, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tested": self.tested,
            "drifted": self.drifted,
            "method": self.method,
            "score": json_safe(self.score),
            "threshold": json_safe(self.threshold),
            "rows": list(self.rows),
            "features": [feature.to_dict() for feature in self.features],
            "details": json_safe(self.details),
        }


def drifted_group_names(groups: Sequence[GroupResult]) -> list[str]:
    return [group.name for group in groups if group.tested and group.drifted]


@dataclass(frozen=True)
class DriftResult:
    """The verdict of a batch, every group's and feature's result, and Evidently's HTML report."""

    verdict: bool
    groups: tuple[GroupResult, ...]
    thresholds: dict[str, Any]
    """Every threshold and rule actually used (defaults resolved)."""
    rule: str
    seed: int
    seconds: float
    evidently_version: str
    html: str = field(repr=False)

    def group(self, name: str) -> GroupResult:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(name)

    @property
    def drifted_groups(self) -> list[str]:
        """The tested groups that drifted; the verdict is that they number ``min_drifted_groups`` or more."""
        return drifted_group_names(self.groups)

    @property
    def features(self) -> list[dict[str, Any]]:
        """Every per-feature result as JSON-ready dicts, tagged with its group."""
        return [{"group": group.name, **feature.to_dict()} for group in self.groups for feature in group.features]

    def save_html(self, path: str | Path) -> Path:
        """Write Evidently's HTML report to ``path`` (parents created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.html, encoding="utf-8")
        return path

    def to_dict(self, *, include_html: bool = False) -> dict[str, Any]:
        """JSON-ready form; the HTML (several MB) only when asked."""
        data = {
            "verdict": self.verdict,
            "rule": self.rule,
            "groups": [group.to_dict() for group in self.groups],
            "thresholds": json_safe(self.thresholds),
            "seed": self.seed,
            "seconds": self.seconds,
            "evidently_version": self.evidently_version,
        }
        if include_html:
            data["html"] = self.html
        return data
