"""Batches of images from files: an ImageFolder tree, an ``.npz`` or a ``.pt`` file.

Whatever the source, a :class:`Batch` holds float32 images N x C x H x W in [0, 1] on the
CPU, optional int64 labels, and class names when the source has them.

Accepted tensor layouts for ``x`` in ``.npz`` and ``.pt`` files:

* N x H x W: grayscale, one channel is added;
* N x C x H x W or N x H x W x C with C in 1..4 (channels first is assumed when both
  positions could hold channels, unless a model spec says which count it expects);
* uint8 (or other integer) values 0..255, or float values 0..1.

``y`` (optional) is a 1-D integer array of label ids, one per image; ``classes``
(optional) names them. Reading never unpickles Python objects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shiftcost.data.limits import check_batch_file, check_image_count
from shiftcost.data.models import ModelSpec
from shiftcost.errors import InputError, short_error
from shiftcost.tensorfiles import load_tensors_only

BATCH_SUFFIXES = (".npz", ".pt", ".pth")
_MAX_CHANNELS = 4
# Float images may carry rounding error from their producer; beyond this they are mis-scaled.
_RANGE_TOLERANCE = 1e-4


@dataclass
class Batch:
    """Images ``x`` (float32, N x C x H x W, [0, 1], CPU) with optional labels ``y`` (int64, N)."""

    x: torch.Tensor
    y: torch.Tensor | None
    source: str
    classes: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def has_labels(self) -> bool:
        return self.y is not None

    def unknown_classes(self, spec: ModelSpec) -> list[str]:
        """The classes this batch names that ``spec`` has no output for (none when it names none)."""
        return [] if self.classes is None else [name for name in self.classes if name not in spec.classes]

    def with_model_ids(self, spec: ModelSpec | None) -> Batch:
        """This batch with its labels as ``spec``'s label ids, where every class it names is one of
        the model's; as it is otherwise (no names, no labels, or classes the model lacks, which
        :func:`check_batch` refuses and a new task keeps)."""
        if spec is None or self.y is None or self.classes is None or self.unknown_classes(spec):
            return self
        if len(self.y) and int(self.y.max()) >= len(self.classes):
            raise InputError(f"Batch {self.source} has label {int(self.y.max())} but names only {len(self.classes)} classes; name every class.")
        model_ids = torch.tensor([spec.classes.index(name) for name in self.classes], dtype=torch.int64)
        return dataclasses.replace(self, y=model_ids[self.y], classes=spec.classes)


# ------------------------------------------------------------------------------- loading


def load_batch(path: str | os.PathLike[str], *, spec: ModelSpec | None = None) -> Batch:
    """Read a batch from an ImageFolder directory, an ``.npz`` or a ``.pt`` file.

    ImageFolder: one sub-directory per class, images inside; labels follow the class
    names (the spec's label ids when every folder name is one of ``spec.classes``,
    otherwise the sorted folder names, as for a new task). With a spec, images are
    resized to ``spec.image_size`` and converted to ``spec.in_channels`` (1 = grey,
    3 = RGB); without one they must share a size.

    Tensor files: see the module docstring for layouts; with a spec they must already
    have the spec's channel count and image size. Every problem raises
    :class:`InputError` naming the file.
    """
    path = Path(path)
    if path.is_dir():
        batch = _load_image_folder(path, spec)
    elif not path.exists():
        raise InputError(f"Batch {path} does not exist; check the path.")
    else:
        suffix = path.suffix.lower()
        if suffix in BATCH_SUFFIXES:
            check_batch_file(path)
        if suffix == ".npz":
            batch = _load_npz(path, spec)
        elif suffix in (".pt", ".pth"):
            batch = _load_pt(path, spec)
        else:
            raise InputError(f"Batch {path} has an unknown format; use an ImageFolder directory, an .npz or a .pt file.")
    if spec is not None and tuple(batch.x.shape[1:]) != spec.input_shape:
        raise InputError(
            f"Batch {path} has images of shape {tuple(batch.x.shape[1:])} but the model expects {spec.input_shape} (C, H, W); "
            "resize or convert the images."
        )
    return batch


def declared_classes(path: str | os.PathLike[str]) -> tuple[str, ...] | None:
    """The class names a batch source declares, reading nothing else: an ImageFolder's sorted
    sub-folder names, or the ``classes`` entry of a tensor file; None where it declares none.

    For a model import, whose spec (and so how the images are read) needs the names first.
    """
    path = Path(path)
    if path.is_dir():
        return tuple(sorted(entry.name for entry in path.iterdir() if entry.is_dir())) or None
    if path.is_file() and path.suffix.lower() == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:  # members are read on access only
                raw = archive["classes"] if "classes" in archive.files else None
        except Exception as error:  # bad zip, pickled object arrays, truncated members
            raise _unreadable_npz(path, error) from None
        return _class_names(path, raw)
    if path.is_file() and path.suffix.lower() == ".pt":
        try:  # mapped, not read: the images stay on disk
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # a file mapping cannot read (the legacy format) or no file of tensors at all
            return load_batch(path).classes
        return _class_names(path, payload.get("classes") if isinstance(payload, dict) else None)
    return load_batch(path).classes


def _class_names(path: Path, raw: Any) -> tuple[str, ...] | None:
    if raw is None:
        return None
    try:
        return tuple(str(name) for name in (raw.tolist() if hasattr(raw, "tolist") else raw))
    except TypeError:
        raise InputError(f'Batch {path} has an unreadable "classes" entry; store class names as a list of strings.') from None


def _load_npz(path: Path, spec: ModelSpec | None) -> Batch:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as error:  # bad zip, pickled object arrays, truncated members
        raise _unreadable_npz(path, error) from None
    return _from_arrays(path, arrays, spec)


def _unreadable_npz(path: Path, error: Exception) -> InputError:
    return InputError(f"Batch {path} is not a readable .npz of plain arrays ({short_error(error)}); save it with numpy.savez.")


def _load_pt(path: Path, spec: ModelSpec | None) -> Batch:
    payload = load_tensors_only(path, lambda why: (
        f"Batch {path} cannot be read as tensors only ({why}); "
        'save a dict {"x": tensor, "y": tensor} with torch.save.'
    ))
    if isinstance(payload, torch.Tensor):
        payload = {"x": payload}
    if not isinstance(payload, dict):
        raise InputError(f'Batch {path} holds a {type(payload).__name__}, not a dict with "x"; save {{"x": tensor, "y": tensor}} with torch.save.')
    return _from_arrays(path, payload, spec)


def _from_arrays(path: Path, arrays: dict[str, Any], spec: ModelSpec | None) -> Batch:
    if "x" not in arrays:
        raise InputError(f'Batch {path} has no "x" array (found {", ".join(map(str, arrays)) or "nothing"}); store the images under "x".')
    x = _as_images(path, arrays["x"], spec)
    y = _as_labels(path, arrays["y"], len(x)) if arrays.get("y") is not None else None
    return Batch(x=x, y=y, source=str(path), classes=_class_names(path, arrays.get("classes"))).with_model_ids(spec)


def _as_images(path: Path, raw: Any, spec: ModelSpec | None) -> torch.Tensor:
    x = _as_tensor(path, raw, "x")
    if x.dtype == torch.bool or x.is_complex():
        raise InputError(f"Batch {path} has images of type {x.dtype}; store uint8 0..255 or float 0..1.")
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif x.ndim == 4:
        x = _channels_first(path, x, spec)
    else:
        raise InputError(f"Batch {path} has images of shape {tuple(x.shape)}; expected N x H x W, N x C x H x W or N x H x W x C.")
    if x.shape[0] == 0:
        raise InputError(f"Batch {path} is empty (0 images); give at least one image.")
    if x.is_floating_point():
        x = x.to(torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise InputError(f"Batch {path} has non-finite pixel values (NaN or infinity); fix or drop those images.")
        low, high = float(x.min()), float(x.max())
        if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
            raise InputError(f"Batch {path} has float pixel values in [{low:g}, {high:g}]; scale them to [0, 1] or store uint8 0..255.")
        x = x.clamp(0.0, 1.0)
    else:
        low, high = int(x.min()), int(x.max())
        if low < 0 or high > 255:
            raise InputError(f"Batch {path} has integer pixel values in [{low}, {high}]; integers must lie in 0..255.")
        x = x.to(torch.float32) / 255.0
    return x.contiguous()


def _channels_first(path: Path, x: torch.Tensor, spec: ModelSpec | None) -> torch.Tensor:
    if spec is not None:
        if x.shape[1] == spec.in_channels:
            return x
        if x.shape[3] == spec.in_channels:
            return x.permute(0, 3, 1, 2)
    if x.shape[1] <= _MAX_CHANNELS:
        return x
    if x.shape[3] <= _MAX_CHANNELS:
        return x.permute(0, 3, 1, 2)
    raise InputError(
        f"Batch {path} has images of shape {tuple(x.shape)} with no channel axis of at most {_MAX_CHANNELS}; "
        "store N x C x H x W or N x H x W x C."
    )


def _as_labels(path: Path, raw: Any, count: int) -> torch.Tensor:
    y = _as_tensor(path, raw, "y")
    if y.is_floating_point():
        if not bool(torch.isfinite(y).all()) or not bool((y == y.round()).all()):
            raise InputError(f"Batch {path} has non-integer labels; store label ids as integers.")
    elif y.dtype == torch.bool or y.is_complex():
        raise InputError(f"Batch {path} has labels of type {y.dtype}; store label ids as integers.")
    y = y.reshape(-1) if y.ndim == 2 and 1 in y.shape else y
    if y.ndim != 1 or y.shape[0] != count:
        raise InputError(f"Batch {path} has labels of shape {tuple(y.shape)} for {count} images; give one label per image.")
    y = y.to(torch.int64)
    if count and int(y.min()) < 0:
        raise InputError(f"Batch {path} has negative labels (smallest {int(y.min())}); label ids start at 0.")
    return y.contiguous()


def _as_tensor(path: Path, raw: Any, name: str) -> torch.Tensor:
    if isinstance(raw, torch.Tensor):
        return raw.detach().cpu()
    if isinstance(raw, np.ndarray):
        if raw.dtype.kind not in "biuf":
            raise InputError(f'Batch {path} has a "{name}" array of type {raw.dtype}; store numbers.')
        if raw.dtype == np.uint16 or raw.dtype == np.uint32 or raw.dtype == np.uint64:
            raw = raw.astype(np.int64)
        return torch.from_numpy(np.ascontiguousarray(raw))
    raise InputError(f'Batch {path} has a "{name}" entry of type {type(raw).__name__}; store a tensor or array.')


# ----------------------------------------------------------------------- ImageFolder trees

_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


def _pil_loader(file: str):  # noqa: ANN202 - returns a PIL image
    from PIL import Image

    with open(file, "rb") as handle:
        image = Image.open(handle)
        image.load()
    # Grey images stay one channel, so a folder of grey scans loads as C=1 without a spec.
    return image.convert("L") if image.mode in _GREY_MODES else image.convert("RGB")


def _load_image_folder(path: Path, spec: ModelSpec | None) -> Batch:
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    # Float before grey conversion and resizing, so neither rounds to 8 bits on the way.
    steps: list[Any] = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if spec is not None:
        if spec.in_channels == 1:
            steps.append(v2.Grayscale(num_output_channels=1))
        elif spec.in_channels == 3:
            steps.append(v2.RGB())
        else:
            raise InputError(f"Batch {path} is an image folder but the model expects {spec.in_channels} channels; only 1 (grey) or 3 (RGB) can be read from images.")
        if spec.resize == "shorter_side_crop":
            steps += [v2.Resize(spec.image_size, antialias=True), v2.CenterCrop(spec.image_size)]
        else:
            steps.append(v2.Resize((spec.image_size, spec.image_size), antialias=True))
    try:
        dataset = ImageFolder(str(path), transform=v2.Compose(steps), loader=_pil_loader)
    except (FileNotFoundError, OSError) as error:
        raise InputError(f"Batch {path} is not an ImageFolder tree with images ({short_error(error)}); use one sub-directory of images per class.") from None
    check_image_count(path, len(dataset.samples))

    images: list[torch.Tensor] = []
    for index, (file, _) in enumerate(dataset.samples):
        try:
            image, _ = dataset[index]
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as error:
            raise InputError(f"Image {file} in batch {path} cannot be read ({short_error(error)}); remove or replace it.") from None
        images.append(image.clamp(0.0, 1.0))  # antialiased resizing may overshoot slightly
    if not images:
        raise InputError(f"Batch {path} is empty (no images); give at least one image.")
    if spec is None:
        images = _common_shape(path, dataset.samples, images)

    y = torch.tensor(dataset.targets, dtype=torch.int64)
    return Batch(x=torch.stack(images).contiguous(), y=y, source=str(path), classes=tuple(dataset.classes)).with_model_ids(spec)


def _common_shape(path: Path, samples: Sequence[tuple[str, int]], images: list[torch.Tensor]) -> list[torch.Tensor]:
    channels = max(image.shape[0] for image in images)
    images = [image.expand(channels, -1, -1) if image.shape[0] != channels else image for image in images]
    size = images[0].shape[1:]
    for (file, _), image in zip(samples, images):
        if image.shape[1:] != size:
            raise InputError(
                f"Image {file} in batch {path} is {tuple(image.shape[1:])} pixels while {samples[0][0]} is {tuple(size)}; "
                "give the model spec so images are resized, or resize them."
            )
    return images


# ---------------------------------------------------------------------- saving, checking


def save_batch(batch: Batch, path: str | os.PathLike[str]) -> Path:
    """Write ``batch`` to ``.npz`` or ``.pt`` (float32 x, int64 y, class names); atomic."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in BATCH_SUFFIXES:
        raise InputError(f"Cannot save a batch to {path}: use a file name ending in .npz or .pt.")
    x = batch.x.detach().to("cpu", torch.float32).contiguous()
    y = None if batch.y is None else batch.y.detach().to("cpu", torch.int64).contiguous()
    buffer = io.BytesIO()
    if suffix == ".npz":
        arrays: dict[str, np.ndarray] = {"x": x.numpy()}
        if y is not None:
            arrays["y"] = y.numpy()
        if batch.classes is not None:
            arrays["classes"] = np.array(batch.classes, dtype=np.str_)
        np.savez(buffer, **arrays)
    else:
        payload: dict[str, Any] = {"x": x}
        if y is not None:
            payload["y"] = y
        if batch.classes is not None:
            payload["classes"] = list(batch.classes)
        torch.save(payload, buffer)
    _write_atomic(path, buffer.getvalue())
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as handle:
        temporary = Path(handle.name)
        try:
            handle.write(data)
        except BaseException:
            temporary.unlink(missing_ok=True)  # a full disk leaves no partial file behind
            raise
    try:
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def check_batch(batch: Batch, spec: ModelSpec) -> None:
    """Refuse a batch the model cannot take: shape, emptiness, non-finite values, labels."""
    source = batch.source
    x = batch.x
    if x.ndim != 4:
        raise InputError(f"Batch {source} has images of shape {tuple(x.shape)}; expected N x C x H x W.")
    if x.shape[0] == 0:
        raise InputError(f"Batch {source} is empty (0 images); give at least one image.")
    if x.shape[1] != spec.in_channels:
        raise InputError(f"Batch {source} has {x.shape[1]} channels but the model expects {spec.in_channels}; convert the images.")
    if tuple(x.shape[2:]) != (spec.image_size, spec.image_size):
        raise InputError(
            f"Batch {source} has {x.shape[2]}x{x.shape[3]} images but the model expects {spec.image_size}x{spec.image_size}; resize them."
        )
    if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
        raise InputError(f"Batch {source} has non-finite pixel values (NaN or infinity); fix or drop those images.")
    if batch.y is not None:
        y = batch.y
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise InputError(f"Batch {source} has labels of shape {tuple(y.shape)} for {x.shape[0]} images; give one label per image.")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= spec.num_classes):
            raise InputError(
                f"Batch {source} has labels in [{int(y.min())}, {int(y.max())}] but the model knows classes 0..{spec.num_classes - 1}; "
                "relabel the batch or use a model for these classes."
            )
        unknown = batch.unknown_classes(spec)
        if unknown:
            # Its label ids count its own classes, not the model's: read as the model's they would be wrong.
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise InputError(
                f"Batch {source} has classes the model has no output for ({shown}; the model knows {', '.join(spec.classes[:12])}"
                f"{', ...' if len(spec.classes) > 12 else ''}); remove their images or use a model for these classes."
            )


def content_fingerprint(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes; for a directory, of its sorted relative paths and file bytes."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist; check the path.")
    digest = hashlib.sha256()
    if path.is_file():
        _hash_file(digest, path)
        return digest.hexdigest()
    files = sorted((file for file in path.rglob("*") if file.is_file()), key=lambda file: file.relative_to(path).as_posix())
    for file in files:
        # Length-prefixed so that moving bytes between a name and a file changes the digest.
        name = file.relative_to(path).as_posix().encode()
        digest.update(len(name).to_bytes(8, "little") + name + file.stat().st_size.to_bytes(8, "little"))
        _hash_file(digest, file)
    return digest.hexdigest()


def _hash_file(digest: Any, file: Path) -> None:
    with open(file, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)


