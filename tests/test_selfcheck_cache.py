"""The self-check's verdict cache (lowmem_vt/selfcheck/env.py, issue 26): a verdict is reused only for the code, the
model and the packages it was measured with, and a speed is reused only when it was measured on a quiet machine.

The code fingerprint comes from the checks' import graph: a test edits every file of it, in a copy of the package,
and sees the group measured again (multiplying the engine's attention scaling by 1.05 in families/base.py kept the
old hand-written fingerprint); another model with the same config, and a changed version of each accelerating
package, measure again; a group measured on a busy machine keeps its verdicts but not its speeds. Also the table's
word for a named path that failed and stops the run (it said "FAIL, chosen")."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowmem_vt
import lowmem_vt.selfcheck as sc
from lowmem_vt.selfcheck import env, head
from lowmem_vt.selfcheck.report import PathResult

FAST = {"train.prompts_per_step": 2, "grpo.num_generations": 4, "train.micro_batch_size": 8,
        "grpo.max_completion_length": 6, "data.generated_samples": 16, "log.sample_every": 0}
QUIET = {"load_per_core": 0.0, "calibration_s": 0.010}
BUSY = {"load_per_core": 0.9, "calibration_s": 0.010}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A verdict cache of this test's own, on a machine that counts as quiet unless the test says otherwise."""
    path = tmp_path / "cache"
    monkeypatch.setenv("LOWMEM_VT_CACHE_DIR", str(path))
    monkeypatch.setattr(env, "machine_load", lambda device: dict(QUIET))
    return path


@pytest.fixture
def counted_heads(monkeypatch):
    """The head check replaced by a count of its calls (both heads pass, 10x faster than torch): what is tested is
    whether the cache or a measurement answers. auto measures the heads as on a GPU."""
    calls = []

    def check_heads(weight, heads, settings, **kw):
        calls.append(list(heads))
        return [PathResult("kernels", "torch", reference=True, ok=True, cost=0.01),
                *[PathResult("kernels", h, ok=True, cost=0.001) for h in heads]]

    monkeypatch.setattr(head, "check_heads", check_heads)
    monkeypatch.setattr(head, "fast_path_device", lambda device: True)
    return calls


def _package_copy(tmp_path: Path) -> Path:
    """A copy of the lowmem_vt package (the kernels link resolved into a folder), without caches."""
    root = tmp_path / "copy" / "lowmem_vt"
    shutil.copytree(Path(lowmem_vt.__file__).parent, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _use_package_root(monkeypatch, root: Path) -> None:
    monkeypatch.setattr(env, "PACKAGE_ROOT", root)
    env.code_fingerprint.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_fingerprint():
    env.code_fingerprint.cache_clear()
    yield
    env.code_fingerprint.cache_clear()


# ---------------------------------------------------------------------------------------------- the code


def test_the_fingerprint_holds_what_the_checks_import():
    names = {f.relative_to(env.PACKAGE_ROOT).as_posix() for f in env.fingerprinted_files()}
    # what the old hand-written list left out, and what the checked paths run
    for must in ("families/base.py", "families/qwen2_vl.py", "families/qwen3_vl.py", "inputs.py", "grpo.py", "model.py",
                 "rollout/engine.py", "rollout/sampling.py", "kernels/head.py", "kernels/fused_linear.py",
                 "kernels/compiled_resources.json", "selfcheck/head.py", "selfcheck/rollout.py", "selfcheck/levers.py"):
        assert must in names, must
    # what no check runs: the trainer, the command line, the doctor (editing them keeps the verdicts)
    assert not {"trainer.py", "cli.py", "selfcheck/doctor.py", "eval.py", "merge.py"} & names


def test_the_walk_finds_every_module_that_importing_the_checks_loads(tmp_path):
    """What Python itself loads for the self-check (and its lazy imports, run by a check of the tiny model) is a
    subset of what the walk finds: the walk cannot miss an import that executes."""
    script = ("import sys, json\n"
              "import lowmem_vt.selfcheck, lowmem_vt.selfcheck.env as env\n"
              "import lowmem_vt.kernels.head, lowmem_vt.rollout.engine, lowmem_vt.model, lowmem_vt.inputs\n"
              "root = env.PACKAGE_ROOT\n"
              "loaded = sorted(m for m in sys.modules if m == 'lowmem_vt' or m.startswith('lowmem_vt.'))\n"
              "files = {str(f) for f in env.fingerprinted_files()}\n"
              "missing = [m for m in loaded if env._module_source(root, m) is not None "
              "and str(env._module_source(root, m)) not in files]\n"
              "print(json.dumps({'loaded': len(loaded), 'missing': missing}))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["loaded"] > 20 and found["missing"] == [], found


def test_an_edit_to_any_fingerprinted_file_measures_again(tmp_path, monkeypatch, recipe_factory, tiny_lm, cache,
                                                          counted_heads):
    """Every file of the set, edited in a copy of the package (a byte appended), changes the fingerprint, and the
    self-check measures again instead of reading the cached verdict."""
    root = _package_copy(tmp_path)
    real = env.code_fingerprint()
    _use_package_root(monkeypatch, root)
    assert env.code_fingerprint() == real  # the copy is the same code: the fingerprint depends on contents only
    cfg = recipe_factory(**FAST)
    sc.run_selfcheck(cfg, tiny_lm, show=False)
    sc.run_selfcheck(cfg, tiny_lm, show=False)
    assert len(counted_heads) == 1  # measured once, then read from the cache
    files = env.fingerprinted_files(root)
    assert len(files) > 30
    seen = {real}
    for f in files:
        f.write_bytes(f.read_bytes() + b"\n")
        env.code_fingerprint.cache_clear()
        fingerprint = env.code_fingerprint()
        assert fingerprint not in seen, f"editing {f.relative_to(root)} kept the fingerprint"
        seen.add(fingerprint)
        n = len(counted_heads)
        result = sc.run_selfcheck(cfg, tiny_lm, show=False)
        assert len(counted_heads) == n + 1 and result.measured == ["kernels"], f.relative_to(root)


def test_the_engines_attention_scaling_edited_changes_the_fingerprint(tmp_path):
    """The fault of issue 26, through the public function only (so that it runs on any version of the package): a
    fresh interpreter imports a copy of the package, and editing families/base.py (the attention scaling x 1.05),
    inputs.py or grpo.py must change ``code_fingerprint()``."""
    root = _package_copy(tmp_path)
    base = root / "families" / "base.py"
    assert "scaling" in base.read_text()
    edits = [("families/base.py", "# the engine's attention scaling x 1.05\n"), ("inputs.py", "# edited\n"),
             ("grpo.py", "# edited\n")]
    script = ("import json, sys, pathlib\n"
              "import lowmem_vt, lowmem_vt.selfcheck.env as env\n"
              "assert pathlib.Path(lowmem_vt.__file__).resolve().is_relative_to(pathlib.Path(sys.argv[1]).resolve())\n"
              "def fingerprint():\n"
              "    if hasattr(env, '_fingerprint'): env._fingerprint = None\n"
              "    if hasattr(env.code_fingerprint, 'cache_clear'): env.code_fingerprint.cache_clear()\n"
              "    return env.code_fingerprint()\n"
              "out = [fingerprint()]\n"
              f"for name, text in {edits!r}:\n"
              "    f = pathlib.Path(sys.argv[1]) / 'lowmem_vt' / name\n"
              "    f.write_text(f.read_text() + text)\n"
              "    out.append(fingerprint())\n"
              "print(json.dumps(out))\n")
    run_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script, str(root.parent)], capture_output=True, text=True, timeout=300,
                         cwd=root.parent, env={**run_env, "PYTHONPATH": str(root.parent), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    prints = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(set(prints)) == len(prints), dict(zip(["before"] + [e[0] for e in edits], prints))


def test_a_computed_import_makes_every_file_count(tmp_path, monkeypatch):
    """A module that imports by a computed name cannot be followed: the whole package counts then."""
    root = _package_copy(tmp_path)
    rollout = root / "selfcheck" / "rollout.py"
    rollout.write_text(rollout.read_text() + "\n\ndef _plugin(name):\n    import importlib\n\n"
                       "    return importlib.import_module(name)\n")
    files = {f.relative_to(root).as_posix() for f in env.fingerprinted_files(root)}
    assert {"trainer.py", "cli.py", "selfcheck/doctor.py"} <= files


# ---------------------------------------------------------------------------------------------- the model


def _safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def test_another_model_with_the_same_config_measures_again(tmp_path, monkeypatch, recipe_factory, tiny_lm, cache,
                                                           counted_heads):
    from lowmem_vt.tiny import build_tiny_model

    a = build_tiny_model(tmp_path / "a", seed=1)
    b = build_tiny_model(tmp_path / "b", seed=2)  # other weights, the same config
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()
    ida, idb = env.model_identity(str(a)), env.model_identity(str(b))
    assert ida["config_sha256"] == idb["config_sha256"] and ida["weights"] != idb["weights"]
    shutil.copytree(a, tmp_path / "a-copy")  # a copy: other modification times, the same model
    assert env.model_identity(str(tmp_path / "a-copy")) == ida
    assert env.model_identity(f"tiny:{a}") == ida  # a tiny model's name names its folder
    sc.run_selfcheck(recipe_factory(**FAST, **{"model.name_or_path": str(a)}), tiny_lm, show=False)
    sc.run_selfcheck(recipe_factory(**FAST, **{"model.name_or_path": str(tmp_path / "a-copy")}), tiny_lm, show=False)
    assert len(counted_heads) == 1
    result = sc.run_selfcheck(recipe_factory(**FAST, **{"model.name_or_path": str(b)}), tiny_lm, show=False)
    assert len(counted_heads) == 2 and result.measured == ["kernels"]


def test_weight_digest_sees_one_changed_tensor_not_a_touch(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(64, 64, generator=g) for i in range(8)}
    f = tmp_path / "m" / "model.safetensors"
    _safetensors(f, tensors)
    before = env._weights_digest(f)
    os.utime(f, (1, 1))  # another time: the same weights
    assert env._weights_digest(f) == before
    tensors["layer5.weight"] = tensors["layer5.weight"] * 1.01  # one tensor of eight, the same size
    _safetensors(f, tensors)
    assert env._weights_digest(f) != before


def test_a_model_from_the_hub_cache_is_known_by_its_blobs_and_commit(tmp_path):
    """In the hub's cache a weight file links to blobs/<sha256 of its content>: that name is the identity (free), and
    the snapshot's folder name is the commit."""
    repo = tmp_path / "hub" / "models--org--model"
    commit = "0123456789abcdef0123456789abcdef01234567"
    blob = "ab" * 32
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    _safetensors(repo / "blobs" / blob, {"w": torch.zeros(4, 4)})
    (snap / "model.safetensors").symlink_to(Path("..") / ".." / "blobs" / blob)
    (snap / "config.json").write_text('{"model_type": "qwen2_vl"}')
    identity = env.model_identity(str(snap))
    assert identity["hub_commit"] == commit and identity["weights"] == {"model.safetensors": f"sha256:{blob}"}
    assert env.model_identity("org/not-downloaded") == {"name": "org/not-downloaded"}


# ---------------------------------------------------------------------------------------------- the packages


@pytest.mark.parametrize("package", ["flash-attn", "flash-linear-attention", "vllm", "bitsandbytes", "liger-kernel",
                                     "triton", "transformers", "torch"])
def test_a_package_version_change_measures_again(package, monkeypatch, recipe_factory, tiny_lm, cache, counted_heads):
    assert package in env.KEY_PACKAGES
    cfg = recipe_factory(**FAST)
    sc.run_selfcheck(cfg, tiny_lm, show=False)
    sc.run_selfcheck(cfg, tiny_lm, show=False)
    assert len(counted_heads) == 1
    real = env.package_versions
    monkeypatch.setattr(env, "package_versions", lambda names=env.KEY_PACKAGES: {**real(names), package: "0.0.1-other"})
    result = sc.run_selfcheck(cfg, tiny_lm, show=False)
    assert len(counted_heads) == 2 and result.measured == ["kernels"]


def test_the_gpu_driver_and_cuda_are_in_the_key(monkeypatch):
    card = {"device": "cuda", "name": "NVIDIA L4", "capability": "8.9", "cuda_runtime": "12.8", "driver": "570.1"}
    monkeypatch.setattr(env, "gpu_info", lambda device=None: dict(card))
    first = env.environment(torch.device("cpu"))
    monkeypatch.setattr(env, "gpu_info", lambda device=None: {**card, "driver": "575.2"})
    second = env.environment(torch.device("cpu"))
    monkeypatch.setattr(env, "gpu_info", lambda device=None: {**card, "cuda_runtime": "13.0"})
    third = env.environment(torch.device("cpu"))
    assert first["driver"] == "570.1" and len({json.dumps(k, sort_keys=True) for k in (first, second, third)}) == 3


# ---------------------------------------------------------------------------------------------- speed under load


def test_speeds_measured_on_a_busy_machine_are_not_kept(monkeypatch, recipe_factory, tiny_lm, cache, counted_heads,
                                                        tmp_path):
    """auto ranks passing heads by speed. Measured busy: this run decides (with a warning), the cache keeps the
    verdicts without the speeds; the next quiet run measures again and keeps them; the one after reads the cache."""
    monkeypatch.setattr(env, "machine_load", lambda device: dict(BUSY))
    cfg = recipe_factory(**FAST)
    first = sc.run_selfcheck(cfg, tiny_lm, out_dir=tmp_path)
    assert first.kernels == "triton_fused_linear" and first.measured == ["kernels"]
    assert any("busy machine" in w and "other processes used 90% of the cores" in w for w in first.warnings), first.warnings
    assert "| kernels | speeds not kept | measured on a busy machine" in sc.summary(first)
    stored = json.loads(next((cache / "selfcheck").glob("kernels-*.json")).read_text())
    assert stored["speeds_kept"] is False and all(p["cost"] is None for p in stored["paths"])
    assert all(p["ok"] for p in stored["paths"])  # the verdicts are kept
    busy_again = sc.run_selfcheck(cfg, tiny_lm, show=False)  # still busy: measured again, not kept again
    assert len(counted_heads) == 2 and busy_again.measured == ["kernels"]
    monkeypatch.setattr(env, "machine_load", lambda device: dict(QUIET))
    second = sc.run_selfcheck(cfg, tiny_lm, show=False)
    assert len(counted_heads) == 3 and second.measured == ["kernels"] and not second.warnings
    third = sc.run_selfcheck(cfg, tiny_lm, show=False)
    assert len(counted_heads) == 3 and third.cache_hits == ["kernels"] and third.kernels == "triton_fused_linear"


def test_a_busy_verdict_is_reused_where_no_speed_decides(monkeypatch, recipe_factory, tiny_lm, cache, counted_heads):
    """A named head: only its correctness decides, so the verdict measured on a busy machine is read back."""
    monkeypatch.setattr(env, "machine_load", lambda device: dict(BUSY))
    cfg = recipe_factory(**FAST, kernels="triton_fused_linear")
    sc.run_selfcheck(cfg, tiny_lm, show=False)
    monkeypatch.setattr(env, "machine_load", lambda device: dict(QUIET))
    again = sc.run_selfcheck(cfg, tiny_lm, show=False)
    assert len(counted_heads) == 1 and again.cache_hits == ["kernels"] and again.kernels == "triton_fused_linear"


def test_busy_rule():
    quiet = {"load_per_core": 0.1, "calibration_s": 0.010}
    assert env.busy_reason(quiet, quiet) == ""
    assert "used 80% of the cores" in env.busy_reason({**quiet, "load_per_core": 0.8}, quiet)
    assert "calibration" in env.busy_reason(quiet, {**quiet, "calibration_s": 0.016})  # 1.6x slower after
    assert "calibration" in env.busy_reason({**quiet, "calibration_s": 0.016}, quiet)  # load that went away
    assert env.busy_reason(quiet, {**quiet, "calibration_s": 0.012}) == ""  # 1.2x: noise
    gpu = {**quiet, "gpu_utilization": 0, "gpu_other_processes": 0}
    assert env.busy_reason(gpu, gpu) == ""
    assert "2 other process(es)" in env.busy_reason(gpu, {**gpu, "gpu_other_processes": 2})
    assert "GPU was 85 % busy" in env.busy_reason({**gpu, "gpu_utilization": 85}, gpu)
    load = env.machine_load(torch.device("cpu"))  # the real sample: figures, no judgement
    assert load["load_per_core"] >= 0 and load["calibration_s"] > 0


# ---------------------------------------------------------------------------------------------- the table's words


def test_a_named_path_that_fails_is_not_called_chosen(monkeypatch, recipe_factory, tiny_lm, cache, capsys):
    """selfcheck: on stops the run: the table says so (it said "FAIL, chosen"); selfcheck: warn runs it anyway."""
    def failing(weight, heads, settings, **kw):
        return [PathResult("kernels", "torch", reference=True, ok=True, cost=0.01),
                *[PathResult("kernels", h, ok=False, reason="grad error 2.0e-02 > 1e-03", cost=0.001) for h in heads]]

    monkeypatch.setattr(head, "check_heads", failing)
    cfg = recipe_factory(**FAST, kernels="triton_fused_linear")
    stopped = sc.run_selfcheck(cfg, tiny_lm, show=False, raise_errors=False)
    table = sc.summary(stopped)
    assert stopped.errors and "| kernels: triton_fused_linear | FAIL, **stops the run** (named in the recipe) |" in table
    assert "chosen" not in table and "the run stops before step 1" in table.splitlines()[0], table
    capsys.readouterr()
    with pytest.raises(sc.SelfCheckError, match="key 'kernels'"):  # what a run prints before it stops
        sc.run_selfcheck(cfg, tiny_lm)
    printed = capsys.readouterr().out
    assert "FAIL, **stops the run**" in printed and "chosen" not in printed, printed
    warned = sc.run_selfcheck(recipe_factory(**FAST, kernels="triton_fused_linear", selfcheck="warn"), tiny_lm, show=False)
    table = sc.summary(warned)
    assert "| kernels: triton_fused_linear | FAIL, **runs anyway** (selfcheck: warn) (cached) |" in table
    assert "chosen" not in table, table
