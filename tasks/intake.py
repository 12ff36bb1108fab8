"""Tasks of the watcher: discover batches, register each once, list what waits."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from shiftcost import pipeline
from shiftcost.config import Settings
from shiftcost.landing import LandedBatch
from tasks.common import DB_RETRIES, retry_on_passing_faults


@task(name="discover-batches", cache_policy=NO_CACHE, timeout_seconds=300, retry_condition_fn=retry_on_passing_faults, **DB_RETRIES)
def discover_batches(settings: Settings) -> list[LandedBatch]:
    """The batches now in the landing location."""
    found = pipeline.discover_batches(settings)
    get_run_logger().info("%d batch(es) in %s", len(found), settings.landing)
    return found


@task(name="register-batch", cache_policy=NO_CACHE, timeout_seconds=600, retry_condition_fn=retry_on_passing_faults, **DB_RETRIES)
def register_batch(settings: Settings, uri: str) -> pipeline.Registration:
    """Fingerprint and register one batch; known batches come back unchanged."""
    with pipeline.connect(settings) as db:
        registration = pipeline.register_batch(db, settings, uri)
    logger = get_run_logger()
    if registration.created and registration.status == "failed":
        logger.warning("batch %s registered as failed: %s", uri, registration.failure_reason)
    elif registration.created:
        logger.info("batch %s registered as batch %d", uri, registration.batch_id)
    return registration


@task(name="fail-stale-retrains", cache_policy=NO_CACHE, timeout_seconds=120, retry_condition_fn=retry_on_passing_faults, **DB_RETRIES)
def fail_stale_retrains(settings: Settings) -> list[int]:
    """Close retrain runs whose process was killed; the ids of the runs closed."""
    with pipeline.connect(settings) as db:
        closed = pipeline.fail_stale_retrains(db, settings.model_name, settings.retrain_stale_after_s)
    for outcome in closed:
        get_run_logger().warning("retrain run %d (batch %s) %s; its reservation was released", outcome.run_id, outcome.batch_id, outcome.error)
    return [outcome.run_id for outcome in closed if outcome.run_id is not None]


@task(name="requeue-deferred", cache_policy=NO_CACHE, timeout_seconds=120, retry_condition_fn=retry_on_passing_faults, **DB_RETRIES)
def requeue_deferred(settings: Settings) -> list[int]:
    """Give deferred batches whose retry time has passed back for assessment."""
    with pipeline.connect(settings) as db:
        moved = pipeline.requeue_deferred(db, settings.model_name)
    if moved:
        get_run_logger().info("deferred batch(es) %s are due again: assessing them afresh", ", ".join(map(str, moved)))
    return moved


@task(name="pending-batches", cache_policy=NO_CACHE, timeout_seconds=120, retry_condition_fn=retry_on_passing_faults, **DB_RETRIES)
def pending_batches(settings: Settings) -> list[pipeline.PendingBatch]:
    """The batches waiting for assessment (new, or left behind by a crashed run)."""
    with pipeline.connect(settings) as db:
        return pipeline.pending_batches(db, settings.model_name, settings.claim_lease_s)


@task(name="attach-landed-labels", cache_policy=NO_CACHE, timeout_seconds=120, retry_condition_fn=retry_on_passing_faults, **DB_RETRIES)
def attach_landed_labels(settings: Settings) -> list[int]:
    """Attach NAME.labels.npz files that landed beside batches awaiting their labels."""
    with pipeline.connect(settings) as db:
        attached = [done.batch_id for done in pipeline.attach_landed_labels(db, settings)]
    if attached:
        get_run_logger().info("labels came for batch(es) %s: assessing them afresh", ", ".join(map(str, attached)))
    return attached
