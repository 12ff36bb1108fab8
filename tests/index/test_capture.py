"""Activation capture: the hooked vectors equal a hand-run sub-network, and hooks never linger."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shiftcost.errors import InputError
from shiftcost.index.capture import (
    LayerCapture,
    capture_batches,
    capture_features,
    iter_chunks,
    reduce_activation,
    resolve_device,
    resolve_layers,
)

from .engine_support import single_thread  # noqa: F401 - autouse fixture
from .engine_support import LAYERS, manual_penultimate, tiny_data, tiny_model


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_default_layer_is_classifier_input_and_equals_manual_forward() -> None:
    model, spec = tiny_model()
    x, _ = tiny_data(37)
    features, logits = capture_features(model, x, None, spec=spec, batch_size=16, device="cpu")
    assert list(features) == ["fc:input"]
    expected = manual_penultimate(model, x).double()
    assert features["fc:input"].dtype == torch.float64
    # float32 convolutions in another memory format may round the last bit differently.
    torch.testing.assert_close(features["fc:input"], expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x), rtol=1e-6, atol=1e-6)


def test_conv_outputs_are_spatial_means_taken_before_inplace_relu() -> None:
    model, spec = tiny_model(double=True)
    x, _ = tiny_data(21, double=True)
    features, _ = capture_features(model, x, ["features.1", "features.6"], spec=spec, batch_size=8, device="cpu")
    with torch.no_grad():
        bn_out = model.features[1](model.features[0](x))  # features.2 is an in-place ReLU after it
        pooled = model.features[:7](x)
    torch.testing.assert_close(features["features.1"], bn_out.mean(dim=(2, 3)), rtol=0, atol=1e-12)
    torch.testing.assert_close(features["features.6"], pooled.mean(dim=(2, 3)), rtol=0, atol=1e-12)
    assert bool((bn_out < 0).any()), "the check needs negative pre-ReLU values to mean anything"


def test_tokens_average_over_sequence_and_conv1d_over_length() -> None:
    tokens = torch.randn(5, 7, 3, dtype=torch.float64)
    torch.testing.assert_close(reduce_activation(tokens), tokens.mean(dim=1))
    torch.testing.assert_close(reduce_activation(tokens, channel_first_1d=True), tokens.mean(dim=2))

    class Sequence1d(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 6, 3)
            self.embed = nn.Linear(2, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).sum() + self.embed(x.transpose(1, 2)).sum()

    model = Sequence1d().double()
    x = torch.randn(3, 2, 9, dtype=torch.float64)
    chunks = iter_chunks(x, None, 2)
    got = {"conv": [], "embed": []}
    for batch in capture_batches(model, chunks, ["conv", "embed"], device="cpu"):
        for name in got:
            got[name].append(batch.features[name])
    with torch.no_grad():
        conv = model.conv(x).mean(dim=2)  # (N, C, L) map: mean over L
        embed = model.embed(x.transpose(1, 2)).mean(dim=1)  # (N, T, D) tokens: mean over T
    torch.testing.assert_close(torch.cat(got["conv"]), conv)
    torch.testing.assert_close(torch.cat(got["embed"]), embed)


def test_capture_is_the_same_for_any_batch_size_and_for_a_stream() -> None:
    model, spec = tiny_model(double=True)
    x, y = tiny_data(23, double=True)
    whole, _ = capture_features(model, x, LAYERS, spec=spec, batch_size=64, device="cpu")
    for batch_size in (1, 7):
        part, _ = capture_features(model, x, LAYERS, spec=spec, batch_size=batch_size, device="cpu")
        for name in LAYERS:
            torch.testing.assert_close(part[name], whole[name], rtol=0, atol=1e-12)
    stream = [(x[:5], y[:5]), (x[5:6], y[5:6]), (x[6:], y[6:])]
    streamed, _ = capture_features(model, stream, LAYERS, spec=spec, device="cpu")
    for name in LAYERS:
        torch.testing.assert_close(streamed[name], whole[name], rtol=0, atol=1e-12)


def test_hooks_are_removed_after_use_after_errors_and_after_early_stop() -> None:
    model, spec = tiny_model()
    x, _ = tiny_data(20)
    assert _hook_count(model) == 0
    capture_features(model, x, LAYERS, spec=spec, batch_size=8, device="cpu")
    assert _hook_count(model) == 0

    def refuse(chunk_x: torch.Tensor, chunk_y: object) -> None:
        if chunk_x.shape[0] < 8:
            raise InputError("last chunk refused")

    with pytest.raises(InputError, match="last chunk refused"):
        for _ in capture_batches(model, iter_chunks(x, None, 8), LAYERS, device="cpu", check_chunk=refuse):
            assert _hook_count(model) == len(LAYERS)
    assert _hook_count(model) == 0

    passes = capture_batches(model, iter_chunks(x, None, 4), LAYERS, device="cpu")
    next(passes)
    assert _hook_count(model) == len(LAYERS)
    passes.close()
    assert _hook_count(model) == 0


def test_training_flag_is_restored() -> None:
    model, spec = tiny_model()
    model.train()
    x, _ = tiny_data(10)
    capture_features(model, x, None, spec=spec, device="cpu")
    assert model.training


def test_unknown_layer_names_it_and_lists_close_matches() -> None:
    model, spec = tiny_model()
    with pytest.raises(InputError) as caught:
        resolve_layers(model, ["featurs.6"], spec)
    message = str(caught.value)
    assert "'featurs.6'" in message
    assert "features.6" in message.split("Close matches:")[1]
    with pytest.raises(InputError, match="does not exist"):
        resolve_layers(model, ["fcc:input"], spec)
    assert resolve_layers(model, None, spec) == ["fc:input"]
    assert resolve_layers(model, ["features.6", "fc:input", "features.6"], spec) == ["features.6", "fc:input"]


def test_layer_the_forward_pass_never_reaches_is_refused() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.spare = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    model = Unused()
    with pytest.raises(InputError, match="'spare' was not reached"):
        list(capture_batches(model, iter_chunks(torch.randn(4, 3), None, 2), ["spare"], device="cpu"))


def test_bf16_autocast_stays_close_to_float32_and_returns_float64() -> None:
    model, spec = tiny_model()
    x, _ = tiny_data(16)
    exact, _ = capture_features(model, x, None, spec=spec, device="cpu")
    rounded, _ = capture_features(model, x, None, spec=spec, device="cpu", autocast=True)
    assert rounded["fc:input"].dtype == torch.float64
    torch.testing.assert_close(rounded["fc:input"], exact["fc:input"], rtol=0.05, atol=0.02)


def test_device_names() -> None:
    assert resolve_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(InputError, match="not a device name"):
        resolve_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            resolve_device("cuda")


def test_layer_capture_context_manager_pops_each_pass() -> None:
    model, _ = tiny_model()
    x, _ = tiny_data(6)
    with LayerCapture(model, ["fc:input"]) as capture, torch.no_grad():
        model(x)
        first = capture.pop()
        with pytest.raises(InputError, match="not reached"):
            capture.pop()  # the buffer is emptied by each pop
    assert first["fc:input"].shape == (6, 64)
    assert _hook_count(model) == 0
