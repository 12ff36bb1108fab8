"""Batches from .npz, .pt and ImageFolder trees; layouts, round trips and bad input."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shiftcost.data.batches import Batch, check_batch, content_fingerprint, load_batch, save_batch
from shiftcost.data.models import build_model
from shiftcost.errors import InputError

SPEC = build_model("digits_cnn", 10)[1]


def _images(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 16, 16), dtype=np.uint8)


def _refused(path: Path, match: str | None = None, **kwargs) -> str:
    with pytest.raises(InputError) as caught:
        load_batch(path, **kwargs)
    message = str(caught.value)
    assert str(path) in message, message
    if match is not None:
        assert match in message, message
    return message


# -------------------------------------------------------------------- layouts and scaling


@pytest.mark.parametrize("layout", ["NHW", "NHWC", "NCHW"])
def test_uint8_layouts_normalise_to_float_channels_first(tmp_path, layout):
    grey = _images()
    expected = torch.from_numpy(grey.astype(np.float32) / np.float32(255)).unsqueeze(1)
    stored = {"NHW": grey, "NHWC": grey[..., None], "NCHW": grey[:, None]}[layout]
    path = tmp_path / "x.npz"
    np.savez(path, x=stored, y=np.arange(6) % 3)
    batch = load_batch(path, spec=SPEC)
    assert batch.x.dtype == torch.float32 and batch.x.shape == (6, 1, 16, 16)
    assert torch.equal(batch.x, expected)
    assert batch.y.dtype == torch.int64 and batch.y.tolist() == [0, 1, 2, 0, 1, 2]
    assert batch.source == str(path)


def test_rgb_channels_last_is_transposed(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, size=(3, 8, 10, 3), dtype=np.uint8)
    path = tmp_path / "rgb.npz"
    np.savez(path, x=rgb)
    batch = load_batch(path)
    assert batch.x.shape == (3, 3, 8, 10) and batch.y is None
    assert float(batch.x[1, 2, 4, 7]) == pytest.approx(rgb[1, 4, 7, 2] / 255)


def test_float_images_are_kept_and_out_of_range_floats_refused(tmp_path):
    x = np.random.default_rng(2).random((4, 1, 16, 16)).astype(np.float64)
    path = tmp_path / "float.npz"
    np.savez(path, x=x)
    assert torch.equal(load_batch(path).x, torch.from_numpy(x.astype(np.float32)))
    np.savez(path, x=x * 255)
    _refused(path, "[0, 1]")


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_save_load_round_trip(tmp_path, suffix):
    x = torch.rand(5, 3, 12, 12)
    batch = Batch(x=x, y=torch.tensor([0, 2, 1, 2, 0]), source="memory", classes=("ant", "bee", "cat"))
    path = save_batch(batch, tmp_path / f"batch{suffix}")
    loaded = load_batch(path)
    assert torch.equal(loaded.x, x) and torch.equal(loaded.y, batch.y)
    assert loaded.classes == batch.classes
    assert loaded.source == str(path)
    unlabelled = load_batch(save_batch(Batch(x=x, y=None, source="m"), tmp_path / f"bare{suffix}"))
    assert unlabelled.y is None and unlabelled.classes is None


def test_pt_file_of_plain_tensors_loads(tmp_path):
    path = tmp_path / "plain.pt"
    x = torch.randint(0, 256, (4, 16, 16), dtype=torch.uint8)
    torch.save({"x": x, "y": torch.tensor([1, 2, 3, 4])}, path)
    batch = load_batch(path, spec=SPEC)
    assert torch.equal(batch.x, x.float().unsqueeze(1) / 255)


# ------------------------------------------------------------------------------ bad input


def test_nan_values_are_refused(tmp_path):
    x = np.random.default_rng(3).random((4, 1, 16, 16)).astype(np.float32)
    x[2, 0, 3, 3] = np.nan
    path = tmp_path / "nan.npz"
    np.savez(path, x=x)
    _refused(path, "non-finite")


def test_empty_batch_is_refused(tmp_path):
    path = tmp_path / "empty.npz"
    np.savez(path, x=np.zeros((0, 1, 16, 16), dtype=np.uint8), y=np.zeros(0, dtype=np.int64))
    _refused(path, "empty")
    pt = tmp_path / "empty.pt"
    torch.save({"x": torch.zeros(0, 16, 16)}, pt)
    _refused(pt, "empty")


def test_wrong_shape_for_the_model_names_expected_and_got(tmp_path):
    path = tmp_path / "big.npz"
    np.savez(path, x=np.zeros((2, 1, 28, 28), dtype=np.uint8))
    message = _refused(path, spec=SPEC)
    assert "(1, 28, 28)" in message and "(1, 16, 16)" in message


def test_three_channel_batch_for_a_grey_model_is_refused(tmp_path):
    path = tmp_path / "rgb.pt"
    torch.save({"x": torch.rand(2, 3, 16, 16)}, path)
    _refused(path, "(3, 16, 16)", spec=SPEC)


@pytest.mark.parametrize(
    ("y", "match"),
    [(np.array([0, 1, 2]), "one label per image"), (np.array([0, -1, 2, 3]), "negative"), (np.array([0.5, 1, 2, 3]), "non-integer")],
)
def test_bad_labels_are_refused(tmp_path, y, match):
    path = tmp_path / "labels.npz"
    np.savez(path, x=np.zeros((4, 16, 16), dtype=np.uint8), y=y)
    _refused(path, match)


def test_labels_out_of_the_model_range_are_refused_by_check(tmp_path):
    path = tmp_path / "eleven.npz"
    np.savez(path, x=_images(3), y=np.array([0, 9, 10]))
    batch = load_batch(path, spec=SPEC)
    with pytest.raises(InputError) as caught:
        check_batch(batch, SPEC)
    assert str(path) in str(caught.value) and "0..9" in str(caught.value)


def test_check_batch_refuses_what_the_model_cannot_take():
    good = Batch(x=torch.rand(2, 1, 16, 16), y=torch.tensor([0, 9]), source="good.npz")
    check_batch(good, SPEC)
    cases = {
        "channels": Batch(x=torch.rand(2, 3, 16, 16), y=None, source="c.npz"),
        "resize": Batch(x=torch.rand(2, 1, 8, 8), y=None, source="s.npz"),
        "empty": Batch(x=torch.rand(0, 1, 16, 16), y=None, source="e.npz"),
        "non-finite": Batch(x=torch.full((2, 1, 16, 16), float("inf")), y=None, source="f.npz"),
        "one label per image": Batch(x=torch.rand(2, 1, 16, 16), y=torch.tensor([1]), source="l.npz"),
    }
    for match, batch in cases.items():
        with pytest.raises(InputError, match=match) as caught:
            check_batch(batch, SPEC)
        assert batch.source in str(caught.value)


def test_truncated_and_foreign_files_are_refused(tmp_path):
    path = save_batch(Batch(x=torch.rand(50, 1, 16, 16), y=None, source="m"), tmp_path / "cut.npz")
    path.write_bytes(path.read_bytes()[:1000])
    _refused(path)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(2048))
    _refused(noise)
    text = tmp_path / "notes.npz"
    text.write_text("not an archive")
    _refused(text)


def test_pickled_objects_are_refused(tmp_path):
    npz = tmp_path / "objects.npz"
    np.savez(npz, x=np.array([{"a": 1}, None], dtype=object))
    _refused(npz)
    pt = tmp_path / "objects.pt"
    torch.save({"x": torch.rand(2, 1, 16, 16), "extra": Path("/")}, pt)
    _refused(pt)


def test_missing_x_unknown_suffix_and_missing_file(tmp_path):
    path = tmp_path / "nox.npz"
    np.savez(path, images=_images(2))
    _refused(path, '"x"')
    other = tmp_path / "batch.csv"
    other.write_text("1,2,3")
    _refused(other, "unknown format")
    _refused(tmp_path / "absent.npz", "does not exist")
    with pytest.raises(InputError, match="batch.csv"):
        save_batch(Batch(x=torch.rand(1, 1, 2, 2), y=None, source="m"), other)


# ---------------------------------------------------------------------------- ImageFolder


def _write_folder(root: Path, layout: dict[str, list[tuple[str, int, tuple[int, int]]]]) -> None:
    """layout: class -> [(mode, grey value, (width, height))]; images are flat colour."""
    for name, images in layout.items():
        (root / name).mkdir(parents=True)
        for index, (mode, value, size) in enumerate(images):
            colour = value if mode == "L" else (value, value, value)
            Image.new(mode, size, colour).save(root / name / f"{index}.png")


def test_image_folder_is_resized_converted_and_labelled_by_the_model_classes(tmp_path):
    _write_folder(tmp_path, {"3": [("L", 128, (20, 20)), ("RGB", 64, (30, 24))], "7": [("L", 255, (16, 16))]})
    batch = load_batch(tmp_path, spec=SPEC)
    assert batch.x.shape == (3, 1, 16, 16) and batch.x.dtype == torch.float32
    # Flat images stay flat through resizing, so each pixel is the grey level (the RGB
    # one through ITU-R 601 weights, which sum to 0.9999).
    for image, value in zip(batch.x, (128, 64, 255)):
        assert torch.allclose(image, torch.full_like(image, value / 255), atol=1e-4)
    assert batch.y.tolist() == [3, 3, 7]
    assert batch.classes == SPEC.classes


def test_image_folder_of_a_new_label_space_keeps_folder_labels(tmp_path):
    _write_folder(tmp_path, {"cat": [("L", 10, (16, 16))], "dog": [("L", 20, (16, 16))] * 2})
    batch = load_batch(tmp_path, spec=SPEC)
    assert batch.classes == ("cat", "dog") and batch.y.tolist() == [0, 1, 1]


def test_a_labelled_batch_naming_a_class_the_model_lacks_is_refused_by_check(tmp_path):
    # Its folder labels count its own classes ("11" would be read as the model's "1").
    _write_folder(tmp_path, {"0": [("L", 10, (16, 16))], "11": [("L", 20, (16, 16))] * 2})
    batch = load_batch(tmp_path, spec=SPEC)
    assert batch.classes == ("0", "11") and batch.y.tolist() == [0, 1, 1]
    with pytest.raises(InputError) as caught:
        check_batch(batch, SPEC)
    message = str(caught.value)
    assert str(tmp_path) in message and "no output for (11;" in message and "the model knows 0, 1, 2" in message
    check_batch(Batch(x=batch.x, y=None, source=batch.source, classes=batch.classes), SPEC)  # a new task's images pass


def test_tensor_files_naming_their_classes_get_the_model_s_label_ids(tmp_path):
    path = tmp_path / "named.npz"
    np.savez(path, x=_images(3), y=np.array([0, 1, 1]), classes=np.array(["9", "0"]))
    batch = load_batch(path, spec=SPEC)
    assert batch.y.tolist() == [9, 0, 0] and batch.classes == SPEC.classes
    check_batch(batch, SPEC)
    assert load_batch(path).y.tolist() == [0, 1, 1]  # without a model, as stored

    short = tmp_path / "short.npz"
    np.savez(short, x=_images(3), y=np.array([0, 1, 2]), classes=np.array(["9", "0"]))
    _refused(short, "has label 2 but names only 2 classes", spec=SPEC)


def test_image_folder_without_spec_keeps_size_and_grey_channel(tmp_path):
    _write_folder(tmp_path, {"a": [("L", 40, (9, 7))], "b": [("L", 80, (9, 7))]})
    batch = load_batch(tmp_path)
    assert batch.x.shape == (2, 1, 7, 9)
    _write_folder(tmp_path / "rgb", {"a": [("RGB", 40, (5, 5))]})
    assert load_batch(tmp_path / "rgb").x.shape == (1, 3, 5, 5)


def test_image_folder_rgb_model_gets_three_channels(tmp_path):
    _write_folder(tmp_path, {"a": [("L", 200, (40, 40))]})
    _, spec = build_model("cifar_resnet18", 1, classes=["a"])
    batch = load_batch(tmp_path, spec=spec)
    assert batch.x.shape == (1, 3, 32, 32)
    assert torch.allclose(batch.x, torch.full_like(batch.x, 200 / 255), atol=1e-6)


def test_image_folder_of_mixed_sizes_without_spec_names_the_image(tmp_path):
    _write_folder(tmp_path, {"a": [("L", 1, (8, 8)), ("L", 1, (9, 9))]})
    message = _refused(tmp_path, "resize")
    assert "1.png" in message


def test_unreadable_image_is_named(tmp_path):
    _write_folder(tmp_path, {"a": [("L", 1, (8, 8))]})
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    message = _refused(tmp_path)
    assert "broken.png" in message


def test_empty_or_flat_directory_is_refused(tmp_path):
    _refused(tmp_path)
    (tmp_path / "loose.png").write_bytes(b"")
    _refused(tmp_path)


# ----------------------------------------------------------------------------- fingerprint


def test_content_fingerprint_of_a_file_is_its_sha256(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"shift" * 1000)
    assert content_fingerprint(path) == hashlib.sha256(b"shift" * 1000).hexdigest()


def test_content_fingerprint_of_a_directory_follows_names_and_bytes(tmp_path):
    def tree(root: Path, files: dict[str, bytes]) -> str:
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        return content_fingerprint(root)

    base = tree(tmp_path / "a", {"x/1.png": b"one", "y/2.png": b"two"})
    assert tree(tmp_path / "b", {"y/2.png": b"two", "x/1.png": b"one"}) == base  # creation order is irrelevant
    assert tree(tmp_path / "c", {"x/1.png": b"one", "y/3.png": b"two"}) != base
    assert tree(tmp_path / "d", {"x/1.png": b"one", "y/2.png": b"twO"}) != base
    assert tree(tmp_path / "e", {"x/1.png": b"on", "y/2.png": b"etwo"}) != base
    with pytest.raises(InputError, match="absent"):
        content_fingerprint(tmp_path / "absent")


def test_declared_classes_read_only_the_names_and_say_none_where_there_are_none(tmp_path):
    import io
    import zipfile

    from shiftcost.data.batches import declared_classes

    for name in ("zebra", "ant", "moth"):
        (tmp_path / "folder" / name).mkdir(parents=True)
    assert declared_classes(tmp_path / "folder") == ("ant", "moth", "zebra")  # ImageFolder's order
    # An .npz whose images cannot be parsed: the names are read all the same, so the images
    # are read once, by the load that needs them, not also for the names.
    names = io.BytesIO()
    np.save(names, np.array(["cat", "dog"]))
    with zipfile.ZipFile(tmp_path / "named.npz", "w") as archive:
        archive.writestr("classes.npy", names.getvalue())
        archive.writestr("x.npy", b"not an array")
    assert declared_classes(tmp_path / "named.npz") == ("cat", "dog")
    with pytest.raises(InputError, match='"x" entry of type bytes'):
        load_batch(tmp_path / "named.npz")
    np.savez(tmp_path / "unnamed.npz", x=np.zeros((2, 8, 8), dtype=np.uint8))
    assert declared_classes(tmp_path / "unnamed.npz") is None
    torch.save({"x": torch.zeros(2, 1, 8, 8), "classes": ["cat", "dog"]}, tmp_path / "named.pt")
    assert declared_classes(tmp_path / "named.pt") == ("cat", "dog")
    # A tensor file too: its images are mapped, not read, so names come even where they would not load.
    torch.save({"x": "not images", "classes": ["cat", "dog"]}, tmp_path / "bad_images.pt")
    assert declared_classes(tmp_path / "bad_images.pt") == ("cat", "dog")
    with pytest.raises(InputError, match='"x"'):
        load_batch(tmp_path / "bad_images.pt")
    # The legacy format cannot be mapped: it is read whole, as before.
    torch.save({"x": torch.zeros(2, 1, 8, 8), "classes": ["cat", "dog"]}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert declared_classes(tmp_path / "legacy.pt") == ("cat", "dog")
    with pytest.raises(InputError, match="does not exist"):
        declared_classes(tmp_path / "missing.npz")
