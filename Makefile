# make demo: set up .venv and run the offline default recipe (tiny model, generated data, CPU)
# make test: set up .venv and run the whole suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

setup: $(STAMP)

# torch first, pinned: the 2.13.0 CPU build lies on local disk; installed first, no dependency can pull a CUDA build
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# --overwrite: each demo replaces the previous demo run (moved aside to out/demo.old-<time>, not deleted)
demo: $(STAMP)
	$(BIN)/python train.py recipes/demo_tiny.yaml --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) out artifacts
