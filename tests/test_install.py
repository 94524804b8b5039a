"""`pip install .` works (issue #26): the wheel holds the whole `lowmem_vt` tree and its data files, and the
installed package runs from outside the repository.

Every venv and CI path installs with `-e`, which reads the source folder: a package or data file the wheel
leaves out shows only in a non-editable install (`pip install git+...`, the Colab notebook's `pip install REPO`).
The wheel is built from a copy of the source and installed, without dependencies, into a fresh venv that sees
this venv's packages (torch, transformers, ...) but not its editable lowmem_vt; then, with a temporary folder as
working directory, `lowmem-vt --help`, `lowmem-vt doctor` on a tiny recipe and one training step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEFT_OUT = shutil.ignore_patterns(".git", ".venv*", "out", "artifacts", "runs", "build", "wheels", ".whl", ".gl",
                                  "__pycache__", "*.egg-info", ".pytest_cache")


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    run = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"{' '.join(map(str, cmd))} -> {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip install .` builds, from a copy of the source (the build leaves nothing in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=LEFT_OUT)  # lowmem_vt/kernels stays a link, as in a clone
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w",
          str(tmp / "dist"), str(src)], cwd=tmp, env=dict(os.environ, PIP_NO_INPUT="1"))
    (whl,) = (tmp / "dist").glob("lowmem_vt-*.whl")
    return whl


def test_the_wheel_holds_every_module_and_data_file_of_the_tree(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    # what the source tree holds, found by walking it (through the kernels link), not from a list
    expected = {(Path(d) / f).relative_to(ROOT).as_posix() for d, _, files in os.walk(ROOT / "lowmem_vt", followlinks=True)
                for f in files if f.endswith((".py", ".json")) and "__pycache__" not in d}
    assert "lowmem_vt/kernels/compiled_resources.json" in expected and "lowmem_vt/families/__init__.py" in expected
    missing = sorted(expected - names)
    assert not missing, f"the wheel lacks {missing}"


def test_the_installed_wheel_runs_help_doctor_and_a_training_step_outside_the_repository(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # this venv's packages (torch & co.), appended after the fresh venv's own: a path in a .pth file runs none of
    # the .pth files it holds, so the editable lowmem_vt's finder there stays inactive
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)],
         cwd=tmp_path, env=env)
    work = tmp_path / "work"  # no repository here: nothing but the installed package can be imported
    work.mkdir()
    where = _run([py, "-c", "import lowmem_vt.families, lowmem_vt.selfcheck, lowmem_vt.rollout, lowmem_vt.kernels.resources"
                            " as r; print(r.RESOURCES_FILE.is_file(), lowmem_vt.families.__file__)"], work, env).stdout.split()
    assert where[0] == "True" and where[1].startswith(str(venv)), where

    cli = str(venv / "bin" / "lowmem-vt")
    assert "train" in _run([cli, "--help"], work, env).stdout
    _run([cli, "build-tiny", str(work / "tiny")], work, env)
    recipe = work / "tiny.yaml"
    recipe.write_text(f"""
model:
  name_or_path: {work / "tiny"}
  dtype: float32
lora:
  r: 4
  alpha: 8
data:
  source: generated
  generated_samples: 16
  generated_image_size: 56
  generated_tasks: [color]
  max_pixels: 3136
  min_pixels: 3136
grpo:
  num_generations: 4
  max_prompt_length: 256
  max_completion_length: 8
train:
  prompts_per_step: 2
  micro_batch_size: 8
  max_steps: 1
  device: cpu
log:
  output_dir: {work / "run"}
  progress_bar: false
  plot: false
""")
    doctor = _run([cli, "doctor", str(recipe)], work, env)
    assert "## lowmem-vt doctor" in doctor.stdout and "### Self-check" in doctor.stdout, doctor.stdout[-2000:]
    _run([cli, "train", str(recipe)], work, env)
    assert (work / "run" / "metrics.jsonl").read_text().strip(), "no training step was logged"
