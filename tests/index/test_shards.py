"""Shards of a batch, computed separately and merged, give the indices of one pass."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from shiftcost.errors import InputError
from shiftcost.index.engine import assess, compute_reference_stats
from shiftcost.index.shards import assess_in_shards, index_shard, report_from_shards, split_batch

from .engine_support import single_thread  # noqa: F401 - autouse fixture
from .engine_support import LAYERS, tiny_data, tiny_model

TOL = 1e-12


@pytest.fixture(scope="module")
def world() -> dict:
    model, spec = tiny_model(double=True)
    x_ref, y_ref = tiny_data(80, seed=0, double=True)
    reference = compute_reference_stats(model, spec, x_ref, y_ref, layers=LAYERS, batch_size=32, device="cpu", max_samples=40, seed=2)
    x_new, y_new = tiny_data(70, seed=1, double=True, shift=0.15)
    return {"model": model, "spec": spec, "reference": reference, "x": x_new, "y": y_new, "clean": tiny_data(70, seed=1, double=True)[0]}


def assert_same_report(sharded, single) -> None:
    got, want = sharded.to_dict(), single.to_dict()
    for key in ("seconds", "device"):
        got.pop(key), want.pop(key)
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, float):
            assert math.isclose(got[key], value, rel_tol=0, abs_tol=TOL), key
        elif isinstance(value, dict):
            assert got[key].keys() == value.keys(), key
            assert all(abs(got[key][k] - v) <= TOL for k, v in value.items()), key
        else:
            assert got[key] == value, key
    for ours, theirs in zip(sharded.embedding_sample, single.embedding_sample):
        assert torch.equal(ours, theirs)
    # per-image pixel statistics are vectorised over the chunk: equal up to rounding
    torch.testing.assert_close(sharded.image_stats, single.image_stats, rtol=0, atol=TOL)


@pytest.mark.parametrize("shard_size", [1, 9, 35, 69, 70, 500])
@pytest.mark.parametrize("mode", ["labels", "no labels", "task", "paired"])
def test_shards_merged_equal_one_pass(world: dict, shard_size: int, mode: str) -> None:
    model, spec, reference, x, y = world["model"], world["spec"], world["reference"], world["x"], world["y"]
    kwargs = {"task": mode == "task", "paired_clean_x": world["clean"] if mode == "paired" else None}
    labels = None if mode == "no labels" else (y + 3 if mode == "task" else y)
    single = assess(model, spec, reference, x, labels, batch_size=16, device="cpu", **kwargs)
    sharded = assess_in_shards(model, spec, reference, x, labels, shard_size=shard_size, batch_size=16, device="cpu", **kwargs)
    assert sharded.samples == 70
    assert_same_report(sharded, single)


def test_shard_states_travel_between_processes_with_their_own_rows_only(world: dict) -> None:
    model, spec, reference, x, y = world["model"], world["spec"], world["reference"], world["x"], world["y"]
    shards = split_batch(x, y, shard_size=30)
    assert [(s.start, s.stop) for s in shards] == [(0, 30), (30, 60), (60, 70)]
    copied = pickle.loads(pickle.dumps(shards[2]))
    assert torch.equal(copied.images, x[60:70]) and torch.equal(copied.labels, y[60:70])
    assert len(pickle.dumps(shards[2])) < len(pickle.dumps(x)) / 4
    states = [pickle.loads(pickle.dumps(index_shard(model, spec, reference, pickle.loads(pickle.dumps(s)), device="cpu"))) for s in shards]
    single = assess(model, spec, reference, x, y, device="cpu")
    # any order of the shards' states gives the same report
    assert_same_report(report_from_shards(spec, reference, states[::-1]), single)


def test_a_shard_counted_twice_or_missing_changes_the_result(world: dict) -> None:
    """The merge is only right when every shard's state enters it exactly once."""
    model, spec, reference, x, y = world["model"], world["spec"], world["reference"], world["x"], world["y"]
    states = [index_shard(model, spec, reference, s, device="cpu") for s in split_batch(x, y, shard_size=30)]
    assert report_from_shards(spec, reference, states[:2]).samples == 60
    with pytest.raises(InputError, match=r"id \d+ was given twice"):
        report_from_shards(spec, reference, [*states, states[1]])


def test_bad_shard_requests_are_one_sentence(world: dict) -> None:
    x, y = world["x"], world["y"]
    with pytest.raises(InputError, match="shard_size=0"):
        split_batch(x, y, shard_size=0)
    with pytest.raises(InputError, match="one row per image"):
        split_batch(x, y[:5], shard_size=10)
    with pytest.raises(InputError, match="one tensor"):
        split_batch([x], shard_size=10)
    with pytest.raises(InputError, match="no shard state"):
        report_from_shards(world["spec"], world["reference"], [])
