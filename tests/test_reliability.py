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
pytest.importorskip("hypothesis", reason="a dev package (the GPU machine has it: requirements/gpu-machine.txt)")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

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


# ---------------------------------------------------------------------------------- images and prompts


def test_16_bit_image_is_scaled_not_clipped():
    import io

    import numpy as np
    from PIL import Image

    from lowmem_vt.data import decode_image

    grey16 = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    buf = io.BytesIO()
    Image.fromarray(grey16).save(buf, format="PNG")
    rgb = np.asarray(decode_image(buf.getvalue())).astype(int)
    assert rgb.shape == (64, 64, 3)
    assert np.abs(rgb[..., 0] - np.rint(grey16 / 257.0)).max() <= 1  # faithful, not 99 % white
    assert (rgb == 255).mean() < 0.01
    floats = Image.fromarray(np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10), mode="F")
    assert np.asarray(decode_image(floats))[..., 0].max() == 255


def test_transparent_pixels_become_white():
    import io

    import numpy as np
    from PIL import Image

    from lowmem_vt.data import decode_image

    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red hidden under transparency
    rgba[:4, :, 3] = 0  # top half transparent
    rgba[4:, :, 3] = 255  # bottom half opaque red
    buf = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG")
    out = np.asarray(decode_image(buf.getvalue()))
    assert (out[:4] == 255).all()
    assert (out[4:] == [200, 0, 0]).all()
    la = Image.fromarray(np.stack([np.full((4, 4), 10, np.uint8), np.zeros((4, 4), np.uint8)], -1), mode="LA")
    assert (np.asarray(decode_image(la)) == 255).all()


@pytest.fixture(scope="module")
def builder(tiny_dir):
    from transformers import AutoConfig

    from lowmem_vt.inputs import InputBuilder
    from lowmem_vt.model import load_tokenizer_and_processor

    tok, proc = load_tokenizer_and_processor(str(tiny_dir), 3136, 3136)
    return lambda n: InputBuilder(tok, proc, AutoConfig.from_pretrained(tiny_dir), max_prompt_length=n, min_pixels=3136, max_pixels=3136)


def test_truncation_cuts_the_middle_and_keeps_the_options(builder, caplog):
    import logging

    from PIL import Image

    from lowmem_vt.data import sat_question

    image = Image.new("RGB", (56, 56), (10, 200, 10))
    question = sat_question("is the red circle " + "left of the blue square and " * 60 + "where exactly?", ["left", "right"])
    full = builder(10**6).encode(image, question)
    b = builder(full.length - 40)
    with caplog.at_level(logging.WARNING, logger="lowmem_vt.inputs"):
        short = b.encode(image, question)
        b.encode(image, question)
    assert short.truncated and short.length <= full.length - 40
    text = b.tokenizer.decode(short.input_ids[short.mm_token_type_ids == 0].tolist())
    assert "choose between the following options" in text.lower() and "left or right" in text
    assert "answer in natural language" in text.lower()  # the start is kept too: the middle was cut
    assert b.truncated_prompts == 2
    assert caplog.text.count("longer than grpo.max_prompt_length") == 1  # warned once, then counted


SMALL_RUN = {"train.prompts_per_step": 2, "grpo.num_generations": 2, "train.micro_batch_size": 4,
             "grpo.max_completion_length": 2, "data.generated_samples": 8}


def test_truncated_prompts_are_counted_in_the_metrics(recipe_factory, builder):
    from PIL import Image

    from lowmem_vt.data import generate_sat_records, sat_question
    from lowmem_vt.trainer import Trainer

    b = builder(10**6)
    rec = generate_sat_records(1, size=56, tasks=["left_right"])[0]
    full = b.encode(Image.new("RGB", (56, 56)), sat_question(rec["question"], rec["answers"]))
    tr = Trainer(recipe_factory(**SMALL_RUN, **{"train.max_steps": 1, "grpo.max_prompt_length": full.length - 6}))
    m = tr.step()
    tr.close()
    assert m["prompts_truncated"] == 2


# ------------------------------------------------------------------------------------- logs and exits


def test_samples_log_is_truncated_on_resume_like_metrics(recipe_factory):
    import json

    from lowmem_vt.trainer import Trainer

    over = {**SMALL_RUN, "train.max_steps": 3, "log.save_steps": 2, "log.sample_every": 1}
    tr = Trainer(recipe_factory(**over))
    tr.train()  # checkpoints 2 and 3; samples of steps 1, 2, 3
    resumed = Trainer(recipe_factory(**over), resume=str(tr.out / "checkpoint-2"))
    resumed.train()  # replays step 3
    steps = [json.loads(line)["step"] for line in (tr.out / "samples.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_exits_128_plus_signal_and_says_how_to_resume(sig, tiny_dir, tmp_path, monkeypatch, capsys):
    from lowmem_vt import trainer as trainer_mod
    from lowmem_vt.cli import main

    real_step = trainer_mod.Trainer.step

    def step_then_signal(self):
        m = real_step(self)
        if self.step_count == 1:
            os.kill(os.getpid(), sig)
        return m

    monkeypatch.setattr(trainer_mod.Trainer, "step", step_then_signal)
    out = tmp_path / "out"
    rc = main(["train", "recipes/demo_tiny.yaml", f"model.name_or_path={tiny_dir}", f"log.output_dir={out}",
               "log.progress_bar=false", "log.plot=false", *[f"{k}={v}" for k, v in SMALL_RUN.items()], "train.max_steps=3"])
    assert rc == 128 + int(sig) == (130 if sig == signal.SIGINT else 143)
    err = capsys.readouterr().err
    assert f"interrupted by {sig.name} at step 1" in err and "--resume latest" in err
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1"]
    assert "done:" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------- small items


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    from lowmem_vt.config import load_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  learning_rate: 1e-5\ngrpo:\n  beta: 4e-2\n")
    cfg = load_config(recipe)
    assert cfg.train.learning_rate == 1e-5 and cfg.grpo.beta == 0.04


def test_answers_given_as_a_string_are_rejected():
    import random

    from lowmem_vt.data import DataError, generate_sat_records, record_to_example

    rec = {**generate_sat_records(1, size=28)[0], "answers": "ab", "correct_answer": "a"}
    with pytest.raises(DataError, match="'answers' is str 'ab'; expected a list"):
        record_to_example(rec, 0, rng=random.Random(0), shuffle_options=False, max_pixels=3136)


def test_plot_argument_errors_are_one_line(tmp_path, capsys):
    from lowmem_vt.cli import main
    from lowmem_vt.plot import PlotError, resolve_metrics_path, smooth

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "reward": {s / 10}}}\n' for s in range(1, 5)))
    (run / "samples.jsonl").write_text('{"step": 1, "answer": "left", "reward": 1.0, "completion": "x"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    cases = {
        "smoothing": ([str(run / "metrics.jsonl"), "--smoothing", "5"], "smoothing must be in [0, 1)"),
        "samples": ([str(run / "samples.jsonl")], "is a samples log"),
        "missing": ([str(tmp_path / "nope.jsonl")], "no such file"),
        "empty": ([str(tmp_path / "empty.jsonl")], "holds no metrics"),
        "folder": ([str(tmp_path)], "folder without metrics.jsonl"),
    }
    for name, (args, expected) in cases.items():
        assert main(["plot", *args]) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and expected in err and len(err.splitlines()) == 1, (name, err)
    assert resolve_metrics_path(run) == run / "metrics.jsonl"  # a run folder stands for its metrics
    with pytest.raises(PlotError):
        smooth([1.0, 2.0], 1.0)
    assert smooth([1.0, 3.0], 0.5) == [1.0, 2.0]


def test_readme_imports_resolve():
    import importlib
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    found = re.findall(r"^from (lowmem_vt[\w.]*) import ([\w, ]+)$", readme, flags=re.M)
    assert found
    for module, names in found:
        mod = importlib.import_module(module)
        for name in names.split(","):
            assert hasattr(mod, name.strip()), f"README: from {module} import {name.strip()}"
