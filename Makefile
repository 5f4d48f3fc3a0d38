# Set-up commands for a fresh machine with Python 3.11 (see README and docs/install.md).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
# The newest releases of every direct dependency, past pyproject's upper bounds (make test-latest).
LATEST_VENV ?= .venv-latest
# TRL 0.11.4 and its library versions, the baseline of benchmarks/bench_trl.py (make venv-trl).
TRL_VENV ?= .venv-trl
TRL_REQS := benchmarks/trl-requirements.txt
DIRECT_DEPS := torch torchvision diffusers peft accelerate transformers open-clip-torch safetensors numpy pillow \
	scipy pyyaml tqdm matplotlib pytest ruff tensorboard

.PHONY: venv venv-trl test lint format demo lock test-latest browser

# Installs exactly the tested versions: requirements.lock is a pip constraints file (make lock rewrites it).
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(LOCK) torch torchvision
	$(PY) -m pip install -q -c $(LOCK) -e ".[test]"
	touch $@

venv: $(VENV)/.installed

# The TRL side of benchmarks/bench_trl.py: a separate venv (torch from requirements.lock as in make venv, then
# the pins of benchmarks/trl-requirements.txt; pip resolves the rest). Its versions: $(TRL_VENV)/versions.txt.
$(TRL_VENV)/.installed: $(TRL_REQS) $(LOCK)
	$(PYTHON) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/python -m pip install -q --upgrade pip
	$(TRL_VENV)/bin/python -m pip install -q -c $(LOCK) torch
	$(TRL_VENV)/bin/python -m pip install -q -r $(TRL_REQS)
	$(TRL_VENV)/bin/python -m pip check
	$(TRL_VENV)/bin/python -m pip freeze > $(TRL_VENV)/versions.txt
	touch $@

venv-trl: $(TRL_VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The main job on the embedded default: AlignProp on the shapes world (CPU). Prints where the LoRA,
# the metrics and the before/after images are. OpenMP's default wait policy (threads spin briefly between
# parallel regions): alone on the machine, 2 threads step about 25 % faster than with OMP_WAIT_POLICY=PASSIVE
# (docs/benchmarks.md); PASSIVE is for when another torch process shares the cores (`make test` sets it).
demo: venv
	$(VENV)/bin/diffalign train --config configs/shapes/alignprop.yaml

# Headless Chromium for the gallery's browser tests (tests/test_gallery.py): Debian's chromium package,
# installed where root and apt-get are available; elsewhere those tests skip and say why.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	       && { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; }; } \
	  || echo "make: no Chromium and no way to install it (needs root and apt-get): the gallery browser tests will skip"

# Lint, then the whole test suite (single process). Exit 5 (no tests) counts as success.
test: lint browser
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

# Rewrite requirements.lock: a fresh venv with the newest versions pyproject.toml allows, then pip freeze.
# Run it when you change dependencies, then make test, and commit both.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q -e ".[test]"
	{ echo "# Tested versions (pip constraints) used by 'make venv', 'make test' and 'make demo'."; \
	  echo "# Regenerate after changing dependencies: make lock   (fresh venv, newest versions allowed by pyproject.toml, pip freeze)."; \
	  echo "# Generated $$(date -u +%Y-%m-%d) with Python $$(.venv-lock/bin/python -c 'import sys; print(sys.version.split()[0])') on $$(uname -m) $$(uname -s)."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v '^-e '; } > $(LOCK)
	rm -rf .venv-lock

# Early warning: the newest release of every direct dependency (ignoring the lock and pyproject's upper
# bounds) in a separate venv, then the whole suite. A failure here is a break users will meet once a
# bound is lifted or a lower bound's release goes; the versions used are in .venv-latest/versions.txt.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q -e ".[test]"
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade $(DIRECT_DEPS)
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable > $(LATEST_VENV)/versions.txt
	grep -iE '^(torch|torchvision|diffusers|peft|accelerate|transformers|open.clip.torch)==' $(LATEST_VENV)/versions.txt
	OMP_WAIT_POLICY=PASSIVE $(LATEST_VENV)/bin/python -m pytest -q -p no:cacheprovider
