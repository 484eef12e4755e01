# Two commands do all the set-up on a fresh machine (Debian, Python 3.11, no GPU):
#   make demo   creates .venv, installs the CPU torch build and the project, starts the explorer
#   make test   the same install plus the dev extras and a headless Chromium, then `ruff check .` and
#               the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: install install-dev demo test lint

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Stamps: a later `make demo` skips pip unless pyproject.toml changed.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e . $(TORCH_PIN)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev]' $(TORCH_PIN)
	# curvlinops (via backpack) and kronfluence pull torchvision, whose PyPI build breaks beside this torch
	$(BIN)/pip uninstall -y -q torchvision || true
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev
	bash .ci/install-browser.sh

# MALLOC_ARENA_MAX=2: two glibc malloc arenas keep the server's memory flat under concurrent
# queries; glibc reads it only at process start (`attribution demo` re-executes itself with it
# when it is unset, so setting it here just saves that restart)
demo: install
	MALLOC_ARENA_MAX=2 $(BIN)/attribution demo

# lint and format check first (seconds), then every test; `pytest -m "not slow and not browser and not peers"` is the quick subset
test: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -x --durations=15

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
