"""Forecasts that know how learnable a shift is: probe, learning curve, in-flight guard.

* :mod:`~shiftcost.forecast.protocol`: the one measurement protocol (holdout, cadence, cap);
* :mod:`~shiftcost.forecast.probe`: a few fine-tuning steps on a throw-away copy, with their cost;
* :mod:`~shiftcost.forecast.curve`: the learning curve that extrapolates a trajectory;
* :mod:`~shiftcost.forecast.forecaster`: stage 0 (indices) and stage 1 (probe) forecasts;
* :mod:`~shiftcost.forecast.guard`: the ``progress`` callback that stops a retrain the budget cannot hold;
* :mod:`~shiftcost.forecast.price`: a retrain's and a probe's kWh under the protocol;
* :mod:`~shiftcost.forecast.decide`: whether a probe pays for itself against the budget left.
"""
