# Everything a fresh machine with python3 needs: `make demo` and `make test` create .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The demo: the whole loop on a fresh machine. tunerd's real cycle, experiments and verdicts
# against the simulated crons of a bundled scenario, six weeks on a virtual clock.
demo: $(STAMP)
	$(BIN)/tunerd simulate deploy/scenarios/demo.toml

lint: $(STAMP)
	$(BIN)/ruff check tunerd tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/analyze_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache
