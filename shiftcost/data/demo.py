"""The demo data and base model: scikit-learn's bundled 8x8 digits, nothing downloaded."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shiftcost.data.models import ModelSpec, build_model
from shiftcost.errors import InputError

DIGITS_IMAGE_SIZE = 16
DIGITS_CLASSES = tuple(str(digit) for digit in range(10))
SPLIT_NAMES = ("train", "holdout", "stream")

Split = tuple[torch.Tensor, torch.Tensor]


def load_digits(image_size: int = DIGITS_IMAGE_SIZE) -> Split:
    """All 1797 digits as ``(x, y)``: x float32 (N, 1, S, S) in [0, 1], y int64 (N,).

    The 8x8 images (grey levels 0..16) are upsampled with bilinear interpolation.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    if not isinstance(image_size, int) or image_size < 1:
        raise InputError(f"image_size must be a positive integer, got {image_size!r}.")
    digits = sklearn_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.clamp_(0.0, 1.0).contiguous(), torch.from_numpy(digits.target.astype(np.int64))


def split_digits(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    fractions: Sequence[float] = (0.5, 0.2, 0.3),
    seed: int = 0,
) -> dict[str, Split]:
    """Stratified, seeded split into ``"train"``, ``"holdout"`` and ``"stream"``.

    ``fractions`` are the three shares, in that order, and must sum to 1.
    """
    from sklearn.model_selection import train_test_split

    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise InputError(f"fractions must be three positive shares summing to 1, got {tuple(fractions)}.")
    index = np.arange(len(y))
    labels = y.numpy()
    train, rest = train_test_split(index, train_size=fractions[0], stratify=labels, random_state=seed)
    holdout_share = fractions[1] / (fractions[1] + fractions[2])
    holdout, stream = train_test_split(rest, train_size=holdout_share, stratify=labels[rest], random_state=seed)
    parts = {"train": train, "holdout": holdout, "stream": stream}
    return {name: (x[torch.from_numpy(np.sort(part))], y[torch.from_numpy(np.sort(part))]) for name, part in parts.items()}


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 15,
    batch_size: int = 64,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    schedule: str = "onecycle",
    cpu_threads: int | None = 1,
) -> nn.Module:
    """Quick supervised training (Adam, cross-entropy), seeded; returns the model in eval mode.

    ``schedule="onecycle"`` warms the learning rate up to ``lr`` and anneals it to zero
    over the run (stable results from few epochs); ``"constant"`` keeps ``lr``, for
    fine-tuning in short increments. The seed fixes the order of mini-batches; the
    global random state is left untouched.

    On the CPU, training runs on ``cpu_threads`` intra-op threads (``None`` keeps
    torch's setting) and restores the setting afterwards: for models as small as the
    demo CNN, extra threads add synchronisation, not speed, and on a busy machine they
    make training many times slower. Results are reproducible for a given thread count.
    """
    if schedule not in ("onecycle", "constant"):
        raise InputError(f"Unknown learning-rate schedule {schedule!r}; use 'onecycle' or 'constant'.")
    if len(x) == 0 or len(x) != len(y):
        raise InputError(f"Training needs as many labels as images and at least one of each, got {len(x)} images and {len(y)} labels.")
    device = torch.device(device)
    with torch_threads(cpu_threads if device.type == "cpu" else None):
        _fit(model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed, device=device, schedule=schedule)
    return model.eval()


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads (``None``: unchanged), then restore.

    Small models train many times slower with the default pool on a busy machine.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    device: torch.device,
    schedule: str,
) -> None:
    model.to(device).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    steps_per_epoch = -(-len(x) // batch_size)
    # Cosine decay to zero: ending at a tiny step size makes the final weights (and the
    # batch-norm statistics they were trained with) settle instead of ending mid-jump.
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    if schedule == "onecycle" and epochs > 0:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimiser, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15, anneal_strategy="cos"
        )
    generator = torch.Generator().manual_seed(seed)
    x_device, y_device = x.to(device), y.to(device)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator).to(device)
        for start in range(0, len(x), batch_size):
            chosen = order[start : start + batch_size]
            if len(chosen) < 2 and len(x) > 1:
                if scheduler is not None:
                    scheduler.step()
                continue  # a single sample breaks batch norm statistics
            optimiser.zero_grad(set_to_none=True)
            loss_fn(model(x_device[chosen]), y_device[chosen]).backward()
            optimiser.step()
            if scheduler is not None:
                scheduler.step()


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512, cpu_threads: int | None = 1) -> float:
    """Top-1 accuracy of ``model`` (evaluated in eval mode) on ``(x, y)``.

    ``cpu_threads`` as in :func:`train_classifier`; pass ``None`` for large models.
    """
    if len(y) == 0 or len(x) != len(y):
        raise InputError(f"Accuracy needs as many labels as images and at least one of each, got {len(x)} images and {len(y)} labels.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    with torch_threads(cpu_threads if device.type == "cpu" else None):
        for start in range(0, len(x), batch_size):
            logits = model(x[start : start + batch_size].to(device))
            correct += int((logits.argmax(1).cpu() == y[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / len(y)


def train_demo_model(seed: int = 0) -> tuple[nn.Module, ModelSpec, dict[str, Split]]:
    """The demo base model: a ``digits_cnn`` trained on the digits "train" split.

    Returns the model (eval mode, CPU), its spec and the splits from :func:`split_digits`.
    Seeded end to end (initial weights included) without touching the global random state.
    """
    x, y = load_digits()
    splits = split_digits(x, y, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, spec = build_model("digits_cnn", len(DIGITS_CLASSES), in_channels=1, image_size=DIGITS_IMAGE_SIZE, classes=DIGITS_CLASSES)
    train_classifier(model, *splits["train"], seed=seed)
    return model, spec, splits
