# Set-up commands for a fresh machine with Python 3.11 (see README).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv test lint format demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The main job on the embedded default: AlignProp on the shapes world (CPU, about 8 minutes). Prints where
# the LoRA, the metrics and the before/after images are.
demo: venv
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/diffalign train --config configs/shapes/alignprop.yaml

# Lint, then the whole test suite (single process, torch on one thread). Exit 5 (no tests) counts as success.
test: lint
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc
