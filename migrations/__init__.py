"""Alembic migration scripts for the shiftcost schema (run them with ``shiftcost db upgrade``)."""
