"""Model building by name, file round trips, and refusal of every bad model file."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from shiftcost.data.models import (
    ModelSpec,
    available_architectures,
    build_model,
    load_model,
    model_fingerprint,
    save_model,
)
from shiftcost.errors import InputError

FORMATS = (".safetensors", ".pt")


def _digits_model() -> tuple[nn.Module, ModelSpec]:
    torch.manual_seed(0)
    model, spec = build_model("digits_cnn", 10)
    # Move the batch-norm running statistics off their initial values so buffers are tested too.
    model.train()
    with torch.no_grad():
        model(torch.rand(32, 1, 16, 16))
    return model.eval(), spec


# ------------------------------------------------------------------------------ building


@pytest.mark.parametrize(
    ("architecture", "in_channels", "image_size", "classifier"),
    [
        ("digits_cnn", 1, 16, "fc"),
        ("cifar_resnet18", 3, 32, "fc"),
        ("resnet18", 3, 64, "fc"),
        ("mobilenet_v3_small", 3, 64, "classifier.3"),
        ("squeezenet1_1", 3, 64, "classifier.1"),
    ],
)
def test_built_models_produce_one_logit_per_class(architecture, in_channels, image_size, classifier):
    model, spec = build_model(architecture, 7, in_channels=in_channels, image_size=image_size)
    assert spec.classifier == classifier
    assert spec.input_shape == (in_channels, image_size, image_size)
    assert spec.classes == tuple(str(i) for i in range(7))
    with torch.no_grad():
        logits = model(torch.rand(2, in_channels, image_size, image_size))
    assert logits.shape == (2, 7)
    head = model.get_submodule(spec.classifier)
    assert getattr(head, "out_features", getattr(head, "out_channels", None)) == 7


def test_a_built_in_architecture_loads_without_importing_torchvision(tmp_path: Path) -> None:
    # torchvision's import is most of `shiftcost index`'s start-up; a digits CNN needs none of it.
    model, spec = build_model("digits_cnn", 3, image_size=8)
    path = save_model(model, spec, tmp_path / "model.safetensors")
    script = f"import sys; from shiftcost.data import load_model; load_model({str(path)!r}); print('torchvision' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False", done.stderr


def test_digits_cnn_defaults_to_one_channel_16_pixels_and_a_penultimate_wider_than_the_classes():
    model, spec = build_model("digits_cnn", 10)
    assert spec.input_shape == (1, 16, 16)
    assert model.get_submodule(spec.classifier).in_features > 10


def test_cifar_resnet18_keeps_spatial_resolution_in_the_stem():
    model, _ = build_model("cifar_resnet18", 10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)


def test_torchvision_model_is_adapted_to_grey_input():
    model, spec = build_model("resnet18", 4, in_channels=1, image_size=32)
    assert model.conv1.in_channels == 1
    with torch.no_grad():
        assert model(torch.rand(2, 1, 32, 32)).shape == (2, 4)


def test_class_names_are_kept_and_must_match_the_class_count():
    _, spec = build_model("digits_cnn", 3, classes=["cat", "dog", "eel"])
    assert spec.classes == ("cat", "dog", "eel")
    with pytest.raises(InputError, match="class names"):
        build_model("digits_cnn", 3, classes=["cat", "dog"])


@pytest.mark.parametrize(("typo", "suggestion"), [("resnet19", "resnet18"), ("mobilenet_v3_smal", "mobilenet_v3_small"), ("digit_cnn", "digits_cnn")])
def test_unknown_architecture_suggests_close_names(typo, suggestion):
    with pytest.raises(InputError) as caught:
        build_model(typo, 10)
    assert repr(typo) in str(caught.value) and suggestion in str(caught.value)


def test_available_architectures_covers_custom_and_torchvision_names():
    names = available_architectures()
    assert {"digits_cnn", "cifar_resnet18", "resnet18", "mobilenet_v3_small", "vit_b_16"} <= set(names)


def test_spec_survives_json():
    _, spec = build_model("digits_cnn", 3, classes=["a", "b", "c"])
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_spec_with_wrong_class_count_is_refused():
    data = build_model("digits_cnn", 3)[1].to_dict()
    data["classes"] = ["a"]
    with pytest.raises(InputError, match="classes"):
        ModelSpec.from_dict(data)


# ------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", FORMATS)
def test_save_load_round_trip_gives_identical_outputs_and_fingerprint(tmp_path, suffix):
    model, spec = _digits_model()
    path = save_model(model, spec, tmp_path / f"model{suffix}")
    loaded, loaded_spec = load_model(path)
    x = torch.rand(8, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded_spec == spec
    assert not loaded.training
    assert model_fingerprint(loaded) == model_fingerprint(model)
    assert model_fingerprint(load_model(path)[0]) == model_fingerprint(model)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_both_formats_hold_the_same_weights(tmp_path):
    model, spec = _digits_model()
    a, _ = load_model(save_model(model, spec, tmp_path / "m.safetensors"))
    b, _ = load_model(save_model(model, spec, tmp_path / "m.pt"))
    assert model_fingerprint(a) == model_fingerprint(b)


def test_fingerprint_sees_any_change_of_value_name_or_dtype():
    model, _ = _digits_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base = model_fingerprint(state)
    assert model_fingerprint(model) == base
    nudged = dict(state)
    nudged["fc.bias"] = torch.nextafter(state["fc.bias"], torch.full_like(state["fc.bias"], 1e9))
    renamed = {("head." + k if k.startswith("fc.") else k): v for k, v in state.items()}
    retyped = dict(state, **{"fc.bias": state["fc.bias"].double()})
    digests = {base, model_fingerprint(nudged), model_fingerprint(renamed), model_fingerprint(retyped)}
    assert len(digests) == 4
    assert all(len(d) == 64 and int(d, 16) >= 0 for d in digests)


def test_bare_state_dict_loads_when_the_spec_is_given(tmp_path):
    model, spec = _digits_model()
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(InputError, match="no model spec") as caught:
        load_model(path)
    assert str(path) in str(caught.value)
    loaded, loaded_spec = load_model(path, spec=spec)
    assert loaded_spec == spec and model_fingerprint(loaded) == model_fingerprint(model)


# ---------------------------------------------------------------------------- bad files


def _assert_refused(path: Path, match: str | None = None, **kwargs) -> InputError:
    with pytest.raises(InputError) as caught:
        load_model(path, **kwargs)
    message = str(caught.value)
    assert str(path) in message, message
    assert "\n" not in message
    if match is not None:
        assert match in message, message
    return caught.value


@pytest.mark.parametrize("suffix", FORMATS)
def test_truncated_model_file_is_refused(tmp_path, suffix):
    model, spec = _digits_model()
    path = save_model(model, spec, tmp_path / f"model{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _assert_refused(path)


@pytest.mark.parametrize("suffix", FORMATS)
def test_random_bytes_are_refused(tmp_path, suffix):
    path = tmp_path / f"noise{suffix}"
    path.write_bytes(os.urandom(4096))
    _assert_refused(path)


class _Payload:
    """Unpickling this would write a marker file: proof that arbitrary code ran."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_python_object_is_never_unpickled(tmp_path):
    model, spec = _digits_model()
    payload = _Payload()
    payload.marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        torch.save({"spec": spec.to_dict(), "state_dict": model.state_dict(), "extra": payload}, handle)
    # The marker only appears if unpickling executes the payload.
    assert not payload.marker.exists()
    _assert_refused(path)
    assert not payload.marker.exists()
    pickle.loads(pickle.dumps(payload))  # the payload is live: plain pickle does run it
    assert payload.marker.exists()


def test_a_whole_pickled_model_is_refused_in_one_plain_sentence_that_says_how_to_save_it(tmp_path):
    model, _ = _digits_model()
    path = tmp_path / "whole.pt"
    torch.save(model, path)  # the module itself, not its state dict
    message = str(_assert_refused(path, "pickled Python objects, such as a whole model saved with torch.save(model)"))
    assert "model.state_dict()" in message and "\x1b" not in message and "Weights only load failed" not in message


def test_a_truncated_model_file_names_the_damage(tmp_path):
    model, spec = _digits_model()
    whole = tmp_path / "whole.pt"
    torch.save({"spec": spec.to_dict(), "state_dict": model.state_dict()}, whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    _assert_refused(cut, "truncated, or not a file torch.save wrote")


def test_file_that_is_not_a_model_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    _assert_refused(path, "no model weights")


def test_state_dict_of_another_shape_is_refused(tmp_path):
    model, spec = _digits_model()
    path = tmp_path / "five.pt"
    wrong = ModelSpec.from_dict({**spec.to_dict(), "num_classes": 5, "classes": list("abcde")})
    torch.save({"spec": wrong.to_dict(), "state_dict": model.state_dict()}, path)
    _assert_refused(path, "fc.weight")


def test_state_dict_of_another_architecture_is_refused(tmp_path):
    other, _ = build_model("cifar_resnet18", 10)
    _, spec = build_model("digits_cnn", 10)
    path = tmp_path / "other.safetensors"
    save_model(other, spec, path)
    _assert_refused(path, "does not match architecture 'digits_cnn'")


def test_safetensors_without_spec_is_refused(tmp_path):
    model, _ = _digits_model()
    path = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    _assert_refused(path, "no model spec")


def test_spec_naming_an_unknown_architecture_is_refused(tmp_path):
    model, spec = _digits_model()
    path = tmp_path / "renamed.pt"
    torch.save({"spec": {**spec.to_dict(), "architecture": "digits_cnm"}, "state_dict": model.state_dict()}, path)
    error = _assert_refused(path, "digits_cnn")
    assert "did you mean" in str(error)


def test_non_finite_weights_are_refused(tmp_path):
    model, spec = _digits_model()
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    path = save_model(model, spec, tmp_path / "nan.safetensors")
    _assert_refused(path, "non-finite")


def test_missing_file_and_unknown_suffix_are_refused(tmp_path):
    _assert_refused(tmp_path / "absent.pt", "does not exist")
    other = tmp_path / "model.onnx"
    other.write_bytes(b"\x00" * 16)
    _assert_refused(other, "unknown format")
    model, spec = _digits_model()
    with pytest.raises(InputError, match="model.bin"):
        save_model(model, spec, tmp_path / "model.bin")


def test_spec_with_classes_as_one_string_is_refused():
    data = build_model("digits_cnn", 3)[1].to_dict()
    data["classes"] = "abc"
    with pytest.raises(InputError, match="list of names"):
        ModelSpec.from_dict(data)


def test_unusable_device_is_not_blamed_on_the_file(tmp_path):
    model, spec = _digits_model()
    path = save_model(model, spec, tmp_path / "m.pt")
    error = _assert_refused(path, "choose an available device", map_location="no-such-device")
    assert "'no-such-device'" in str(error)
