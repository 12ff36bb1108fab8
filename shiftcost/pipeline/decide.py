"""The decision on one assessed batch: the budget policy plus what only the pipeline knows.

``shiftcost.policy.decide`` weighs the predicted cost against the budgets and the drift;
:func:`decide_batch` adds the pipeline's own reasons (a task change, labels the model has
no output for, labels still to come, a cost that could not be predicted), each of which
may only make the action more cautious, and :func:`status_after` says where the batch
goes next. Nothing here reads or writes the database: ``store_assessment`` calls it under
the budgets' lock and stores what it returns.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from shiftcost.pipeline.labels import labels_beside

if TYPE_CHECKING:
    from shiftcost.config import Settings
    from shiftcost.index.engine import IndexReport
    from shiftcost.pipeline.assess import CostEstimate, DriftCheck, LoadedBatch
    from shiftcost.policy import Decision, Reason

__all__ = ["decide_batch", "status_after"]

# Where a batch goes after its decision: a skip is finished, the others wait for more.
_STATUS_AFTER = {"skip": "done", "defer": "assessed", "retrain": "assessed"}


def status_after(decision: Decision) -> str:
    """The batch's status after its decision: a deferral for want of labels waits for them."""
    if decision.action == "defer" and any(reason.code == "awaiting_labels" for reason in decision.reasons):
        return "awaiting_labels"
    return _STATUS_AFTER[decision.action]


def decide_batch(
    settings: Settings,
    loaded: LoadedBatch,
    report: IndexReport,
    drift: DriftCheck,
    estimate: CostEstimate | None,
    budgets: list[Any],
) -> Decision:
    """The policy's decision, plus what only the pipeline knows: task change, labels, features."""
    from shiftcost.policy import CostFigures, PolicySettings, decide

    policy = PolicySettings(
        use_upper_bound=settings.use_upper_bound,
        always_assess=settings.always_assess,
        min_accuracy_drop=settings.min_accuracy_drop,
        on_not_converging=settings.on_not_converging,
    )
    reference_accuracy = loaded.reference.accuracy
    drop = None if report.accuracy is None or reference_accuracy is None else reference_accuracy - report.accuracy
    prediction: Any = None
    if estimate is not None:
        prediction = estimate.prediction or CostFigures(None, None, None, None, None, None, False)
    decision = decide(prediction, budgets, policy, drift_verdict=drift.verdict, accuracy_drop=drop, model_name=loaded.model_name)
    decision = _with_reasons(decision, _pipeline_reasons(loaded, report, estimate, assessed=decision.assessed))
    if decision.assessed and not loaded.data.has_labels and decision.action != "skip":
        # A batch skipped on its label-free forecast is finished: labels would change nothing.
        decision = _with_reasons(decision, [_awaiting_labels(loaded)])
    return decision


def _pipeline_reasons(loaded: LoadedBatch, report: IndexReport, estimate: CostEstimate | None, *, assessed: bool) -> list[Reason]:
    from shiftcost.policy import Reason

    reasons = []
    if report.task_change:
        value = "not computed (a single class)" if report.resque_task is None else f"{report.resque_task:.4g}"
        labels = loaded.unknown_labels or report.new_classes
        reasons.append(
            Reason(
                "task_change",
                f"Task change: the batch has labels {labels} that the model's reference never had; RESQUE_task = {value}.",
                "info",
                {"resque_task": report.resque_task, "new_labels": [str(label) for label in labels]},
            )
        )
    if not assessed:
        return reasons
    if loaded.new_task:
        reasons.append(
            Reason(
                "new_classes",
                f"The batch has labels {loaded.unknown_labels} that the model has no output for, so retraining needs a new "
                "classifier head, which this pipeline does not build; register a model for these classes.",
                "skip",
                {"new_labels": [str(label) for label in loaded.unknown_labels]},
            )
        )
    if estimate is not None and estimate.problem is not None:
        reasons.append(
            Reason("cost_unpredictable", f"The cost of retraining could not be predicted ({estimate.problem})", "skip", {"features": estimate.features})
        )
    return reasons


def _awaiting_labels(loaded: LoadedBatch) -> Reason:
    from shiftcost.policy import Reason

    return Reason(
        "awaiting_labels",
        "The batch has no labels yet: it waits with its label-free forecast until they come "
        f"(`shiftcost labels attach {loaded.batch_id} FILE`, or {labels_beside(loaded.source_uri).rsplit('/', 1)[-1]} beside it).",
        "defer",
    )


def _with_reasons(decision: Decision, extra: list[Reason]) -> Decision:
    """The decision with ``extra`` reasons; the most severe effect still sets the action."""
    if not extra:
        return decision
    reasons = decision.reasons + tuple(extra)
    from shiftcost.policy import most_severe_action

    action = most_severe_action(reasons)
    return dataclasses.replace(decision, action=action, reasons=reasons, retry_after=decision.retry_after if action == "defer" else None)
