"""One measurement protocol: calibration, `shiftcost retrain` and the pipeline measure alike."""

from __future__ import annotations

import inspect
import re

from shiftcost.calibrate import SWEEP_CONFIG, _round_robin, run_sweep
from shiftcost.config import Settings
from shiftcost.forecast import protocol
from shiftcost.recipe import RetrainConfig


def test_every_retrain_path_defaults_to_the_protocol() -> None:
    assert inspect.signature(run_sweep).parameters["config"].default is None  # None: SWEEP_CONFIG
    assert SWEEP_CONFIG.cutoff.holdout_fraction == protocol.HOLDOUT_FRACTION
    assert SWEEP_CONFIG.cutoff.eval_every is None  # a quarter epoch, decided by retrain_to_cutoff
    assert SWEEP_CONFIG.caps.max_epochs == protocol.MAX_EPOCHS
    assert Settings().retrain_holdout_fraction == protocol.HOLDOUT_FRACTION
    # A retrain gives up where calibration's runs were censored: past that cap a forecast has
    # never seen a run, so its "not to converge" flag and its price end there too.
    assert RetrainConfig().caps.max_epochs == Settings().retrain_max_epochs == protocol.MAX_EPOCHS
    from typer.testing import CliRunner

    from shiftcost.cli import app

    help_text = CliRunner().invoke(app, ["retrain", "--help"]).output
    # The option's entry: its line and the wrapped description under it, up to the next option.
    entry = re.search(r"^ +--holdout-fraction\b.*?(?=^ +-)", help_text, re.MULTILINE | re.DOTALL)
    assert entry is not None, help_text
    assert re.search(rf"default:? {protocol.HOLDOUT_FRACTION}\b", entry.group()), entry.group()


def test_the_quarter_epoch_cadence_matches_the_retrain_loop() -> None:
    # retrain_to_cutoff evaluates every max(1, steps_per_epoch // 4) steps when eval_every is None.
    for per_epoch, expected in ((1, 1), (3, 1), (4, 1), (8, 2), (100, 25)):
        assert protocol.eval_every(per_epoch) == expected
    assert protocol.evaluations(0.0, 8) == 1
    assert protocol.evaluations(1.0, 8) == 1 + 4


def test_a_time_budget_takes_kinds_round_robin() -> None:
    plan = [("a", 0.0), ("a", 1.0), ("a", 2.0), ("b", 0.0), ("b", 1.0)]
    assert _round_robin(plan) == [("a", 0.0), ("b", 0.0), ("a", 1.0), ("b", 1.0), ("a", 2.0)]


def test_steps_per_epoch_counts_the_retrain_loop_batches() -> None:
    import torch

    from shiftcost.retrain import _batches

    for n in (1, 2, 3, 16, 17, 18, 63, 64, 65, 66, 378):
        for batch in (1, 16, 64):
            if batch == 1 and n > 1:
                continue  # batches of one are never used (batch norm cannot train on them)
            assert protocol.steps_per_epoch(n, batch) == len(_batches(n, batch, torch.Generator().manual_seed(0))), (n, batch)


def slow_cutoff_reached(accuracies: list[float], target: float, window: int) -> bool:
    """The rule written out longhand: the latest evaluation and the mean of the last ``window`` meet the target."""
    if not accuracies:
        return False
    last = accuracies[len(accuracies) - window :] if len(accuracies) >= window else accuracies
    total = 0.0
    for value in last:
        total += value
    return accuracies[-1] >= target and total / len(last) >= target


def test_the_cutoff_rule_matches_its_longhand() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(500):
        history = list(rng.uniform(0.8, 1.0, int(rng.integers(1, 6))))
        for window in (1, 2, 3):
            assert protocol.cutoff_reached(history, 0.9, window) == slow_cutoff_reached(history, 0.9, window), (history, window)
    assert protocol.cutoff_reached([0.5, 0.95], 0.9, 1) and not protocol.cutoff_reached([0.5, 0.95], 0.9, 2)
    assert not protocol.cutoff_reached([0.99, 0.85], 0.9, 2)  # never stopped on the way down
    assert not protocol.cutoff_reached([], 0.9)


def test_the_first_cutoff_is_the_first_prefix_that_meets_the_rule() -> None:
    import numpy as np

    rng = np.random.default_rng(1)
    for _ in range(300):
        history = list(rng.uniform(0.8, 1.0, int(rng.integers(0, 9))))
        met = [k for k in range(len(history)) if slow_cutoff_reached(history[: k + 1], 0.9, protocol.CUTOFF_WINDOW)]
        assert protocol.first_cutoff(history, 0.9) == (met[0] if met else None), history


def _noisy_task():
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, generator=g)
    x = torch.randn(300, 8, generator=g)
    y = ((x @ w + 0.8 * torch.randn(300, generator=g)) > 0).long()  # label noise: evaluations jitter
    model = nn.Linear(8, 2)
    with torch.no_grad():
        model.weight.copy_(torch.stack([w, -w]) * 0.3)
        model.bias.zero_()
    return model, x, y


def test_every_retrain_stops_where_the_one_cutoff_rule_says(monkeypatch) -> None:
    """retrain_to_cutoff (which calibration, `shiftcost retrain` and the pipeline all call)
    stops at the first evaluation where :func:`protocol.cutoff_reached` holds, and the budget
    guard treats that evaluation as the run's last."""
    import torch

    from shiftcost.forecast.guard import BudgetGuard
    from shiftcost.retrain import retrain_to_cutoff
    from tests.forecast.helpers import fitted_forecaster

    torch.set_num_threads(1)
    went_on_past_a_single_crossing = False
    for window in (1, 2, 3):
        monkeypatch.setattr(protocol, "CUTOFF_WINDOW", window)
        for seed in range(3):
            model, x, y = _noisy_task()
            guard = BudgetGuard(fitted_forecaster(), budget_kwh=1e12, batch_samples=300, ceiling=0.9)
            run = retrain_to_cutoff(
                model, x, y, target_accuracy=0.8, holdout_fraction=0.3, eval_every=1, batch_size=16, lr=0.05, optimizer="sgd",
                max_epochs=10, track_energy=False, progress=guard, device="cpu", seed=seed,
            )
            accuracies = [p.accuracy for p in run.curve]
            assert run.status == "reached", run.status
            assert protocol.cutoff_reached(accuracies, run.target_accuracy, window)
            assert not any(protocol.cutoff_reached(accuracies[:k], run.target_accuracy, window) for k in range(1, len(accuracies)))
            assert len(guard.forecasts) == len(accuracies) - 1 - 2  # no forecast at the final evaluation (nor before three)
            first_alone = next(k for k in range(1, len(accuracies)) if accuracies[k] >= run.target_accuracy)
            went_on_past_a_single_crossing |= first_alone < len(accuracies) - 1
    assert went_on_past_a_single_crossing  # the window changed where some run stopped: the rule is really in the loop


def test_calibration_the_command_line_and_the_pipeline_retrain_through_retrain_to_cutoff() -> None:
    import shiftcost.calibrate.sweep as sweep
    import shiftcost.cli.retrain as cli_retrain
    import shiftcost.forecast.guard as guard
    import shiftcost.pipeline.retrain as pipeline_retrain
    import shiftcost.retrain as retrain

    for module in (sweep, cli_retrain, pipeline_retrain):
        assert "retrain_to_cutoff(" in inspect.getsource(module), module.__name__
    from shiftcost.retrain.loop import _CutoffRun

    assert "retrain_to_cutoff" in retrain.__all__
    assert "protocol_cutoff_reached(self.curve, self.target_accuracy)" in inspect.getsource(_CutoffRun.evaluate_and_check_cutoff)
    assert "protocol.cutoff_reached(" in inspect.getsource(guard.BudgetGuard.__call__)
