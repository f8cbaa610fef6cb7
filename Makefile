# Two commands for a newcomer: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck check bench fuzz clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)  ## the main job on embedded defaults: emulator + broker + daemon + scripted failover
	$(VENV)/bin/esim-agent demo

test: $(STAMP)  ## the whole test suite, lint and types included
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

fuzz: $(STAMP)  ## every outside-input entry point, >= 10^6 Hypothesis inputs each (hours)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q -m fuzz -p no:cacheprovider -o timeout=0 tests/test_fuzz_inputs.py

bench: $(STAMP)  ## benchmarks, results as JSON under bench/results/
	$(PY) -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
