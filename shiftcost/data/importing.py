"""Turning the weights users have into a shiftcost model file, and checking its accuracy.

:func:`import_model` reads a plain state dict (``.pt``/``.pth`` read tensors-only, or
``.safetensors``; never arbitrary pickled objects), rebuilds the module from a torchvision
architecture name or a factory ``pkg.module:build``, loads the weights and returns the
model with its :class:`~shiftcost.data.models.ModelSpec` (input size, channels, resize
rule, mean/std normalisation, recipe).

:func:`check_accuracy` measures the model's accuracy on labelled data; near chance it is
refused (a model fed the wrong preprocessing makes every index and forecast after it
wrong), and where a common normalisation, or one by the images' own mean and std, would do much
better, one sentence names it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shiftcost.data.batches import Batch
from shiftcost.data.models import (
    ModelSpec,
    _load_state,
    _read_safetensors,
    _read_torch,
    apply_preprocessing,
    build_model,
    call_factory,
    find_classifier,
)
from shiftcost.errors import InputError

__all__ = ["AccuracyCheck", "COMMON_NORMALISATIONS", "OWN_NORMALISATION", "accuracy_of", "check_accuracy", "check_weights_file", "import_model", "own_normalisation"]

#: Normalisations models are commonly trained with: name -> (mean, std) per RGB channel
#: (single-channel models use the first value).
COMMON_NORMALISATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "ImageNet's mean/std": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "[-1, 1]": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "no normalisation": None,
}
#: The normalisation by the checked images' own per-channel mean and std, tried beside the common
#: ones: models trained on their own data (CIFAR's, MNIST's) are as often normalised that way.
OWN_NORMALISATION = "these images' own mean/std"
#: Significant digits of the suggested own mean/std (the accuracy is checked at the rounded figures).
OWN_DIGITS = 4
#: An alternative normalisation is suggested when it gains at least this much accuracy.
MUCH_BETTER = 0.10
#: Accuracy refused as near chance: not above chance at this significance (one-sided binomial test).
CHANCE_P_VALUE = 0.01


@dataclass
class AccuracyCheck:
    """The model's accuracy on labelled data and what a common normalisation would give."""

    accuracy: float
    samples: int
    chance: float
    p_value: float
    source: str
    alternatives: dict[str, float] = field(default_factory=dict)
    suggestion: str | None = None
    fix: str | None = None

    @property
    def near_chance(self) -> bool:
        return self.p_value > CHANCE_P_VALUE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"near_chance": self.near_chance}


@torch.no_grad()
def accuracy_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``(x, y)``."""
    model = model.eval().to(device)
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == y[start : start + batch_size]).sum())
    return correct / len(x)


def _flags(mean: Sequence[float], std: Sequence[float]) -> str:
    return f"--mean {','.join(f'{v:g}' for v in mean)} --std {','.join(f'{v:g}' for v in std)}"


def check_accuracy(model: nn.Module, spec: ModelSpec, batch: Batch, *, device: str | torch.device = "cpu") -> AccuracyCheck:
    """Accuracy on a labelled batch, a binomial test against chance, and a better normalisation if one exists."""
    from scipy.stats import binomtest

    if batch.y is None:
        raise InputError(f"Batch {batch.source} has no labels; the accuracy check needs labelled data.")
    accuracy = accuracy_of(model, batch.x, batch.y, device=device)
    chance = 1.0 / spec.num_classes
    correct = int(round(accuracy * len(batch)))
    p_value = float(binomtest(correct, len(batch), chance, alternative="greater").pvalue)
    check = AccuracyCheck(accuracy=accuracy, samples=len(batch), chance=chance, p_value=p_value, source=str(batch.source))
    current = (spec.mean, spec.std) if spec.mean is not None else None
    candidates: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {}
    for name, norm in COMMON_NORMALISATIONS.items():
        if norm is not None:
            if spec.in_channels not in (1, 3):
                continue
            norm = (norm[0][: spec.in_channels], norm[1][: spec.in_channels])
        candidates[name] = norm
    candidates[OWN_NORMALISATION] = own_normalisation(batch.x)
    for name, norm in candidates.items():
        if norm == current:
            continue
        trial = copy.deepcopy(model)
        mean, std = norm if norm is not None else (None, None)
        apply_preprocessing(trial, _with_norm(spec, mean, std))
        check.alternatives[name] = accuracy_of(trial, batch.x, batch.y, device=device)
    if check.alternatives:
        best = max(check.alternatives, key=check.alternatives.__getitem__)
        if check.alternatives[best] >= accuracy + MUCH_BETTER:
            norm = candidates[best]
            flags = _flags(*norm) if norm is not None else "no --mean/--std"
            if best == OWN_NORMALISATION:
                flags += " (or the exact figures it was trained with)"
            check.fix = f"with {best} it is {check.alternatives[best]:.2f}: import it again with {flags}"
            check.suggestion = (
                f"The model's accuracy on {batch.source} is {accuracy:.2f}, but {check.alternatives[best]:.2f} with {best}: "
                f"it was probably trained with that normalisation; import it again with {flags}."
            )
    return check


def own_normalisation(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation over every pixel of the images ``x`` (N, C, H, W),
    each to :data:`OWN_DIGITS` significant digits (a channel that never varies gets std 1)."""
    std, mean = torch.std_mean(x.float(), dim=(0, 2, 3), correction=0)
    return (
        tuple(float(f"{v:.{OWN_DIGITS}g}") for v in mean.tolist()),
        tuple(float(f"{v:.{OWN_DIGITS}g}") if v > 0 else 1.0 for v in std.tolist()),
    )


def _with_norm(spec: ModelSpec, mean: Sequence[float] | None, std: Sequence[float] | None) -> ModelSpec:
    from dataclasses import replace

    return replace(spec, mean=None if mean is None else tuple(mean), std=None if std is None else tuple(std))


def refuse_near_chance(check: AccuracyCheck) -> None:
    """One sentence, as an :class:`InputError`, when the accuracy is no better than chance."""
    if check.near_chance:
        fix = check.fix or "check --arch, the order of --classes (the order of the model's outputs), --image-size and --mean/--std"
        raise InputError(
            f"The model's accuracy on {check.source} is {check.accuracy:.2f}, no better than chance ({check.chance:.2f}) "
            f"on {check.samples} images; {fix}."
        )


def check_weights_file(path: Path) -> None:
    """Refuse a weights path that names no file, before any other check of an import."""
    if not Path(path).is_file():
        raise InputError(f"Weights file {path} does not exist; check the path.")


def import_model(
    weights: str | os.PathLike[str],
    *,
    classes: Sequence[str],
    image_size: int,
    architecture: str | None = None,
    factory: str | None = None,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    resize: str = "stretch",
    recipe: Mapping[str, Any] | None = None,
    classes_from: str = "--classes",
) -> tuple[nn.Module, ModelSpec]:
    """Rebuild a model from a plain state dict and describe it with a spec (nothing written).

    Exactly one of ``architecture`` (a name :func:`~shiftcost.data.build_model` knows) and
    ``factory`` (``pkg.module:build``, called with ``num_classes=`` when it takes it) builds
    the module. A state dict saved from ``nn.DataParallel`` (keys prefixed ``module.``) loads too.
    ``classes_from`` says where ``classes`` came from, for the sentence refusing weights with
    another number of outputs.
    """
    path = Path(weights)
    if (architecture is None) == (factory is None):
        raise InputError("give either --arch (a torchvision architecture name) or --factory pkg.module:build, not both or neither.")
    check_weights_file(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        _, state = _read_safetensors(path)
    elif suffix in (".pt", ".pth"):
        _, state = _read_torch(path)
    else:
        raise InputError(f"Weights file {path} has an unknown format; give a state dict as .pt/.pth (torch.save) or .safetensors.")
    if state and all(name.startswith("module.") for name in state):
        state = {name[len("module.") :]: tensor for name, tensor in state.items()}
    classes = tuple(str(c) for c in classes)
    if factory is not None:
        model = call_factory(factory, len(classes))
        name = f"factory:{factory}"
    else:
        model, _ = build_model(architecture, len(classes), in_channels=in_channels, image_size=image_size, classes=classes)
        name = architecture
    spec = ModelSpec(
        architecture=name,
        num_classes=len(classes),
        in_channels=in_channels,
        image_size=image_size,
        classes=classes,
        classifier=find_classifier(model, len(classes)),
        mean=None if mean is None else tuple(mean),
        std=None if std is None else tuple(std),
        resize=resize,
        factory=factory,
        recipe=None if recipe is None else dict(recipe),
    )
    outputs = state.get(f"{spec.classifier}.weight")
    if outputs is not None and outputs.ndim == 2 and outputs.shape[0] != len(classes):
        raise InputError(
            f"Weights file {path} has {outputs.shape[0]} outputs but {len(classes)} classes come from {classes_from}; "
            f"give --classes with the model's {outputs.shape[0]} class names in output order, or their count."
        )
    _load_state(model, state, path, spec)
    _check_outputs(model, spec, path)
    apply_preprocessing(model, spec)
    return model.eval(), spec


def _check_outputs(model: nn.Module, spec: ModelSpec, path: Path) -> None:
    with torch.no_grad():
        try:
            logits = model.eval()(torch.zeros(2, *spec.input_shape))
        except Exception as error:  # any shape mismatch inside user or library code
            raise InputError(
                f"The model from {path} cannot take {spec.in_channels}x{spec.image_size}x{spec.image_size} images ({type(error).__name__}); "
                "check --image-size and --channels."
            ) from None
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, spec.num_classes):
        raise InputError(
            f"The model from {path} returns {getattr(logits, 'shape', type(logits).__name__)} for 2 images, not (2, {spec.num_classes}) "
            "class scores; check --classes."
        )
