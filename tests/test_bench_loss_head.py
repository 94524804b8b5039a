"""bench/loss_head.py --smoke runs on CPU (Triton interpreter) and writes its JSON and markdown table, so the
GPU benchmark cannot rot between GPU sessions; and it fails (exit 1) when one of our heads disagrees with the
float64 head beyond 3x the torch head's own error: in fp16, a loss or a gradient 1 % off, dW 1 % off, the KL term
dropped or the temperature ignored (issue 26)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _run(tmp_path, *extra, **env):
    run = subprocess.run([sys.executable, "bench/loss_head.py", "--out", str(tmp_path), "--smoke", *extra],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1", **env})
    return run, json.loads((tmp_path / "loss_head.json").read_text())


def test_loss_head_bench_smoke(tmp_path):
    run, result = _run(tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    rows = {(r["method"], r["launch"]): r for r in result["rows"]}
    assert result["smoke"] and result["bound"].startswith("3 x the torch head's own error") and not result["failures"]
    cases = {(c["method"], c["case"]) for c in result["cases"]}
    assert {(m, c) for m in ("triton_fused_linear", "triton_streaming")
            for c in ("recipe", "KL only", "advantage only", "temperature 0.7", "dW")} == cases
    for method in ("torch", "naive", "triton_fused_linear", "triton_streaming"):
        measured = [r for (m, _), r in rows.items() if m == method and "fwd_ms" in r]
        assert measured, f"{method} did not run: {[r for (m, _), r in rows.items() if m == method]}"
        for r in measured:
            assert r["fwd_ms"] >= 0 and r["bwd_ms"] >= 0
            assert r["errors"]["loss"] < 1e-5 and r["errors"]["dh"] < 1e-5, r
            if method != "naive":
                assert r["errors"]["logp"] < 1e-6, r
    table = (tmp_path / "loss_head.md").read_text()
    assert "| method | launch | fwd ms | bwd ms |" in table and "triton_fused_linear" in table


@pytest.mark.parametrize("fault, where", [
    ("1", "recipe: loss error"), ("grad", "recipe: dh error"), ("dw", "dW: dw error"), ("kl", "KL only: loss error"),
    ("temperature", "temperature 0.7: logp error"),
])
def test_each_fault_fails_the_bench_in_fp16(tmp_path, fault, where):
    run, result = _run(tmp_path, "--dtype", "float16", "--skip-timing", "--skip", "triton_streaming", "naive", LOWMEM_BENCH_FAULT=fault)
    assert run.returncode == 1, run.stdout[-2000:]
    assert result["failures"] and all(f.startswith("triton_fused_linear") for f in result["failures"]), result["failures"]
    assert any(where in f for f in result["failures"]), result["failures"]
    assert "FAILED" in (tmp_path / "loss_head.md").read_text()


def test_clean_heads_pass_the_bench_in_fp16(tmp_path):
    run, result = _run(tmp_path, "--dtype", "float16", "--skip-timing")
    assert run.returncode == 0, run.stdout[-3000:]
    assert not result["failures"] and min(c["worst"] for c in result["cases"]) > 1.2


def test_a_row_is_judged_with_the_real_vocabulary(monkeypatch):
    """Each row is judged by the self-check's rule on its recipe case: a quantity's bound is 3 x the larger of the torch
    head's error and float32's floor for the terms it sums, the vocabulary's for dh (V = 300 here). A row whose dh is
    off by 5e-6 sits inside that floor (3 x 4.1e-6) and passes; judged with the floor of V = 1 (the rows' V was read
    from a dW the recipe case does not form) it failed. A dh 1e-3 off fails."""
    import torch

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    import loss_head

    from lowmem_vt.selfcheck import head
    from lowmem_vt.selfcheck.compare import MULTIPLE, fp32_minimum, rel_err

    args = loss_head.parse_args(["--out", "unused", "--smoke", "--dtype", "float32"])
    x = loss_head.make_inputs(args, torch.device("cpu"), torch.float32)
    settings = loss_head.settings_for(args)
    exact, ref = head.exact(x, settings), head._run_once("torch", x, settings, torch.device("cpu"))
    assert MULTIPLE * max(rel_err(ref["dh"], exact["dh"]), fp32_minimum(1)) < 5e-6 < MULTIPLE * fp32_minimum(args.vocab)
    direction = torch.randn(exact["dh"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for off, passes in ((5e-6, True), (1e-3, False)):
        dh = exact["dh"] + direction * (off * exact["dh"].norm() / direction.norm())
        row = {"loss": exact["loss"].float(), "grad": dh.float(), "logp": exact["logp"].float()}
        errors, over = loss_head.disagreement(row, x, args, {"recipe": (exact, ref)})
        assert set(errors) == {"loss", "logp", "dh"} and errors["dh"] == pytest.approx(off, rel=0.05)
        assert (not over) == passes, (off, over)
