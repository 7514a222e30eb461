# The two commands of the quick start:
#   make demo   trains a DP model locally on an example manifest (creates .venv on first use)
#   make test   runs the whole suite: lint, types, import contracts, CRD drift, unit + integration + e2e tests
# Other targets: make crds (regenerate crds/, chart CRDs and docs/src/reference from api/), make docs, make lint, make bench, make clean,
#   make images (trainer + operator images with podman), make image-facts, make push-images, make image-trainer-cuda.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO ?= examples/breast-cancer-logistic.yaml
PYTEST_ARGS ?=
# Images: <IMAGE_REPOSITORY>/trainer:<IMAGE_TAG> and <IMAGE_REPOSITORY>/operator:<IMAGE_TAG> (the container tests
# use these names too). podman reads images/containers.conf: nothing in /etc is changed.
IMAGE_REPOSITORY ?= localhost/dptrain
IMAGE_TAG ?= $(shell python3 -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
CONTAINERS_CONF ?= $(CURDIR)/images/containers.conf
export CONTAINERS_CONF
export DPTRAIN_TEST_IMAGE_REPOSITORY := $(IMAGE_REPOSITORY)
export DPTRAIN_TEST_IMAGE_TAG := $(IMAGE_TAG)

.PHONY: demo test lint docs crds bench clean images image-trainer-cuda push-images image-facts

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
	$(VENV)/bin/dptrain-crdgen --chart --reference --check
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -f docs/mkdocs.yml

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

crds: $(STAMP)
	$(VENV)/bin/dptrain-crdgen --out crds --chart --reference

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -f docs/mkdocs.yml
	@echo "docs: build/docs/index.html (or: $(VENV)/bin/mkdocs serve -f docs/mkdocs.yml)"

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

images:
	python3 images/build.py --repository $(IMAGE_REPOSITORY) --tag $(IMAGE_TAG) --summary build/images/summary.json

image-trainer-cuda:
	python3 images/build.py --cuda --repository $(IMAGE_REPOSITORY) --tag $(IMAGE_TAG)

# Pushes both images; their digests (for the chart's operator.image.digest / trainer.image.digest) land in build/images/.
push-images:
	mkdir -p build/images
	podman push --digestfile build/images/trainer.digest $(IMAGE_REPOSITORY)/trainer:$(IMAGE_TAG)
	podman push --digestfile build/images/operator.digest $(IMAGE_REPOSITORY)/operator:$(IMAGE_TAG)
	@echo "digests: trainer $$(cat build/images/trainer.digest), operator $$(cat build/images/operator.digest)"

image-facts: $(STAMP)
	$(PY) benchmarks/images.py --repository $(IMAGE_REPOSITORY) --tag $(IMAGE_TAG)

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
