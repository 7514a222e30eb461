# The two commands of the quick start:
#   make demo   trains a DP model locally on an example manifest (creates .venv on first use)
#   make test   runs the whole suite: lint, types, import contracts, CRD drift, unit + integration + e2e tests
# Other targets: make crds (regenerate crds/ from api/), make lint, make bench, make clean.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO ?= examples/breast-cancer-logistic.yaml
PYTEST_ARGS ?=

.PHONY: demo test lint crds bench clean

$(STAMP): api/pyproject.toml operator/pyproject.toml trainer-image/pyproject.toml requirements-dev.txt constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and exact: 2.13.0 is the local CPU build here; the packages keep an open range for CUDA images.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e 'api[accounting]' -e operator -e 'trainer-image[federated]' -r requirements-dev.txt
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dptrain run $(DEMO) --output runs/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(VENV)/bin/dptrain-crdgen --chart --check

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

crds: $(STAMP)
	$(VENV)/bin/dptrain-crdgen --out crds --chart

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
