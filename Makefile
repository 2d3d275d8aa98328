# `make run`: set up .venv and run the default pipeline; `make test`: set up .venv and run the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MALLOC_MMAP_THRESHOLD_ := 16777216
export MALLOC_TRIM_THRESHOLD_ := 1073741824

.PHONY: run test setup bench clean-outputs

setup: $(VENV)/.installed
	@DVC=$(BIN)/dvc bash scripts/vega_offline.sh $(CURDIR)  # offline HTML for `dvc plots show` (npm; optional)

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

run: setup
	$(BIN)/landscape run

test: setup
	$(BIN)/python -m pytest -q

# Speed ratios (see README, "Benchmarks"); uses the trained checkpoints of `make run` when present.
bench: setup
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	$(BIN)/python benchmarks/hvp.py
	$(BIN)/python benchmarks/eigen.py
	$(BIN)/python benchmarks/grid.py
	$(BIN)/python benchmarks/dask_grid.py

clean-outputs:
	rm -rf artifacts reports/tables reports/metrics.json reports/figures
