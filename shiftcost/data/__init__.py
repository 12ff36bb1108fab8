"""Models, batches and the demo data: everything that turns files into tensors and modules.

Imports only torch, torchvision, numpy, safetensors and (for the demo) scikit-learn.
"""

from shiftcost.data.batches import Batch, check_batch, content_fingerprint, load_batch, save_batch
from shiftcost.data.models import (
    ModelSpec,
    available_architectures,
    build_model,
    find_classifier,
    load_model,
    model_fingerprint,
    save_model,
)

__all__ = [
    "Batch",
    "ModelSpec",
    "available_architectures",
    "build_model",
    "check_batch",
    "content_fingerprint",
    "find_classifier",
    "load_batch",
    "load_model",
    "model_fingerprint",
    "save_batch",
    "save_model",
]
