# The two commands a newcomer runs: `make dev` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
export RESPONDER_TEST_PG_URL ?= postgresql+psycopg://responder:responder@127.0.0.1:5432/postgres
# Test processes (pytest-xdist). The integration tests spend most of their time waiting on
# events (a worker's start, a lease, a cooldown), so two halve the suite's wall time even on two
# cores; every test starts its own services (free ports, Redis, databases named by process).
TEST_PROCESSES ?= 2

.PHONY: install dev test bench lint typecheck unit lock clean

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

dev: install
	.ci/ensure-tools dev
	$(BIN)/responder dev

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy

test: install
	.ci/ensure-tools test
	$(MAKE) lint typecheck
	rm -f .coverage .coverage.*
	$(BIN)/coverage run -m pytest -n $(TEST_PROCESSES) $(PYTEST_ARGS)
	$(BIN)/coverage combine -q
	$(BIN)/coverage report

# The benchmark suite (docs/benchmarks.md): figures, ratios to the floors, met / not met.
bench: install
	.ci/ensure-tools test
	$(BIN)/python -m bench.suite $(BENCH_ARGS)

# Fast feedback while editing: no services, no coverage.
unit: install
	$(BIN)/pytest tests/unit -q $(PYTEST_ARGS)

# Regenerate constraints.txt from a fresh resolve of pyproject.toml.
lock:
	rm -rf /tmp/responder-lock && $(PYTHON) -m venv /tmp/responder-lock
	/tmp/responder-lock/bin/pip install -q -e '.[dev]'
	{ echo "# Exact versions for every install (pip install -c constraints.txt): a new upstream"; \
	  echo "# release cannot change what CI tests. Regenerate with: make lock"; \
	  /tmp/responder-lock/bin/pip freeze --exclude-editable | sort -f; } > constraints.txt

clean:
	rm -rf $(VENV) .coverage .coverage.* .pytest_cache .mypy_cache .ruff_cache .responder
