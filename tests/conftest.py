"""Shared fixtures: the tiny offline Qwen2-VL (built once per session) and a loaded LoRA model on it."""

from __future__ import annotations

import fcntl
import logging
import os
import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", category=FutureWarning)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs the suite in pytest-xdist workers, one per core (setup.cfg's addopts): each worker takes one thread
# (two workers of two threads each on 2 cores would fight over them); run alone (-p no:xdist, -n 0) a test takes two
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))
# Triton kernels run in the interpreter on CPU; triton.jit reads this when a kernel module is imported, which any
# test module importing the trainer does at collection, so it is set here, before all of them. Where CUDA exists it
# is 0 whatever the environment says: one interpreted kernel would make the GPU tests test the interpreter.
os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else os.environ.get("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def selfcheck_cache(tmp_path_factory):
    """The self-check's verdict cache (lowmem_vt/selfcheck/env.py) in a temporary folder for the whole session, never
    the user's ~/.cache: trainers with the same shapes measure once (subprocesses inherit it); tests of the cache
    itself point LOWMEM_VT_CACHE_DIR at their own folder."""
    path = tmp_path_factory.mktemp("selfcheck-cache")
    old = os.environ.get("LOWMEM_VT_CACHE_DIR")
    os.environ["LOWMEM_VT_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LOWMEM_VT_CACHE_DIR", None)
    else:
        os.environ["LOWMEM_VT_CACHE_DIR"] = old


@pytest.fixture
def seed() -> int:
    """A fresh random seed per test (LOWMEM_TEST_SEED repeats one), printed so a failure can be replayed."""
    value = int(os.environ.get("LOWMEM_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"seed={value}")
    torch.manual_seed(value)
    return value


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: a problem must be reported before the model loads."""
    import lowmem_vt.model
    import lowmem_vt.trainer

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the problem was reported")

    monkeypatch.setattr(lowmem_vt.trainer, "load_model", refuse)
    monkeypatch.setattr(lowmem_vt.model, "load_model", refuse)
    monkeypatch.setattr(lowmem_vt.model, "load_plain_model", refuse)


def built_once(tmp_path_factory, name: str, build) -> Path:
    """``build(folder)`` run once per test session, its folder shared by every xdist worker (``make test`` runs the
    suite in workers; each has its own temporary root, whose parent is the session's): the first worker builds under
    the lock, the others wait for it and reuse the folder."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder = root / "built-once" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    done = folder.parent / f"{name}.done"
    with open(folder.parent / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            assert Path(build(folder)) == folder
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from lowmem_vt.tiny import build_tiny_model

    return built_once(tmp_path_factory, "tiny-qwen2vl", build_tiny_model)


@pytest.fixture(scope="session")
def tiny_lm(tiny_dir):
    """The tiny model with a LoRA adapter whose B is non-zero, so policy != reference."""
    from helpers.tiny_models import lora_model
    from lowmem_vt.config import LoraConfig

    return lora_model(tiny_dir, LoraConfig(r=4, alpha=8), max_pixels=112 * 112)


def tiny_recipe(tiny_dir, out_dir, **over):
    """The demo recipe pointed at the session's (random) tiny model and a temporary output folder, at the small
    sizes the tests were written for (the demo itself runs larger: tests/test_demo.py)."""
    from lowmem_vt.config import load_config

    base = [f"model.name_or_path={tiny_dir}", f"log.output_dir={out_dir}", "log.progress_bar=false", "log.plot=false",
            "data.generated_samples=64", "data.generated_tasks=[left_right]", "grpo.max_completion_length=8",
            "train.prompts_per_step=4", "train.micro_batch_size=16", "train.learning_rate=1e-2", "train.lr_scheduler=linear"]
    return load_config("recipes/demo_tiny.yaml", base + [f"{k}={v}" for k, v in over.items()])


@pytest.fixture
def recipe_factory(tiny_dir, tmp_path):
    def make(**over):
        return tiny_recipe(tiny_dir, tmp_path / "out", **over)

    return make


logging.getLogger("lowmem_vt").setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------- the tiny models of each family


@pytest.fixture
def one_thread():
    """One torch thread while a test runs (a whole module's: ``pytestmark = pytest.mark.usefixtures("one_thread")``):
    the tiny models' matmuls gain nothing from threads, and lose a lot when the cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_family_dir(tmp_path_factory):
    """``tiny_family_dir(name)``: the folder of family ``name``'s tiny random model, built once per session by
    ``lowmem-vt build-tiny --family name`` (``built_once``: shared by the xdist workers). No test writes into it."""
    from lowmem_vt.cli import main

    def build(name: str):
        def build_tiny(folder):
            assert main(["build-tiny", str(folder), "--family", name]) == 0
            return folder

        return built_once(tmp_path_factory, f"tiny-{name}", build_tiny)

    return build


@pytest.fixture(scope="session")
def tiny35_dir(tiny_family_dir):
    """The tiny Qwen3.5: a Gated DeltaNet layer, then a gated full-attention layer."""
    return tiny_family_dir("qwen3_5")


@pytest.fixture(scope="session")
def tiny35_lm(tiny35_dir):
    """The tiny Qwen3.5 with LoRA (r 4) on every linear of both layer kinds, B non-zero (policy != reference), in eval
    mode, images up to 128 x 128 px. Shared by several modules: tests read it and never change its weights."""
    from helpers.tiny_models import QWEN35_TARGETS, lora_model
    from lowmem_vt.config import LoraConfig

    lm = lora_model(tiny35_dir, LoraConfig(r=4, alpha=8, target_modules=QWEN35_TARGETS), max_pixels=128 * 128)
    lm.peft_model.eval()
    return lm
