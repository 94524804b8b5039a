"""bench/loss_head.py --smoke runs on CPU (Triton interpreter) and writes its JSON and markdown table, so the
GPU benchmark cannot rot between GPU sessions; and it fails (exit 1) when one of our heads disagrees with the
fp32 reference beyond the stated tolerance."""

import json
import os
import subprocess
import sys


def _run(tmp_path, **env):
    run = subprocess.run([sys.executable, "bench/loss_head.py", "--out", str(tmp_path), "--smoke"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1", **env})
    return run, json.loads((tmp_path / "loss_head.json").read_text())


def test_loss_head_bench_smoke(tmp_path):
    run, result = _run(tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    rows = {(r["method"], r["launch"]): r for r in result["rows"]}
    assert result["smoke"] and result["tolerance"] == {"logp": 1e-5, "loss": 1e-5, "dh": 1e-4} and not result["failures"]
    for method in ("torch", "naive", "triton_fused_linear", "triton_streaming"):
        measured = [r for (m, _), r in rows.items() if m == method and "fwd_ms" in r]
        assert measured, f"{method} did not run: {[r for (m, _), r in rows.items() if m == method]}"
        for r in measured:
            assert r["fwd_ms"] >= 0 and r["bwd_ms"] >= 0
            assert r["errors"]["loss"] < 1e-5 and r["errors"]["dh"] < 1e-4, r
            if method != "naive":
                assert r["errors"]["logp"] < 1e-5, r
    table = (tmp_path / "loss_head.md").read_text()
    assert "| method | launch | fwd ms | bwd ms |" in table and "triton_fused_linear" in table


def test_a_head_off_by_one_percent_fails_the_bench(tmp_path):
    run, result = _run(tmp_path, LOWMEM_BENCH_FAULT="1")  # the fused-linear head's loss x 1.01
    assert run.returncode == 1, run.stdout[-2000:]
    assert result["failures"] and all(f.startswith("triton_fused_linear") for f in result["failures"]), result["failures"]
    assert "FAILED" in (tmp_path / "loss_head.md").read_text()
