# Everything a fresh machine needs: `make train` and `make test` create .venv on first use.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup test test-all lint train clean

setup: $(STAMP)

# Re-installs only when pyproject.toml changes. torch/torchvision are pinned to the releases that lie on this
# machine kind's disk (pip takes them from there in ~1.5 min instead of downloading several GB).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-all: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

train: setup
	$(BIN)/python scripts/train.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
