"""Memory bombs are refused from their headers, before anything is allocated for them."""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from shiftcost.data import build_model, load_batch, load_model
from shiftcost.errors import InputError


@pytest.fixture
def small_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHIFTCOST_MAX_BATCH_BYTES", str(2**20))  # 1 MiB
    monkeypatch.setenv("SHIFTCOST_MAX_BATCH_IMAGES", "50")


def test_a_small_npz_declaring_a_large_array_is_refused_before_it_is_allocated(tmp_path: Path, small_limits) -> None:
    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, x=np.zeros((40, 3, 256, 256), np.uint8))  # 7.9 MB declared, a few kB on disk
    assert bomb.stat().st_size < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=r"bomb.npz declares 7.5 MiB of arrays, more than the 1 MiB allowed \(SHIFTCOST_MAX_BATCH_BYTES\)"):
            load_batch(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_too_many_images_are_refused_from_the_header(tmp_path: Path, small_limits) -> None:
    many = tmp_path / "many.npz"
    np.savez(many, x=np.zeros((60, 1, 4, 4), np.uint8))
    with pytest.raises(InputError, match="many.npz holds 60 images, more than the 50 allowed"):
        load_batch(many)


def test_a_pt_batch_declaring_large_storages_is_refused(tmp_path: Path, small_limits) -> None:
    big = tmp_path / "big.pt"
    torch.save({"x": torch.zeros(8, 3, 128, 128)}, big)  # 1.5 MiB of float32
    with pytest.raises(InputError, match="big.pt declares"):
        load_batch(big)


def test_an_image_folder_with_too_many_images_is_refused_before_reading_them(tmp_path: Path, small_limits) -> None:
    from PIL import Image

    folder = tmp_path / "folder" / "cat"
    folder.mkdir(parents=True)
    for i in range(51):
        Image.new("L", (4, 4)).save(folder / f"{i}.png")
    with pytest.raises(InputError, match="holds 51 images"):
        load_batch(tmp_path / "folder")


@pytest.mark.parametrize(
    ("architecture", "kwargs", "words"),
    [
        ("digits_cnn", {"in_channels": 10**9}, "1000000000 input channels"),
        ("vit_b_16", {"image_size": 48_000}, "48000-pixel images"),
    ],
)
def test_a_model_spec_asking_for_too_much_is_refused_before_the_model_is_built(architecture, kwargs, words) -> None:
    with pytest.raises(InputError, match=words):  # once untraced, so imports do not count below
        build_model(architecture, 10, **kwargs)
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=words):
            build_model(architecture, 10, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000  # the refused model would take 27.6 GB (vit) or 576 GB (in_channels)


def test_an_edited_spec_in_a_model_file_is_refused_with_the_file_named(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model, spec = build_model("digits_cnn", 10, image_size=8)
    edited = spec.to_dict() | {"in_channels": 1_000_000_000}
    path = tmp_path / "edited.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"shiftcost_spec": json.dumps(edited)})
    with pytest.raises(InputError, match="edited.safetensors cannot be rebuilt.*input channels"):
        load_model(path)


def test_a_safetensors_header_declaring_huge_tensors_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHIFTCOST_MAX_MODEL_BYTES", str(2**20))
    header = json.dumps({"w": {"dtype": "F32", "shape": [1024, 1024], "data_offsets": [0, 4 * 2**20]}}).encode()
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(InputError, match="huge.safetensors declares 4 MiB of tensors"):
        load_model(path)
