# Everything on a fresh machine: `make demo` and `make test` create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PIP := $(BIN)/python -m pip

.PHONY: demo test test-all lint typecheck bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[all,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mskmri demo --out demo-output

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q -m "slow or not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy src/mskmri

clean:
	rm -rf $(VENV) demo-output .pytest_cache
