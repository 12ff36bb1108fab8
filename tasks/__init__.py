"""Prefect tasks: thin wrappers over the ``shiftcost.pipeline`` steps.

Each task adds what orchestration needs and nothing else: retries for passing faults
(the database or the landing location out of reach), timeouts, logging, and the ``gpu``
tag on the tasks that run the model, so that a tag concurrency limit
(``prefect concurrency-limit create gpu 1``) keeps them from sharing a device. The other
tasks carry no tag: a tagged task asks the API for a concurrency slot every time it runs.
Results live in memory only (nothing is persisted), so a retried flow recomputes them;
the database guards against processing a batch twice.
"""

import os

# No usage statistics leave an air-gapped host unless asked for.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
