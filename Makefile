# make demo: set up .venv and run the offline default recipe (tiny model, generated data, CPU)
# make test: set up .venv and run the whole suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-other-cpu setup clean

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

# the suite as on an x86 CPU without AVX-512/AMX: torch's kernels and oneDNN capped at AVX2 (results must not
# depend on the CPU a test runs on; CI machines differ)
test-other-cpu: $(STAMP)
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) out artifacts

# make gpu-wheels (here, with PyPI): the packages the GPU machine lacks, as Python 3.12 manylinux wheels in
#   wheels/ (git-ignored; the device tool carries it), then checks that tree + wheels fit what it moves.
# make gpu-check (on the GPU machine): install them and the project without touching its torch, then every
#   stage of bench/gpu_check.py; results in $OUT (the device tool's) or out/gpu_check.
GPU_WHEELS := bitsandbytes==0.50.2 trl==1.16.0 liger-kernel==0.8.5 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19
WHEEL_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64,--platform $(p))

gpu-wheels:
	mkdir -p wheels
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(WHEEL_PLATFORMS) -d wheels $(GPU_WHEELS)
	$(PY) bench/gpu_check.py --carry-size

gpu-check:
	$(PY) bench/gpu_check.py --install

.PHONY: gpu-wheels gpu-check
