"""The index engine: one forward pass over a batch feeds every index.

:func:`compute_reference_stats` summarises the reference data once per model version;
:func:`assess` then costs exactly one pass over each new batch. During the pass the
hooked activations go, still on the device, into streaming accumulators (per-class sums,
fixed-edge histograms, a bounded embedding sample, prediction statistics); the indices
are computed from those at the end:

- RESQUE_dist per layer (headline: the primary layer), grouped by the batch's labels or,
  without labels, by the model's predicted class (``resque_dist_variant``);
- inv_ARI: k-means on the embedding sample started at the reference centroids;
- layer shift: Wasserstein-1 between the reference and new histograms over the
  reference std, averaged over layers;
- RESQUE_task when asked (``task=True``) or when the batch has labels the reference
  never had (a task change, reported in ``notes``);
- PreIndex p (paired form) only when the clean originals of the batch are given;
- accuracy, mean loss and mean prediction entropy of the current model on the batch.

Input problems (wrong image shape, empty batch, labels outside the model's classes,
NaN/inf activations, stats of another model) raise ``InputError`` with one sentence.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

# scipy.stats and sklearn.cluster serve every pass's final step; importing them with the
# engine keeps their one-off import (seconds) out of the first pass's measured time.
import scipy.stats  # noqa: F401
import sklearn.cluster  # noqa: F401
import torch
from torch import nn

from shiftcost.errors import InputError
from shiftcost.imagestats import IMAGE_STAT_NAMES, image_stats
from shiftcost.index.accumulators import (
    EmbeddingSample,
    PairedHistogramDistance,
    PredictionStats,
    edges_from_range,
    inv_ari_from_sample,
    resque_dist_from_sums,
    resque_task_from_sample,
)
from shiftcost.index.capture import capture_batches, iter_chunks, resolve_device, resolve_layers
from shiftcost.index.functional import DEFAULT_MAX_SAMPLES, layer_shift
from shiftcost.index.layered import LayeredClassSums, LayeredHistograms, join_layers
from shiftcost.index.reference import ReferenceStats
from shiftcost.index.report import IndexReport, PassFacts
from shiftcost.index.state import AccumulatorCollection

__all__ = [
    "IndexReport",
    "PassFacts",
    "accumulate_pass",
    "assess",
    "compute_reference_stats",
    "image_statistics",
    "pass_accumulators",
    "report_from_pass",
]

Progress = Callable[[int, "int | None"], None]

DEFAULT_BINS = 128
PREINDEX_BINS = 32
PREINDEX_METRIC = "wasserstein"


# --------------------------------------------------------------------------- input checks


def image_statistics(x: torch.Tensor) -> torch.Tensor:
    """Per-image pixel statistics (N, 4) float64, columns :data:`IMAGE_STAT_NAMES`."""
    stats = image_stats(x)
    return torch.stack([stats[name] for name in IMAGE_STAT_NAMES], dim=1).to(torch.float64)


def _images_for_statistics(batch: Any) -> torch.Tensor:
    # On CPU the caller's NCHW chunk is the same data and its statistics run ~20% faster
    # than on the channels_last copy; on CUDA they run where the images already are.
    if batch.x.device.type == "cpu" and batch.source_x is not None and batch.source_x.device.type == "cpu":
        return batch.source_x
    return batch.x


def _chunk_checker(
    spec: Any, *, labels: str, source: str, paired: bool = False
) -> Callable[[Any, Any], None]:
    """Host-side checks of one chunk against the model spec; ``labels`` in {"model", "any", "required"}."""
    expected = (int(spec.in_channels), int(spec.image_size), int(spec.image_size))

    def check(x: Any, y: Any) -> None:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{source} holds a {type(x).__name__} where images were expected; give a float tensor N x C x H x W.")
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise InputError(
                f"{source} has images of shape {tuple(x.shape[1:]) if x.dim() == 4 else tuple(x.shape)} but the model "
                f"expects {expected[0]}x{expected[1]}x{expected[2]} (C x H x W); convert the images to that size and channel count."
            )
        if not x.is_floating_point():
            raise InputError(f"{source} has images of dtype {x.dtype}; give float images with values in [0, 1].")
        n = x.shape[0] // 2 if paired else x.shape[0]
        if y is None:
            if labels == "required":
                raise InputError(f"{source} has no labels; the reference data needs a label per image.")
            return
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != n:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise InputError(f"{source} has labels of shape {got} for {n} images; give one integer label per image.")
        if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
            raise InputError(f"{source} has labels of dtype {y.dtype}; give integer class ids.")
        if n == 0:
            return
        lo, hi = int(y.min()), int(y.max())
        if lo < 0:
            raise InputError(f"{source} has the negative label {lo}; class ids start at 0.")
        if labels != "any" and hi >= spec.num_classes:
            hint = "; pass task=True (--task) if the batch is a new task" if labels == "model" else ""
            raise InputError(
                f"{source} has label {hi} but the model has {spec.num_classes} classes (0..{spec.num_classes - 1}){hint}."
            )

    return check


def _first_chunk_guard(x: Any, source: str) -> None:
    if isinstance(x, torch.Tensor) and x.shape[0] == 0:
        raise InputError(f"{source} is empty; give at least one image.")


def _report_progress(progress: Progress | None, done: int, total: int | None) -> None:
    if progress is not None:
        progress(done, total)


def _total(x: Any) -> int | None:
    return int(x.shape[0]) if isinstance(x, torch.Tensor) else None


# --------------------------------------------------------------------------- reference


def compute_reference_stats(
    model: nn.Module,
    spec: Any,
    x: Any,
    y: Any = None,
    *,
    layers: Iterable[str] | None = None,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    autocast: bool | None = False,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    seed: int = 0,
    bins: int = DEFAULT_BINS,
    progress: Progress | None = None,
) -> ReferenceStats:
    """Summarise the labelled reference data ``(x, y)`` for ``model`` (see :class:`ReferenceStats`).

    ``x`` is an image tensor (N, C, H, W) with labels ``y``, or a re-iterable source of
    ``(x, y)`` chunks (a list, or an object whose ``__iter__`` starts over). Two passes:
    the first gathers everything except the histograms and each layer's min/max, the
    second bins every layer's activations on edges spanning that range, so no value of
    the reference falls outside its histogram. ``layers`` default to the classifier's
    input; the first one is the primary layer.
    """
    from shiftcost.data.models import model_fingerprint

    started = time.perf_counter()
    names = resolve_layers(model, None if layers is None else list(layers), spec)
    source = "The reference data"
    _check_two_pass_source(x, source)
    total = _total(x)
    grand_total = None if total is None else 2 * total
    run_device = resolve_device(device)
    grouped, sample, predictions, lows, highs = _reference_first_pass(
        model, spec, x, y, names, batch_size=batch_size, device=run_device, autocast=autocast, max_samples=max_samples,
        seed=seed, progress=lambda done: _report_progress(progress, done, grand_total),
    )  # fmt: skip
    edges = {
        name: edges_from_range(float(lows[grouped.columns(name)].min()), float(highs[grouped.columns(name)].max()), bins)
        for name in names
    }
    histograms = _reference_second_pass(
        model, x, y, names, LayeredHistograms(names, grouped.widths, edges), seen=predictions.samples,
        batch_size=batch_size, device=run_device, autocast=autocast, source=source,
        progress=lambda done: _report_progress(progress, done, grand_total),
    )

    primary_width = grouped.widths[0]
    stats = ReferenceStats(
        spec=spec,
        fingerprint=model_fingerprint(model),
        layers=tuple(names),
        class_sums=grouped.compute(),
        histograms=histograms.compute(),
        embedding_sample=sample.with_columns(slice(0, primary_width)),
        image_stats_sample=sample.with_columns(slice(primary_width, None)),
        image_stat_names=IMAGE_STAT_NAMES,
        predictions=predictions,
        samples=predictions.samples,
        bins=int(bins),
        max_samples=int(max_samples),
        seed=int(seed),
    )
    _check_reference_usable(stats, source)
    stats.seconds = time.perf_counter() - started
    return stats


def _check_two_pass_source(x: Any, source: str) -> None:
    _first_chunk_guard(x, source)
    if not isinstance(x, torch.Tensor) and iter(x) is x:
        raise InputError(
            "The reference data is a one-shot iterator; give a tensor or a re-iterable source (e.g. a list of chunks), "
            "because the reference takes two passes."
        )


def _reference_second_pass(
    model: nn.Module, x: Any, y: Any, names: list[str], histograms: LayeredHistograms, *, seen: int,
    batch_size: int, device: torch.device, autocast: bool | None, source: str, progress: Callable[[int], None],
) -> LayeredHistograms:
    """Bin every layer's activations on the first pass's range; the source must give the same images again."""
    done = seen
    for batch in capture_batches(model, iter_chunks(x, y, batch_size), names, device=device, autocast=autocast):
        histograms.update(join_layers(batch.features, names))
        done += batch.count
        progress(done)
    if done != 2 * seen:
        raise InputError(
            f"{source} gave {seen} images on the first pass and {done - seen} on the second; give a source that yields "
            "the same data each time it is iterated."
        )
    return histograms


def _check_reference_usable(stats: ReferenceStats, source: str) -> None:
    """Layer shift needs spread in every layer; the class-conditional indices need two classes."""
    for name, std in stats.reference_std.items():
        if not std > 0:
            raise InputError(
                f"Layer '{name}' gives the same value for every reference image, so layer shift is undefined there; "
                "hook another layer."
            )
    if len(stats.classes) < 2:
        raise InputError(f"{source} holds only class {stats.classes}; the reference needs at least two classes.")


def _reference_first_pass(
    model: nn.Module,
    spec: Any,
    x: Any,
    y: Any,
    names: list[str],
    *,
    batch_size: int,
    device: torch.device,
    autocast: bool | None,
    max_samples: int,
    seed: int,
    progress: Callable[[int], None],
) -> tuple[LayeredClassSums, EmbeddingSample, PredictionStats, torch.Tensor, torch.Tensor]:
    """Everything of the reference but its histograms, and each column's minimum and maximum."""
    source = "The reference data"
    check = _chunk_checker(spec, labels="required", source=source)
    grouped: LayeredClassSums | None = None  # built at the first chunk, when the layers' widths are known
    sample = EmbeddingSample(max_samples, seed)  # over [primary layer | image statistics]
    predictions = PredictionStats(spec.num_classes)
    facts = PassFacts()
    lows: torch.Tensor | None = None
    highs: torch.Tensor | None = None
    for batch in capture_batches(model, iter_chunks(x, y, batch_size), names, device=device, autocast=autocast, check_chunk=check):
        if batch.count == 0:
            continue
        assert batch.y is not None
        labels = batch.y
        if grouped is None:
            grouped = LayeredClassSums(spec.num_classes, names, [batch.features[name].shape[1] for name in names])
        ids = torch.arange(facts.samples, facts.samples + batch.count, dtype=torch.int64)
        joined = join_layers(batch.features, names)
        facts.update(batch.logits, labels, source=source)
        grouped.update(joined, labels)
        lo, hi = torch.aminmax(joined, dim=0)
        lows = lo if lows is None else torch.minimum(lows, lo)
        highs = hi if highs is None else torch.maximum(highs, hi)
        sample.update(torch.cat([batch.features[names[0]], image_statistics(_images_for_statistics(batch))], dim=1), labels, ids)
        predictions.update(batch.logits, labels)
        progress(facts.samples)
    if facts.samples == 0:
        raise InputError(f"{source} is empty; give at least one image.")
    assert grouped is not None and lows is not None and highs is not None
    # NaN and inf propagate into the running minima and maxima, so these flag them per column.
    facts.check_finite(grouped, ~(torch.isfinite(lows) & torch.isfinite(highs)), source)
    return grouped, sample, predictions, lows, highs


# --------------------------------------------------------------------------- assess


def _paired_chunks(
    x: Any, y: Any, clean: Any, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Chunks of ``cat([shifted, clean])`` so that one forward call serves both halves."""
    shifted_chunks = iter_chunks(x, y, batch_size)
    clean_chunks = iter_chunks(clean, None, batch_size)
    for shifted, original in itertools.zip_longest(shifted_chunks, clean_chunks):
        if shifted is None or original is None or shifted[0].shape[0] != original[0].shape[0]:
            raise InputError(
                "The clean originals (paired_clean_x) do not pair up with the batch; give exactly one clean image per "
                "shifted image, in the same order."
            )
        if not isinstance(original[0], torch.Tensor):
            raise InputError("The clean originals hold something other than image tensors; give a float tensor N x C x H x W.")
        yield torch.cat([shifted[0], original[0]]), shifted[1]


def assess(
    model: nn.Module,
    spec: Any,
    reference: ReferenceStats,
    x: Any,
    y: Any = None,
    *,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    autocast: bool | None = False,
    task: bool = False,
    paired_clean_x: Any = None,
    progress: Progress | None = None,
    check_model: bool = True,
) -> IndexReport:
    """All indices for the batch ``(x, y)`` against ``reference``, in one forward pass.

    ``x`` is an image tensor (N, C, H, W) with optional labels ``y``, or an iterable of
    ``(x, y)`` chunks / image tensors (a stream, read once). Without labels RESQUE_dist and
    inv_ARI group the batch by predicted class. ``task=True`` treats the labels as a new
    task's (any non-negative ids) and adds RESQUE_task; labels the reference never had
    trigger RESQUE_task too. ``paired_clean_x`` (the clean originals of ``x``, same order)
    adds PreIndex p, at the price of a forward pass over them. ``check_model`` compares the
    model's fingerprint with the one stored in ``reference``.
    """
    started = time.perf_counter()
    if check_model:
        reference.check_compatible(model)
    run_device = resolve_device(device)
    parts = accumulate_pass(
        model, spec, reference, x, y, batch_size=batch_size, device=run_device, autocast=autocast, task=task,
        paired_clean_x=paired_clean_x, progress=progress,
    )  # fmt: skip
    return report_from_pass(
        spec, reference, parts, task=task, paired=paired_clean_x is not None, device=run_device,
        seconds=time.perf_counter() - started,
    )  # fmt: skip


def _preindex_layers(spec: Any, reference: ReferenceStats) -> list[str]:
    """PreIndex p averages over the layers wider than the number of classes."""
    return [name for name in reference.layers if (reference.class_sums[name].num_features or 0) > spec.num_classes]


def pass_accumulators(spec: Any, reference: ReferenceStats) -> AccumulatorCollection:
    """The empty accumulators of one pass over a batch (or over one shard of it)."""
    names = list(reference.layers)
    widths = [int(reference.class_sums[name].num_features or 0) for name in names]
    return AccumulatorCollection(
        {
            "class_sums": LayeredClassSums(spec.num_classes, names, widths),
            "histograms": LayeredHistograms(names, widths, {name: reference.histograms[name].edges for name in names}),
            # over [primary layer | image statistics]: one compaction serves both
            "sample": EmbeddingSample(reference.max_samples, reference.seed),
            "predictions": PredictionStats(spec.num_classes),
            "paired": AccumulatorCollection(
                {name: PairedHistogramDistance(PREINDEX_BINS, PREINDEX_METRIC) for name in _preindex_layers(spec, reference)}
            ),
            "facts": PassFacts(),
        }
    )


def accumulate_pass(
    model: nn.Module,
    spec: Any,
    reference: ReferenceStats,
    x: Any,
    y: Any = None,
    *,
    first_row: int = 0,
    batch_size: int = 256,
    device: torch.device,
    autocast: bool | None = False,
    task: bool = False,
    paired_clean_x: Any = None,
    progress: Progress | None = None,
) -> AccumulatorCollection:
    """One forward pass over ``(x, y)`` into :func:`pass_accumulators`; nothing is computed yet.

    ``first_row`` is the position of ``x``'s first image in the whole batch, so that a
    shard's embedding-sample ids are the ones a single pass would give.
    """
    names = list(reference.layers)
    primary = reference.primary_layer
    source = "The batch"
    _first_chunk_guard(x, source)
    if task and y is None and isinstance(x, torch.Tensor):
        raise InputError("RESQUE_task needs the new task's labels but the batch has none; give labels or drop --task.")
    paired = paired_clean_x is not None
    check = _chunk_checker(spec, labels="any" if task else "model", source=source, paired=paired)
    if paired:
        _first_chunk_guard(paired_clean_x, "The clean originals")
        chunks = _paired_chunks(x, y, paired_clean_x, max(1, batch_size // 2))
    else:
        chunks = iter_chunks(x, y, batch_size)
    total = _total(x)
    parts = pass_accumulators(spec, reference)
    facts: PassFacts = parts["facts"]
    paired_distances: AccumulatorCollection = parts["paired"]

    for batch in capture_batches(model, chunks, names, device=device, autocast=autocast, check_chunk=check):
        n = batch.count // 2 if paired else batch.count
        if n == 0:
            continue
        features, logits = batch.features, batch.logits
        if paired:
            for name, distance in paired_distances.items():
                distance.update(features[name][n:], features[name][:n], layer=name)
            features = {name: f[:n] for name, f in features.items()}
            logits = logits[:n]
        has_labels = batch.y is not None
        if task and not has_labels:
            raise InputError("RESQUE_task needs the new task's labels but the batch has none; give labels or drop --task.")
        ids = torch.arange(first_row + facts.samples, first_row + facts.samples + n, dtype=torch.int64)
        facts.update(logits, batch.y, source=source)
        # Grouping: the batch's labels when they are the model's classes, else the predictions.
        predicted = logits.argmax(dim=1)
        group = batch.y if has_labels and not task else predicted
        joined = join_layers(features, names)
        parts["class_sums"].update(joined, group)
        parts["histograms"].update(joined)
        statistics = image_statistics(_images_for_statistics(batch)[:n])
        parts["sample"].update(torch.cat([features[primary], statistics], dim=1), batch.y if has_labels else predicted, ids)
        parts["predictions"].update(logits, None if task or not has_labels else batch.y)
        _report_progress(progress, facts.samples, total)
    return parts


def report_from_pass(
    spec: Any,
    reference: ReferenceStats,
    parts: AccumulatorCollection,
    *,
    task: bool = False,
    paired: bool = False,
    device: torch.device | str = "cpu",
    seconds: float = 0.0,
) -> IndexReport:
    """Every index from the accumulators of a pass (or of merged shards of one)."""
    source = "The batch"
    facts: PassFacts = parts["facts"]
    if facts.samples == 0:
        raise InputError(f"{source} is empty; give at least one image.")
    labelled = facts.labelled_or_raise(source)
    layered_histograms: LayeredHistograms = parts["histograms"]
    facts.check_finite(layered_histograms, layered_histograms.nonfinite_columns(), "the batch")
    primary_width = layered_histograms.widths[0]
    sample = parts["sample"].with_columns(slice(0, primary_width))
    image_sample = parts["sample"].with_columns(slice(primary_width, None))
    notes: list[str] = []
    variant = "labels" if labelled and not task else "predicted"
    if variant == "predicted":
        why = "task mode" if task else "the batch has no labels"
        notes.append(f"RESQUE_dist groups the batch by the model's predicted class ({why}).")
    by_layer, excluded = _resque_dist(reference, parts["class_sums"].compute(), notes)
    sampled = sample.compute()
    shift_by_layer = _layer_shift(reference, layered_histograms.compute())
    seen_labels = facts.labels_seen
    new_classes = sorted(seen_labels - set(reference.classes)) if labelled else []
    task_change = bool(new_classes) or task
    outputs = parts["predictions"].compute()
    return IndexReport(
        resque_dist=by_layer.get(reference.primary_layer),
        resque_dist_variant=variant,
        resque_dist_by_layer=by_layer,
        excluded_classes=excluded,
        inv_ari=_inv_ari(reference, sample, notes),
        layer_shift=sum(shift_by_layer.values()) / len(shift_by_layer),
        layer_shift_by_layer=shift_by_layer,
        resque_task=_resque_task(sample, seen_labels, new_classes, task, notes) if task_change else None,
        task_change=task_change,
        new_classes=new_classes,
        preindex_p=_preindex_p(spec, parts["paired"], notes) if paired else None,
        accuracy=outputs["accuracy"],
        mean_loss=outputs["mean_loss"],
        mean_entropy=outputs["mean_entropy"],
        mean_confidence=outputs["mean_confidence"],
        predicted_counts=outputs["predicted_counts"],
        reference_accuracy=reference.accuracy,
        samples=facts.samples,
        embedding_samples=int(sampled.features.shape[0]),
        seconds=seconds,
        device=str(device),
        layers=list(reference.layers),
        notes=notes,
        embedding_sample=(sampled.features, sampled.labels, sampled.ids),
        image_stats=image_sample.compute().features,
        image_stat_names=reference.image_stat_names,
    )


def _resque_dist(reference: ReferenceStats, class_sums: dict[str, Any], notes: list[str]) -> tuple[dict[str, float], list[int]]:
    """RESQUE_dist per layer (the primary layer's is the headline) and the classes left out."""
    ref_classes = set(reference.classes)
    primary = reference.primary_layer
    new_group_classes = set(class_sums[primary].compute().classes)
    if not ref_classes & new_group_classes:
        notes.append(
            f"RESQUE_dist not computed: the batch shares no class with the reference (batch {sorted(new_group_classes)}, "
            f"reference {sorted(ref_classes)})."
        )
        return {}, []
    by_layer: dict[str, float] = {}
    excluded: list[int] = []
    for name in reference.layers:
        result = resque_dist_from_sums(reference.class_sums[name], class_sums[name], layer=name)
        by_layer[name] = result.value
        if name == primary:
            excluded = sorted(result.reference_only + result.new_only)
    if excluded:
        notes.append(f"Classes {excluded} are on one side only and were left out of RESQUE_dist.")
    return by_layer, excluded


def _inv_ari(reference: ReferenceStats, sample: EmbeddingSample, notes: list[str]) -> float | None:
    """inv_ARI on the embedding sample, k-means started at the reference centroids."""
    rows, classes = int(sample.compute().features.shape[0]), len(reference.classes)
    if rows < classes:
        notes.append(f"inv_ARI not computed: the batch has {rows} images, fewer than the {classes} reference classes.")
        return None
    return inv_ari_from_sample(reference.class_sums[reference.primary_layer], sample).value


def _layer_shift(reference: ReferenceStats, histograms: dict[str, Any]) -> dict[str, float]:
    """W1 between the reference and new histograms of each layer, over the reference std."""
    reference_std = reference.reference_std
    return {
        name: layer_shift(
            reference.histograms[name].compute(), histograms[name].compute(), reference.histograms[name].edges, reference_std[name], layer=name
        )
        for name in reference.layers
    }


def _resque_task(sample: EmbeddingSample, seen_labels: set[int], new_classes: list[int], task: bool, notes: list[str]) -> float | None:
    """RESQUE_task, asked for or triggered by labels the reference never had."""
    value: float | None = None
    if new_classes and not task:
        notes.append(f"Task change: labels {new_classes} are not among the reference classes; RESQUE_task computed.")
    if len(seen_labels) < 2:
        if task:
            raise InputError(f"The batch holds only label {sorted(seen_labels)}; RESQUE_task needs at least two classes.")
        notes.append("RESQUE_task not computed: the batch holds a single class.")
    else:
        value = resque_task_from_sample(sample).value
    if task:
        notes.append("Task mode: the labels are the new task's, so accuracy and loss are not computed.")
    return value


def _preindex_p(spec: Any, paired_distances: AccumulatorCollection, notes: list[str]) -> float | None:
    """PreIndex p: the mean over the layers wider than the number of classes."""
    if not len(paired_distances):
        notes.append(f"PreIndex p not computed: no hooked layer is wider than the {spec.num_classes} classes.")
        return None
    values = [distance.compute() for _, distance in paired_distances.items()]
    return sum(values) / len(values)
