"""Model architectures by name, and model files that never unpickle arbitrary objects.

A model travels as its weights plus a :class:`ModelSpec` (architecture, classes, input
shape, classifier path), so that loading rebuilds the exact module from code and only
tensors are read from disk:

* ``.safetensors``: the state dict, with the spec as JSON in the metadata key
  ``shiftcost_spec``;
* ``.pt`` / ``.pth``: ``torch.save`` of ``{"spec": dict, "state_dict": dict}`` (plain
  types only), read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shiftcost.data.limits import check_model_spec, check_safetensors
from shiftcost.errors import InputError, short_error
from shiftcost.tensorfiles import load_tensors_only, read_safetensors

SPEC_METADATA_KEY = "shiftcost_spec"
MODEL_SUFFIXES = (".safetensors", ".pt", ".pth")

#: Architectures defined here rather than taken from torchvision as they are.
CUSTOM_ARCHITECTURES = ("digits_cnn", "cifar_resnet18")

# Square input sizes the torchvision families were designed for; any size their pooling
# accepts works, these are only the defaults when the caller names none.
_DEFAULT_IMAGE_SIZE = {"digits_cnn": 16, "cifar_resnet18": 32, "inception_v3": 299}
_TORCHVISION_DEFAULT_IMAGE_SIZE = 224


#: How images of another size become ``image_size`` squares: ``stretch`` resizes both sides
#: (aspect ratio not kept); ``shorter_side_crop`` resizes the shorter side and crops the centre.
RESIZE_RULES = ("stretch", "shorter_side_crop")
_OPTIONAL = ("mean", "std", "resize", "factory", "recipe")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model and feed it: the file format's header.

    ``classes[i]`` is the name of label id ``i``; ``classifier`` is the
    ``named_modules()`` path of the final classifier, whose input is the penultimate
    representation the indices use by default.

    Preprocessing: images are read as floats in [0, 1], ``in_channels`` channels, resized
    to ``image_size`` by the ``resize`` rule (:func:`shiftcost.data.load_batch`); the model
    itself then normalises its input by ``mean`` and ``std`` (one value per channel; None
    = no normalisation), so every forward pass (indices, forecasts, retraining) sees what
    the model was trained on, while shifts and image statistics stay in pixel space.
    ``factory`` (``pkg.module:build``) rebuilds a custom module instead of a named
    architecture. ``recipe`` is the model's retraining recipe (the ``[recipe]`` table of
    :class:`shiftcost.recipe.RetrainConfig`), not part of the spec's identity.
    """

    architecture: str
    num_classes: int
    in_channels: int
    image_size: int
    classes: tuple[str, ...]
    classifier: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize: str = "stretch"
    factory: str | None = None
    recipe: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        # Normalise lists (e.g. from JSON) to tuples so specs compare and hash by value.
        object.__setattr__(self, "classes", tuple(str(name) for name in self.classes))
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
        if (self.mean is None) != (self.std is None):
            raise InputError("give both mean and std for the normalisation, or neither.")
        if self.mean is not None:
            for name in ("mean", "std"):
                values = getattr(self, name)
                if len(values) != self.in_channels:
                    raise InputError(
                        f"{name} has {len(values)} values but the model takes {self.in_channels} input channels; give one value per channel, "
                        "or the channel count that matches them (--channels of shiftcost model import, 1 for grey images)."
                    )
            if not all(v > 0 and math.isfinite(v) for v in self.std) or not all(math.isfinite(v) for v in self.mean):
                raise InputError(f"std must be positive and mean finite, got mean {list(self.mean)} and std {list(self.std)}.")
        if self.resize not in RESIZE_RULES:
            raise InputError(f"resize rule {self.resize!r} is unknown; use one of {', '.join(RESIZE_RULES)}.")
        if self.recipe is not None:
            object.__setattr__(self, "recipe", dict(self.recipe))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The (C, H, W) shape of one input image."""
        return (self.in_channels, self.image_size, self.image_size)

    @property
    def shape_key(self) -> str:
        """``CxHxW``: the input size an energy probe was measured at (``energy_probes.image_size``)."""
        return "x".join(str(n) for n in self.input_shape)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types: str, int, float and lists."""
        data = asdict(self)
        data["classes"] = list(self.classes)
        for name in ("mean", "std"):
            data[name] = None if data[name] is None else list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "model spec") -> ModelSpec:
        """Rebuild a spec from :meth:`to_dict` output; ``source`` names it in errors.

        Specs written before preprocessing existed load with no normalisation.
        """
        if not isinstance(data, Mapping):
            raise InputError(f"{source} holds no model spec (expected a mapping, got {type(data).__name__}); save the model with shiftcost.")
        missing = [name for name in ("architecture", "num_classes", "in_channels", "image_size", "classes", "classifier") if name not in data]
        if missing:
            raise InputError(f"{source} has an incomplete model spec (missing {', '.join(missing)}); save the model again with shiftcost.")
        if isinstance(data["classes"], (str, bytes)) or not isinstance(data["classes"], (list, tuple)):
            raise InputError(f"{source} has an invalid model spec (classes must be a list of names); save the model again with shiftcost.")
        try:
            spec = cls(
                architecture=str(data["architecture"]),
                num_classes=_positive_int(data["num_classes"]),
                in_channels=_positive_int(data["in_channels"]),
                image_size=_positive_int(data["image_size"]),
                classes=tuple(str(name) for name in data["classes"]),
                classifier=str(data["classifier"]),
                **{name: data[name] for name in _OPTIONAL if data.get(name) is not None},
            )
        except (TypeError, ValueError) as error:
            raise InputError(f"{source} has an invalid model spec ({error}); save the model again with shiftcost.") from None
        except InputError as error:
            raise InputError(f"{source} has an invalid model spec: {error}") from None
        if len(spec.classes) != spec.num_classes:
            raise InputError(
                f"{source} names {len(spec.classes)} classes for a model with {spec.num_classes} outputs; fix the class list."
            )
        return spec


class InputNormalisation:
    """``(x - mean) / std`` per channel, as a forward pre-hook on the model.

    A hook rather than a wrapper module: the state dict, the layer names the indices
    capture and the classifier path stay those of the model as trained.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        return ((x - self.mean.to(x.device, x.dtype)) / self.std.to(x.device, x.dtype), *args[1:])


def apply_preprocessing(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """Install (or replace) the spec's input normalisation on ``model``; returns it."""
    handle = getattr(model, "_shiftcost_normalisation", None)
    if handle is not None:
        handle.remove()
        del model._shiftcost_normalisation
    if spec.mean is not None and spec.std is not None:
        model._shiftcost_normalisation = model.register_forward_pre_hook(InputNormalisation(spec.mean, spec.std))
    return model


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError(f"{value!r} is not a positive integer")
    return int(value)


# --------------------------------------------------------------------------- building


class DigitsCNN(nn.Module):
    """A small CNN for 16x16 digits: fast enough to fine-tune dozens of times on a CPU.

    The 64-wide globally pooled features (the input of ``fc``) are the penultimate
    representation; they are wider than the 10 classes, as the layer-wise indices need.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        # Pooling early keeps the cost near 0.6 MMAC per image; the last 3x3 convolution
        # then sees the whole 16x16 digit, so global pooling loses no layout.
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def available_architectures() -> tuple[str, ...]:
    """Every architecture name :func:`build_model` accepts."""
    return CUSTOM_ARCHITECTURES + tuple(_torchvision_names())


def _torchvision_names() -> list[str]:
    import torchvision

    # Classification models only: the module filter leaves out detection, video, etc.
    return list(torchvision.models.list_models(module=torchvision.models))


def build_model(
    architecture: str,
    num_classes: int,
    *,
    in_channels: int | None = None,
    image_size: int | None = None,
    classes: Sequence[str] | None = None,
) -> tuple[nn.Module, ModelSpec]:
    """Build an untrained model (random init, never downloaded weights) and its spec.

    ``architecture`` is ``"digits_cnn"`` (1x16x16 input by default), ``"cifar_resnet18"``
    (ResNet-18 with a 3x3 stride-1 stem and no max-pool, 3x32x32) or any torchvision
    classification model name (3x224x224 by default; a different ``in_channels`` swaps
    the first convolution for one with that many input channels). ``classes`` defaults
    to ``"0" .. str(num_classes - 1)``. The model is returned in eval mode.
    """
    try:
        num_classes = _positive_int(num_classes)
    except (TypeError, ValueError):
        raise InputError(f"num_classes must be a positive integer, got {num_classes!r}.") from None
    # Built-in names first: listing torchvision's imports it, 2 s of a digits CNN's `shiftcost index`.
    if architecture not in CUSTOM_ARCHITECTURES and architecture not in _torchvision_names():
        names = available_architectures()
        close = difflib.get_close_matches(str(architecture), names, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"choose one of {', '.join(names)}."
        raise InputError(f"Unknown model architecture {architecture!r}; {hint}")
    default_channels = 1 if architecture == "digits_cnn" else 3
    in_channels = default_channels if in_channels is None else in_channels
    if image_size is None:
        image_size = _DEFAULT_IMAGE_SIZE.get(architecture, _TORCHVISION_DEFAULT_IMAGE_SIZE)
    for label, value in (("in_channels", in_channels), ("image_size", image_size)):
        try:
            _positive_int(value)
        except (TypeError, ValueError):
            raise InputError(f"{label} must be a positive integer, got {value!r}.") from None
    check_model_spec(architecture, num_classes, in_channels, image_size)
    if classes is None:
        classes = tuple(str(i) for i in range(num_classes))
    classes = tuple(str(name) for name in classes)
    if len(classes) != num_classes:
        raise InputError(f"{len(classes)} class names were given for {num_classes} classes; give one name per class.")

    if architecture == "digits_cnn":
        model: nn.Module = DigitsCNN(num_classes, in_channels)
    elif architecture == "cifar_resnet18":
        model = _cifar_resnet18(num_classes, in_channels)
    else:
        model = _torchvision_model(architecture, num_classes, in_channels, image_size)

    spec = ModelSpec(
        architecture=architecture,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        classes=classes,
        classifier=find_classifier(model, num_classes),
    )
    return model.eval(), spec


def build_from_spec(spec: ModelSpec) -> nn.Module:
    """An untrained module of ``spec``'s architecture, or its factory's module."""
    if spec.factory is None:
        model, _ = build_model(spec.architecture, spec.num_classes, in_channels=spec.in_channels, image_size=spec.image_size, classes=spec.classes)
        return model
    return call_factory(spec.factory, spec.num_classes)


def call_factory(path: str, num_classes: int) -> nn.Module:
    """``pkg.module:build`` called with ``num_classes=`` when it takes it; must return an nn.Module."""
    import inspect

    from shiftcost.recipe import load_entry_point

    factory = load_entry_point(path, "The model factory")
    try:
        takes_classes = "num_classes" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_classes = False
    try:
        model = factory(num_classes=num_classes) if takes_classes else factory()
    except Exception as error:  # user code
        raise InputError(f"The model factory {path!r} failed ({type(error).__name__}: {short_error(error)}); fix it or call it by hand.") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"The model factory {path!r} returned {type(model).__name__}, not a torch nn.Module; return the model.")
    return model.eval()


def _cifar_resnet18(num_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    # CIFAR-style stem: 32x32 inputs would be shrunk to 8x8 by the ImageNet stem.
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _torchvision_model(architecture: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    import torchvision

    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if architecture in ("googlenet", "inception_v3"):
        # Auxiliary heads make training-mode outputs a tuple; one logits tensor is the contract.
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = True
    if architecture.startswith("vit_"):
        kwargs["image_size"] = image_size
    try:
        model = torchvision.models.get_model(architecture, **kwargs)
    except (ValueError, AssertionError, TypeError) as error:
        raise InputError(f"Cannot build {architecture!r} for {image_size}x{image_size} inputs ({error}); choose another image size.") from None
    if in_channels != 3:
        _adapt_first_conv(model, architecture, in_channels)
    return model


def _adapt_first_conv(model: nn.Module, architecture: str, in_channels: int) -> None:
    """Swap the stem convolution for one taking ``in_channels`` channels (fresh weights)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels != 3 or module.groups != 1:
                break
            replacement = nn.Conv2d(
                in_channels,
                module.out_channels,
                module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
            )
            parent_name, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attribute, replacement)
            return
    raise InputError(
        f"Architecture {architecture!r} expects 3 input channels and its first layer cannot be adapted to {in_channels}; convert the images to RGB."
    )


def find_classifier(model: nn.Module, num_classes: int | None = None) -> str:
    """``named_modules()`` path of the final classifier of ``model``.

    The last ``nn.Linear`` with ``num_classes`` outputs (or the last ``nn.Linear`` at
    all); models without one (SqueezeNet) use the last 1x1-style ``nn.Conv2d`` with
    ``num_classes`` output channels.
    """
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    matching = [name for name, m in linears if num_classes is None or m.out_features == num_classes]
    if matching:
        return matching[-1]
    if linears:
        return linears[-1][0]
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.out_channels == num_classes]
    if convs:
        return convs[-1]
    raise InputError(f"Cannot find the classifier layer of {type(model).__name__}; name the layer explicitly.")


# ------------------------------------------------------------------------ saving/loading


def save_model(model: nn.Module, spec: ModelSpec, path: str | os.PathLike[str]) -> Path:
    """Write ``model``'s weights and ``spec`` to ``.safetensors`` or ``.pt``/``.pth``.

    The file appears complete or not at all (written to a temporary file, then renamed).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MODEL_SUFFIXES:
        raise InputError(f"Cannot save a model to {path}: use a file name ending in {', '.join(MODEL_SUFFIXES)}.")
    # Copies: safetensors refuses tensors sharing storage, and the file must not alias the live model.
    state = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as handle:
        temporary = Path(handle.name)
    try:
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(temporary), metadata={SPEC_METADATA_KEY: json.dumps(spec.to_dict())})
        else:
            torch.save({"spec": spec.to_dict(), "state_dict": state}, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def load_model(
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    spec: ModelSpec | None = None,
) -> tuple[nn.Module, ModelSpec]:
    """Rebuild the model saved at ``path`` and load its weights; returned in eval mode.

    Only tensors and plain types are read (safetensors, or ``torch.load`` with
    ``weights_only=True``), on the CPU; the model then moves to ``map_location``.
    A file holding a bare state dict without a spec (for example a torchvision
    checkpoint) loads when ``spec`` describes it. Any unreadable, truncated, foreign or
    mismatching file raises :class:`InputError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Model file {path} does not exist; check the path.")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        check_safetensors(path, "Model file")
        stored_spec, state = _read_safetensors(path)
    elif suffix in (".pt", ".pth"):
        stored_spec, state = _read_torch(path)
    else:
        raise InputError(f"Model file {path} has an unknown format; use a .safetensors or .pt file saved by shiftcost.")

    if stored_spec is not None:
        spec = ModelSpec.from_dict(stored_spec, source=f"Model file {path}")
    elif spec is None:
        raise InputError(
            f"Model file {path} holds weights but no model spec (the architecture, input size and classes); "
            "give them to `shiftcost model import`, which writes a model file that carries them."
        )
    try:
        model = build_from_spec(spec)
    except InputError as error:
        raise InputError(f"Model file {path} cannot be rebuilt: {error}") from None
    _load_state(model, state, path, spec)
    apply_preprocessing(model, spec)
    try:
        model = model.to(map_location)
    except (RuntimeError, AssertionError, ValueError) as error:
        raise InputError(f"Cannot place the model from {path} on device {str(map_location)!r} ({short_error(error)}); choose an available device.") from None
    return model.eval(), spec


def _read_safetensors(path: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    metadata, state = read_safetensors(path, lambda why: (
        f"Model file {path} is not a readable safetensors file (truncated or corrupt: {why}); save the model again."
    ))
    raw = metadata.get(SPEC_METADATA_KEY)
    if raw is None:
        return None, state
    try:
        return json.loads(raw), state
    except json.JSONDecodeError:
        raise InputError(f"Model file {path} has an unreadable model spec in its metadata; save the model again with shiftcost.") from None


def _read_torch(path: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    payload = load_tensors_only(path, lambda why: (
        f"Model file {path} cannot be read as tensors only ({why}); save its weights as a plain state dict, "
        "torch.save(model.state_dict(), path), and import them with `shiftcost model import`."
    ))
    if isinstance(payload, Mapping) and "state_dict" in payload:
        state, stored_spec = payload["state_dict"], payload.get("spec")
    elif isinstance(payload, Mapping) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        state, stored_spec = payload, None
    else:
        raise InputError(f"Model file {path} holds no model weights (found {type(payload).__name__}); save the model with shiftcost.")
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"Model file {path} has a malformed state dict (not all values are tensors); save the model again.")
    return stored_spec, dict(state)


def _load_state(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, spec: ModelSpec) -> None:
    expected = model.state_dict()
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    if missing or unexpected:
        details = []
        if missing:
            details.append(f"missing {_listing(missing)}")
        if unexpected:
            details.append(f"unexpected {_listing(unexpected)}")
        raise InputError(
            f"Model file {path} does not match architecture {spec.architecture!r} ({'; '.join(details)}); check the file was saved from that model."
        )
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise InputError(
                f"Model file {path} does not match architecture {spec.architecture!r} with {spec.num_classes} classes: "
                f"{name} has shape {tuple(state[name].shape)}, expected {tuple(tensor.shape)}; check the spec or the file."
            )
        if state[name].is_floating_point() and not bool(torch.isfinite(state[name]).all()):
            raise InputError(f"Model file {path} has non-finite values in {name}; the saved model is broken, retrain or restore it.")
    model.load_state_dict(state, strict=True)


def _listing(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")




def model_fingerprint(model: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the state dict (names, dtypes, shapes, bytes), stable across save/load."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(b"\0" + str(tensor.dtype).encode() + b"\0" + str(tuple(tensor.shape)).encode() + b"\0")
        # Raw bytes through a uint8 view, so bfloat16 and other numpy-less dtypes hash too.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
