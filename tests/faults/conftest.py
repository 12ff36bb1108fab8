"""The pipeline fixtures of ``tests/flows`` (a bootstrapped model, settings, a landing folder),
shared with the fault tests without copying them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_FLOWS = Path(__file__).resolve().parent.parent / "flows"
if str(_FLOWS) not in sys.path:
    sys.path.insert(0, str(_FLOWS))

_spec = importlib.util.spec_from_file_location("tests_flows_fixtures", _FLOWS / "conftest.py")
assert _spec is not None and _spec.loader is not None
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)

prefect_server = _fixtures.prefect_server
trained_model = _fixtures.trained_model
pipeline_env = _fixtures.pipeline_env
