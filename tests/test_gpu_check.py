"""The GPU check (bench/gpu_check.py): its smoke mode runs every stage at tiny sizes on CPU, so the harness
and the bench scripts it calls cannot rot between GPU runs; and a stage that fails, skips, or runs past its
budget is reported as such, with what it had written kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402


def test_smoke_runs_every_stage_on_cpu(tmp_path):
    run = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=1500)
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = {s["name"]: s for s in data["stages"]}
    assert list(stages) == [s.name for s in gpu_check.STAGES]
    for s in data["stages"]:
        assert s["status"] in ("ok", "skipped"), (s["name"], s["status"], s.get("reason"), s.get("tail"))
        assert s["status"] == "ok" or s["reason"], s  # a skip always says why
    assert run.returncode == 0, run.stdout[-3000:]
    # CPU: the GPU tests are collected and every one skips, none fails
    counts = stages["cuda_tests"]["result"]["counts"]
    assert counts["skipped"] >= 2 and counts["failed"] == counts["error"] == 0, counts
    timed = {r["method"]: r for r in stages["loss_head"]["result"]["rows"] if r.get("fwd_ms") is not None}
    assert "torch" in timed and "triton_fused_linear" in timed, list(timed)  # both heads ran (interpreter)
    assert stages["rollout"]["result"]["tables"]["rollout"]  # the engine rows of the trainer's call
    assert stages["doctor"]["result"]["rc"] == 0 and "## lowmem-vt doctor" in stages["doctor"]["markdown"]
    for name in ("step_lora", "step_qlora"):
        phases = stages[name]["result"]["phases"]
        assert {p["step"] for p in phases} == {1, 2, 3}, name  # 3 steps, every phase timed
        assert stages[name]["result"]["planner_peak_gib"] > 0
    ours = stages["vs_trl"]["result"]["ours"]
    assert isinstance(ours, list) and len(ours) == 2, ours  # our side runs even where TRL's cannot
    if stages["vs_trl"]["status"] == "skipped":
        assert "TRL" in stages["vs_trl"]["reason"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert all(f"## {i}. " in md for i in range(1, len(gpu_check.STAGES) + 1))
    assert "=== vs_trl" in (tmp_path / "gpu_check.log").read_text()


def test_every_stage_fails_when_handed_a_wrong_method(tmp_path):
    """A check that cannot fail checks nothing: each measuring stage, handed a deliberately wrong method
    (--fault: a loss head off by 1 %, engine log-probs off by 0.5, a NaN loss, our step raising), fails."""
    faulty = ["loss_head", "rollout", "step_lora", "vs_trl"]
    run = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(tmp_path), "--only", *faulty,
                          "--fault", *faulty], cwd=ROOT, capture_output=True, text=True, timeout=1500)
    stages = {s["name"]: s for s in json.loads((tmp_path / "gpu_check.json").read_text())["stages"]}
    assert stages["environment"]["status"] == "ok"
    for name in faulty:
        assert stages[name]["status"] == "failed", (name, stages[name]["status"], stages[name].get("tail"))
    assert run.returncode == 1
    assert any("triton_fused_linear" in f for f in stages["loss_head"]["result"]["failures"])
    checks = {c["check"]: c["ok"] for c in stages["rollout"]["result"]["tables"]["checks"]}
    assert checks["log-probs match the trainer's"] is False and checks["same seeds, same samples"] is True
    assert not all(c["ok"] for c in stages["step_lora"]["result"]["checks"])
    assert "deliberate fault" in stages["vs_trl"]["result"]["ours"]["error"]


def test_a_machine_triton_cannot_build_on_stops_at_the_first_stage_with_one_line(tmp_path):
    env = {**os.environ, "CC": "/nonexistent/cc"}
    run = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    stages = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert run.returncode == 1
    assert stages[0]["name"] == "environment" and stages[0]["status"] == "failed"
    assert [s["status"] for s in stages[1:]] == ["not_run"] * (len(gpu_check.STAGES) - 1)
    reason = stages[1]["reason"]
    assert reason == "environment: C compiler: CC=/nonexistent/cc is not an executable; fix CC or unset it", reason
    assert f"!! {reason}" in run.stdout


def _script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text("import json, sys, time\nout = sys.argv[sys.argv.index('--out') + 1]\n" + textwrap.dedent(body))
    return str(path)


@pytest.fixture
def check(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    return gpu_check.Check(out, smoke=True, budget=120, log=gpu_check.Log(out / "gpu_check.log"))


def test_a_stage_past_its_budget_is_stopped_and_keeps_what_it_wrote(check, tmp_path):
    slow = _script(tmp_path, "slow", """
        json.dump({"first": 1.5}, open(f"{out}/slow.json", "w"))
        open(f"{out}/slow.md", "w").write("| first | 1.5 |")
        time.sleep(300)
    """)
    check.run_stage(gpu_check.Stage("slow", "a stage that hangs", 4, slow))
    rec = check.data["stages"][0]
    assert rec["status"] == "timeout" and rec["seconds"] < 30, rec
    assert rec["result"] == {"first": 1.5} and rec["markdown"] == "| first | 1.5 |"
    saved = json.loads((check.out / "gpu_check.json").read_text())  # on disk, not only in memory
    assert saved["stages"][0]["result"] == {"first": 1.5}


def test_skips_failures_and_a_spent_budget_are_reported(check, tmp_path):
    skip = _script(tmp_path, "skip", 'json.dump({"skipped": "needs a CUDA GPU"}, open(f"{out}/skip.json", "w"))\n')
    fail = _script(tmp_path, "fail", 'print("something broke"); sys.exit(3)\n')
    silent = _script(tmp_path, "silent", "pass\n")
    for name, script in (("skip", skip), ("fail", fail), ("silent", silent)):
        check.run_stage(gpu_check.Stage(name, name, 30, script))
    check.budget = 0  # nothing left for the next stage
    check.run_stage(gpu_check.Stage("late", "late", 30, silent))
    got = {s["name"]: (s["status"], s.get("reason", "")) for s in check.data["stages"]}
    assert got["skip"] == ("skipped", "needs a CUDA GPU")
    assert got["fail"][0] == "failed" and "3" in got["fail"][1]
    assert "something broke" in check.data["stages"][1]["tail"]
    assert got["silent"] == ("failed", "no silent.json written")
    assert got["late"][0] == "not_run"
