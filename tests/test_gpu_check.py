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

from lowmem_vt.families import FAMILIES  # noqa: E402


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
    processor = stages["processor"]["result"]  # every family, every case compared, each side's class named
    assert [f["family"] for f in processor["families"]] == list(FAMILIES) and not processor["failures"], processor
    assert all(len(f["rows"]) == 3 and f["theirs"] for f in processor["families"])
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
    faulty = ["processor", "loss_head", "rollout", "step_lora", "vs_trl"]
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
    assert all("pixel_values differ" in f for f in stages["processor"]["result"]["failures"])


def test_a_wrong_trivial_launch_fails_the_environment_stage(tmp_path):
    run = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(tmp_path), "--only", "environment",
                          "--fault", "environment"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    (stage,) = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert run.returncode == 1 and stage["status"] == "failed", (stage, run.stdout[-2000:])
    assert "x + 1 on cpu: WRONG result" in stage["result"]["findings"][-1]["detail"]


def test_fault_is_refused_where_the_stage_cannot_fail(tmp_path):
    """On CPU the doctor checks no head and every gpu test skips: their wrong head would show nowhere, so --smoke
    refuses it (exit 2, argparse), instead of reporting a fault test that did nothing as run."""
    for name in ("doctor", "cuda_tests"):
        run = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(tmp_path), "--fault", name],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and f"--fault {name}: the wrong head runs only on a CUDA GPU" in run.stderr, run.stderr
    assert all(s.fault for s in gpu_check.STAGES)  # every stage has a wrong method that must fail it


def test_the_wrong_head_of_the_doctor_and_cuda_tests_fails_the_kernel_tests():
    """--fault doctor / cuda_tests hand the stage Triton heads off by 1 % (bench/report.py break_triton_heads,
    applied by bench/pytest_results.py in the pytest stage). Its gpu tests run only on CUDA; the same kernel tests in
    the interpreter show here that the patch reaches what the tests call, and fails them."""
    tests = ["tests/test_kernels.py::test_token_logprobs_matches_reference[triton_fused_linear]",
             "tests/test_kernels.py::test_fused_grpo_loss_matches_reference[grpo-False-True-0.04-1.0-False-triton_fused_linear]"]
    outcomes = {}
    for fault in ("0", "1"):
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT / "bench"), LOWMEM_BENCH_FAULT=fault)
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "pytest_results", "-p", "no:cacheprovider", *tests],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        outcomes[fault] = run.returncode
        assert ("2 passed" if fault == "0" else "2 failed") in run.stdout, run.stdout[-2000:]
    assert outcomes == {"0": 0, "1": 1}


@pytest.mark.parametrize("smoke", [True, False])
def test_a_skip_is_expected_on_cpu_and_a_failure_on_the_gpu_machine(tmp_path, smoke):
    """The GPU machine has a GPU, torchvision and the carried wheels: a stage, a method of a stage's table or a gpu
    test that skips there fails the check; in the CPU rehearsal (--smoke) the skip is stated as expected."""
    out = tmp_path / "out"
    out.mkdir()
    check = gpu_check.Check(out, smoke=smoke, budget=120, log=gpu_check.Log(out / "gpu_check.log"))
    whole = _script(tmp_path, "whole", 'json.dump({"skipped": "needs a CUDA GPU"}, open(f"{out}/whole.json", "w"))\n')
    part = _script(tmp_path, "part", 'json.dump({"rows": [{"method": "torch", "note": ""}, {"method": "liger", '
                                     '"note": "skipped: liger_kernel does not import"}]}, open(f"{out}/part.json", "w"))\n')
    for name, script in (("whole", whole), ("part", part)):
        check.run_stage(gpu_check.Stage(name, name, 30, script))
    got = {s["name"]: (s["status"], s.get("reason", "")) for s in check.data["stages"]}
    if smoke:
        assert got["whole"] == ("skipped", "expected off the GPU machine: needs a CUDA GPU")
        assert got["part"] == ("ok", "expected off the GPU machine: liger: liger_kernel does not import")
    else:
        assert got["whole"] == ("failed", "skipped on the GPU machine, which should not need to: needs a CUDA GPU")
        assert got["part"] == ("failed", "skipped on the GPU machine, which should not need to: liger: liger_kernel does not import")
    tests = {"counts": {"passed": 1, "skipped": 2}, "tests": [{"test": "a", "outcome": "passed", "message": ""}] +
             [{"test": t, "outcome": "skipped", "message": "bitsandbytes is carried as a wheel"} for t in "bc"]}
    assert gpu_check.skipped_parts(tests) == ["2 tests: bitsandbytes is carried as a wheel"]


def test_the_readme_table_is_the_stages_table():
    """README's GPU-check table names each stage with the script it runs and its budget, as STAGES says."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## The GPU check"):]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 3:
            for name in cells[0].replace("`", "").split(","):
                rows[name.strip()] = cells
    assert list(rows) == [s.name for s in gpu_check.STAGES], list(rows)
    for stage in gpu_check.STAGES:
        what, budget = rows[stage.name][1], rows[stage.name][2]
        assert str(int(stage.budget_s)) in budget.split(" + ") or budget == str(int(stage.budget_s)), (stage.name, budget)
        assert (f"`{stage.script}" if stage.script else "`pytest -m gpu") in what, (stage.name, what)


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
    assert got["skip"] == ("skipped", "expected off the GPU machine: needs a CUDA GPU")
    assert got["fail"][0] == "failed" and "3" in got["fail"][1]
    assert "something broke" in check.data["stages"][1]["tail"]
    assert got["silent"] == ("failed", "no silent.json written")
    assert got["late"][0] == "not_run"


def test_a_test_module_skipped_at_import_counts_as_a_skip(tmp_path):
    """A module-level importorskip (a package missing) runs none of the module's tests: the pytest stage counts
    it, so on the GPU machine it fails the check instead of vanishing from the report."""
    module = tmp_path / "test_needs_a_missing_package.py"
    module.write_text("import pytest\n\npytest.importorskip('no_such_package_26')\n\n\ndef test_x():\n    pass\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bench"), GPU_CHECK_TESTS_JSONL=str(tmp_path / "tests.jsonl"))
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "pytest_results", "-p", "no:cacheprovider", str(module)],
                   cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    gpu_check.tests_report(tmp_path)
    result = json.loads((tmp_path / "cuda_tests.json").read_text())
    assert result["counts"]["skipped"] == 1, result
    assert gpu_check.skipped_parts(result) == ["1 test: could not import 'no_such_package_26': No module named 'no_such_package_26'"]
