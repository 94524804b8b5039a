"""Data-parallel training on CPU over gloo: torchrun and `accelerate launch` with 2 processes against one
process with the same global batch, and a 2-rank run resumed by 1 rank."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "helpers" / "ddp_worker.py"
ROOT = Path(__file__).parent.parent


def _overrides(tiny_dir, out, steps):
    # constant lr: a run stopped early and resumed follows the same schedule as one run
    return [f"model.name_or_path={tiny_dir}", f"log.output_dir={out}", "log.progress_bar=false", "log.plot=false",
            "train.prompts_per_step=4", "grpo.num_generations=4", "train.micro_batch_size=4",
            "data.generated_samples=16", f"train.max_steps={steps}", "log.save_steps=1", "train.learning_rate=1e-2",
            "train.lr_scheduler=constant", "data.generated_tasks=[color]", "rewards.funcs=[accuracy]",
            "grpo.max_completion_length=1"]


def _run(launcher, dump, overrides, resume=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if resume:
        env["LOWMEM_RESUME"] = "latest"
    cmd = [*launcher(), str(WORKER), "recipes/demo_tiny.yaml", str(dump), *overrides]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]


def _free_port() -> int:
    """A port no one listens on now: the suite runs in parallel workers (make test), so two launches in flight
    must not share a fixed rendezvous port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun():
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port())]


# --multi_gpu selects accelerate's torch-elastic launcher; without CUDA the trainer uses gloo
def accelerate_launch():
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
            "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]


def one_process():
    return [sys.executable]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_run(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    _run(one_process, tmp / "dump", _overrides(tiny_dir, tmp / "out", 2))
    one = torch.load(tmp / "dump.rank0.pt")
    assert one["world"] == 1
    return one, _metrics(tmp / "out")


@pytest.mark.parametrize("launcher", [torchrun, accelerate_launch], ids=["torchrun", "accelerate"])
def test_two_ranks_match_one_process(launcher, single_run, tiny_dir, tmp_path):
    one, one_m = single_run
    _run(launcher, tmp_path / "dump", _overrides(tiny_dir, tmp_path / "out", 2))
    r0 = torch.load(tmp_path / "dump.rank0.pt")
    r1 = torch.load(tmp_path / "dump.rank1.pt")
    assert r0["world"] == r1["world"] == 2
    moved = 0.0
    for k, v in r0["adapter"].items():
        assert torch.equal(v, r1["adapter"][k]), f"ranks differ on {k}"
        torch.testing.assert_close(v, one["adapter"][k], rtol=1e-4, atol=1e-5, msg=f"DDP vs single process: {k}")
        if "lora_B" in k:
            moved += float(v.abs().sum())
    # only rank 0 logs and saves; metrics cover the global batch
    ddp_m = _metrics(tmp_path / "out")
    assert [m["step"] for m in ddp_m] == [1, 2]
    for a, b in zip(ddp_m, one_m):
        assert a["prompts"] == b["prompts"] == 4
        assert a["reward"] == b["reward"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
    assert (tmp_path / "out" / "checkpoint-2" / "COMPLETE").is_file()
    assert moved > 0 or all(m["reward_std"] == 0 for m in one_m)


def test_two_rank_checkpoint_resumed_by_one_rank(single_run, tiny_dir, tmp_path):
    """A different number of ranks re-shards the data deterministically: same prompts, same samples."""
    one, one_m = single_run
    _run(torchrun, tmp_path / "dump", _overrides(tiny_dir, tmp_path / "out", 1))
    _run(one_process, tmp_path / "dump", _overrides(tiny_dir, tmp_path / "out", 2), resume=True)
    resumed = torch.load(tmp_path / "dump.rank0.pt")
    assert resumed["world"] == 1
    for k, v in resumed["adapter"].items():
        torch.testing.assert_close(v, one["adapter"][k], rtol=1e-4, atol=1e-5, msg=k)
    m = _metrics(tmp_path / "out")
    assert [r["step"] for r in m] == [1, 2]
    assert [r["reward"] for r in m] == [r["reward"] for r in one_m]


def test_two_ranks_with_the_engine_rollout_match_one_process(tiny_dir, tmp_path):
    """rollout.backend: engine under torchrun: each rank's engine lays out its own copy of the weights and samples
    its prompts with their own seeds, so 2 ranks train the adapter one process trains; the sampler is the policy."""
    engine = ["rollout.backend=engine"]
    _run(one_process, tmp_path / "one", _overrides(tiny_dir, tmp_path / "one_out", 2) + engine)
    _run(torchrun, tmp_path / "two", _overrides(tiny_dir, tmp_path / "two_out", 2) + engine)
    one, r0, r1 = (torch.load(tmp_path / f"{n}.rank{r}.pt") for n, r in (("one", 0), ("two", 0), ("two", 1)))
    for k, v in r0["adapter"].items():
        assert torch.equal(v, r1["adapter"][k]), f"ranks differ on {k}"
        torch.testing.assert_close(v, one["adapter"][k], rtol=1e-4, atol=1e-5, msg=f"DDP vs single process: {k}")
    for a, b in zip(_metrics(tmp_path / "two_out"), _metrics(tmp_path / "one_out")):
        assert a["reward"] == b["reward"] and a["sampler_logprob_diff_max"] < 1e-4, (a, b)
