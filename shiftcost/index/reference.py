"""Reference stats: what the indices need to know about the reference data, computed once.

For one model version and one set of hooked layers, :class:`ReferenceStats` holds

- per layer: the per-class activation sums and counts (RESQUE_dist), the histogram of
  all activation values on fixed edges spanning the reference range, and the reference
  standard deviation (layer shift);
- for the primary layer (the first one; by default the classifier's input): a bounded,
  seeded, stratified embedding sample with labels, and the class centroids (inv_ARI);
  beside it, per-image pixel statistics of the same sampled rows (for drift tests);
- the model's prediction statistics on the reference (its accuracy is the retraining
  target);
- the model fingerprint, layer names, model spec and shiftcost version, so that stats
  are never used with another model or other layers.

Files are safetensors: every tensor of every accumulator state under a
``<part>/<key>`` name, and all other values as JSON in the safetensors metadata. Loading
reads tensors only (no unpickling) and refuses files for another model or layer set.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import shiftcost
from shiftcost.errors import InputError, short_error
from shiftcost.index.accumulators import ClassSums, EmbeddingSample, LayerHistogram, PredictionStats

__all__ = ["FORMAT", "FORMAT_VERSION", "ReferenceStats"]

FORMAT = "shiftcost-reference-stats"
FORMAT_VERSION = 1
_METADATA_KEY = "shiftcost_reference"


@dataclass
class ReferenceStats:
    """Summary of the reference data as seen by one model version through named layers.

    Build it with :func:`shiftcost.index.engine.compute_reference_stats`; store it with
    :meth:`save` and read it back with :meth:`load`.
    """

    spec: Any  # shiftcost.data.models.ModelSpec
    fingerprint: str
    layers: tuple[str, ...]
    class_sums: dict[str, ClassSums]
    histograms: dict[str, LayerHistogram]
    embedding_sample: EmbeddingSample
    image_stats_sample: EmbeddingSample
    image_stat_names: tuple[str, ...]
    predictions: PredictionStats
    samples: int
    bins: int
    max_samples: int
    seed: int
    edges_method: str = "two passes: per-layer min/max, then histograms on those edges"
    version: str = field(default_factory=lambda: shiftcost.__version__)
    seconds: float = 0.0

    # ------------------------------------------------------------------ derived values

    @property
    def primary_layer(self) -> str:
        """The layer whose embeddings feed inv_ARI and RESQUE_task (the first listed)."""
        return self.layers[0]

    @property
    def reference_std(self) -> dict[str, float]:
        """Standard deviation of all activation values of each layer on the reference."""
        return {layer: self.histograms[layer].std() for layer in self.layers}

    @property
    def classes(self) -> list[int]:
        """Class ids present in the reference data, sorted."""
        return self.class_sums[self.primary_layer].compute().classes

    def centroids(self) -> tuple[list[int], torch.Tensor]:
        """Sorted reference class ids and the float64 centroids of the primary layer."""
        return self.class_sums[self.primary_layer].centroids()

    @property
    def accuracy(self) -> float | None:
        """The model's accuracy on the reference data (the retraining target)."""
        return self.predictions.compute()["accuracy"]

    def summary(self) -> dict[str, Any]:
        """Plain-JSON description (no tensors) for reports and the CLI."""
        return {
            "fingerprint": self.fingerprint,
            "architecture": self.spec.architecture,
            "layers": list(self.layers),
            "samples": self.samples,
            "classes": self.classes,
            "accuracy": self.accuracy,
            "reference_std": self.reference_std,
            "embedding_sample": int(self.embedding_sample.compute().features.shape[0]),
            "bins": self.bins,
            "max_samples": self.max_samples,
            "seed": self.seed,
            "edges_method": self.edges_method,
            "version": self.version,
            "seconds": self.seconds,
        }

    # ------------------------------------------------------------------ compatibility

    def check_compatible(
        self,
        model: nn.Module | None = None,
        layers: Sequence[str] | None = None,
        *,
        fingerprint: str | None = None,
        source: str = "The reference stats",
    ) -> None:
        """Raise ``InputError`` unless these stats belong to ``model`` and ``layers``."""
        if model is not None and fingerprint is None:
            from shiftcost.data.models import model_fingerprint

            fingerprint = model_fingerprint(model)
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise InputError(
                f"{source} were computed for another model (fingerprint {self.fingerprint[:12]}, this model "
                f"{fingerprint[:12]}); rebuild them for this model with `shiftcost reference`."
            )
        if layers is not None and list(layers) and tuple(layers) != self.layers:
            raise InputError(
                f"{source} cover layers {', '.join(self.layers)} but layers {', '.join(layers)} were asked for; "
                "rebuild them with those layers or drop the layer option."
            )

    # ------------------------------------------------------------------ files

    def _parts(self) -> dict[str, Mapping[str, Any]]:
        parts: dict[str, Mapping[str, Any]] = {
            "embedding_sample": self.embedding_sample.state_dict(),
            "image_stats_sample": self.image_stats_sample.state_dict(),
            "predictions": self.predictions.state_dict(),
        }
        for index, layer in enumerate(self.layers):
            parts[f"layer{index}/class_sums"] = self.class_sums[layer].state_dict()
            parts[f"layer{index}/histogram"] = self.histograms[layer].state_dict()
        return parts

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the stats to a safetensors file (complete or not at all)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        plain: dict[str, dict[str, Any]] = {}
        for part, state in self._parts().items():
            plain[part] = {}
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{part}/{key}"] = value.detach().cpu().contiguous()
                else:
                    plain[part][key] = value
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "version": self.version,
            "fingerprint": self.fingerprint,
            "spec": self.spec.to_dict(),
            "layers": list(self.layers),
            "image_stat_names": list(self.image_stat_names),
            "samples": self.samples,
            "bins": self.bins,
            "max_samples": self.max_samples,
            "seed": self.seed,
            "edges_method": self.edges_method,
            "seconds": self.seconds,
            "reference_std": self.reference_std,
            "parts": plain,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as handle:
            temporary = Path(handle.name)
        try:
            save_file(tensors, str(temporary), metadata={_METADATA_KEY: json.dumps(header)})
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        model: nn.Module | None = None,
        layers: Sequence[str] | None = None,
    ) -> ReferenceStats:
        """Read stats saved by :meth:`save`; refuse another model's or layer set's stats.

        ``model`` (its fingerprint) and ``layers`` are checked when given. A missing,
        truncated or foreign file raises ``InputError`` naming it.
        """
        from shiftcost.data.models import ModelSpec
        from shiftcost.tensorfiles import read_safetensors

        path = Path(path)
        if not path.is_file():
            raise InputError(f"Reference stats file {path} does not exist; build it with `shiftcost reference`.")
        metadata, tensors = read_safetensors(path, lambda why: (
            f"Reference stats file {path} is not a readable safetensors file ({why}); "
            "it is truncated or of another kind, build it again with `shiftcost reference`."
        ))
        try:
            header = json.loads(metadata[_METADATA_KEY])
        except (KeyError, json.JSONDecodeError, TypeError):
            raise InputError(
                f"File {path} holds no shiftcost reference stats; pass a file written by `shiftcost reference`."
            ) from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise InputError(f"File {path} holds no shiftcost reference stats; pass a file written by `shiftcost reference`.")
        if header.get("format_version") != FORMAT_VERSION:
            raise InputError(
                f"Reference stats file {path} has format version {header.get('format_version')!r}, this shiftcost reads "
                f"{FORMAT_VERSION}; build it again with `shiftcost reference`."
            )
        try:
            stats = cls._from_header(header, tensors, ModelSpec, source=f"Reference stats file {path}")
        except InputError as error:
            raise InputError(f"Reference stats file {path} is damaged ({error}); build it again with `shiftcost reference`.") from None
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(
                f"Reference stats file {path} is damaged (missing or malformed {short_error(error)}); build it again with "
                "`shiftcost reference`."
            ) from None
        stats.check_compatible(model, layers, source=f"The reference stats in {path}")
        return stats

    @classmethod
    def _from_header(
        cls, header: dict[str, Any], tensors: dict[str, torch.Tensor], spec_type: Any, *, source: str
    ) -> ReferenceStats:
        parts: dict[str, dict[str, Any]] = {part: dict(values) for part, values in header["parts"].items()}
        for name, tensor in tensors.items():
            part, _, key = name.rpartition("/")
            if part not in parts:
                raise ValueError(f"tensor {name}")
            parts[part][key] = tensor
        layers = tuple(str(layer) for layer in header["layers"])
        if not layers:
            raise ValueError("layer list")

        def loaded(accumulator: Any, part: str) -> Any:
            if part not in parts:
                raise KeyError(part)
            accumulator.load_state_dict(parts[part])
            return accumulator

        spec = spec_type.from_dict(header["spec"], source=source)
        class_sums: dict[str, ClassSums] = {}
        histograms: dict[str, LayerHistogram] = {}
        for index, layer in enumerate(layers):
            class_sums[layer] = loaded(ClassSums(), f"layer{index}/class_sums")
            edges = parts[f"layer{index}/histogram"]["edges"]
            histograms[layer] = loaded(LayerHistogram(edges), f"layer{index}/histogram")
        stats = cls(
            spec=spec,
            fingerprint=str(header["fingerprint"]),
            layers=layers,
            class_sums=class_sums,
            histograms=histograms,
            embedding_sample=loaded(EmbeddingSample(), "embedding_sample"),
            image_stats_sample=loaded(EmbeddingSample(), "image_stats_sample"),
            image_stat_names=tuple(str(name) for name in header["image_stat_names"]),
            predictions=loaded(PredictionStats(spec.num_classes), "predictions"),
            samples=int(header["samples"]),
            bins=int(header["bins"]),
            max_samples=int(header["max_samples"]),
            seed=int(header["seed"]),
            edges_method=str(header.get("edges_method", "")),
            version=str(header["version"]),
            seconds=float(header.get("seconds", 0.0)),
        )
        for layer, std in stats.reference_std.items():
            if not math.isfinite(std):
                raise ValueError(f"standard deviation of layer {layer}")
        return stats


