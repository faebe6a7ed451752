# The commands a person types. Everything runs from .venv in this folder, created on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Pytest workers are not used: the suite starts real servers and Dask/Ray clusters.
PYTEST_ARGS ?=

.PHONY: install run test lint format bench ui stack-up clean help

help:
	@echo "make run    - the quickstart on the embedded defaults (local Dask, SQLite MLflow, .physflow/)"
	@echo "make test   - lint and the test suite (installs into .venv first)"
	@echo "make bench  - the quick benchmarks; full size: $(BIN)/python -m benchmarks.<name>"
	@echo "make ui     - MLflow UI on the embedded store, http://127.0.0.1:5000"
	@echo "make stack-up - local S3 (SeaweedFS) + MLflow server on 127.0.0.1"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/physflow run configs/quickstart.yaml

lint: $(STAMP)
	$(BIN)/ruff check flows actors infra benchmarks tests
	$(BIN)/ruff format --check flows actors infra benchmarks tests

format: $(STAMP)
	$(BIN)/ruff check --fix flows actors infra benchmarks tests
	$(BIN)/ruff format flows actors infra benchmarks tests

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks.preprocess --quick
	$(BIN)/python -m benchmarks.moe --quick

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.physflow/mlflow.db \
		--host 127.0.0.1 --port 5000

stack-up: $(STAMP)
	$(BIN)/python -m infra.services

clean:
	rm -rf .physflow .pytest_cache
