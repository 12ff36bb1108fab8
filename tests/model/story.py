"""The new user's side of the story, in plain PyTorch: an ImageFolder and a model trained on it.

Nothing here imports shiftcost: this is what a user has before meeting it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

CLASSES = ("diagonal", "horizontal", "other_diagonal", "vertical")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def stripes(n: int, seed: int, *, noise: float = 0.08) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` 3x32x32 images in [0, 1]: stripes at one of four angles (the class), random colour and phase."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    # CLASSES are in sorted (ImageFolder) order; angles: diagonal 45, horizontal 90, other 135, vertical 0.
    angle = torch.tensor([45.0, 90.0, 135.0, 0.0])[y] * math.pi / 180 + 0.1 * torch.randn(n, generator=g)
    phase = 2 * math.pi * torch.rand(n, generator=g)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    proj = xx[None] * torch.cos(angle)[:, None, None] + yy[None] * torch.sin(angle)[:, None, None]
    base = 0.5 + 0.5 * torch.sin(0.8 * proj + phase[:, None, None])
    colour = 0.5 + 0.5 * torch.rand(n, 3, 1, 1, generator=g)
    x = base[:, None] * colour + noise * torch.randn(n, 3, 32, 32, generator=g)
    return x.clamp(0, 1), y


def write_folder(root: Path, x: torch.Tensor, y: torch.Tensor) -> Path:
    """An ImageFolder of 8-bit PNGs, one sub-folder per class."""
    for i, (image, label) in enumerate(zip(x, y)):
        folder = root / CLASSES[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


def read_folder(root: Path, *, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The folder as torchvision reads it, with the training transform (Normalize or not)."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    steps = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if normalize:
        steps.append(v2.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    dataset = ImageFolder(str(root), transform=v2.Compose(steps))
    xs, ys = zip(*[dataset[i] for i in range(len(dataset))])
    return torch.stack(xs), torch.tensor(ys)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float = 0.05, seed: int = 0) -> nn.Module:
    """Plain SGD training, as a user would write it."""
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x))
        for start in range(0, len(x), 16):
            idx = order[start : start + 16]
            if len(idx) < 2:
                continue
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model.eval()(x).argmax(1) == y).float().mean())


class TinyNet(nn.Module):
    """A custom module, not rebuilt from any torchvision name."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )  # fmt: skip
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.body(x), 1))


def build_tiny(num_classes: int = 4) -> nn.Module:
    """The factory ``shiftcost model import --factory tests.model.story:build_tiny`` calls."""
    return TinyNet(num_classes)


def not_a_module() -> str:
    return "not a model"


STEP_CALLS = {"count": 0}


def smoothed_step(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A user's own training step: label smoothing (``--train-step tests.model.story:smoothed_step``)."""
    STEP_CALLS["count"] += 1
    return F.cross_entropy(model(inputs), labels, label_smoothing=0.1)
