"""bench/loss_head.py --smoke runs on CPU (Triton interpreter) and writes its JSON and markdown table, so the
GPU benchmark cannot rot between GPU sessions."""

import json
import os
import subprocess
import sys


def test_loss_head_bench_smoke(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "bench/loss_head.py", "--out", str(tmp_path), "--smoke"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "loss_head.json").read_text())
    rows = {(r["method"], r["launch"]): r for r in result["rows"]}
    assert result["smoke"] and result["rows"][0]["agreement"] == "reference"
    for method in ("naive", "triton_fused_linear", "triton_streaming"):
        measured = [r for (m, _), r in rows.items() if m == method and "fwd_ms" in r]
        assert measured, f"{method} did not run: {[r for (m, _), r in rows.items() if m == method]}"
        for r in measured:
            assert r["fwd_ms"] >= 0 and r["bwd_ms"] >= 0
            loss_err, dh_err = (float(part.split()[1]) for part in r["agreement"].split(", "))
            assert loss_err < 1e-5 and dh_err < 1e-4, r
    table = (tmp_path / "loss_head.md").read_text()
    assert "| method | launch | fwd ms | bwd ms |" in table and "triton_fused_linear" in table
