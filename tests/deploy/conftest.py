"""Fixtures of the deployment tests: the flow tests' trained model and bootstrapped pipeline,
and a real Prefect server with work pools and process workers on PostgreSQL."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

FLOW_TESTS = Path(__file__).resolve().parents[1] / "flows"
if str(FLOW_TESTS) not in sys.path:
    sys.path.insert(0, str(FLOW_TESTS))

# The same fixtures as the flow tests (one trained model, a bootstrapped pipeline), loaded
# under a name of their own so that the two conftest modules do not collide.
_spec = importlib.util.spec_from_file_location("shiftcost_flow_fixtures", FLOW_TESTS / "conftest.py")
assert _spec is not None and _spec.loader is not None
_flow_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_flow_fixtures)

trained_model = _flow_fixtures.trained_model
pipeline_env = _flow_fixtures.pipeline_env
prefect_server = _flow_fixtures.prefect_server
