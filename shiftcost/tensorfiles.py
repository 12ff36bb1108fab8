"""Reading tensor files without running code from them, each failure one sentence.

``damaged`` turns the underlying error, already cut to one short line, into the sentence
the user sees: it names the file and says what to do, which only the caller knows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from shiftcost.errors import InputError, short_error


def read_safetensors(path: Path, damaged: Callable[[str], str]) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file, on CPU."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises its own, OS and value errors for damage
        raise InputError(damaged(short_error(error))) from None
    return metadata, tensors


def load_tensors_only(path: Path, damaged: Callable[[str], str]) -> Any:
    """``torch.load`` restricted to tensors and plain containers (no pickled code), on CPU.

    ``damaged`` gets what is wrong with the file: that it holds pickled objects (torch's own
    refusal is a page of advice on loading them anyway, which shiftcost never does), or the
    underlying error of a truncated or foreign file.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling refusals, truncated zips, foreign bytes
        if str(error).startswith("Weights only load failed"):
            why = "it holds pickled Python objects, such as a whole model saved with torch.save(model), and loading them would run code"
        else:
            why = f"truncated, or not a file torch.save wrote: {short_error(error)}"
        raise InputError(damaged(why)) from None
