"""Retraining settings in one object: :class:`RetrainConfig` and its groups.

A retrain is described by four groups of settings:

* :class:`Recipe`: *how* the model is fine-tuned (optimizer, learning rate, weight decay,
  schedule, batch size, augmentation by torchvision transforms v2 names, replay of
  reference data, or a user training step ``pkg.module:step``). The recipe belongs to the
  model: the calibration sweep that forecasts a model's retrains must use the recipe its
  retrains use, so a model file carries its recipe (see :mod:`shiftcost.data.models`).
* :class:`Cutoff`: when a retrain is done (held-out split, tolerance, evaluation cadence).
* :class:`Caps`: when it gives up (steps, epochs).
* :class:`EnergyConfig`: how its cost is measured (CodeCarbon).

Every group is a frozen dataclass that validates itself, so a bad value fails when it is
set, with one sentence naming it. :meth:`RetrainConfig.replace` takes the flat names the
functions and the command line use (``lr=``, ``tolerance=``, ``max_steps=`` ...).
A recipe file is TOML with a ``[recipe]`` table (and optionally ``[cutoff]`` and
``[caps]``)::

    [recipe]
    optimizer = "sgd"
    lr = 0.01
    schedule = "cosine"
    augment = ["RandomHorizontalFlip", "RandomCrop(32, padding=4)"]
    replay_fraction = 0.5
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shiftcost.errors import ConfigError, InputError
from shiftcost.forecast import protocol

__all__ = [
    "Recipe",
    "Cutoff",
    "Caps",
    "EnergyConfig",
    "RetrainConfig",
    "OPTIMIZERS",
    "SCHEDULES",
    "load_entry_point",
    "build_augmentation",
]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "step")
#: Share of each epoch replayed from the reference data when the recipe leaves it unset.
AUTO_REPLAY = 0.5


def pool_samples(train_samples: int, replay_fraction: float, reference_samples: int) -> int:
    """Samples per retraining epoch: the new training split plus the replayed reference
    samples (``replay_fraction`` of the pool, capped by the reference size)."""
    if replay_fraction <= 0:
        return train_samples
    wanted = int(round(replay_fraction / (1.0 - replay_fraction) * train_samples))
    return train_samples + min(wanted, reference_samples)


@dataclass(frozen=True)
class Recipe:
    """How a model is fine-tuned.

    ``schedule``: ``constant``; ``cosine`` anneals the learning rate to 0 over the step
    cap; ``step`` multiplies it by ``gamma`` every ``step_epochs`` epochs.
    ``augment``: torchvision ``transforms.v2`` class names, optionally with arguments
    (``"RandomCrop(32, padding=4)"``), applied per training image before the model's own
    normalisation. ``replay_fraction``: share of each epoch's pool drawn from the
    reference data (needs labelled reference data); None (the default) replays
    :data:`AUTO_REPLAY` whenever labelled reference data is at hand, none otherwise.
    The defaults (Adam at 1e-4, half of each epoch replayed, batch-norm statistics frozen)
    are chosen not to make a converged model worse on its reference data: a resnet18 at
    1.00 on its reference fell to 0.78 after a contrast-shifted batch at Adam 1e-3 with
    replay, and to 0.94 (from 0.99) at 1e-3 without replay on another; at 1e-4 with replay
    it kept 1.00 / 0.99 with a 0.2 holdout, but fell to 0.979 with the protocol's 0.3 holdout
    while its batch-norm statistics followed the small shifted batches; frozen, it kept 1.00
    (``tests/model/test_recipe.py`` holds this case). ``freeze_batchnorm`` keeps batch-norm
    statistics as they are (a small batch would otherwise overwrite what the reference
    data taught them); a model trained from scratch on little data (the demo) may prefer
    ``false``. ``train_step``: ``pkg.module:step``, called per mini-batch as
    ``step(model, inputs, labels) -> loss`` in training mode; shiftcost then runs the
    backward pass, the optimizer and the schedule, so the cutoff protocol, gradient
    norms and energy meter stay around it.
    """

    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "constant"
    step_epochs: float = 5.0
    gamma: float = 0.1
    batch_size: int = 64
    augment: tuple[str, ...] = ()
    replay_fraction: float | None = None
    freeze_batchnorm: bool = True
    train_step: str | None = None

    def replay_with(self, reference_available: bool) -> float:
        """The replay share a run uses: the set one, or :data:`AUTO_REPLAY` / 0 when unset."""
        if self.replay_fraction is not None:
            return self.replay_fraction
        return AUTO_REPLAY if reference_available else 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "optimizer", str(self.optimizer).lower())
        object.__setattr__(self, "schedule", str(self.schedule).lower())
        augment = (self.augment,) if isinstance(self.augment, str) else tuple(str(a) for a in self.augment)
        object.__setattr__(self, "augment", augment)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer {self.optimizer!r} is unknown; use one of {', '.join(OPTIMIZERS)}.")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule {self.schedule!r} is unknown; use one of {', '.join(SCHEDULES)}.")
        _check(self.lr > 0 and math.isfinite(self.lr), f"the learning rate must be positive, got {self.lr!r}.")
        _check(self.weight_decay >= 0, f"weight_decay must not be negative, got {self.weight_decay!r}.")
        _check(0 <= self.momentum < 1, f"momentum must lie in [0, 1), got {self.momentum!r}.")
        _check(self.step_epochs > 0 and 0 < self.gamma <= 1, f"the step schedule needs step_epochs > 0 and gamma in (0, 1], got {self.step_epochs!r} and {self.gamma!r}.")
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1, f"batch sizes must be positive, got {self.batch_size!r}.")
        _check(
            self.replay_fraction is None or 0.0 <= self.replay_fraction < 1.0,
            f"replay_fraction must lie in [0, 1), got {self.replay_fraction!r}.",
        )
        if self.train_step is not None and ":" not in self.train_step:
            raise ConfigError(f"train_step {self.train_step!r} must be written pkg.module:function.")


@dataclass(frozen=True)
class Cutoff:
    """When a retrain has recovered: held-out accuracy >= target (reference - tolerance)."""

    tolerance: float = 0.03
    # The measurement protocol's holdout (shiftcost.forecast.protocol.HOLDOUT_FRACTION): a
    # retrain measured with another share measures something else than the forecast predicts.
    holdout_fraction: float = 0.3
    min_holdout: int = 10
    eval_every: int | None = None
    eval_batch_size: int = 512
    # None: the run's seed draws the held-out split too. Fixed, repeated retrains of one batch
    # are judged on the same samples and differ in their training alone.
    holdout_seed: int | None = None

    def __post_init__(self) -> None:
        _check(0.0 < self.holdout_fraction < 1.0, f"holdout_fraction must lie strictly between 0 and 1, got {self.holdout_fraction!r}.")
        _check(0.0 <= self.tolerance < 1.0, f"tolerance must lie in [0, 1), got {self.tolerance!r}.")
        _check(self.eval_every is None or self.eval_every >= 1, f"eval_every must be a positive number of steps, got {self.eval_every!r}.")
        _check(self.eval_batch_size >= 1, f"batch sizes must be positive, got {self.eval_batch_size!r}.")
        _check(self.min_holdout >= 1, f"min_holdout must be at least 1, got {self.min_holdout!r}.")


@dataclass(frozen=True)
class Caps:
    """Where a retrain gives up: the first of ``max_steps`` and ``max_epochs``."""

    max_steps: int | None = None
    max_epochs: float | None = protocol.MAX_EPOCHS

    def __post_init__(self) -> None:
        _check(self.max_steps is not None or self.max_epochs is not None, "give max_steps or max_epochs (or both): a run needs a cap.")
        _check(
            (self.max_steps is None or self.max_steps >= 1) and (self.max_epochs is None or self.max_epochs > 0),
            f"caps must be positive, got max_steps={self.max_steps!r}, max_epochs={self.max_epochs!r}.",
        )


@dataclass(frozen=True)
class EnergyConfig:
    """CodeCarbon around the run; ``require=False`` records a failed measurement instead of raising."""

    track: bool = True
    country_iso_code: str = "USA"
    options: Mapping[str, Any] = field(default_factory=dict)
    require: bool = True


# Flat name (function keyword, CLI flag, TOML key) -> (group, field in the group).
_GROUPS = {"recipe": Recipe, "cutoff": Cutoff, "caps": Caps}
_FLAT: dict[str, tuple[str, str]] = {
    **{f.name: (group, f.name) for group, cls in _GROUPS.items() for f in dataclasses.fields(cls)},
    "track_energy": ("energy", "track"),
    "country_iso_code": ("energy", "country_iso_code"),
    "energy_options": ("energy", "options"),
    "require_energy": ("energy", "require"),
}
_TOP = ("seed", "device")


@dataclass(frozen=True)
class RetrainConfig:
    """All settings of one retrain; see the module docstring for the groups."""

    recipe: Recipe = field(default_factory=Recipe)
    cutoff: Cutoff = field(default_factory=Cutoff)
    caps: Caps = field(default_factory=Caps)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    seed: int = 0
    device: str = "auto"

    def replace(self, **flat: Any) -> RetrainConfig:
        """A copy with flat-named settings changed (``lr=``, ``tolerance=``, ``max_steps=`` ...)."""
        changes: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        for name, value in flat.items():
            if name in _TOP:
                top[name] = value
            elif name in _FLAT:
                group, key = _FLAT[name]
                changes.setdefault(group, {})[key] = value
            else:
                raise ConfigError(f"{name!r} is not a retraining setting; use one of {', '.join(sorted([*_FLAT, *_TOP]))}.")
        groups = {group: dataclasses.replace(getattr(self, group), **values) for group, values in changes.items()}
        return dataclasses.replace(self, **groups, **top)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, grouped as in TOML."""
        data = dataclasses.asdict(self)
        data["recipe"]["augment"] = list(self.recipe.augment)
        data["energy"]["options"] = dict(self.energy.options)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "the retraining settings") -> RetrainConfig:
        """Rebuild from :meth:`to_dict` or a TOML document's tables (unknown keys refused)."""
        return cls().replace(**_flatten(data, source))

    def with_file(self, path: str | Path) -> RetrainConfig:
        """This config with the settings a recipe file names changed (the rest kept)."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"The recipe file {path} does not exist; check the path.") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise InputError(f"The recipe file {path} is not valid TOML ({error}); fix it.") from None
        return self.replace(**_flatten(data, f"The recipe file {path}"))

    def for_model(self, spec: Any) -> RetrainConfig:
        """This config with the recipe a model file carries (``spec.recipe``), if any.

        The model's recipe wins over general settings: its cost model was calibrated with it.
        """
        recipe = getattr(spec, "recipe", None)
        if not recipe:
            return self
        return self.replace(**{name: value for name, value in recipe.items() if _FLAT.get(name, ("",))[0] == "recipe"})

    @classmethod
    def from_settings(cls, settings: Any) -> RetrainConfig:
        """The pipeline's retraining settings (``shiftcost.config.Settings``) as a config."""
        return cls(
            recipe=Recipe(batch_size=settings.retrain_batch_size, **({} if settings.retrain_lr is None else {"lr": settings.retrain_lr})),
            cutoff=Cutoff(tolerance=settings.cutoff_tolerance, holdout_fraction=settings.retrain_holdout_fraction),
            caps=Caps(max_steps=settings.retrain_max_steps, max_epochs=settings.retrain_max_epochs),
            energy=EnergyConfig(country_iso_code=settings.country_iso_code, options={"measure_power_secs": settings.energy_sample_s}),
            seed=settings.retrain_seed,
            device=settings.device,
        )

    @classmethod
    def from_toml(cls, path: str | Path) -> RetrainConfig:
        return cls().with_file(path)


def _flatten(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for group, values in data.items():
        if group in _TOP:
            flat[group] = values
            continue
        if not isinstance(values, Mapping) or group not in (*_GROUPS, "energy"):
            raise ConfigError(f"{source} has an unknown section {group!r}; use [recipe], [cutoff], [caps].")
        for key, value in values.items():
            name = next((flat_name for flat_name, where in _FLAT.items() if where == (group, key)), None)
            if name is None:
                raise ConfigError(f"{source} has an unknown setting {group}.{key}; see `shiftcost retrain --help` for the names.")
            flat[name] = value
    return flat


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# --------------------------------------------------------------------------- recipe parts


def load_entry_point(path: str, what: str) -> Callable[..., Any]:
    """Import ``pkg.module:attribute`` and return it; one sentence when it cannot be."""
    module_name, _, attribute = str(path).partition(":")
    if not module_name or not attribute:
        raise InputError(f"{what} {path!r} must be written pkg.module:function.")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any import-time failure of user code
        raise InputError(f"{what} {path!r} does not import ({type(error).__name__}: {error}); check PYTHONPATH and the module name.") from None
    target = getattr(module, attribute, None)
    if not callable(target):
        raise InputError(f"{what} {path!r}: module {module_name} has no callable {attribute!r}; check the name after the colon.")
    return target


def build_augmentation(names: tuple[str, ...]) -> Callable[[Any], Any] | None:
    """A torchvision v2 ``Compose`` from names such as ``"RandomCrop(32, padding=4)"``."""
    if not names:
        return None
    from torchvision.transforms import v2

    steps = []
    for text in names:
        name, args, kwargs = _parse_call(text)
        cls = getattr(v2, name, None)
        if not (inspect.isclass(cls) and issubclass(cls, v2.Transform)):
            raise ConfigError(f"augmentation {text!r} is not a torchvision.transforms.v2 transform; use a name such as RandomHorizontalFlip.")
        try:
            steps.append(cls(*args, **kwargs))
        except (TypeError, ValueError) as error:
            raise ConfigError(f"augmentation {text!r} cannot be built ({error}); fix its arguments.") from None
    return v2.Compose(steps)


def _parse_call(text: str) -> tuple[str, list[Any], dict[str, Any]]:
    try:
        node = ast.parse(text.strip(), mode="eval").body
        if isinstance(node, ast.Name):
            return node.id, [], {}
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
            return node.func.id, args, kwargs
    except (SyntaxError, ValueError):
        pass
    raise ConfigError(f"augmentation {text!r} must be a transform name, optionally with literal arguments: Name or Name(arg, key=value).")
