"""The demo's stream of batches: growing and changing shifts on the digits "stream" split.

A scenario is a list of :class:`Step` s. Each step becomes one file in the landing folder,
written one at a time so the watcher sees them arrive in order:

* ``clean``: a fresh sample of the stream split, untouched (no drift expected);
* a corruption kind from :mod:`shiftcost.shifts` at an intensity;
* ``duplicate``: the exact bytes of an earlier step under a new name (the same batch
  dropped twice; its content fingerprint is already known, so it is processed once);
* ``corrupt``: bytes that are not an ``.npz`` archive (that batch must fail with a reason
  while the others carry on).

File names sort in arrival order and say what the batch is
(``04-gaussian_noise-0.2.npz``), so a report read back from the database alone still
tells the batches apart.

Every batch is drawn from the stream split with its own seed, so the stream is the
same on every run and for every ``batch_size``-sized prefix of steps.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from shiftcost.data.batches import Batch, save_batch
from shiftcost.errors import InputError
from shiftcost.shifts import CORRUPTIONS

CLEAN = "clean"
DUPLICATE = "duplicate"
CORRUPT = "corrupt"
SPECIAL_KINDS = (CLEAN, DUPLICATE, CORRUPT)

#: Kinds tried, in order, for the step whose shift the cost model has never seen.
UNSEEN_CANDIDATES = ("frost", "impulse_noise", "brightness", "shot_noise")


@dataclass(frozen=True)
class Step:
    """One batch of the stream: what shift it carries and why it is in the demo.

    ``kind`` is a corruption kind, ``clean``, ``duplicate`` (``of`` names the earlier
    step by its 1-based position) or ``corrupt``. ``unseen`` marks a kind the calibration
    did not cover.
    """

    kind: str
    intensity: float = 0.0
    note: str = ""
    of: int | None = None
    unseen: bool = False

    @property
    def label(self) -> str:
        """Short human label: ``clean``, ``gaussian_noise 0.2``, ``duplicate of #4``."""
        if self.kind == DUPLICATE:
            return f"duplicate of #{self.of}"
        if self.kind in (CLEAN, CORRUPT):
            return self.kind
        return f"{self.kind} {self.intensity:g}"


@dataclass(frozen=True)
class ScenarioBatch:
    """A step made concrete: its position, file name and payload (bytes to write)."""

    position: int
    step: Step
    file_name: str
    payload: bytes
    samples: int

    def write(self, landing: str | os.PathLike[str]) -> Path:
        """Write this batch into ``landing`` atomically (a watcher never sees half a file)."""
        landing = Path(landing)
        landing.mkdir(parents=True, exist_ok=True)
        path = landing / self.file_name
        temporary = landing / f".{self.file_name}.tmp"
        temporary.write_bytes(self.payload)
        os.replace(temporary, path)
        return path


def default_steps(calibrated_kinds: Iterable[str] = ("gaussian_noise", "gaussian_blur", "contrast")) -> list[Step]:
    """The demo's ten batches; every corruption kind outside ``calibrated_kinds`` is marked unseen.

    The order tells a story: clean data passes, mild noise is caught, clean data again,
    a stronger and then different shifts eat into the budget, a kind never calibrated
    shows the cost model extrapolating, a batch dropped twice is processed once, more
    noise arrives when the budget is spent, and a broken file fails alone.
    """
    calibrated = set(calibrated_kinds)
    unseen = next((kind for kind in UNSEEN_CANDIDATES if kind not in calibrated), "frost")
    unseen_intensity = {"frost": 0.5, "impulse_noise": 0.1, "brightness": 0.25, "shot_noise": 0.3}[unseen]
    steps = [
        Step(CLEAN, note="a fresh sample of the stream: no drift expected"),
        Step("gaussian_noise", 0.08, note="mild sensor noise"),
        Step(CLEAN, note="clean again"),
        Step("gaussian_noise", 0.2, note="strong sensor noise"),
        Step("gaussian_blur", 1.25, note="out of focus"),
        Step("contrast", 0.4, note="washed-out images"),
        Step(unseen, unseen_intensity, note="a shift type the calibration never saw"),
        Step(DUPLICATE, of=4, note="the strong-noise batch dropped a second time"),
        Step("gaussian_noise", 0.16, note="noise again, after the budget has been used"),
        Step(CORRUPT, note="a file that is not an .npz archive"),
    ]
    return [mark_unseen(step, calibrated) for step in steps]


def mark_unseen(step: Step, calibrated_kinds: Iterable[str]) -> Step:
    """``step`` with ``unseen`` set when its corruption kind is not among ``calibrated_kinds``."""
    from dataclasses import replace

    shifted = step.kind not in SPECIAL_KINDS
    return replace(step, unseen=shifted and step.kind not in set(calibrated_kinds))


def build_scenario(
    stream: tuple[torch.Tensor, torch.Tensor],
    steps: Sequence[Step] | None = None,
    *,
    batch_size: int = 200,
    seed: int = 0,
    classes: Sequence[str] | None = None,
) -> list[ScenarioBatch]:
    """Turn ``steps`` into batches drawn from ``stream`` (images N x C x H x W in [0, 1], labels).

    Each non-special step samples ``batch_size`` images without replacement (seed
    ``seed + position``) and applies its corruption with the same seed. Labels travel with
    the images, so retraining and accuracy on the batch are possible.
    """
    x, y = stream
    steps = list(default_steps() if steps is None else steps)
    if not steps:
        raise InputError("A scenario needs at least one step.")
    if len(x) != len(y) or len(x) == 0:
        raise InputError(f"The stream needs as many labels as images and at least one image, got {len(x)} and {len(y)}.")
    if not 1 <= batch_size <= len(x):
        raise InputError(f"batch_size must be between 1 and the stream size {len(x)}, got {batch_size}.")
    built: list[ScenarioBatch] = []
    for position, step in enumerate(steps, start=1):
        if step.kind == DUPLICATE:
            if step.of is None or not 1 <= step.of < position or steps[step.of - 1].kind in (DUPLICATE, CORRUPT):
                raise InputError(f"Step {position} duplicates step {step.of}, which is not an earlier data batch.")
            original = built[step.of - 1]
            name = f"{position:02d}-duplicate-of-{step.of:02d}.npz"
            built.append(ScenarioBatch(position, step, name, original.payload, original.samples))
            continue
        if step.kind == CORRUPT:
            payload = b"this is not an npz archive\n" * 8
            built.append(ScenarioBatch(position, step, f"{position:02d}-corrupt.npz", payload, 0))
            continue
        if step.kind != CLEAN and step.kind not in CORRUPTIONS:
            raise InputError(f"Step {position} has unknown kind {step.kind!r}; use clean, duplicate, corrupt or one of {', '.join(CORRUPTIONS)}.")
        generator = torch.Generator().manual_seed(seed + position)
        chosen = torch.randperm(len(x), generator=generator)[:batch_size].sort().values
        images, labels = x[chosen], y[chosen]
        if step.kind != CLEAN:
            from shiftcost.shifts import corrupt

            images = corrupt(images, step.kind, step.intensity, seed=seed + position, clamp=True)
        name = f"{position:02d}-{step.kind}.npz" if step.kind == CLEAN else f"{position:02d}-{step.kind}-{step.intensity:g}.npz"
        built.append(ScenarioBatch(position, step, name, _npz_bytes(images, labels, classes), len(images)))
    return built


def _npz_bytes(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str] | None) -> bytes:
    """The exact bytes :func:`save_batch` writes, so duplicates are byte-identical."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = save_batch(Batch(images, labels, "scenario", None if classes is None else tuple(classes)), Path(folder) / "b.npz")
        return path.read_bytes()


def demo_pools(seed: int = 0, calibration_images: int = 180) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The digits "stream" split cut in two disjoint, seeded pools: (calibration, scenario).

    The calibration sweep retrains on the first pool, the scenario's batches are drawn from
    the second, so no image the cost model was calibrated on comes back in the stream.
    """
    from shiftcost.data.demo import load_digits, split_digits

    x, y = load_digits()
    stream_x, stream_y = split_digits(x, y, seed=seed)["stream"]
    if not 0 < calibration_images < len(stream_y):
        raise InputError(f"calibration_images must be between 1 and {len(stream_y) - 1}, got {calibration_images}.")
    order = torch.randperm(len(stream_y), generator=torch.Generator().manual_seed(seed))
    first, rest = order[:calibration_images].sort().values, order[calibration_images:].sort().values
    return (stream_x[first], stream_y[first]), (stream_x[rest], stream_y[rest])


__all__ = ["CLEAN", "CORRUPT", "DUPLICATE", "ScenarioBatch", "Step", "build_scenario", "default_steps", "demo_pools", "mark_unseen"]
