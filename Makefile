# The two commands: `make run` and `make test`. Both set themselves up.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run run-guarded test test-plain-clone lint setup up down clean

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

test: lint
	$(BIN)/python -m pytest

# The tests that may read data beside the checkout (../shared/external), with that folder hidden, as a plain
# clone runs them; CI runs this after `make test` so the next such dependency fails there, not for a user.
test-plain-clone: $(STAMP)
	KFTUNE_TESTS_HIDE_EXTERNAL=1 $(BIN)/python -m pytest -m external_data

clean:
	rm -rf build .pytest_cache
