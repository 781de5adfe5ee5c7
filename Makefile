# Two commands set up a fresh machine:  `make serve`  and  `make test`.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
PORT ?= 3000

.PHONY: setup data serve test test-fast stats container container-run gpu-proof gpu-parts gpu-data gpu-env-check gpu-rehearsal rollout

# The virtual environment with everything (serving, training, tests); reinstalled when
# pyproject.toml changes. torch 2.14.1 / torchvision 0.29.1 come from this machine's disk.
# Byte-compiled at install: with PYTHONDONTWRITEBYTECODE set, as on this machine, nothing would
# write a .pyc later and every process would compile torch again.
$(STAMP): pyproject.toml serving/requirements.txt training/requirements.txt tests/requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[serve,train,dev]"
	touch $(STAMP)

# The security scanners (checkov, bandit) in a venv of their own: their pins clash with bentoml's.
# Installed with uv (from the main venv): the same versions as pip's, in 3 s instead of 43.
SCAN := .venv-scan
$(SCAN)/.installed: tests/scan-requirements.txt | $(STAMP)
	test -x $(SCAN)/bin/python || $(BIN)/uv venv --quiet --python $(PY) $(SCAN)
	$(BIN)/uv pip install --quiet --python $(SCAN)/bin/python -r tests/scan-requirements.txt
	touch $@

setup: $(STAMP) $(SCAN)/.installed data

# From Debian: the real Fashion-MNIST (the four original IDX .gz files), wrk (the benchmark's
# native load generator), chromium + chromium-driver (tests/test_browser.py drives the upload
# page in them) and haproxy (the rolling restart, bench/rollout.py). Installed once, as root or
# through sudo.
data:
	@missing=""; [ -f $(FMNIST) ] || missing="dataset-fashion-mnist"; command -v wrk >/dev/null || missing="$$missing wrk"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing="$$missing haproxy"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing; \
	  elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq $$missing; \
	  else echo "note: run 'apt-get install $$missing' as root (real data, benchmark, browser test)"; fi; \
	fi

# The shipped model goes into BentoML's model store (idempotent, checked against its card), and
# the service serves it from there, as a bento built from this tree would.
serve: setup
	$(BIN)/python -m serving.model_files models/nin-fashion-mnist
	$(BIN)/bentoml serve --port $(PORT)

# Two pytest-xdist workers, a test file each at a time (its module fixtures built once): alone, the
# suite kept 2 cores ~60 % busy, waiting on the servers and trainings it starts. Not for
# test-fast, which is CPU-bound and slower so (docs/testing.md).
test: setup
	$(BIN)/python -m pytest -n 2 --dist loadfile

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not integration"

stats: $(STAMP)
	$(BIN)/python -m training.stats

# The service's container, built offline from a local mmdebstrap base image (scripts/container.sh).
container: $(STAMP)
	BIN=$(BIN) bash scripts/container.sh build

container-run:
	bash scripts/container.sh run $(PORT)

# The training half of the GPU proof (scripts/gpu_proof.py), on any machine with make; on the GPU
# machine the four calls of scripts/gpu_calls.py run it (docs/gpu.md "The plan"):
#   make gpu-proof OUT=folder DATA=folder-with-the-4-idx-files [STAGE=strong|d2l|grid]
#   make gpu-proof OUT=/tmp/proof DRY=1                                        CPU dry run (the tests run it)
GPU_PY = $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
OUT ?= gpu-proof-out
gpu-proof:
	$(GPU_PY) scripts/gpu_proof.py --out "$(OUT)" $(if $(DRY),--dry-run) $(if $(DATA),--data-dir "$(DATA)") $(if $(STAGE),--stage $(STAGE))

# The wheels the GPU machine lacks (scripts/gpu-wheels.lock: onnxruntime-gpu with only its sm_90
# code, bentoml, fastapi, ...), for its Python 3.12, cut into the parts the device calls carry
# (scripts/gpu_parts.py; docs/gpu.md). `python scripts/gpu_parts.py lock` re-pins them.
gpu-parts: .gpu/parts/.prepared
.gpu/parts/.prepared: scripts/gpu-wheels.lock scripts/gpu_parts.py | $(STAMP)
	$(BIN)/python scripts/gpu_parts.py prepare --out .gpu/parts
	touch $@

# The data the GPU machine lacks: the four .gz files (30 MB), into an ignored folder that call 1
# carries (carry [".gpu/data"]).
gpu-data: data
	mkdir -p .gpu/data && cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .gpu/data/

# The GPU machine's Python 3.12 and library versions (torch 2.11, onnxruntime 1.30, ...) on this CPU:
# the proof's dry run and the training/export tests in a venv of those versions (.gpu/venv312, ~4 GB
# from PyPI, once). Before a GPU run, after any change to training/ or export/ (scripts/gpu_env_check.sh).
gpu-env-check:
	PY312=$(PY312) bash scripts/gpu_env_check.sh

# Before every device call: each of the plan's four calls (scripts/gpu_calls.py; docs/gpu.md "The
# plan") run here with --dry-run, in the device's versions, with the same carries; < 10 minutes.
gpu-rehearsal: gpu-data gpu-parts
	PY312=$(PY312) bash scripts/gpu_env_check.sh venv
	.gpu/venv312/bin/python scripts/gpu_calls.py rehearse

# A real rolling restart here: two replicas behind haproxy (health check /readyz), c=16, each
# replica restarted in turn; failures and latency before/during/after (bench/rollout.py).
rollout: setup
	$(BIN)/python -m bench.rollout --concurrency 16 --duration 30 --out bench/cpu-2core/rollout
