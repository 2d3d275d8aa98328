# `make run`: set up .venv and run the default pipeline; `make test`: set up .venv and run the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MALLOC_MMAP_THRESHOLD_ := 16777216
export MALLOC_TRIM_THRESHOLD_ := 1073741824

.PHONY: run test lint docs lock setup bench clean-outputs

setup: $(VENV)/.installed
	@DVC=$(BIN)/dvc bash scripts/vega_offline.sh $(CURDIR)  # offline HTML for `dvc plots show` (npm; optional)

# Exact versions from constraints.txt (the ones the suite last passed with): a fresh machine gets the same packages.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $@

run: setup
	$(BIN)/landscape run

test: setup lint
	$(BIN)/python -m pytest -q

# ruff: lint and format check (configured in pyproject.toml); `ruff format .` fixes the format
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# docs/params.md from pipeline/config.py's field metadata (tests/test_params_doc.py checks it is current)
docs: setup
	$(BIN)/python -m pipeline.docs

# Refresh constraints.txt: resolve pyproject.toml's dependencies afresh in a scratch venv, freeze the result
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	.lock-venv/bin/python -m pip freeze --exclude-editable --disable-pip-version-check > constraints.txt
	rm -rf .lock-venv

# Speed ratios (see README, "Benchmarks"); uses the trained checkpoints of `make run` when present.
bench: setup
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,bench]'
	$(BIN)/python benchmarks/hvp.py
	$(BIN)/python benchmarks/eigen.py
	$(BIN)/python benchmarks/grid.py
	$(BIN)/python benchmarks/dask_grid.py

clean-outputs:
	rm -rf artifacts reports/tables reports/metrics.json reports/figures
