"""shiftcost: retraining under data drift as an accountable, budgeted decision."""

__version__ = "0.1.0"
