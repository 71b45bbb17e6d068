# Fresh-machine entry points. Each target sets up .venv itself; a second run skips what is up to date.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH_WHEEL_DIR ?= /opt/wheels
# lmms-eval declares torchvision (never installed here: its only build is CUDA) and pytablewriter's typepy[datetime]
# would downgrade python-dateutil, so these go in without their declared dependencies; the `lmms` extra holds
# what their import path needs (see eval/lmms_adapter.py).
LMMS_NO_DEPS := lmms-eval==0.7.3 pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 \
	tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1
export HF_HUB_OFFLINE := 1
export DS_ACCELERATOR := cpu
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

# torch goes first from the pinned CPU wheel so nothing later pulls a CUDA build;
# deepspeed is an sdist whose build must see that torch, hence --no-build-isolation.
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q --find-links $(TORCH_WHEEL_DIR) torch==2.13.0
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[dev,demo,lmms]"
	$(BIN)/python -m pip install -q --no-deps $(LMMS_NO_DEPS)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		{ (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 \
		  || echo "note: could not install chromium from apt; the browser test will skip"; }
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dualtoken demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --timeout 900 tests

bench: $(STAMP)
	@for f in bench/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) .torch_extensions runs
