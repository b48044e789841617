# The two commands of the README: `make demo` and `make test`. Each creates .venv when missing,
# installs the project with everything it needs, then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint synth bench clean system-deps

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

system-deps:
	bash scripts/install-system-deps.sh

demo: $(STAMP) system-deps
	$(BIN)/proctor demo

test: $(STAMP) system-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m 'integration or not integration' -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# `cdk synth` through the CLI (the tests synthesize through the library and need no CLI).
synth: $(STAMP)
	test -x node_modules/.bin/cdk || npm install --no-save --no-audit --no-fund aws-cdk@2
	test -d build/lambda-layer/python || PYTHON=$(BIN)/python bash scripts/build-lambda-layer.sh
	PATH=$(CURDIR)/$(BIN):$$PATH node_modules/.bin/cdk synth --quiet

bench: $(STAMP)
	bash scripts/install-system-deps.sh pgbouncer
	$(BIN)/python scripts/bench_postgres.py

clean:
	rm -rf $(VENV) cdk.out build .proctor
