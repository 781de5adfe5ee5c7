# Two commands set up a fresh machine:  `make serve`  and  `make test`.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
PORT ?= 3000

.PHONY: setup data serve test test-fast stats container container-run

# The virtual environment with everything (serving, training, tests); reinstalled when
# pyproject.toml changes. torch 2.14.1 / torchvision 0.29.1 come from this machine's disk.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[serve,train,dev]"
	touch $(STAMP)

setup: $(STAMP) data

# The real Fashion-MNIST from Debian (the four original IDX .gz files).
data:
	@if [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "note: run 'apt-get install dataset-fashion-mnist' as root for the real data"; fi; \
	fi

serve: setup
	$(BIN)/bentoml serve --port $(PORT)

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not integration"

stats: $(STAMP)
	$(BIN)/python -m training.stats

# The service's container, built offline from a local debootstrap base image (scripts/container.sh).
container: $(STAMP)
	BIN=$(BIN) bash scripts/container.sh build

container-run:
	bash scripts/container.sh run $(PORT)
