"""One measurement protocol: calibration, `shiftcost retrain` and the pipeline measure alike."""

from __future__ import annotations

import inspect
import re

from shiftcost.calibrate import SWEEP_CONFIG, _round_robin, run_sweep
from shiftcost.config import Settings
from shiftcost.forecast import protocol


def test_every_retrain_path_defaults_to_the_protocol() -> None:
    assert inspect.signature(run_sweep).parameters["config"].default is None  # None: SWEEP_CONFIG
    assert SWEEP_CONFIG.cutoff.holdout_fraction == protocol.HOLDOUT_FRACTION
    assert SWEEP_CONFIG.cutoff.eval_every is None  # a quarter epoch, decided by retrain_to_cutoff
    assert SWEEP_CONFIG.caps.max_epochs == protocol.MAX_EPOCHS
    assert Settings().retrain_holdout_fraction == protocol.HOLDOUT_FRACTION
    from typer.testing import CliRunner

    from shiftcost.cli import app

    help_text = CliRunner().invoke(app, ["retrain", "--help"], env={"COLUMNS": "200"}).output
    line = next(line for line in help_text.splitlines() if "--holdout-fraction" in line)
    assert re.search(rf"default:? {protocol.HOLDOUT_FRACTION}\b", line), line


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
