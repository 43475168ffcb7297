# The two commands: `make run` and `make test`. Both set themselves up.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run run-guarded test multinode test-plain-clone lint setup up down clean lock gpu-wheelhouse

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and exactly: the CPU wheel on disk, never a CUDA range.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,dev]'
	touch $(STAMP)

setup: $(STAMP)

# The retrain workflow's runtime dependencies (pyproject.toml's, no extra), hash-locked for `pip install
# --require-hashes`: every file of each pin for Linux x86_64, torch as the CPU build (its wheel from
# TORCH_WHEELS; the workflow fetches the same file from PyTorch's CPU index). Rerun after changing pyproject.toml.
TORCH_WHEELS ?= /opt/wheels
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --no-config --generate-hashes --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --override requirements/cpu-torch.txt \
	  --find-links $(TORCH_WHEELS) --custom-compile-command 'make lock' -o requirements/runtime.lock

include mk/cluster.mk

run: $(STAMP)
	$(BIN)/python -m pipelines.demo

# `make run` plus the guard against forgetting (README "Guarding against forgetting"): the smoke benchmark
# on base and tuned, a 10% guard in the gate, and 10% of the training rows from a general source
run-guarded: $(STAMP)
	$(BIN)/python -m pipelines.demo --benchmarks kftune_smoke --guard-max-drop 0.1 \
		--data-mix '[{"uri": "data/smoke_facts.jsonl", "weight": 0.1}]'

up: $(STAMP)
	$(BIN)/kftune stack up

down: $(STAMP)
	$(BIN)/kftune stack down

# ruff's lint rules (pyproject.toml [tool.ruff]); `make test` runs it first
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/zizmor --offline --no-progress .github/workflows
	$(BIN)/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	$(BIN)/check-jsonschema --builtin-schema vendor.dependabot .github/dependabot.yml

test: lint
	$(BIN)/python -m pytest

# The tests that may read data beside the checkout (../shared/external), with that folder hidden, as a plain
# clone runs them; CI runs this after `make test` so the next such dependency fails there, not for a user.
# training on two hosts made with network namespaces (root; skipped, saying why, elsewhere): the Trainer's way
multinode: $(STAMP)
	$(BIN)/python -m pytest -m multinode tests/integration/test_multinode.py

test-plain-clone: $(STAMP)
	KFTUNE_TESTS_HIDE_EXTERNAL=1 $(BIN)/python -m pytest -m external_data
# the wheels a bare CUDA machine lacks, carried to it with the tree (bench/gpu.sh installs them --no-index)
gpu-wheelhouse: $(STAMP)
	$(BIN)/python bench/gpu_wheelhouse.py

clean:
	rm -rf build .pytest_cache
