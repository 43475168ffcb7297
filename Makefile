# The two commands: `make run` and `make test`. Both set themselves up.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint setup up down clean gpu-wheelhouse

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and exactly: the CPU wheel on disk, never a CUDA range.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

include mk/cluster.mk

run: $(STAMP)
	$(BIN)/python -m pipelines.demo

up: $(STAMP)
	$(BIN)/kftune stack up

down: $(STAMP)
	$(BIN)/kftune stack down

# ruff's lint rules (pyproject.toml [tool.ruff]); `make test` runs it first
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

# the wheels a bare CUDA machine lacks, carried to it with the tree (bench/gpu.sh installs them --no-index)
gpu-wheelhouse: $(STAMP)
	$(BIN)/python bench/gpu_wheelhouse.py

clean:
	rm -rf build .pytest_cache
