"""Calibration sweeps: known shifts at known strengths, retrained for real, and how well
the indices predict what the retraining cost.

:func:`run_sweep` takes a model, its labelled reference data and a labelled batch of new
data. For every corruption kind and intensity of the sweep it

1. corrupts the new batch (seeded, :func:`shiftcost.shifts.corrupt`);
2. computes every index in one pass (:func:`shiftcost.index.engine.assess`, with the clean
   batch as ``paired_clean_x`` so PreIndex p comes too), plus the current model's accuracy,
   loss and entropy on the corrupted batch, and the full-batch gradient norm at the
   current weights;
3. retrains to the cutoff for real (:func:`shiftcost.retrain.retrain_to_cutoff`: target =
   reference accuracy minus ``tolerance``), ``repeats`` times with different split and
   shuffle seeds, and records steps, epochs, kWh, kg CO2e, gradient norms, parameter
   change, wall time, status and how the energy was measured.

A point is one row. Its measures are the means over the repeats; a point counts as
censored (``reached_cutoff`` false) when any repeat hit the cap, since the mean is then
only a lower bound of the cost. A point that crashes is recorded with its error and the
sweep goes on.

From the rows it derives Pearson and Spearman correlations of each index with each
measure (overall and per corruption kind), fits the cost model
(:class:`shiftcost.costmodel.CostModel`, capped runs censored) and evaluates it by
leaving one corruption kind out at a time. Energy predictions there go through epochs:
``kWh = epochs x samples x J per sample-epoch``, with the joules figure estimated from
the training kinds' runs only (the held-out kind's energy never informs its own
prediction); the hardware probe's figure is measured too and reported beside it.

:meth:`SweepResult.write` puts the table (JSON, CSV), the correlations (JSON and a
Markdown report), the cost model, the leave-one-out evaluation and a plot (PNG) into a
directory.

With ``fit_intensities=True`` the built-in kinds' intensities are first stretched to the
model (:func:`fit_sweep`), so a model sturdier or frailer than the digits demo, on which the
default intensities were chosen, still gets a sweep from mild to strong.
"""
from __future__ import annotations

from shiftcost.calibrate.analysis import analyse, best_index, correlate, label_free_analysis
from shiftcost.calibrate.helpers import _round_robin
from shiftcost.calibrate.ladder import KindFit, fit_sweep
from shiftcost.calibrate.outputs import markdown_report, plot_sweep
from shiftcost.calibrate.result import SweepInterrupted, SweepResult
from shiftcost.calibrate.settings import (
    COLUMNS,
    CORRELATION_FEATURES,
    CORRELATION_MEASURES,
    COST_FEATURES,
    GROUP_KEY,
    INDEX_FEATURES,
    LABEL_FREE_FEATURES,
    LABEL_FREE_FILE,
    PLOT_NAME,
    QUICK_SWEEP,
    SWEEP_CONFIG,
    Progress,
)
from shiftcost.calibrate.sweep import full_batch_grad_norm, run_sweep
from shiftcost.data.demo import torch_threads

__all__ = [
    "COLUMNS",
    "COST_FEATURES",
    "CORRELATION_FEATURES",
    "CORRELATION_MEASURES",
    "GROUP_KEY",
    "KindFit",
    "INDEX_FEATURES",
    "LABEL_FREE_FEATURES",
    "LABEL_FREE_FILE",
    "PLOT_NAME",
    "QUICK_SWEEP",
    "SWEEP_CONFIG",
    "Progress",
    "SweepInterrupted",
    "SweepResult",
    "_round_robin",
    "analyse",
    "best_index",
    "correlate",
    "fit_sweep",
    "full_batch_grad_norm",
    "label_free_analysis",
    "markdown_report",
    "plot_sweep",
    "run_sweep",
    "torch_threads",
]
