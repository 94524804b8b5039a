"""``lowmem-vt doctor RECIPE`` with every shipped recipe as shipped (issue 26): the demo's ``tiny-base:`` name is
resolved as ``train`` resolves it (it crashed: "Repo id must use alphanumeric chars"), and on a machine without the
hub the large recipes still give the report and say what could not be checked, never a traceback. Exit status: 0
nothing failed (also when nothing could be checked: it says so), 1 a path failed, 2 the user's error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lowmem_vt.cli import main
from lowmem_vt.selfcheck import env, head
from lowmem_vt.selfcheck.report import PathResult

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.name for p in (REPO / "recipes").glob("*.yaml"))
LARGE = [r for r in RECIPES if r != "demo_tiny.yaml"]


@pytest.fixture
def quiet_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWMEM_VT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(env, "machine_load", lambda device: {"load_per_core": 0.0, "calibration_s": 0.01})


def test_every_shipped_recipe_is_tested_here():
    assert "demo_tiny.yaml" in RECIPES and len(LARGE) >= 5, RECIPES


def test_doctor_runs_the_demo_recipe_as_shipped(tiny_dir, tmp_path, monkeypatch, capsys, quiet_cache):
    """recipes/demo_tiny.yaml names ``tiny-base:artifacts/tiny-base-qwen2vl`` (relative to the working folder). Its
    folder is filled beforehand with the session's tiny model and a pretraining.json, so that the doctor resolves
    the name exactly as ``train`` does (a complete folder is reused) without 30 s of pre-training here."""
    base = tmp_path / "artifacts" / "tiny-base-qwen2vl"
    shutil.copytree(tiny_dir, base)
    (base / "pretraining.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    rc = main(["doctor", str(REPO / "recipes" / "demo_tiny.yaml"), "--out", str(tmp_path / "doctor")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "### Self-check: " in out and "demo_tiny.yaml (cpu, float32" in out
    assert "A run of this recipe would use: kernels **torch**, rollout **hf**." in out
    assert (tmp_path / "doctor" / "doctor.md").read_text().startswith("## lowmem-vt doctor")
    report = json.loads((tmp_path / "doctor" / "selfcheck.json").read_text())
    assert report["requested"] == {"kernels": "auto", "rollout": "hf"}


def test_doctor_with_every_large_recipe_without_the_hub_reports_what_it_could_not_check(tmp_path):
    """Each SAT recipe as shipped, in a fresh interpreter with an empty hub cache and the hub offline: the report,
    its environment table, and the self-check reported as not run with the reason (data, model), status 0."""
    script = ("import contextlib, io, json, sys\n"
              "from lowmem_vt.cli import main\n"
              "results = {}\n"
              "for recipe in sys.argv[1:]:\n"
              "    buf = io.StringIO()\n"
              "    with contextlib.redirect_stdout(buf):\n"
              "        rc = main(['doctor', recipe])\n"
              "    results[recipe] = [rc, buf.getvalue()]\n"
              "print('RESULTS ' + json.dumps(results))\n")
    hub = tmp_path / "hf-home"
    hub.mkdir()
    run_env = {**os.environ, "HF_HOME": str(hub), "HF_HUB_CACHE": str(hub / "hub"), "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script, *[f"recipes/{r}" for r in LARGE]], capture_output=True,
                         text=True, timeout=600, cwd=REPO, env=run_env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    results = json.loads(out.stdout.split("RESULTS ", 1)[1])
    for recipe, (rc, text) in results.items():
        assert rc == 0, (recipe, text)
        assert "\n## lowmem-vt doctor\n" in text and "| torch |" in text, recipe
        assert f"### Self-check: {recipe}: not run" in text, text
        assert "could not be loaded" in text and "its model could not be loaded on" in text, text
        not_checked = text.split("### Not checked on this machine", 1)[1]
        assert f"the self-check of {recipe}" in not_checked, text


def test_doctor_exit_status_for_the_users_errors(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    assert main(["doctor", "recipes/demo_tiny.yaml", "--out", str(tmp_path / "a-file")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["doctor", "recipes/demo_tiny.yaml", "no_such.key=1"]) == 2
    assert "no_such" in capsys.readouterr().err


def test_doctor_says_a_run_would_stop_not_what_it_would_use(tiny_dir, monkeypatch, capsys, quiet_cache):
    """A named head that fails: status 1, the table says it stops the run, and no "would use" line names it."""
    def failing(weight, heads, settings, **kw):
        return [PathResult("kernels", "torch", reference=True, ok=True, cost=0.01),
                *[PathResult("kernels", h, ok=False, reason="grad error 2.0e-02 > 1e-03", cost=0.001) for h in heads]]

    monkeypatch.setattr(head, "check_heads", failing)
    rc = main(["doctor", "recipes/demo_tiny.yaml", f"model.name_or_path={tiny_dir}", "kernels=triton_fused_linear"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "| kernels: triton_fused_linear | FAIL, **stops the run** (named in the recipe) |" in out
    assert "would **stop before step 1** (status 2)" in out and "would use" not in out and "chosen" not in out
