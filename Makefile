# The commands a person types. Everything runs from .venv in this folder, created on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# checkov pins its own dependencies: it lives in a virtualenv of its own.
CHECKOV_VENV := .venv-checkov
CHECKOV      := $(CHECKOV_VENV)/bin/checkov
# Pytest workers are not used: the suite starts real servers and Dask/Ray clusters.
PYTEST_ARGS ?=

.PHONY: install run test lint format bench ui stack-up stack-down k8s-check clean help

help:
	@echo "make run    - the quickstart on the embedded defaults (local Dask, SQLite MLflow, .physflow/)"
	@echo "make test   - lint and the test suite (installs into .venv first)"
	@echo "make bench  - the quick benchmarks; full size: $(BIN)/python -m benchmarks.<name>"
	@echo "make ui     - MLflow UI on the embedded store, http://127.0.0.1:5000"
	@echo "make k8s-check  - render k8s/overlays and check them offline (schemas, KubeRay rules, checkov, hadolint)"
	@echo "make stack-up   - S3 (SeaweedFS) + MLflow server + Ray head with token auth, on 127.0.0.1, in the background"
	@echo "make stack-down - stop the local stack (its data stays in .physflow/stack)"

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

$(CHECKOV):
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet --disable-pip-version-check 'checkov==3.3.30'

k8s-check: $(STAMP) $(CHECKOV)
	$(BIN)/python -m infra.k8s_check --checkov $(CHECKOV)

test: lint k8s-check
	CHECKOV=$(CHECKOV) $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks.preprocess --quick
	$(BIN)/python -m benchmarks.moe --quick
	$(BIN)/python -m benchmarks.pbt --quick
	$(BIN)/python -m benchmarks.nas --quick
	$(BIN)/python -m benchmarks.submit --quick

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath $(or $(PHYSFLOW_HOME),.physflow))/mlflow.db \
		--host 127.0.0.1 --port 5000

stack-up: $(STAMP)
	$(BIN)/python -m infra.stack up --ray

stack-down: $(STAMP)
	$(BIN)/python -m infra.stack down

clean:
	rm -rf .physflow .pytest_cache
