"""Tiny real models and data for the capture, reference and engine tests.

The digits CNN at 8x8 pixels runs a forward pass over a hundred images in milliseconds
on a CPU; ``double=True`` turns it into a float64 model so that results can be compared
across batch sizes to 1e-9 (float32 convolutions may round differently per batch size).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from shiftcost.data.models import ModelSpec, build_model

NUM_CLASSES = 4
IMAGE_SIZE = 8
LAYERS = ["fc:input", "features.1", "features.6"]


def tiny_model(seed: int = 0, *, double: bool = False, num_classes: int = NUM_CLASSES) -> tuple[torch.nn.Module, ModelSpec]:
    """An untrained digits CNN for 1x8x8 images (seeded weights, eval mode)."""
    torch.manual_seed(seed)
    model, spec = build_model("digits_cnn", num_classes, image_size=IMAGE_SIZE)
    # Non-trivial BatchNorm statistics, so eval-mode outputs are not just the conv outputs.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    if double:
        model = model.double()
    return model.eval(), spec


def tiny_data(
    n: int, seed: int = 0, *, num_classes: int = NUM_CLASSES, double: bool = False, shift: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images in [0, 1] whose brightness depends on the class, labels cycling 0..K-1."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = torch.rand(n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 0.5 + (y.float() / (2 * num_classes))[:, None, None, None]
    x = (x + shift).clamp(0, 1)
    return (x.double() if double else x), y


def manual_penultimate(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of ``fc`` computed by calling the sub-network by hand."""
    with torch.no_grad():
        return torch.flatten(model.pool(model.features(x)), 1)


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """One intra-op thread while a module's tests run.

    The tiny models here make thousands of very small tensor operations; on a busy
    machine each of them waits for a second OpenMP thread to be scheduled, which made
    these tests many times slower without changing any result.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
