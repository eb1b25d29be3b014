PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install -q -c constraints.txt
STAMP  := $(VENV)/.installed

DOCS_STAMP := $(VENV)/.docs-installed

.PHONY: install demo test test-slow lint typecheck bench docs clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev,ray]'
	touch $(STAMP)

install: $(STAMP)

## Run the default federated job (digits, 20 non-IID clients, FedAvg, 30 rounds).
demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/fedloom run --out runs/demo
	$(BIN)/fedloom centralized --out runs/demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

## Lint, type-check and run the test suite (the tests marked slow excepted), one test
## file per worker process (pytest-xdist): the suite leaves cores idle while its tests
## wait on the processes they start (2 cores: 14.2 min serial, 8.4 min with 2 workers).
test: lint typecheck
	$(BIN)/python -m pytest -n auto --maxprocesses=4 --dist loadfile

## The slow tests: processes killed and resumed, long learning runs, the browser (CI runs them too).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

## Simulation benchmark; installs Flower into the venv to compare against it.
bench: $(STAMP)
	$(PIP) 'flwr[simulation]>=1.10'
	$(BIN)/python benchmarks/simulation.py

$(DOCS_STAMP): $(STAMP) pyproject.toml constraints.txt
	$(PIP) -e '.[docs]'
	touch $(DOCS_STAMP)

## Build the documentation site (guides + API reference) into site/; open site/index.html.
## --strict: any warning (a broken link, a docstring griffe cannot read) fails the build.
docs: $(DOCS_STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) runs site .pytest_cache .mypy_cache .ruff_cache
