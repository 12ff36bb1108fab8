"""Size checks made before anything is allocated: what a file declares, what a spec asks for.

A 3 MB ``.npz`` may declare a 3 GB array, and a model spec edited to ``in_channels=1e9``
asks for hundreds of gigabytes; both are refused here, with one sentence naming the file
and the setting to raise, from the headers alone (``shiftcost.config.InputLimits``).
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from pathlib import Path

import numpy as np

from shiftcost.config import InputLimits, load_limits
from shiftcost.errors import InputError

__all__ = ["check_batch_file", "check_image_count", "check_model_spec", "check_safetensors"]

# safetensors' own dtype names and their sizes in bytes.
_SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                         "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# numpy's own guard against headers that are slow to parse.
_MAX_NPY_HEADER = 10_000
# A safetensors header is JSON describing tensors; real ones are kilobytes.
_MAX_SAFETENSORS_HEADER = 100 * 2**20


def _gib(size: int) -> str:
    """``size`` bytes in the largest binary unit that keeps it at least 1."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} bytes"


def check_batch_file(path: Path, limits: InputLimits | None = None) -> None:
    """Refuse a ``.npz`` / ``.pt`` batch whose declared arrays exceed the limits.

    ``.npz``: each member's ``.npy`` header (shape and dtype) is read, not its data.
    ``.pt`` (a zip since torch 1.6): the storages' uncompressed sizes; an older
    ``.pt`` is bounded by its file size. A file that cannot be parsed this far is left to
    the loader, which says what is wrong with it.
    """
    limits = limits or load_limits()
    suffix = path.suffix.lower()
    images = None
    if suffix == ".npz":
        declared, images = _npz_declared(path)
    elif zipfile.is_zipfile(path):
        declared = _zip_uncompressed(path)
    else:
        declared = path.stat().st_size
    if declared is not None and declared > limits.max_batch_bytes:
        raise InputError(
            f"Batch {path} declares {_gib(declared)} of arrays, more than the {_gib(limits.max_batch_bytes)} allowed "
            "(SHIFTCOST_MAX_BATCH_BYTES); split it into smaller batches or raise the limit."
        )
    if images is not None:
        check_image_count(path, images, limits)


def check_image_count(path: Path, count: int, limits: InputLimits | None = None) -> None:
    """Refuse a batch of more images than ``max_batch_images``."""
    limits = limits or load_limits()
    if count > limits.max_batch_images:
        raise InputError(
            f"Batch {path} holds {count} images, more than the {limits.max_batch_images} allowed "
            "(SHIFTCOST_MAX_BATCH_IMAGES); split it into smaller batches or raise the limit."
        )


def _npz_declared(path: Path) -> tuple[int | None, int | None]:
    """Bytes declared by every ``.npy`` member, and the image count of ``x`` (None if unknown)."""
    total, images = 0, None
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    total += info.file_size
                    continue
                with archive.open(info) as member:
                    major, _ = np.lib.format.read_magic(member)
                    # Versions 2 and 3 share the header layout (3 only allows utf-8 field names).
                    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read_header(member, max_header_size=_MAX_NPY_HEADER)
                total += math.prod(int(n) for n in shape) * dtype.itemsize
                if info.filename == "x.npy" and shape:
                    images = int(shape[0])
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, SyntaxError, TypeError):
        return None, None  # damaged: the loader reports it
    return total, images


def _zip_uncompressed(path: Path) -> int | None:
    try:
        with zipfile.ZipFile(path) as archive:
            return sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError):
        return None


def check_safetensors(path: Path, what: str, max_bytes: int | None = None) -> None:
    """Refuse a safetensors file whose header declares more than ``max_bytes`` of tensors."""
    max_bytes = max_bytes or load_limits().max_model_bytes
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > _MAX_SAFETENSORS_HEADER:
                raise InputError(f"{what} {path} has a {_gib(length)} header; it is not a safetensors file shiftcost wrote.")
            header = json.loads(handle.read(length))
        declared = sum(
            math.prod(int(n) for n in entry["shape"]) * _SAFETENSORS_ITEMSIZE.get(entry["dtype"], 8)
            for name, entry in header.items() if name != "__metadata__"
        )
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ValueError, OSError):
        return  # damaged: the loader reports it
    if declared > max_bytes:
        raise InputError(
            f"{what} {path} declares {_gib(declared)} of tensors, more than the {_gib(max_bytes)} allowed "
            "(SHIFTCOST_MAX_MODEL_BYTES); raise the limit if this is intended."
        )


def check_model_spec(architecture: str, num_classes: int, in_channels: int, image_size: int,
                     limits: InputLimits | None = None) -> None:
    """Refuse a model spec asking for more than the limits allow, before the model is built.

    Input channels and image side are capped directly; the classifier (``num_classes``
    rows of at most 4096 features) and one image's input (``in_channels x image_size^2``
    floats, times 64 for the first layer's activations) must fit ``max_model_bytes``.
    """
    limits = limits or load_limits()
    where = f"Model spec {architecture}"
    if in_channels > limits.max_in_channels:
        raise InputError(f"{where} asks for {in_channels} input channels, more than {limits.max_in_channels} "
                         "(SHIFTCOST_MAX_IN_CHANNELS); fix the spec.")
    if image_size > limits.max_image_size:
        raise InputError(f"{where} asks for {image_size}-pixel images, more than {limits.max_image_size} "
                         "(SHIFTCOST_MAX_IMAGE_SIZE); fix the spec or raise the limit.")
    estimate = max(num_classes * 4096 * 4, in_channels * image_size**2 * 4 * 64)
    if estimate > limits.max_model_bytes:
        raise InputError(f"{where} ({num_classes} classes, {in_channels} x {image_size} x {image_size} inputs) needs about "
                         f"{_gib(estimate)}, more than the {_gib(limits.max_model_bytes)} allowed (SHIFTCOST_MAX_MODEL_BYTES); "
                         "fix the spec or raise the limit.")
