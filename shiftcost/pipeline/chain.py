"""The order of the pipeline's steps, written once: the watch, assess and retrain chains.

Each chain takes a *step runner*, which decides how every step runs and how one chain
hands a batch to the next. :class:`~shiftcost.pipeline.plain.PlainSteps` calls the library
functions directly and runs the hand-offs in the same process (``watch_once``,
``process_batch``, ``assess_batch``, ``run_retrain``); the Prefect flows pass a runner that
wraps each step in its Prefect task and hands off to a subflow or a deployment run
(``flows/runner.py``). So what happens to a batch, and in which order, is the same code
with Prefect or without it; only retries, timeouts, logging and the hand-offs differ.

The protocols below are the steps a runner offers. A step's failure handling that is the
*chain's* (an ``InputError`` fails the batch, anything else gives its claim back; a
crashed retrain is recorded, then raised) lives here; a runner only decides how a step
runs and what it reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from shiftcost.errors import InputError

if TYPE_CHECKING:
    from shiftcost.costmodel import CostModel
    from shiftcost.index.engine import IndexReport
    from shiftcost.landing import LandedBatch
    from shiftcost.pipeline.assess import AssessOutcome, CostEstimate, DriftCheck, LoadedBatch
    from shiftcost.pipeline.claims import Claim, PendingBatch
    from shiftcost.pipeline.intake import Registration
    from shiftcost.pipeline.retrain import NewVersion, RetrainInputs, RetrainJob, RetrainOutcome
    from shiftcost.retrain import RetrainResult

__all__ = ["AssessSteps", "Poll", "RetrainSteps", "WatchSteps", "assess", "retrain", "watch"]

Handed = TypeVar("Handed")
"""What a hand-off to the next chain gives back; each runner has its own."""
Handed_co = TypeVar("Handed_co", covariant=True)


class WatchSteps(Protocol[Handed_co]):
    """The steps of one poll of the landing location."""

    def discover(self) -> Sequence[LandedBatch]: ...

    def register(self, landed: LandedBatch) -> Registration | None:
        """The entry registered once; None when it could not be (the runner reports why)."""

    def fail_stale_retrains(self) -> Any: ...

    def requeue_deferred(self) -> Any: ...

    def before_handoffs(self) -> Any:
        """Whatever the runner must do before new hand-offs (time out earlier ones that never started)."""

    def attach_landed_labels(self) -> Any: ...

    def pending_batches(self) -> Sequence[PendingBatch]: ...

    def hand_to_assess(self, pending: PendingBatch, registration: Registration | None) -> Handed_co:
        """Assess the batch (in this process, a subflow or a deployment run). A failure there
        is reported in what comes back, never raised: one batch does not stop the others."""

    def archive_processed(self) -> Any:
        """Archive processed landing entries; a failure is reported, not raised."""


class AssessSteps(Protocol[Handed_co]):
    """The steps of assessing one batch, then the hand-off to retraining."""

    def claim_batch(self, batch_id: int) -> Claim | None: ...

    def batch_outcome(self, batch_id: int) -> AssessOutcome: ...

    def load_for_assessment(self, claim: Claim) -> LoadedBatch: ...

    def forward_pass(self, loaded: LoadedBatch) -> IndexReport: ...

    def detect_drift(self, loaded: LoadedBatch, report: IndexReport) -> DriftCheck: ...

    def predict_cost(self, loaded: LoadedBatch, report: IndexReport, drift: DriftCheck) -> CostEstimate | None: ...

    def decide_and_store(
        self, loaded: LoadedBatch, report: IndexReport, drift: DriftCheck, estimate: CostEstimate | None
    ) -> AssessOutcome: ...

    def mark_failed(self, claim: Claim, error: BaseException) -> AssessOutcome: ...

    def release(self, claim: Claim) -> Any:
        """Give the claim back after a failure a retry may fix (called while that failure is raised)."""

    def hand_to_retrain(self, outcome: AssessOutcome) -> Handed_co:
        """Retrain on a batch decided for retraining (or leave it for later); what that gave."""


class RetrainSteps(Protocol):
    """The steps of retraining one batch decided for retraining."""

    def claim_retrain(self, batch_id: int) -> RetrainJob | None: ...

    def not_started(self, batch_id: int) -> RetrainOutcome: ...

    def heartbeat(self, job: RetrainJob) -> AbstractContextManager[Any]:
        """Proves the run alive while its steps run (so the watch does not close it as dead)."""

    def load_inputs(self, job: RetrainJob) -> RetrainInputs: ...

    def retrain_to_cutoff(self, inputs: RetrainInputs) -> RetrainResult: ...

    def build_new_version(self, inputs: RetrainInputs, result: RetrainResult) -> NewVersion | None: ...

    def refit_cost_model(self, inputs: RetrainInputs, result: RetrainResult) -> tuple[CostModel | None, str | None]: ...

    def record_success(
        self, inputs: RetrainInputs, result: RetrainResult, new_version: NewVersion | None, cost_model: CostModel | None, note: str | None
    ) -> RetrainOutcome: ...

    def record_failure(self, job: RetrainJob, error: BaseException, measured: RetrainResult | None) -> RetrainOutcome: ...


@dataclass
class Poll(Generic[Handed]):
    """One poll: the batches it registered (duplicates left out) and each hand-off's result."""

    registrations: dict[int, Registration] = field(default_factory=dict)
    handed: list[Handed] = field(default_factory=list)


def watch(steps: WatchSteps[Handed]) -> Poll[Handed]:
    """One poll: register every new entry, close retrain runs whose process was killed, give
    back deferred batches that are due, attach labels that landed, hand every waiting batch
    to assessment (a failure there does not stop the others), then archive."""
    poll: Poll[Handed] = Poll()
    for landed in steps.discover():
        registration = steps.register(landed)
        if registration is not None and registration.entry_state != "duplicate":
            poll.registrations[registration.batch_id] = registration
    steps.fail_stale_retrains()
    steps.requeue_deferred()
    steps.before_handoffs()
    steps.attach_landed_labels()
    for pending in steps.pending_batches():
        poll.handed.append(steps.hand_to_assess(pending, poll.registrations.get(pending.batch_id)))
    steps.archive_processed()
    return poll


def assess(steps: AssessSteps[Handed], batch_id: int) -> tuple[AssessOutcome, Handed | None]:
    """Claim and assess one registered batch, at most once; then hand a retrain decision on.

    A problem of the batch itself (``InputError``: unreadable, wrong image size, too few
    images) fails it with the reason; any other failure gives the claim back, so that a
    retry (or the next poll) processes the batch, and is raised.
    """
    claim = steps.claim_batch(batch_id)
    if claim is None:
        return steps.batch_outcome(batch_id), None
    try:
        loaded = steps.load_for_assessment(claim)
        report = steps.forward_pass(loaded)
        drift = steps.detect_drift(loaded, report)
        estimate = steps.predict_cost(loaded, report, drift)
        outcome = steps.decide_and_store(loaded, report, drift, estimate)
    except InputError as error:
        outcome = steps.mark_failed(claim, error)
    except BaseException:
        steps.release(claim)
        raise
    return outcome, steps.hand_to_retrain(outcome) if outcome.retrain_pending else None


def retrain(steps: RetrainSteps, batch_id: int) -> RetrainOutcome:
    """Retrain on a batch decided for retraining, once.

    A failure is recorded (run and batch failed, what it measured settled, else the
    reservation released) and raised as ``RetrainFailed``; Ctrl-C and exits are recorded
    too and keep their meaning. A crashed run is not retried: it spent energy, and
    spending more needs a new decision.
    """
    job = steps.claim_retrain(batch_id)
    if job is None:
        return steps.not_started(batch_id)
    result = None
    try:
        with steps.heartbeat(job):
            inputs = steps.load_inputs(job)
            result = steps.retrain_to_cutoff(inputs)
            new_version = steps.build_new_version(inputs, result)
            cost_model, note = steps.refit_cost_model(inputs, result)
            return steps.record_success(inputs, result, new_version, cost_model, note)
    except BaseException as error:
        from shiftcost.pipeline.retrain import RetrainFailed

        try:
            outcome = steps.record_failure(job, error, result)
        except Exception:
            # The database is out of reach too: the run stays open and its reservation held
            # until `shiftcost budget release-open` closes it; the original error matters more.
            raise error from None
        if not isinstance(error, Exception):
            raise  # Ctrl-C and exits keep their meaning, after the bookkeeping
        raise RetrainFailed(f"Retraining batch {batch_id} failed and was recorded as failed: {outcome.error}", outcome) from error
