"""Prefect flows: watch, assess, retrain.

``watch`` polls the landing location, registers each new batch once and hands every
waiting batch to ``assess``; ``assess`` makes one forward pass, tests for drift, predicts
the cost, decides under the budgets and stores it all, handing a retrain decision to
``retrain``; ``retrain`` retrains with the energy measured, settles the ledger, refits the
cost model and registers the new model version. Hand-offs run inline as subflows
(embedded mode) or as deployments on the work pools (``flow_mode = "deployment"``).

Every flow takes ``overrides``: settings to change for this run (non-secret ones; the
database URL with its password belongs in the environment, not in flow parameters,
which the Prefect server stores).
"""

import os

# No usage statistics leave an air-gapped host unless asked for.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect's ephemeral API runs its database migrations on a fresh PREFECT_HOME before it
# answers; on a 2-core host just after a test run that took more than Prefect's default 20 s
# and a first `make demo` stopped with "Timed out while attempting to connect to ephemeral
# Prefect API server" (the same command right after went through in 66 s).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
