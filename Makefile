# Everything on a fresh machine: `make demo` and `make test` create .venv when missing.
#
# torch==2.13.0 is installed FIRST and everything else with that pin as a constraint
# (constraints.txt), or pip would replace the CPU build with a multi-GB CUDA one.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PIP := $(BIN)/python -m pip
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-k report -x"`.
PYTEST_ARGS ?=

.PHONY: demo test test-all lint typecheck clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip || echo "make: could not upgrade pip; going on with $$($(PIP) --version)"
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[all,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mskmri demo --out demo-output

# pytest's exit status is make's: 1 = a test failed, 5 = no test was collected (also a failure).
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q -m "slow or not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy src/mskmri

clean:
	rm -rf $(VENV) demo-output .pytest_cache
