"""Declared state: one base class gives state dicts and merges; layered accumulators; old files."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shiftcost.errors import InputError
from shiftcost.index import ClassSums, LayerHistogram, edges_from_range
from shiftcost.index.engine import compute_reference_stats
from shiftcost.index.layered import LayeredClassSums, LayeredHistograms, join_layers
from shiftcost.index.reference import ReferenceStats
from shiftcost.index.state import Accumulator, AccumulatorCollection, merge_states

from .engine_support import single_thread  # noqa: F401 - autouse fixture
from .engine_support import LAYERS, tiny_data, tiny_model

FORMAT1_FILE = Path(__file__).parent / "data" / "reference_stats_format1.safetensors"


class _RunningRange(Accumulator):
    """An accumulator written only with add_state, update and compute."""

    settings = ("label",)

    def __init__(self, label: str = "x") -> None:
        self.label = label
        self.add_state("high", torch.full((), -torch.inf, dtype=torch.float64), "max", saved_as=float)
        self.add_state("values", torch.zeros(0, dtype=torch.float64), "cat")
        self.add_state("seen", 0)

    def update(self, x: torch.Tensor) -> None:
        self._fold(high=x.max(), values=x, seen=x.shape[0])

    def compute(self) -> tuple[float, list[float], int]:
        return float(self._high), sorted(self._values.tolist()), self._seen


def test_declared_state_gives_reset_merge_and_state_dict() -> None:
    a, b = _RunningRange(), _RunningRange()
    a.update(torch.tensor([1.0, 5.0]))
    b.update(torch.tensor([7.0]))
    restored = Accumulator.from_state_dict(pickle.loads(pickle.dumps(b.state_dict())))
    assert isinstance(restored, _RunningRange) and restored.compute() == (7.0, [7.0], 1)
    assert a.merge(restored).compute() == (7.0, [1.0, 5.0, 7.0], 3)
    state = a.state_dict()
    assert state.pop("values").tolist() == [1.0, 5.0, 7.0]
    assert state == {"kind": "_RunningRange", "version": 1, "label": "x", "high": 7.0, "seen": 3}
    with pytest.raises(InputError, match="label='y'.*same settings"):
        a.merge(_RunningRange("y"))
    a.reset()
    assert a.compute() == (-float("inf"), [], 0)


def _layer_batches(seed: int, n: int, widths: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = {f"l{i}": torch.randn(n, w, generator=generator, dtype=torch.float64) * (i + 1) for i, w in enumerate(widths)}
    return features, torch.randint(0, 5, (n,), generator=generator)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(2, 120), widths=st.lists(st.integers(1, 6), min_size=1, max_size=3), cut=st.floats(0, 1))
def test_layered_accumulators_equal_one_accumulator_per_layer_under_any_split(seed, n, widths, cut) -> None:
    features, labels = _layer_batches(seed, n, widths)
    names = list(features)
    edges = {name: edges_from_range(-2.0 * (i + 1), 2.0 * (i + 1), 12) for i, name in enumerate(names)}
    split = int(cut * n)
    shards = []
    for rows in (slice(0, split), slice(split, n)):
        sums, histograms = LayeredClassSums(5, names, widths), LayeredHistograms(names, widths, edges)
        if rows.stop > rows.start:
            joined = join_layers({k: v[rows] for k, v in features.items()}, names)
            sums.update(joined, labels[rows])
            histograms.update(joined)
        # through the state dict, as a shard's result travels between processes
        shards.append(AccumulatorCollection({"sums": sums, "histograms": histograms}).state_dict())
    merged = merge_states(pickle.loads(pickle.dumps(shards)))
    for name in names:
        expected_sums = ClassSums()
        expected_sums.update(features[name], labels)
        got = merged["sums"][name]
        assert got.compute().classes == expected_sums.compute().classes
        assert torch.equal(got.compute().counts, expected_sums.compute().counts)
        np.testing.assert_allclose(got.compute().sums, expected_sums.compute().sums, rtol=0, atol=1e-12)
        expected_histogram = LayerHistogram(edges[name])
        expected_histogram.update(features[name])
        histogram = merged["histograms"][name]
        assert torch.equal(histogram.compute(), expected_histogram.compute())
        assert histogram.count == expected_histogram.count
        assert abs(histogram.std() - expected_histogram.std()) <= 1e-12


def test_layered_accumulators_refuse_features_of_other_layers() -> None:
    sums = LayeredClassSums(3, ["a", "b"], [2, 3])
    with pytest.raises(InputError, match="5 columns together"):
        sums.update(torch.zeros(4, 4, dtype=torch.float64), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(InputError, match="different bin counts"):
        LayeredHistograms(["a", "b"], [2, 3], {"a": edges_from_range(0, 1, 4), "b": edges_from_range(0, 1, 8)})
    with pytest.raises(InputError, match=r"widths=\[2, 4\] into one with .*widths=\[2, 3\]"):
        sums.merge(LayeredClassSums(3, ["a", "b"], [2, 4]))
    collection = AccumulatorCollection({"sums": sums})
    with pytest.raises(InputError, match="same accumulators"):
        collection.merge(AccumulatorCollection({"other": LayeredClassSums(3, ["a", "b"], [2, 3])}))
    with pytest.raises(InputError, match="does not know"):
        Accumulator.from_state_dict({"kind": "Nothing", "version": 1})


def test_reference_stats_saved_by_the_first_format_still_load_and_equal_a_fresh_build() -> None:
    # Written by the code before accumulators declared their state, from the same model and data.
    model, spec = tiny_model(double=True)
    x, y = tiny_data(80, seed=0, double=True)
    loaded = ReferenceStats.load(FORMAT1_FILE, model=model, layers=LAYERS)
    fresh = compute_reference_stats(model, spec, x, y, layers=LAYERS, batch_size=32, device="cpu", max_samples=40, seed=2)
    old_parts, new_parts = loaded._parts(), fresh._parts()
    assert old_parts.keys() == new_parts.keys()
    for part, old_state in old_parts.items():
        new_state = new_parts[part]
        assert old_state.keys() == new_state.keys(), part
        for key, value in old_state.items():
            if (part, key) == ("predictions", "confidence_sum"):
                # That format kept no confidence: it loads as unknown, not as a number.
                assert math.isnan(value) and math.isfinite(new_state[key])
            elif isinstance(value, torch.Tensor) and value.is_floating_point():
                # Float64 sums of matrix products: CPUs with other vector units differ in the last bit.
                assert torch.allclose(value, new_state[key], rtol=1e-12, atol=1e-15), (part, key)
            elif isinstance(value, torch.Tensor):
                assert torch.equal(value, new_state[key]), (part, key)
            elif isinstance(value, float):
                assert value == pytest.approx(new_state[key], rel=1e-12, abs=1e-15), (part, key)
            else:
                assert value == new_state[key], (part, key)
    assert loaded.reference_std == pytest.approx(fresh.reference_std, rel=1e-12) and loaded.classes == fresh.classes
