"""Activation capture: forward hooks on named layers, one batched pass, any device.

A *layer name* is a ``named_modules()`` path. By default a hook sees the module's
output; the suffix ``:input`` selects the module's input instead, which is how the
default layer — the input of the final classifier, i.e. the penultimate features — is
named (``"fc:input"`` for a torchvision ResNet).

Each captured activation is reduced to one vector per sample before it leaves the hook,
so memory does not grow with the spatial size of the maps:

- conv map ``(N, C, H, W, ...)``: mean over every spatial position -> ``(N, C)``;
- token sequence ``(N, T, D)``: mean over the ``T`` tokens -> ``(N, D)`` (our choice: the
  papers only treat conv maps and vectors); outputs of 1-d conv/pool/norm modules are
  ``(N, C, L)`` maps and are averaged over ``L`` instead;
- vector ``(N, D)``: as is.

The reduced vectors are float64 and stay on the compute device; nothing here waits for
the device, so callers can feed device-side accumulators without a host sync per batch.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from shiftcost.errors import InputError

INPUT_SUFFIX = ":input"

__all__ = [
    "INPUT_SUFFIX",
    "CapturedBatch",
    "LayerCapture",
    "capture_batches",
    "capture_features",
    "default_layer",
    "iter_chunks",
    "prepare_model",
    "reduce_activation",
    "resolve_autocast",
    "resolve_device",
    "resolve_layers",
    "to_device",
]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, CPU otherwise; anything else is checked."""
    if isinstance(device, torch.device):
        chosen = device
    else:
        name = str(device).strip().lower()
        if name in ("", "auto"):
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            chosen = torch.device(name)
        except RuntimeError:
            raise InputError(
                f"Device {device!r} is not a device name; use auto, cpu, cuda or cuda:N."
            ) from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"Device {device!s} was requested but CUDA is not available here; use --device cpu or auto."
        )
    if chosen.type not in ("cpu", "cuda"):
        raise InputError(f"Device {device!s} is not supported; use auto, cpu or cuda.")
    return chosen


def resolve_autocast(autocast: bool | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``device``: ``None`` means automatic (bf16 on CUDA, off on CPU)."""
    if autocast is None:
        autocast = device.type == "cuda"
    return torch.bfloat16 if autocast else None


def default_layer(spec: Any) -> str:
    """The input of the model's final classifier (its penultimate features)."""
    return f"{spec.classifier}{INPUT_SUFFIX}"


def _split(layer: str) -> tuple[str, bool]:
    if layer.endswith(INPUT_SUFFIX):
        return layer[: -len(INPUT_SUFFIX)], True
    return layer, False


def resolve_layers(model: nn.Module, layers: Sequence[str] | str | None, spec: Any = None) -> list[str]:
    """Check layer names against ``model.named_modules()``; ``None`` means the default layer.

    Raises ``InputError`` naming an unknown layer and listing the closest module paths.
    """
    if layers is None or (not isinstance(layers, str) and len(layers) == 0):
        if spec is None:
            raise InputError("No layer was given and no model spec names the classifier; pass a layer name.")
        layers = [default_layer(spec)]
    elif isinstance(layers, str):
        layers = [layers]
    modules = dict(model.named_modules())
    names = [name for name in modules if name]
    resolved: list[str] = []
    for layer in layers:
        path, _ = _split(str(layer).strip())
        if not path or path not in modules:
            close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise InputError(
                f"Layer {layer!r} does not exist in the model; name a module path from "
                f"named_modules() (add {INPUT_SUFFIX!r} for a module's input).{hint}"
            )
        if layer not in resolved:
            resolved.append(str(layer).strip())
    return resolved


# Modules whose 3-d outputs are (N, C, L) channel-first maps rather than (N, T, D) tokens.
def _is_channel_first_1d(module: nn.Module) -> bool:
    one_d = (
        nn.Conv1d,
        nn.ConvTranspose1d,
        nn.BatchNorm1d,
        nn.InstanceNorm1d,
        nn.MaxPool1d,
        nn.AvgPool1d,
        nn.AdaptiveAvgPool1d,
        nn.AdaptiveMaxPool1d,
    )
    return isinstance(module, one_d)


def reduce_activation(activation: torch.Tensor, channel_first_1d: bool = False) -> torch.Tensor:
    """Reduce ``(N, ...)`` activations to ``(N, D)`` float64 vectors (see module docstring)."""
    if activation.dim() < 2:
        raise InputError(
            f"An activation of shape {tuple(activation.shape)} has no feature dimension; hook a layer "
            "whose output has one vector (or map) per sample."
        )
    if activation.dim() == 2:
        return activation.to(torch.float64)
    if activation.dim() == 3 and not channel_first_1d:
        dims: tuple[int, ...] = (1,)
    else:
        dims = tuple(range(2, activation.dim()))
    # The mean runs in float32 at least (bf16 sums lose digits); the result is float64.
    work = torch.float32 if activation.dtype in (torch.float16, torch.bfloat16) else activation.dtype
    return activation.mean(dim=dims, dtype=work).to(torch.float64)


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value:
        return _first_tensor(value[0])
    if isinstance(value, dict) and value:
        return _first_tensor(next(iter(value.values())))
    raise InputError(f"A hooked layer produced {type(value).__name__}, not a tensor; hook another layer.")


class LayerCapture:
    """Context manager that hooks named layers and hands out their reduced activations.

    After each forward pass, :meth:`pop` returns ``{layer: (N, D) float64 tensor}`` and
    clears the buffer. Hooks are removed on exit, also when the pass fails.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        self.model = model
        self.layers = list(layers)
        self._handles: list[Any] = []
        self._buffer: dict[str, torch.Tensor] = {}

    def __enter__(self) -> LayerCapture:
        modules = dict(self.model.named_modules())
        try:
            for layer in self.layers:
                path, on_input = _split(layer)
                module = modules[path]
                one_d = _is_channel_first_1d(module)
                if on_input:
                    hook = self._pre_hook(layer, one_d)
                    self._handles.append(module.register_forward_pre_hook(hook))
                else:
                    hook = self._post_hook(layer, one_d)
                    self._handles.append(module.register_forward_hook(hook))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this capture registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._buffer.clear()

    def _pre_hook(self, layer: str, one_d: bool):  # noqa: ANN202 - torch hook signature
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self._buffer[layer] = reduce_activation(_first_tensor(args), one_d)

        return hook

    def _post_hook(self, layer: str, one_d: bool):  # noqa: ANN202 - torch hook signature
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self._buffer[layer] = reduce_activation(_first_tensor(output), one_d)

        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        """The reduced activations of the last forward pass, by layer name."""
        missing = [layer for layer in self.layers if layer not in self._buffer]
        if missing:
            raise InputError(
                f"Layer {missing[0]!r} was not reached by the model's forward pass; hook a layer the "
                "model actually calls."
            )
        out, self._buffer = self._buffer, {}
        return out


def iter_chunks(
    x: Any, y: Any = None, batch_size: int = 256
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield ``(x, y)`` chunks from whole tensors or from an iterable of chunks.

    ``x`` may be a tensor (then ``y`` is a tensor of labels or ``None``) or an iterable
    whose items are ``(x, y)`` pairs, ``(x,)`` or bare tensors (a streaming source; ``y``
    must then be ``None``). Chunks from a stream are passed through as they come.
    """
    if batch_size < 1:
        raise InputError(f"Batch size {batch_size} is not positive; pass a batch size of at least 1.")
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if isinstance(y, np.ndarray):
        y = torch.from_numpy(y)
    if isinstance(x, torch.Tensor):
        if y is not None and (not isinstance(y, torch.Tensor) or y.shape[:1] != x.shape[:1]):
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise InputError(
                f"The labels have shape {got} but there are {x.shape[0]} images; give one label per image."
            )
        for start in range(0, x.shape[0], batch_size):
            stop = start + batch_size
            yield x[start:stop], (None if y is None else y[start:stop])
        return
    if y is not None:
        raise InputError("Labels were given separately from a streaming source; yield (x, y) pairs instead.")
    if not isinstance(x, Iterable):
        raise InputError(f"The data is a {type(x).__name__}; give a tensor or an iterable of (x, y) chunks.")
    for item in x:
        if isinstance(item, torch.Tensor):
            yield item, None
        elif isinstance(item, (tuple, list)) and 1 <= len(item) <= 2:
            chunk_x = item[0]
            chunk_y = item[1] if len(item) == 2 else None
            if isinstance(chunk_x, np.ndarray):
                chunk_x = torch.from_numpy(chunk_x)
            if isinstance(chunk_y, np.ndarray):
                chunk_y = torch.from_numpy(chunk_y)
            yield chunk_x, chunk_y
        else:
            raise InputError(
                f"A chunk of the streaming source is a {type(item).__name__}; yield (x, y) pairs or tensors."
            )


@dataclass
class CapturedBatch:
    """One chunk after the forward pass.

    ``features``, ``logits`` and ``x`` live on the compute device (``x`` possibly
    channels_last); ``source_x`` is the chunk as it came in. ``y`` stays where the
    caller's labels were (usually the host), because accumulators read labels on the
    host without waiting for the device.
    """

    features: dict[str, torch.Tensor]
    logits: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor | None
    count: int
    source_x: torch.Tensor | None = None


def _uses_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def to_device(tensor: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """Copy a host tensor to ``device`` (pinned and non-blocking for CUDA), optionally channels_last."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        # A pinned staging copy lets the upload overlap with the previous chunk's kernels;
        # the caching host allocator keeps the buffer alive until the copy has run.
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    else:
        tensor = tensor.to(device)
    if channels_last and tensor.dim() == 4:
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    return tensor


def prepare_model(
    model: nn.Module, device: torch.device, channels_last: bool | None = None
) -> tuple[nn.Module, bool]:
    """Move ``model`` to ``device`` in eval mode; conv nets go channels_last.

    Returns the model and whether inputs should be channels_last too. The model is
    changed in place (as ``model.to`` does; the weights' values and fingerprint do not
    change); its train/eval flag is the caller's to restore.
    """
    if channels_last is None:
        # Tensor cores on CUDA want NHWC; on CPU, oneDNN ran the CIFAR ResNet-18 in 0.82x
        # and the demo CNN in 0.52x the time of NCHW (benchmarks/index_throughput.py host).
        channels_last = _uses_conv(model)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.eval()
    return model, channels_last


def capture_batches(
    model: nn.Module,
    chunks: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    layers: Sequence[str],
    *,
    device: str | torch.device = "auto",
    autocast: bool | None = False,
    channels_last: bool | None = None,
    check_chunk: Any = None,
) -> Iterator[CapturedBatch]:
    """Run ``model`` over ``chunks`` once, yielding each chunk's reduced activations and logits.

    The forward pass runs under ``torch.inference_mode`` (and bf16 autocast when asked);
    activations and logits stay on the device and no host sync happens per chunk. Hooks are
    removed when the generator finishes or is closed. ``check_chunk(x, y)`` is called on
    each chunk on the host before it is uploaded (input validation).
    """
    dev = resolve_device(device)
    amp_dtype = resolve_autocast(autocast, dev)
    was_training = model.training
    model, use_channels_last = prepare_model(model, dev, channels_last)
    try:
        with LayerCapture(model, layers) as capture:
            for chunk_x, chunk_y in chunks:
                if check_chunk is not None:
                    check_chunk(chunk_x, chunk_y)
                x_dev = to_device(chunk_x, dev, use_channels_last)
                amp = torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
                with torch.inference_mode(), amp:
                    logits = _first_tensor(model(x_dev))
                    features = capture.pop()
                yield CapturedBatch(features, logits, x_dev, chunk_y, int(chunk_x.shape[0]), chunk_x)
    finally:
        model.train(was_training)


def capture_features(
    model: nn.Module,
    x: Any,
    layers: Sequence[str] | str | None = None,
    *,
    spec: Any = None,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    autocast: bool | None = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Reduced activations of ``layers`` and the logits for all of ``x``, gathered on the CPU.

    Convenient for small data and for tests; large data should stream through
    :func:`capture_batches` (as the index engine does) instead of holding every vector.
    """
    names = resolve_layers(model, layers, spec)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    logits: list[torch.Tensor] = []
    for batch in capture_batches(
        model, iter_chunks(x, None, batch_size), names, device=device, autocast=autocast
    ):
        for name in names:
            parts[name].append(batch.features[name].cpu())
        logits.append(batch.logits.to(torch.promote_types(batch.logits.dtype, torch.float32)).cpu())
    if not logits:
        raise InputError("The batch is empty; give at least one image.")
    return {name: torch.cat(chunks) for name, chunks in parts.items()}, torch.cat(logits)
