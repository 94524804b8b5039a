"""Declared ranges, the minimums CI tests and the locks `make` installs agree (issue #20).

setup.cfg's floors are what `make test-min` runs on (requirements/min.txt, resolved into min-lock.txt); the GPU
machine's stack (transformers 5.17.0, triton 3.6.0, torch 2.11) lies inside the declared ranges; `make` installs
exactly requirements/lock.txt, which holds every declared package at a version inside its range.
"""

import configparser
import os
import re
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
GPU_MACHINE = {"torch": "2.11.0", "transformers": "5.17.0", "triton": "3.6.0", "accelerate": "1.15.0"}
# The GPU machine's image as its published package list gives it (read 2026-11-17): versions it states, what else of
# it matters to us, and what it lacks (carried as wheels, or not needed)
GPU_MACHINE_STATED = {"transformers": "5.17.0", "triton": "3.6.0", "accelerate": "1.15.0", "huggingface-hub": "1.33.0",
                      "tokenizers": "0.23.2", "safetensors": "0.8.0", "sentencepiece": "0.2.2", "tiktoken": "0.14.0"}
GPU_MACHINE_HAS = ["pandas", "pyarrow", "hypothesis", "xxhash", "requests", "setuptools", "opencv-python-headless",
                   "accelerate", "peft", "matplotlib", "tensorboard", "pytest"]
GPU_MACHINE_LACKS = ["trl", "datasets", "bitsandbytes", "liger-kernel", "flash-attn", "vllm"]


def declared() -> dict[str, Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [ln.strip() for ln in cfg["options"]["install_requires"].splitlines()]
    reqs = [Requirement(ln) for ln in lines if ln and not ln.startswith("#")]
    return {r.name.lower(): r for r in reqs}


def pins(path: Path) -> dict[str, Version]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
        if m:
            out[m[1].lower().replace("_", "-")] = Version(m[2])
    return out


def floor(req: Requirement) -> Version:
    (spec,) = [s for s in req.specifier if s.operator == ">="]
    return Version(spec.version)


def test_every_dependency_has_a_floor_and_min_txt_pins_exactly_the_floors():
    reqs, minimum = declared(), pins(ROOT / "requirements" / "min.txt")
    assert set(minimum) == set(reqs), set(minimum) ^ set(reqs)
    for name, req in reqs.items():
        if name == "torch":  # 2.13.0 is the lowest CPU build here; the floor 2.11 is the GPU machine's (make gpu-check)
            assert floor(req) == Version("2.11") and minimum[name] == Version("2.13.0")
            continue
        assert minimum[name] == floor(req), f"{name}: setup.cfg says {req}, requirements/min.txt pins {minimum[name]}"


def test_the_gpu_machines_stack_is_inside_the_declared_ranges():
    reqs = declared()
    for name, version in GPU_MACHINE.items():
        assert reqs[name].specifier.contains(version, prereleases=True), f"{name} {version} outside {reqs[name]}"
    minimum = pins(ROOT / "requirements" / "min.txt")
    assert minimum["transformers"] == Version("5.17.0") and minimum["triton"] == Version("3.6.0")


def test_the_locks_pin_every_declared_package_inside_its_range():
    reqs = declared()
    for lock in ("lock.txt", "min-lock.txt"):
        locked = pins(ROOT / "requirements" / lock)
        for name, req in reqs.items():
            assert name in locked, f"{lock} does not pin {name}"
            version = Version(locked[name].base_version) if name == "torch" else locked[name]  # 2.13.0+cpu
            assert req.specifier.contains(version, prereleases=True), f"{lock}: {name} {locked[name]} outside {req}"
    minimum, min_lock = pins(ROOT / "requirements" / "min.txt"), pins(ROOT / "requirements" / "min-lock.txt")
    for name, version in minimum.items():  # the min lock is the minimums, resolved
        assert Version(min_lock[name].base_version) == version, f"min-lock.txt: {name} {min_lock[name]}, min.txt {version}"


def test_make_installs_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert "$(call make_venv,$(VENV),-c $(LOCK) -e '.[dev]')" in makefile
    assert re.search(r"^\$\(STAMP\): .*\$\(LOCK\)", makefile, flags=re.M)  # a new lock reinstalls
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def _ci_with_make_failing(tmp_path, failing: str, **extra_env) -> tuple[subprocess.CompletedProcess, list[str]]:
    """.ci/run with a stand-in `make` on PATH that logs each target and fails on ``failing``."""
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "make"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n[ "$1" != "{failing}" ]\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}", **extra_env)
    run = subprocess.run(["bash", str(ROOT / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60)
    made = calls.read_text().split()
    # the rehearsal's setup runs in the background, beside the first gate: its place in the log is not fixed
    assert sorted(c for c in made if c not in STEPS) == [".venv-gpu/.installed", "rehearsal-wheels"], made
    return run, [c for c in made if c in STEPS]


STEPS = ("test", "test-min", "gpu-rehearsal", "test-latest")


@pytest.mark.parametrize("failing", ["test", "test-min", "gpu-rehearsal", "test-latest", "none"])
def test_ci_gates_on_what_this_repository_controls_and_reports_test_latest(tmp_path, failing):
    """A release upstream (test-latest red) cannot fail CI; a red gate fails it, and the later steps still run."""
    run, calls = _ci_with_make_failing(tmp_path, failing)
    assert calls == ["test", "test-min", "gpu-rehearsal", "test-latest"], calls  # every step, whatever failed
    gates_red = failing in ("test", "test-min", "gpu-rehearsal")
    assert run.returncode == (1 if gates_red else 0), run.stdout
    assert ("test-latest RED" in run.stdout) == (failing == "test-latest"), run.stdout


def test_ci_skips_the_test_latest_report_when_the_gates_used_most_of_its_time(tmp_path):
    """CI has 90 minutes: past LATEST_AFTER_S (60 min) the report is not run, and the last line says so."""
    run, calls = _ci_with_make_failing(tmp_path, "none", LATEST_AFTER_S="-1")
    assert calls == ["test", "test-min", "gpu-rehearsal"] and run.returncode == 0, (calls, run.stdout)
    assert "test-latest not run: the gates took" in run.stdout


def _names(path: Path) -> set[str]:
    lines = [ln.split("#")[0].strip() for ln in path.read_text().splitlines()]
    return {Requirement(ln).name.lower().replace("_", "-") for ln in lines if ln}


def test_the_rehearsal_holds_what_the_gpu_machine_has_and_nothing_it_lacks():
    """requirements/gpu-machine.txt is the machine's published list (issue #26): what it has is there (its versions
    where stated) and locked from a passing rehearsal; what it lacks is not, so the carried wheels are rehearsed."""
    wanted, lock = _names(ROOT / "requirements" / "gpu-machine.txt"), pins(ROOT / "requirements" / "gpu-machine-lock.txt")
    assert not set(GPU_MACHINE_HAS) - wanted, set(GPU_MACHINE_HAS) - wanted
    assert not set(GPU_MACHINE_HAS) - {"setuptools"} - set(lock), set(GPU_MACHINE_HAS) - set(lock)  # pip freeze omits setuptools
    for name, version in GPU_MACHINE_STATED.items():
        assert lock[name] == Version(version), f"gpu-machine-lock.txt: {name} {lock[name]}, the machine has {version}"
    for name in GPU_MACHINE_LACKS:
        assert name not in wanted and name not in lock, f"the GPU machine lacks {name}; the rehearsal must too"
    # torchvision: there, but no wheel loads beside the CPU torch here; the file says what that leaves unshown
    assert "torchvision" not in lock and "torchvision 0.26.0 is there and NOT here" in (ROOT / "requirements" / "gpu-machine.txt").read_text()


def test_a_failed_background_setup_of_the_rehearsal_is_said_and_the_gate_tries_again(tmp_path):
    run, calls = _ci_with_make_failing(tmp_path, ".venv-gpu/.installed")
    assert calls == ["test", "test-min", "gpu-rehearsal", "test-latest"] and run.returncode == 0, (calls, run.stdout)
    assert "the rehearsal's background setup failed" in run.stdout
