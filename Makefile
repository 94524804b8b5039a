# make demo: set up .venv and run the offline default recipe (tiny model, generated data, CPU)
# make test: set up .venv and run the whole suite
# Both install exactly the versions CI last passed with (requirements/lock.txt); `make lock` refreshes it on purpose.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
MIN_LOCK := requirements/min-lock.txt
GPU_LOCK := requirements/gpu-machine-lock.txt
PIP_VERSION := 26.3
# setup.cfg's peers extra (the oracles of the loss tests), without their dependencies: see setup.cfg
PEERS := trl==1.16.0 liger-kernel==0.8.5

.PHONY: demo test test-other-cpu test-min test-latest gpu-rehearsal rehearsal-wheels lock ci setup clean

setup: $(STAMP)

# A venv at $(1) with torch first, pinned (the 2.13.0 CPU build lies on local disk; installed first, no dependency
# can pull a CUDA build), then $(2): what to install, with its constraints.
define make_venv
	rm -rf $(1)
	$(PY) -m venv $(1)
	$(1)/bin/python -m pip install -q pip==$(PIP_VERSION)
	$(1)/bin/python -m pip install -q torch==2.13.0
	$(1)/bin/python -m pip install -q $(2)
	$(1)/bin/python -m pip install -q --no-deps $(PEERS)
	touch $(1)/.installed
endef

$(STAMP): setup.cfg pyproject.toml $(LOCK)
	$(call make_venv,$(VENV),-c $(LOCK) -e '.[dev]')

# --overwrite: each demo replaces the previous demo run (moved aside to out/demo.old-<time>, not deleted)
demo: $(STAMP)
	$(BIN)/python train.py recipes/demo_tiny.yaml --overwrite

# The suite runs in pytest-xdist workers, one per core up to 4 (each worker one torch thread: tests/conftest.py);
# worksteal: an idle worker takes tests queued on a busy one, so a few minute-long tests do not leave a core idle.
# `make test PYTEST_JOBS=0` runs it in one process.
PYTEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
PYTEST := -m pytest -q -n $(PYTEST_JOBS) --dist worksteal

test: $(STAMP)
	$(BIN)/python $(PYTEST) tests

# The suite on the declared minimums (requirements/min.txt, resolved into min-lock.txt): the floors of setup.cfg,
# the GPU machine's transformers 5.17.0 and triton 3.6.0 among them.
.venv-min/.installed: setup.cfg pyproject.toml $(MIN_LOCK)
	$(call make_venv,.venv-min,-c $(MIN_LOCK) -e '.[dev]')

# test-min and test-latest leave out two modules that test this repository's tooling, not its code against the
# versions in range, and that CI runs elsewhere: the wheel's install (tests/test_install.py, in `make test`) and the
# GPU check's smoke runs (tests/test_gpu_check.py, in `make test`; `make gpu-rehearsal` runs every bench script on
# the GPU machine's stack, transformers 5.17 and triton 3.6 as in the minimums). Several minutes each on 2 cores.
# They also leave out two markers (setup.cfg): `slow`, whole training runs of the newest recipes, and `scale`, the
# simulations of the full-size 2B-8B architectures, whose operators the tiny models' simulations run on each version.
RANGE_SUITE := --ignore=tests/test_install.py --ignore=tests/test_gpu_check.py -m "not slow and not scale"

test-min: .venv-min/.installed
	.venv-min/bin/python $(PYTEST) $(RANGE_SUITE) tests

# The suite on the newest releases in the declared ranges, resolved afresh each time: what `pip install .` gets
# today. Red here, green in `make test`: an upstream release broke us; fix, then `make lock`.
# names as pip compares them (liger-kernel == liger_kernel == Liger-Kernel), one per line, sorted
NORMALIZE := $(PY) -c "import re, sys; print(''.join(sorted(re.sub(r'[-_.]+', '-', n).lower() + '==' + v for n, v in (l.split('==', 1) for l in sys.stdin if '==' in l))), end='')"
# When the newest releases are exactly the lock (no release since `make lock`), the suite has nothing new to meet:
# `make test` runs it on those very versions, so the report says so instead of running it again.
test-latest:
	$(call make_venv,.venv-latest,-e '.[dev]')
	mkdir -p out
	.venv-latest/bin/python -m pip freeze --exclude-editable | grep -v '^-e ' | $(NORMALIZE) > out/latest-versions.txt
	grep -v '^#' $(LOCK) | $(NORMALIZE) > out/lock-versions.txt
	if cmp -s out/latest-versions.txt out/lock-versions.txt; then \
		echo "test-latest: the newest releases in the declared ranges are exactly $(LOCK), the versions make test runs the suite on: nothing new to test"; \
	else \
		echo "test-latest: releases newer than $(LOCK):"; diff out/lock-versions.txt out/latest-versions.txt; \
		.venv-latest/bin/python $(PYTEST) $(RANGE_SUITE) tests; \
	fi

# `make gpu-check` rehearsed on CPU: a venv holding what the GPU machine has (requirements/gpu-machine.txt, its
# published package list, locked in gpu-machine-lock.txt: torch, transformers 5.17, triton 3.6, peft, accelerate,
# pandas, pyarrow, hypothesis, ... all but torchvision, which does not load beside the CPU torch here), the carried
# wheels, then the GPU check's own install and every stage, smoke-sized (CUDA hidden, Triton interpreted).
.venv-gpu/.installed: $(GPU_LOCK) requirements/gpu-machine.txt
	$(call make_venv,.venv-gpu,-c $(GPU_LOCK) -r requirements/gpu-machine.txt)

# the same wheels as make gpu-wheels, built for this machine's Python (the GPU machine's is 3.12)
rehearsal-wheels:
	mkdir -p out/rehearsal-wheels
	$(PY) -m pip download -q --no-deps --only-binary=:all: $(WHEEL_PLATFORMS) -d out/rehearsal-wheels $(GPU_WHEELS)

gpu-rehearsal: .venv-gpu/.installed rehearsal-wheels
	.venv-gpu/bin/python bench/gpu_check.py --install --wheels out/rehearsal-wheels --smoke --out out/gpu_rehearsal

# Refresh the locks on purpose: resolve each stack afresh, run it (suite, or the rehearsal), and write its lock
# only when it passed. A lock is what CI last passed with, never an untested resolution.
lock:
	$(call make_venv,.venv-latest,-e '.[dev]')
	.venv-latest/bin/python $(PYTEST) tests
	$(call make_venv,.venv-min,-c requirements/min.txt -e '.[dev]')
	.venv-min/bin/python $(PYTEST) tests
	$(call make_venv,.venv-gpu,-r requirements/gpu-machine.txt)
	$(MAKE) rehearsal-wheels
	.venv-gpu/bin/python bench/gpu_check.py --install --wheels out/rehearsal-wheels --smoke --out out/gpu_rehearsal
	.venv-latest/bin/python -m pip freeze --exclude-editable | grep -v '^-e ' > $(LOCK)
	.venv-min/bin/python -m pip freeze --exclude-editable | grep -v '^-e ' > $(MIN_LOCK)
	.venv-gpu/bin/python -m pip freeze --exclude-editable | grep -v '^-e ' > $(GPU_LOCK)

# What CI runs: gates on test, test-min and gpu-rehearsal; runs test-latest and reports it without failing
ci:
	.ci/run

# the suite as on an x86 CPU without AVX-512/AMX: torch's kernels and oneDNN capped at AVX2 (results must not
# depend on the CPU a test runs on; CI machines differ)
test-other-cpu: $(STAMP)
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/python $(PYTEST) tests

clean:
	rm -rf $(VENV) .venv-min .venv-latest .venv-gpu out artifacts

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
