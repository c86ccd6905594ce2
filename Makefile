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

# The demo: analyse the example log, then run one tuning cycle on a scratch copy of the params
# file and state (.demo/, made anew each time) and show what tunerd did.
DEMO := .demo
demo: $(STAMP)
	$(BIN)/tunerd analyze deploy/example/auto-retry.jsonl --params deploy/example/params.json
	rm -rf $(DEMO) && mkdir -p $(DEMO) && cp deploy/example/params.json $(DEMO)/params.json
	printf 'log_path = "%s"\nstate_dir = "%s"\nparams_file = "%s"\nwindow = "3650d"\n' \
		"$(CURDIR)/deploy/example/auto-retry.jsonl" "$(CURDIR)/$(DEMO)/state" \
		"$(CURDIR)/$(DEMO)/params.json" > $(DEMO)/tunerd.toml
	$(BIN)/tunerd cycle --config $(DEMO)/tunerd.toml
	$(BIN)/tunerd status --config $(DEMO)/tunerd.toml

lint: $(STAMP)
	$(BIN)/ruff check tunerd tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/analyze_bench.py

clean:
	rm -rf $(VENV) $(DEMO) build *.egg-info .mypy_cache .pytest_cache .ruff_cache
