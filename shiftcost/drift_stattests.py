"""Evidently's per-column drift tests as the drift groups use them.

:func:`value_drift` runs one Evidently ``ValueDrift`` per column and records, beside
each verdict, the rule that made it. :func:`register_homogeneity_test` adds the
two-sample chi-square test of homogeneity (``chisquare_2sample``) that the prediction
group uses on small samples, where Evidently's own ``chisquare`` is a goodness-of-fit
test that treats the reference frequencies as exact (see :mod:`shiftcost.drift`).

Evidently, pandas and scipy are imported inside the functions that use them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from shiftcost.drift_results import FeatureResult
from shiftcost.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DRIFT_WHEN", "HOMOGENEITY_TEST", "register_homogeneity_test", "value_drift"]

HOMOGENEITY_TEST = "chisquare_2sample"
# How each Evidently stat test turns its score into a verdict (from its source, 0.7.2x).
DRIFT_WHEN = {
    **dict.fromkeys(["ks", "cramer_von_mises"], "score <= threshold"),
    **dict.fromkeys(["anderson", "chisquare", "es", "fisher_exact", "g_test", "mannw", "empirical_mmd", "t_test", "TVD", "z", HOMOGENEITY_TEST], "score < threshold"),
    **dict.fromkeys(["hellinger", "jensenshannon", "kl_div", "psi", "wasserstein"], "score >= threshold"),
    "ed": "score > threshold",
}


def register_homogeneity_test() -> str:
    """Register the two-sample chi-square test with Evidently (idempotent); returns its name."""
    from evidently.legacy.calculations.stattests import StatTest, register_stattest
    from evidently.legacy.core import ColumnType

    test = StatTest(
        name=HOMOGENEITY_TEST,
        display_name="chi-square homogeneity p_value",
        allowed_feature_types=[ColumnType.Categorical],
        default_threshold=0.05,
    )
    register_stattest(test, default_impl=_chi_square_homogeneity)
    return HOMOGENEITY_TEST


def _chi_square_homogeneity(reference_data: pd.Series, current_data: pd.Series, feature_type: Any, threshold: float) -> tuple[float, bool]:
    """Pearson's chi-square test that both samples come from one categorical distribution."""
    from scipy.stats import chi2_contingency

    keys = np.union1d(reference_data.dropna().unique(), current_data.dropna().unique())
    table = np.array([[np.sum(reference_data == k) for k in keys], [np.sum(current_data == k) for k in keys]])
    if len(keys) < 2:  # one class on both sides: nothing can differ
        return 1.0, False
    p_value = float(chi2_contingency(table, correction=False).pvalue)
    return p_value, p_value < threshold


def value_drift(ref: pd.DataFrame, cur: pd.DataFrame, numerical: list[str], categorical: list[str], method: str | None, threshold: float | None):
    """One Evidently ``ValueDrift`` per column, in one report; the verdicts are Evidently's.

    The test of each column is resolved first with Evidently's own selection
    (``get_stattest``, which picks the default when ``method`` is None) and then passed
    by name, so its direction and default threshold are known for the stored result.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.legacy.calculations.stattests import get_stattest
    from evidently.legacy.core import ColumnType
    from evidently.metrics import ValueDrift

    kinds = {c: ColumnType.Numerical for c in numerical} | {c: ColumnType.Categorical for c in categorical}
    chosen = {}
    for column, kind in kinds.items():
        try:
            chosen[column] = get_stattest(ref[column], cur[column], kind, method)
        except ValueError as error:
            raise ConfigError(f"drift test {method!r} is not available for {kind.value} columns in Evidently ({str(error).split('.')[0]}); pick another method.") from None

    definition = DataDefinition(numerical_columns=numerical or None, categorical_columns=categorical or None)
    report = Report([ValueDrift(column=c, method=chosen[c].name, threshold=threshold) for c in kinds], include_tests=True)
    # A class absent from the reference makes chi-square divide by zero: p = 0, i.e. drift, as intended.
    with np.errstate(divide="ignore", invalid="ignore"):
        snapshot = report.run(Dataset.from_pandas(cur, data_definition=definition), Dataset.from_pandas(ref, data_definition=definition))
    summary = snapshot.dict()
    status = {test["metric_config"]["metric_id"]: str(getattr(test["status"], "value", test["status"])) for test in summary["tests"]}
    features = []
    for metric in summary["metrics"]:
        config = metric["config"]
        test = chosen[config["column"]]
        drifted = status[metric["id"]] == "FAIL"
        features.append(FeatureResult(config["column"], test.display_name, float(metric["value"]), float(config["threshold"]), drifted, DRIFT_WHEN.get(test.name, "as the test decides")))
    widgets = [widget for result in snapshot.metric_results.values() for widget in result.get_widgets()]
    tests = [test for result in snapshot.metric_results.values() for test in result.tests]
    return features, widgets, tests
