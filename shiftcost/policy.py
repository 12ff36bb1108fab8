"""The retraining decision: retrain, skip or defer a batch, with every reason behind it.

A pure function of its inputs (no I/O, no clock): the drift verdict, the predicted cost
of retraining, the state of the energy/carbon budgets and the settings. The rules:

1. No detected drift -> ``skip`` (code ``no_drift``) without looking at costs, unless
   ``always_assess`` is set; then every other rule is still evaluated and recorded, but
   the batch is still skipped, since there is no shift to retrain for.
2. Predicted not to converge -> ``skip`` or ``defer`` (``on_not_converging``), code
   ``not_converging``.
3. Budgets. A budget applies when its scope is ``"*"`` or the model's name. The amount
   checked is the upper bound of the predicted interval (or the point estimate when
   ``use_upper_bound`` is false), for energy (kWh) and carbon (kg CO2e) alike. Retraining
   needs the amount to fit what remains of *every* applicable budget, for every measure
   that budget caps. When it does not fit now but fits the full cap of every budget it
   fails, and those budgets are periodic (daily, monthly, rolling), the batch is
   deferred to a later period; otherwise it is skipped. A capped measure without a
   predicted figure (no energy calibration, say) cannot be checked and skips.
4. Optional minimum benefit: when ``min_accuracy_drop`` is set and an accuracy drop is
   known (the batch has labels), the drop must exceed it, else ``skip``.

Every rule leaves a :class:`Reason` (code, sentence, numbers), those that allow as well
as those that block. The action is the most severe effect among them: any ``skip`` beats
any ``defer``, which beats ``retrain``. Tightening a budget can therefore never turn a
skip or defer into a retrain.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

from shiftcost.errors import ConfigError
from shiftcost.store.ledger import PERIODIC, BudgetStatus, fits

__all__ = ["BudgetState", "BudgetStatus", "CostFigures", "Decision", "PolicySettings", "Reason", "decide", "PERIODIC"]

Action = Literal["retrain", "skip", "defer"]
Effect = Literal["allow", "skip", "defer", "info"]

_SEVERITY = {"info": 0, "allow": 0, "defer": 1, "skip": 2}


def most_severe_action(reasons: Sequence[Reason]) -> Action:
    """The action the most severe reason calls for: a skip outranks a defer, a defer a retrain."""
    return ("retrain", "defer", "skip")[max(_SEVERITY[reason.effect] for reason in reasons)]

#: A budget stated by its caps and what remains (a what-if, or a test): the ledger's own
#: model, :meth:`shiftcost.store.ledger.BudgetStatus.planned`.
BudgetState = BudgetStatus.planned


@dataclass(frozen=True)
class PolicySettings:
    """How the decision weighs its inputs."""

    use_upper_bound: bool = True
    """Check the upper bound of the predicted interval against budgets (else the point estimate)."""
    always_assess: bool = False
    """Evaluate costs and budgets even when no drift was detected (the batch is still skipped)."""
    min_accuracy_drop: float | None = None
    """Retrain only when the accuracy drop on the batch (when labelled) exceeds this."""
    on_not_converging: Literal["skip", "defer"] = "skip"
    """What to do when retraining is predicted not to reach the cutoff."""

    def __post_init__(self) -> None:
        if self.on_not_converging not in ("skip", "defer"):
            raise ConfigError(f"on_not_converging is {self.on_not_converging!r}; set it to 'skip' or 'defer'.")
        if self.min_accuracy_drop is not None and not math.isfinite(self.min_accuracy_drop):
            raise ConfigError(f"min_accuracy_drop is {self.min_accuracy_drop!r}; set a finite number or leave it unset.")


@dataclass(frozen=True)
class CostFigures:
    """The predicted cost fields the policy reads, whatever object carried them."""

    kwh: float | None
    kwh_lower: float | None
    kwh_upper: float | None
    co2: float | None
    co2_lower: float | None
    co2_upper: float | None
    predicted_not_to_converge: bool
    epochs: float | None = None
    epochs_upper: float | None = None
    level: float | None = None

    @classmethod
    def coerce(cls, prediction: Any) -> CostFigures:
        """Read a cost prediction: any object or mapping with the fields of ``CostPrediction``.

        Both naming schemes are understood: ``kwh``/``co2`` (with ``_lower``/``_upper``)
        and ``energy_kwh``/``emissions_kg`` (with ``_lower``/``_upper``).
        """
        if isinstance(prediction, CostFigures):
            return prediction

        def get(*names: str) -> Any:
            for name in names:
                if isinstance(prediction, Mapping):
                    if name in prediction:
                        return prediction[name]
                elif hasattr(prediction, name):
                    return getattr(prediction, name)
            return None

        return cls(
            kwh=_optional_float(get("kwh", "energy_kwh")),
            kwh_lower=_optional_float(get("kwh_lower", "energy_kwh_lower")),
            kwh_upper=_optional_float(get("kwh_upper", "energy_kwh_upper")),
            co2=_optional_float(get("co2", "emissions_kg")),
            co2_lower=_optional_float(get("co2_lower", "emissions_kg_lower")),
            co2_upper=_optional_float(get("co2_upper", "emissions_kg_upper")),
            predicted_not_to_converge=bool(get("predicted_not_to_converge")),
            epochs=_optional_float(get("epochs")),
            epochs_upper=_optional_float(get("epochs_upper")),
            level=_optional_float(get("level")),
        )

    def amount(self, measure: str, use_upper_bound: bool) -> float | None:
        """The figure checked against budgets for ``measure`` ('kwh' or 'co2'); None if unknown."""
        value = getattr(self, f"{measure}_upper" if use_upper_bound else measure)
        return None if value is None or math.isnan(value) else value


@dataclass(frozen=True)
class Reason:
    """One rule's finding: a stable code, a sentence for people, and the numbers behind it.

    ``effect`` says what the rule asks for: ``allow`` (this rule lets retraining go
    ahead), ``skip``, ``defer``, or ``info``. ``budget`` names the budget it concerns.
    """

    code: str
    message: str
    effect: Effect
    numbers: dict[str, Any] = field(default_factory=dict)
    budget: str | None = None

    @property
    def blocking(self) -> bool:
        return self.effect in ("skip", "defer")

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "effect": self.effect,
            "blocking": self.blocking,
            "budget": self.budget,
            "numbers": {key: _json_value(value) for key, value in self.numbers.items()},
        }


@dataclass(frozen=True)
class Decision:
    """The action for one batch and every reason for it."""

    action: Action
    reasons: tuple[Reason, ...]
    basis: Literal["upper", "point"]
    kwh: float | None
    co2: float | None
    drift_verdict: bool
    accuracy_drop: float | None
    retry_after: datetime | None
    budget_state: tuple[dict[str, Any], ...]
    settings: PolicySettings
    assessed: bool
    """Whether costs and budgets were evaluated (False: skipped for lack of drift)."""

    @property
    def blocked_by_budget(self) -> bool:
        """Whether a budget rule is among the reasons the batch is not retrained."""
        return any(reason.blocking and reason.budget is not None for reason in self.reasons)

    @property
    def blocking_reasons(self) -> tuple[Reason, ...]:
        return tuple(reason for reason in self.reasons if reason.blocking)

    def summary(self) -> str:
        """One line: the action and the sentences of the reasons that decided it."""
        deciding = self.blocking_reasons or tuple(r for r in self.reasons if r.effect == "allow")
        return f"{self.action}: " + " ".join(reason.message for reason in deciding)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the budget state the decision saw."""
        return {
            "action": self.action,
            "summary": self.summary(),
            "reasons": [reason.to_dict() for reason in self.reasons],
            "blocked_by_budget": self.blocked_by_budget,
            "basis": self.basis,
            "kwh": _json_value(self.kwh),
            "co2": _json_value(self.co2),
            "drift_verdict": self.drift_verdict,
            "accuracy_drop": _json_value(self.accuracy_drop),
            "retry_after": _iso(self.retry_after),
            "assessed": self.assessed,
            "budget_state": list(self.budget_state),
            "settings": {key: _json_value(value) for key, value in asdict(self.settings).items()},
        }


def decide(
    prediction: Any,
    budgets_state: Iterable[Any],
    settings: PolicySettings | None = None,
    *,
    drift_verdict: bool,
    accuracy_drop: float | None = None,
    model_name: str | None = None,
) -> Decision:
    """Retrain, skip or defer, with every reason (see the module notes for the rules).

    ``prediction`` is a ``CostPrediction`` (or any object or mapping with its fields); it
    may be None only when there is no drift and ``always_assess`` is off.
    ``budgets_state`` holds the ledger's :class:`BudgetStatus` objects (read from the
    ledger, or stated with :data:`BudgetState`). With ``model_name`` given, budgets scoped
    to other models are left out; without it, every enabled budget given applies.
    """
    settings = settings or PolicySettings()
    budgets = list(budgets_state)
    applicable = [budget for budget in budgets if budget.applies_to(model_name)]
    seen = tuple({**budget.as_dict(), "applies": budget.applies_to(model_name)} for budget in budgets)
    basis: Literal["upper", "point"] = "upper" if settings.use_upper_bound else "point"
    reasons: list[Reason] = []

    if drift_verdict:
        reasons.append(Reason("drift_detected", "Drift was detected in the batch.", "allow"))
    else:
        reasons.append(Reason("no_drift", "No drift was detected in the batch, so there is nothing to retrain for.", "skip"))
        if not settings.always_assess:
            return Decision("skip", tuple(reasons), basis, None, None, False, _optional_float(accuracy_drop), None, seen, settings, assessed=False)
        reasons.append(Reason("always_assess", "Costs and budgets were assessed anyway (always_assess is on).", "info"))

    if prediction is None:
        raise ValueError("decide() needs a cost prediction when drift was detected or always_assess is on.")
    cost = CostFigures.coerce(prediction)
    kwh, co2 = cost.amount("kwh", settings.use_upper_bound), cost.amount("co2", settings.use_upper_bound)

    if cost.predicted_not_to_converge:
        reasons.append(
            Reason(
                "not_converging",
                f"Retraining is predicted not to reach the cutoff accuracy, so the batch is {_past(settings.on_not_converging)}.",
                settings.on_not_converging,
                {"epochs": cost.epochs, "epochs_upper": cost.epochs_upper},
            )
        )

    if cost.epochs is not None and cost.epochs <= 0:
        # Already at the cutoff: retraining would stop at its first evaluation, having
        # spent only the evaluation, so there is no benefit to buy at any cost.
        reasons.append(
            Reason(
                "already_at_target",
                "Retraining is predicted to need 0 epochs (the model is already at the cutoff accuracy), so there is nothing to gain.",
                "skip",
                {"epochs": cost.epochs},
            )
        )

    budget_reasons = [_budget_reason(budget, kwh, co2, basis, cost.level) for budget in applicable]
    reasons.extend(budget_reasons)
    if not applicable:
        reasons.append(Reason("no_budget", "No budget applies to this model, so cost does not limit retraining.", "allow"))

    reasons.extend(_benefit_reasons(settings.min_accuracy_drop, accuracy_drop))

    action = most_severe_action(reasons)
    retry_after = None
    if action == "defer":
        ends = [b.renews_at for b, r in zip(applicable, budget_reasons) if r.effect == "defer" and b.renews_at is not None]
        retry_after = max(ends) if ends else None
    return Decision(action, tuple(reasons), basis, kwh, co2, drift_verdict, _optional_float(accuracy_drop), retry_after, seen, settings, assessed=True)


# ----------------------------------------------------------------------------- rules


def _budget_reason(budget: BudgetStatus, kwh: float | None, co2: float | None, basis: str, level: float | None) -> Reason:
    """Check both measures of one budget; the worst finding makes the reason."""
    which = "upper bound" if basis == "upper" else "point estimate"
    if basis == "upper" and level is not None:
        which = f"{level:.0%} upper bound"
    numbers: dict[str, Any] = {"basis": basis}
    needs, lefts, unknown, over_now, over_cap = [], [], [], [], []
    for measure, amount, unit in (("kwh", kwh, "kWh"), ("co2", co2, "kg CO2e")):
        cap = getattr(budget, f"{measure}_cap")
        if cap is None:
            continue
        room = getattr(budget, f"remaining_{measure}")
        numbers.update({f"{measure}_needed": amount, f"{measure}_remaining": room, f"{measure}_cap": cap})
        if amount is None:
            unknown.append(unit)
            continue
        needs.append(f"{_fmt(amount)} {unit}")
        lefts.append(f"{_fmt(room)} of {_fmt(cap)} {unit}")
        if not fits(amount, room, cap):
            (over_now if fits(amount, cap, cap) else over_cap).append(unit)

    if not needs and not unknown:
        return Reason("within_budget", f"Budget {budget.name!r} caps nothing.", "allow", numbers, budget.name)
    if unknown:
        return Reason(
            "cost_unknown",
            f"Budget {budget.name!r} caps {' and '.join(unknown)} but the prediction has no {which} for it, so the budget cannot be checked.",
            "skip",
            numbers,
            budget.name,
        )
    need, left = " and ".join(needs), " and ".join(lefts)
    if over_cap:
        unbounded = any(amount is not None and math.isinf(amount) for amount in (kwh, co2))
        why = " (the interval is unbounded: too few calibration runs at this level)" if unbounded else ""
        return Reason(
            "over_budget_cap",
            f"Retraining needs {need} ({which}){why}, more than the full {_period_words(budget)} cap of budget {budget.name!r} ({left} left).",
            "skip",
            numbers,
            budget.name,
        )
    if over_now:
        if budget.periodic:
            when = f" after {_iso(budget.renews_at)}" if budget.renews_at is not None else ""
            return Reason(
                "over_budget_now",
                f"Retraining needs {need} ({which}), more than budget {budget.name!r} has left ({left}); it fits the full cap, so it waits for room{when}.",
                "defer",
                {**numbers, "period_end": _iso(budget.window_end)},
                budget.name,
            )
        return Reason(  # a per-run budget with room below its cap cannot happen, but stay total
            "over_budget_cap",
            f"Retraining needs {need} ({which}), more than budget {budget.name!r} allows ({left}).",
            "skip",
            numbers,
            budget.name,
        )
    return Reason("within_budget", f"Retraining needs {need} ({which}), within budget {budget.name!r} ({left} left).", "allow", numbers, budget.name)


def _benefit_reasons(minimum: float | None, drop: float | None) -> list[Reason]:
    if minimum is None:
        return []
    numbers = {"accuracy_drop": drop, "min_accuracy_drop": minimum}
    if drop is None or math.isnan(drop):
        return [Reason("benefit_not_checked", f"The minimum-benefit rule (accuracy drop > {minimum:.3f}) was not checked: the batch has no labels.", "info", numbers)]
    if drop > minimum:
        return [Reason("benefit_met", f"Accuracy dropped by {drop:.3f} on the batch, more than the required {minimum:.3f}.", "allow", numbers)]
    return [Reason("below_min_benefit", f"Accuracy dropped by only {drop:.3f} on the batch, not more than the required {minimum:.3f}, so retraining is not worth its cost.", "skip", numbers)]


# ----------------------------------------------------------------------------- helpers


def _past(action: str) -> str:
    return {"skip": "skipped", "defer": "deferred"}[action]


def _period_words(budget: BudgetStatus) -> str:
    return {"per_run": "per-run", "daily": "daily", "monthly": "monthly", "rolling_days": "rolling-window"}[budget.period]


def _fmt(value: float | None) -> str:
    if value is None:
        return "?"
    if math.isinf(value):
        return "unbounded"
    return f"{value:.4g}"


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _json_value(value: Any) -> Any:
    """JSON-safe scalar: non-finite floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
