"""Reliability: rewards never raise, a kill -9 during a save never leaves a checkpoint that loads wrong,
out-of-memory errors name the knobs."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowmem_vt import checkpoint as ckpt
from lowmem_vt.rewards import accuracy_reward, compute_rewards, format_reward, reflection_rate

TAGS = st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "<answer", "answer>", "\n", " ", "left", "é", "🙂", "(A)"])
TEXT = st.lists(st.one_of(TAGS, st.text(max_size=20)), max_size=60).map("".join)


@settings(max_examples=300, deadline=None)
@given(completion=TEXT, answer=st.text(max_size=10), choices=st.lists(st.text(max_size=8), max_size=4))
def test_rewards_never_raise_and_stay_in_range(completion, answer, choices):
    for mode in ("exact", "normalized"):
        assert accuracy_reward(completion, answer, choices, mode=mode) in (0.0, 1.0)
    assert format_reward(completion) in (0.0, 1.0)
    assert 0.0 <= reflection_rate([completion], ["wait", "re-check"]) <= 1.0


def test_rewards_on_very_long_and_nested_text():
    long = "<think>" * 5000 + "x" * 100000 + "</think><answer>left</answer>"
    assert format_reward(long) in (0.0, 1.0)
    nested = "a<think>b</think></think><answer><answer>left</answer></answer>"
    out = compute_rewards([nested, long], ["left", "left"], [["left", "right"]] * 2, ["format", "accuracy"])
    assert all(v in (0.0, 1.0) for vs in out.values() for v in vs)


SAVER = textwrap.dedent(
    """
    import sys, time, torch
    from lowmem_vt import checkpoint as ckpt

    class SlowAdapter:
        def __init__(self, step):
            self.step = step
        def save_pretrained(self, path):
            import os
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, "adapter_model.bin"), "wb") as f:
                for _ in range(40):  # slow enough for a kill to land mid-save
                    f.write(bytes([self.step % 256]) * 50_000)
                    f.flush()
                    time.sleep(0.005)

    out = sys.argv[1]
    step = 1
    while True:
        ckpt.save_checkpoint(out, step, peft_model=SlowAdapter(step), state={"step": step}, recipe_text="x", keep=2)
        print(step, flush=True)
        step += 1
    """
)


def test_kill_9_during_save_leaves_only_complete_checkpoints(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    partial_seen = 0
    for delay in (0.35, 0.6, 0.9):
        out = tmp_path / f"run{delay}"
        proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE)
        proc.stdout.readline()  # the first checkpoint is complete
        time.sleep(delay)  # lands somewhere inside a later save
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        partial_seen += any(p.name.startswith(".tmp-") for p in out.iterdir())
        cps = ckpt.list_checkpoints(out)
        assert cps
        for p in cps:
            state = ckpt.load_state(p)
            step = int(p.name.split("-")[1])
            assert state["step"] == step
            data = (p / "adapter" / "adapter_model.bin").read_bytes()
            assert len(data) == 40 * 50_000 and data[:1] == bytes([step % 256])
        assert ckpt.resolve_resume("latest", out) == cps[-1]
    assert partial_seen, "no kill landed inside a save; the test did not exercise its case"


def test_out_of_memory_names_the_knobs(recipe_factory, monkeypatch):
    from lowmem_vt.trainer import Trainer

    tr = Trainer(recipe_factory(**{"train.max_steps": 1, "data.generated_samples": 8}))

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(tr, "step", oom)
    with pytest.raises(RuntimeError) as err:
        tr.train()
    msg = str(err.value)
    for knob in ("train.micro_batch_size", "grpo.num_generations", "grpo.max_completion_length"):
        assert knob in msg
