"""Data-parallel training on CPU: 2 processes over gloo (torchrun) against one process, same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "helpers" / "ddp_worker.py"


def _overrides(tiny_dir, out):
    return [f"model.name_or_path={tiny_dir}", f"log.output_dir={out}", "log.progress_bar=false", "log.plot=false",
            "train.prompts_per_step=4", "grpo.num_generations=4", "train.micro_batch_size=4", "grpo.max_completion_length=4",
            "data.generated_samples=16", "train.max_steps=2", "log.save_steps=2", "train.learning_rate=1e-2",
            "data.generated_tasks=[color]", "rewards.funcs=[accuracy]", "grpo.max_completion_length=1"]


def _run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(cmd, cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def test_two_ranks_match_one_process(tiny_dir, tmp_path):
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533", str(WORKER),
          "recipes/demo_tiny.yaml", str(tmp_path / "ddp_dump"), *_overrides(tiny_dir, ddp_out)], tmp_path)
    _run([sys.executable, str(WORKER), "recipes/demo_tiny.yaml", str(tmp_path / "single_dump"), *_overrides(tiny_dir, single_out)], tmp_path)
    r0 = torch.load(tmp_path / "ddp_dump.rank0.pt")
    r1 = torch.load(tmp_path / "ddp_dump.rank1.pt")
    one = torch.load(tmp_path / "single_dump.rank0.pt")
    assert r0["world"] == 2 and one["world"] == 1
    moved = 0.0
    for k, v in r0["adapter"].items():
        assert torch.equal(v, r1["adapter"][k]), f"ranks differ on {k}"
        torch.testing.assert_close(v, one["adapter"][k], rtol=1e-4, atol=1e-5, msg=f"DDP vs single process: {k}")
        if "lora_B" in k:
            moved += float(v.abs().sum())
    # only rank 0 logs and saves; metrics cover the global batch
    ddp_m = [json.loads(l) for l in (ddp_out / "metrics.jsonl").read_text().splitlines()]
    one_m = [json.loads(l) for l in (single_out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in ddp_m] == [1, 2]
    for a, b in zip(ddp_m, one_m):
        assert a["prompts"] == b["prompts"] == 4
        assert a["reward"] == b["reward"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
    assert (ddp_out / "checkpoint-2" / "COMPLETE").is_file()
    assert moved > 0 or all(m["reward_std"] == 0 for m in one_m)
