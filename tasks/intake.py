"""Tasks of the watcher: discover new entries, register each once, list what waits, archive."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from shiftcost import pipeline
from shiftcost.config import Settings
from shiftcost.landing import LandedBatch
from tasks.common import DB_RETRIES, retry_on_passing_faults


@task(name="discover-batches", cache_policy=NO_CACHE, timeout_seconds=300, retry_condition_fn=retry_on_passing_faults, **DB_RETRIES)
def discover_batches(settings: Settings) -> list[LandedBatch]:
    """The entries of the landing location not known yet (known ones are skipped unread)."""
    with pipeline.connect(settings) as db:
        found = pipeline.discover_batches(db, settings)
    if found:
        get_run_logger().info("%d new entr%s in %s", len(found), "y" if len(found) == 1 else "ies", settings.landing)
    return found


@task(name="register-batch", cache_policy=NO_CACHE, timeout_seconds=600, retry_condition_fn=retry_on_passing_faults, **DB_RETRIES)
def register_batch(settings: Settings, landed: LandedBatch) -> pipeline.Registration:
    """Examine, fingerprint and register one landed entry; known batches come back unchanged."""
    with pipeline.connect(settings) as db:
        registration = pipeline.register_landed(db, settings, landed)
    logger = get_run_logger()
    if registration.entry_state == "duplicate":
        logger.info("%s holds the same bytes as batch %d: recorded as its duplicate", landed.uri, registration.batch_id)
    elif registration.created and registration.status == "failed":
        logger.warning("batch %s registered as failed: %s", landed.uri, registration.failure_reason)
    elif registration.created:
        logger.info("batch %s registered as batch %d", landed.uri, registration.batch_id)
    return registration


@task(name="archive-processed", cache_policy=NO_CACHE, timeout_seconds=600, retry_condition_fn=retry_on_passing_faults, **DB_RETRIES)
def archive_processed(settings: Settings) -> pipeline.ArchiveReport:
    """Move processed landing entries to the archive and delete those past their retention."""
    with pipeline.connect(settings) as db:
        report = pipeline.archive_processed(db, settings)
    logger = get_run_logger()
    if report.archived or report.purged:
        logger.info("archived %d landing entr(ies), deleted %d past retention", len(report.archived), len(report.purged))
    for problem in report.problems:
        logger.warning(problem)
    return report


@task(name="fail-stale-retrains", cache_policy=NO_CACHE, timeout_seconds=120, retry_condition_fn=retry_on_passing_faults, **DB_RETRIES)
def fail_stale_retrains(settings: Settings) -> list[int]:
    """Close retrain runs whose process was killed; the ids of the runs closed."""
    with pipeline.connect(settings) as db:
        closed = pipeline.fail_stale_retrains(db, settings.model_name, settings.retrain_stale_after_s)
    for outcome in closed:
        held = ("its reservation was settled at that price" if outcome.settled
                else "its reservation was released" if outcome.released else "it held no open reservation")
        get_run_logger().warning("retrain run %d (batch %s) %s; %s", outcome.run_id, outcome.batch_id, outcome.error, held)
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
