"""The building blocks of a fine-tuning run: input checks, the held-out split, batches,
optimizer and schedule, evaluation and the parameter change."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shiftcost.errors import InputError
from shiftcost.recipe import Recipe

def _check_xy(x: Any, y: Any, what: str, *, labels_needed: bool = True) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise InputError(f"{what} must be a floating-point tensor of images, got {type(x).__name__}.")
    if x.ndim < 2 or len(x) == 0:
        raise InputError(f"{what} is empty or has no sample dimension (shape {tuple(x.shape)}); give at least one sample.")
    if y is None:
        if labels_needed:
            raise InputError(f"retraining needs labels; {what} has none: give a labelled batch.")
        return
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise InputError(f"labels of {what} must be an integer tensor, got {getattr(y, 'dtype', type(y).__name__)}.")
    if y.ndim != 1 or len(y) != len(x):
        raise InputError(f"{what} has {len(x)} samples but {tuple(y.shape)} labels; give one label per sample.")
    if int(y.min()) < 0:
        raise InputError(f"{what} has negative labels; labels must be class ids 0..K-1.")
    if not torch.isfinite(x).all():
        raise InputError(f"{what} contains NaN or infinite values; clean the batch first.")



def _holdout_split(y: torch.Tensor, fraction: float, seed: int, min_holdout: int, what: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Seeded split of indices into (train, holdout), stratified by label when possible."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    n = len(y)
    n_holdout = int(round(n * fraction))
    if n_holdout < min_holdout or n - n_holdout < 1:
        needed = max(math.ceil(min_holdout / fraction), math.ceil(1 / (1 - fraction)) if fraction < 1 else 2, min_holdout + 1)
        raise InputError(
            f"{what} has {n} labelled samples, too few for a held-out split of {fraction:.0%} with at least "
            f"{min_holdout} samples and 1 training sample; give at least {needed} samples or change the holdout settings."
        )
    labels = y.cpu().numpy()
    counts = np.bincount(labels)
    present = counts[counts > 0]
    stratify = labels if (present.min() >= 2 and n_holdout >= len(present) and n - n_holdout >= len(present)) else None
    train, holdout = train_test_split(np.arange(n), test_size=n_holdout, random_state=seed, stratify=stratify)
    return torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(holdout)), stratify is not None


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch_size: int) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    loss_sum = 0.0
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size].to(device, non_blocking=True)
        yb = y[start : start + batch_size].to(device, non_blocking=True)
        logits = model(xb)
        correct += int((logits.argmax(1) == yb).sum())
        loss_sum += float(F.cross_entropy(logits.float(), yb, reduction="sum"))
    model.train(was_training)
    return correct / len(x), loss_sum / len(x)


def _check_logits(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, what: str) -> int:
    """The model's number of classes, once its logits are checked against the labels of ``x``."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(x[:2].to(device))
    model.train(was_training)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or len(logits) != min(2, len(x)):
        raise InputError(f"the model must return class logits of shape (N, K), got {getattr(logits, 'shape', type(logits).__name__)}.")
    if int(y.max()) >= logits.shape[1]:
        raise InputError(f"{what} has label {int(y.max())} but the model has only {logits.shape[1]} outputs; check the labels or the model.")
    return int(logits.shape[1])


def _make_optimizer(recipe: Recipe, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def _make_schedule(
    recipe: Recipe, optim: torch.optim.Optimizer, step_cap: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Stepped once per optimizer step; cosine reaches 0 at the step cap."""
    if recipe.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=max(1, step_cap))
    if recipe.schedule == "step":
        every = max(1, int(round(recipe.step_epochs * steps_per_epoch)))
        return torch.optim.lr_scheduler.StepLR(optim, step_size=every, gamma=recipe.gamma)
    return None


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _param_change(
    start: dict[str, torch.Tensor], model: nn.Module
) -> tuple[float, float, dict[str, float], int]:
    """(||dθ||/sqrt(n), ||dθ||, per-module ||dθ||/sqrt(n_module), n), in float64."""
    per_module_sq: dict[str, float] = {}
    per_module_n: dict[str, int] = {}
    total_sq = 0.0
    total_n = 0
    for name, p in _trainable(model):
        delta = p.detach().double().cpu() - start[name]
        sq = float(delta.square().sum())
        module = name.rsplit(".", 1)[0] if "." in name else ""
        per_module_sq[module] = per_module_sq.get(module, 0.0) + sq
        per_module_n[module] = per_module_n.get(module, 0) + delta.numel()
        total_sq += sq
        total_n += delta.numel()
    per_module = {m: math.sqrt(per_module_sq[m]) / math.sqrt(per_module_n[m]) for m in per_module_sq}
    l2 = math.sqrt(total_sq)
    return (l2 / math.sqrt(total_n) if total_n else 0.0), l2, per_module, total_n


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch of shuffled index batches; a trailing batch of one sample is dropped
    (batch norm cannot train on it) unless the pool itself has one sample."""
    order = torch.randperm(n, generator=generator)
    chunks = list(order.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) < 2:
        chunks.pop()
    return chunks


def _fork_rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The block under ``seed``, the caller's random state untouched. cuDNN's deterministic
    kernels too: its default weight-gradient kernels differ run to run, so the same seed on
    CUDA would not give the same steps."""
    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    with torch.random.fork_rng(devices=_fork_rng_devices(device)):
        torch.manual_seed(seed)
        cudnn.deterministic, cudnn.benchmark = True, False
        try:
            yield
        finally:
            cudnn.deterministic, cudnn.benchmark = saved


def _train_mode(model: nn.Module, freeze_batchnorm: bool) -> None:
    """Training mode; with ``freeze_batchnorm`` the batch-norm layers keep their statistics."""
    model.train()
    if freeze_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
