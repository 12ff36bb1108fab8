# Two entry points: `make demo` (the end-to-end demo on the embedded defaults) and
# `make test` (the test suite). Both create the virtual environment when it is missing.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# One worker per core; set PYTEST_ARGS="-n 0" to run in a single process.
PYTEST_ARGS ?= -n auto

.PHONY: demo test venv bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/shiftcost demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/index_throughput.py
	$(BIN)/python benchmarks/audit_queries.py
	$(BIN)/python benchmarks/sharded_index.py

clean:
	rm -rf $(VENV) shiftcost-demo .pytest_cache .hypothesis
