"""Issue #23, case by case: nothing a careless user types mixes runs, destroys a model or crashes mid-run. Each
input is validated before work starts (one ``error:`` line, status 2, nothing written), what would be
overwritten is refused, what cannot be read is skipped and counted. The numbers are the issue's cases."""

import errno
import hashlib
import io
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from lowmem_vt import checkpoint as ckpt
from lowmem_vt.cli import main
from lowmem_vt.config import ConfigError, load_config
from lowmem_vt.data import DataError, generate_sat_records, record_to_example, write_parquet

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "demo_tiny.yaml")
SMALL = ["train.prompts_per_step=2", "grpo.num_generations=2", "train.micro_batch_size=4", "grpo.max_completion_length=2",
         "data.generated_samples=8", "log.sample_every=1", "log.progress_bar=false", "log.plot=false"]


def tree_digest(*paths) -> dict:
    """Every file under ``paths`` with its SHA-256 (to show an input was not changed)."""
    out = {}
    for root in map(Path, paths):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def one_line(capsys, *expected) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.splitlines()[-1] == lines[0], err
    for e in expected:
        assert e in lines[0], (e, lines[0])
    return lines[0]


def train(tiny_dir, out, *over, steps=2, save=1):
    return main(["train", RECIPE, f"model.name_or_path={tiny_dir}", f"log.output_dir={out}", *SMALL,
                 f"train.max_steps={steps}", f"log.save_steps={save}", *over])


@pytest.fixture(scope="module")
def run_a(tiny_dir, tmp_path_factory):
    """A finished run of 2 steps with checkpoint-1 and checkpoint-2 (copied by the tests that change it)."""
    out = tmp_path_factory.mktemp("runs") / "A"
    assert train(tiny_dir, out) == 0
    return out


def steps_of(folder) -> list[int]:
    return [json.loads(line)["step"] for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------- silently wrong


def test_1_a_foreign_checkpoint_into_a_folder_holding_a_run_is_refused(run_a, tiny_dir, tmp_path, capsys):
    b = tmp_path / "B"
    assert train(tiny_dir, b, steps=1) == 0
    before = tree_digest(b, run_a)
    capsys.readouterr()
    assert train(tiny_dir, b, "--resume", str(run_a / "checkpoint-1"), steps=2) == 2
    one_line(capsys, "is a checkpoint of the run in", "holds another run", "--resume latest")
    assert tree_digest(b, run_a) == before  # neither run touched


def test_1_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(run_a, tiny_dir, tmp_path):
    """The same mix inside one folder: after resuming checkpoint-1, checkpoint-2 of the abandoned future must not
    be what ``--resume latest`` picks."""
    a = tmp_path / "A"
    shutil.copytree(run_a, a)
    assert train(tiny_dir, a, "--resume", str(a / "checkpoint-1"), steps=3, save=5) == 0
    assert steps_of(a) == [1, 2, 3]
    assert [p.name for p in ckpt.list_checkpoints(a)] == ["checkpoint-1", "checkpoint-3"]
    aside = [p for p in a.iterdir() if p.name.startswith("superseded-")]
    assert len(aside) == 1 and (aside[0] / "checkpoint-2").is_dir()


@pytest.mark.parametrize("target", ["base", "checkpoint", "non-empty", "file", "inside the checkpoint"])
def test_2_merge_never_writes_over_an_input_or_a_full_folder(target, run_a, tiny_dir, tmp_path, capsys, no_model_load):
    cp = run_a / "checkpoint-2"
    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    out = {"base": base, "checkpoint": cp, "non-empty": tmp_path / "full", "file": tmp_path / "f",
           "inside the checkpoint": cp / "merged"}[target]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    (tmp_path / "f").write_text("mine")
    before = tree_digest(base, cp, tmp_path / "full", tmp_path / "f")
    assert main(["merge", "--checkpoint", str(cp), "--model", str(base), "--out", str(out)]) == 2
    one_line(capsys, "--out")
    assert tree_digest(base, cp, tmp_path / "full", tmp_path / "f") == before
    assert not (cp / "merged").exists()


def test_2_eval_out_is_checked_before_the_evaluation(tiny_dir, tmp_path, capsys, no_model_load):
    from lowmem_vt.cvbench import generate_cvbench_records

    data = write_parquet(generate_cvbench_records(2, size=56), tmp_path / "cv" / "test.parquet")
    (tmp_path / "results").write_text("an earlier evaluation, kept")
    for out in (tmp_path / "results", tiny_dir):
        rc = main(["eval", "--model", str(tiny_dir), "--data", str(data), "--device", "cpu", "--out", str(out), "--no-progress"])
        assert rc == 2
        one_line(capsys, "--out")
    assert (tmp_path / "results").read_text() == "an earlier evaluation, kept"


def test_3_duplicate_keys_are_an_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  max_steps: 3\nlog:\n  save_steps: 1\ntrain:\n  learning_rate: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"line 5, column 1: key 'train' appears a second time \(first on line 1\)"):
        load_config(recipe)
    recipe.write_text("train:\n  max_steps: 3\n  max_steps: 4\n")
    with pytest.raises(ConfigError, match="'max_steps' appears a second time"):
        load_config(recipe)


def test_4_an_override_on_resume_applies_or_is_refused(run_a, tiny_dir, tmp_path, capsys):
    from lowmem_vt.trainer import Trainer

    a = tmp_path / "A"
    shutil.copytree(run_a, a)
    for change, key in (("lora.r=4", "lora.r"), ("lora.target_modules=[q_proj]", "lora.target_modules"),
                        ("grpo.beta=0.5", "grpo.beta"), ("train.seed=7", "train.seed")):
        assert train(tiny_dir, a, change, "--resume", "latest", steps=3) == 2
        one_line(capsys, f"{key} is", "in the checkpoint", "keeps the settings")
    # the learning rate applies, and the record says so
    cfg = load_config(RECIPE, [f"model.name_or_path={tiny_dir}", f"log.output_dir={a}", *SMALL, "train.max_steps=3",
                               "train.learning_rate=5e-5"])
    tr = Trainer(cfg, resume="latest")
    try:
        assert [g["lr"] for g in tr.optimizer.param_groups] == [5e-5]
        assert tr.scheduler.base_lrs == [5e-5]
        assert "learning_rate: 5.0e-05" in (a / "recipe.yaml").read_text()
    finally:
        tr.close()


def test_5_resuming_onto_another_base_of_the_same_shape_is_refused(run_a, tiny_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other-base"
    shutil.copytree(tiny_dir, other)
    weights = load_file(str(other / "model.safetensors"))
    name = next(k for k in weights if k.endswith("lm_head.weight"))
    weights[name] = weights[name] + 0.01  # same config, same shapes, other weights
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    a = tmp_path / "A"
    shutil.copytree(run_a, a)
    rc = main(["train", RECIPE, f"model.name_or_path={other}", f"log.output_dir={a}", *SMALL, "train.max_steps=3",
               "--resume", "latest"])
    assert rc == 2
    one_line(capsys, "trained on the base", "is another model")
    moved = tmp_path / "moved-base"  # the same base in another folder is the same base
    shutil.copytree(tiny_dir, moved)
    from lowmem_vt.preflight import check_resume_base

    check_resume_base(str(moved), a / "checkpoint-2")
    assert ckpt.checkpoint_base(a / "checkpoint-2")["fingerprint"] == ckpt.base_identity(str(moved))["fingerprint"]


def test_6_text_columns_holding_bytes_are_decoded_or_skipped():
    rec = generate_sat_records(1, size=28, tasks=["left_right"])[0]
    as_bytes = {**rec, "question": rec["question"].encode(), "answers": [a.encode() for a in rec["answers"]],
                "correct_answer": rec["correct_answer"].encode()}
    ex = record_to_example(as_bytes, 0, rng=random.Random(0), shuffle_options=False, max_pixels=3136)
    assert ex.question.endswith(f"{rec['question']} Choose between the following options: left or right")
    assert "b'" not in ex.question and ex.answer == rec["correct_answer"]
    with pytest.raises(DataError, match="'question' is bytes that are not UTF-8 text"):
        record_to_example({**rec, "question": b"\xff\xfe what"}, 0, rng=random.Random(0), shuffle_options=False, max_pixels=3136)
    with pytest.raises(DataError, match="'question' is dict, not text"):
        record_to_example({**rec, "question": {"a": 1}}, 0, rng=random.Random(0), shuffle_options=False, max_pixels=3136)


def test_7_an_empty_output_dir_is_refused(tiny_dir, tmp_path, capsys, monkeypatch, no_model_load):
    monkeypatch.chdir(tmp_path)
    assert train(tiny_dir, "") == 2
    one_line(capsys, "key 'log.output_dir': is empty")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("over, expected", [
    ("grpo.temperature=.inf", "key 'grpo.temperature': got inf; expected a finite number"),
    ("grpo.temperature=1e-9", "key 'grpo.temperature': must be in [0.01, 100]"),
    ("train.learning_rate=.inf", "key 'train.learning_rate': got inf"),
    ("train.learning_rate=1e30", "key 'train.learning_rate': must be in (0, 1]"),
    ("grpo.beta=.nan", "key 'grpo.beta': got nan"),
    ("train.num_epochs=.inf", "key 'train.num_epochs': got inf"),
    ("train.seed=-1", "key 'train.seed': must be in [0, 4294967295]"),
    ("train.max_steps=100000000000000000000", "key 'train.max_steps': 100000000000000000000 is out of range"),
])
def test_8_numbers_are_finite_and_in_range_before_anything_loads(over, expected, tiny_dir, tmp_path, capsys, no_model_load):
    assert train(tiny_dir, tmp_path / "out", over) == 2
    one_line(capsys, expected)
    assert not (tmp_path / "out").exists()


def test_8_plan_gpu_gib_must_be_a_number_of_gib(capsys):
    for bad in ("nan", "inf", "-3", "0"):
        assert main(["plan", RECIPE, "--gpu-gib", bad]) == 2
        one_line(capsys, "--gpu-gib must be a positive number")


def test_8_non_finite_weights_are_never_saved_and_never_verify(tmp_path, recipe_factory):
    from safetensors.torch import save_file

    from lowmem_vt.trainer import Trainer, TrainingStopped

    class InfAdapter:
        def save_pretrained(self, path):
            os.makedirs(path, exist_ok=True)
            save_file({"w": torch.tensor([1.0, float("inf")])}, os.path.join(path, "adapter_model.safetensors"))

    cp = ckpt.save_checkpoint(tmp_path / "run", 1, peft_model=InfAdapter(), state={"step": 1}, recipe_text="x", keep=2)
    with pytest.raises(ckpt.CheckpointError, match="1 non-finite values"):
        ckpt.verify_checkpoint(cp)
    tr = Trainer(recipe_factory(**{"train.max_steps": 1, "data.generated_samples": 8}))
    try:
        with torch.no_grad():
            tr.params[0][0, 0] = float("inf")
        with pytest.raises(TrainingStopped, match="non-finite .* nothing was saved"):
            tr.save()
        assert ckpt.list_checkpoints(tr.out) == []
    finally:
        tr.close()


def test_9_options_longer_than_the_prompt_budget_skip_the_record(tiny_dir):
    from transformers import AutoConfig

    from lowmem_vt.data import sat_question
    from lowmem_vt.inputs import InputBuilder
    from lowmem_vt.model import load_tokenizer_and_processor

    tok, proc = load_tokenizer_and_processor(str(tiny_dir), 3136, 3136)
    image = Image.new("RGB", (56, 56))
    question = sat_question("is it left?", ["left of the blue square"] * 30)
    full = InputBuilder(tok, proc, AutoConfig.from_pretrained(tiny_dir), max_prompt_length=10**6, min_pixels=3136,
                        max_pixels=3136).encode(image, question)
    b = InputBuilder(tok, proc, AutoConfig.from_pretrained(tiny_dir), max_prompt_length=full.length - 60, min_pixels=3136,
                     max_pixels=3136)
    with pytest.raises(DataError, match="the answer options alone need"):
        b.encode(image, question)
    assert b.truncated_prompts == 0  # not counted as a (kept) truncated prompt


def _png(w, h):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_10_extreme_aspect_ratios_are_skipped_and_counted(tiny_dir):
    from transformers import AutoConfig

    from lowmem_vt.data import examples_from_records
    from lowmem_vt.inputs import InputBuilder
    from lowmem_vt.model import load_tokenizer_and_processor

    records = generate_sat_records(4, size=28, tasks=["left_right"])
    records[1]["image_bytes"] = [_png(300, 1)]
    records[2]["image_bytes"] = [_png(1, 40_000)]
    examples, report = examples_from_records(records, max_samples=10, shuffle_options=False, max_pixels=3136, seed=0)
    assert len(examples) == 2 and report.as_metrics()["data_skipped"] == 2
    # and at encoding time (a resume's examples, a CV-Bench item): a DataError, which the trainer skips and counts
    tok, proc = load_tokenizer_and_processor(str(tiny_dir), 3136, 3136)
    b = InputBuilder(tok, proc, AutoConfig.from_pretrained(tiny_dir), max_prompt_length=512, min_pixels=3136, max_pixels=3136)
    with pytest.raises(DataError, match="300x1"):
        b.encode(Image.new("RGB", (300, 1)), "q")


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))


def test_11_a_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    import time

    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(BOMB)
    t0 = time.perf_counter()
    inline = "[&a [x, x, x, x, x, x, x, x, x], " + ", ".join(
        f"&{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)) + "]"
    for cmd in (["train", str(recipe)], ["plan", str(recipe)], ["train", RECIPE, f"train.max_steps={inline}"]):
        assert main(cmd) == 2
        one_line(capsys, "more than 10000 values")
    assert time.perf_counter() - t0 < 10
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20))
    assert main(["train", str(big)]) == 2
    one_line(capsys, "a recipe is a page of settings")


def test_12_the_engines_allocation_is_checked_before_it_is_made(tiny_dir, tmp_path, capsys, monkeypatch, tiny_lm, no_model_load):
    assert train(tiny_dir, tmp_path / "out", "rollout.backend=engine", "grpo.max_completion_length=100000000") == 2
    one_line(capsys, "exceed the model's 4096 positions")
    from lowmem_vt import engine_memory
    from lowmem_vt.rollout import SamplingParams
    from lowmem_vt.rollout.engine import EngineRollout

    monkeypatch.setattr(engine_memory, "available_memory", lambda device: 1 << 20)
    engine = EngineRollout(tiny_lm, graphs=None)
    with pytest.raises(engine_memory.AllocationError, match=r"the engine rollout would allocate .* but cpu has 0.0 GiB"):
        engine.new_state([100] * 8, [100] * 8, SamplingParams(8, 4000))


class _NoSpaceAdapter:
    def save_pretrained(self, path):
        os.makedirs(path, exist_ok=True)
        raise OSError(errno.ENOSPC, "No space left on device")


def test_13_a_save_without_space_says_so_and_keeps_the_previous_checkpoint(tmp_path):
    from safetensors.torch import save_file

    class Ok:
        def save_pretrained(self, path):
            os.makedirs(path, exist_ok=True)
            save_file({"w": torch.ones(4)}, os.path.join(path, "adapter_model.safetensors"))

    out = tmp_path / "run"
    ckpt.save_checkpoint(out, 2, peft_model=Ok(), state={"step": 2}, recipe_text="x", keep=3)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.save_checkpoint(out, 4, peft_model=_NoSpaceAdapter(), state={"step": 4}, recipe_text="x", keep=3)
    msg = str(err.value)
    assert f"cannot save checkpoint-4 at step 4: no space left on {out}" in msg and "checkpoint-2 is intact" in msg
    assert [p.name for p in out.iterdir()] == ["checkpoint-2"]
    ckpt.verify_checkpoint(out / "checkpoint-2")


def test_13_a_log_line_without_space_is_one_line(tmp_path):
    from lowmem_vt.metrics import LogWriteError, MetricsWriter

    w = MetricsWriter(tmp_path / "metrics.jsonl")

    class Full(io.StringIO):
        def write(self, s):
            raise OSError(errno.ENOSPC, "No space left on device")

    w._f.close()
    w._f = Full()
    with pytest.raises(LogWriteError, match=f"cannot write step 7 to .*metrics.jsonl: no space left on {tmp_path}"):
        w.write({"step": 7})


FSIZE = textwrap.dedent("""
    import resource, sys, torch
    from lowmem_vt import checkpoint as ckpt
    class Ok:
        def save_pretrained(self, path):
            import os
            os.makedirs(path, exist_ok=True)
            open(os.path.join(path, "adapter_model.bin"), "wb").write(b"x" * 1000)
    ckpt.save_checkpoint(sys.argv[1], 1, peft_model=Ok(), state={"t": torch.ones(10)}, recipe_text="x", keep=3)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
    try:
        ckpt.save_checkpoint(sys.argv[1], 2, peft_model=Ok(), state={"t": torch.ones(100_000)}, recipe_text="x", keep=3)
    except ckpt.CheckpointError as exc:
        print(exc)
""")


def test_13_a_file_size_limit_during_a_save_is_named(tmp_path):
    res = subprocess.run([sys.executable, "-c", FSIZE, str(tmp_path / "run")], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "cannot save checkpoint-2 at step 2: a file reached the file-size limit" in res.stdout
    assert "checkpoint-1 is intact" in res.stdout
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-1"]


# ------------------------------------------------------------------------- tracebacks where a line was due


def _symlink(tmp_path, kind):
    link = tmp_path / kind
    link.symlink_to(link if kind == "loop" else tmp_path / "nowhere")
    return link


def _write(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _jsonl(tmp_path, lines, name="d.jsonl"):
    return _write(tmp_path, name, "".join(line + "\n" for line in lines).encode())


def _record_json():
    return json.dumps({"question": "q", "answers": ["a", "b"], "correct_answer": "a", "image_bytes": "x.png"})


TRAIN_CASES = {
    "dangling symlink as output dir": (lambda t: [f"log.output_dir={_symlink(t, 'dangling')}"], "symbolic link that points to"),
    "looping symlink as output dir": (lambda t: [f"log.output_dir={_symlink(t, 'loop')}"], "symbolic link that loops"),
    "non-UTF-8 recipe": (lambda t: ["@" + str(_write(t, "r.yaml", "train:\n  seed: 3 # café\n".encode("latin-1")))],
                         "is not UTF-8 text (byte 0xe9"),
    "UTF-16 recipe": (lambda t: ["@" + str(_write(t, "r.yaml", "train:\n  seed: 3\n".encode("utf-16")))], "is UTF-16 text"),
    "recipe that is a list": (lambda t: ["@" + str(_write(t, "r.yaml", b"- train\n- log\n"))], "must be a mapping of sections"),
    "override that is not UTF-8": (lambda t: ["train.max_steps=\udcff"], "is not UTF-8 text"),
    "override that is invalid YAML": (lambda t: ["train.max_steps=["], "override 'train.max_steps': '[' is not a valid value"),
    "override of a value as a section": (lambda t: ["train.max_steps.x=1"], "'train.max_steps' is a value, not a section"),
    "non-UTF-8 data file": (lambda t: ["data.source=sat", "data.path=" + str(_write(t, "d.jsonl", _record_json().encode() + b" \xff"))],
                            "line 1: not UTF-8 text"),
    "JSONL whose lines are not objects": (lambda t: ["data.source=sat", "data.path=" + str(_jsonl(t, ["[1, 2]", "3", '"x"']))],
                                          "none of the first 3 records is an object"),
    "LoRA rank beyond the layers": (lambda t: ["lora.r=100000"], "key 'lora.r': 100000 exceeds the smallest side"),
    "target module that is a regex": (lambda t: ["lora.target_modules=[q_proj, '.*']"], "is not a module name"),
    "generated images beyond memory": (lambda t: ["data.generated_samples=100000", "data.generated_image_size=2048",
                                                  "data.max_pixels=268435456"],
                                       "would hold 1171.9 GiB in memory"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_inputs_are_one_line(case, tiny_dir, tmp_path, capsys, no_model_load):
    make, expected = TRAIN_CASES[case]
    args = make(tmp_path)
    recipe = args.pop(0)[1:] if args and args[0].startswith("@") else RECIPE
    out = [] if any(a.startswith("log.output_dir=") for a in args) else [f"log.output_dir={tmp_path / 'out'}"]
    before = tree_digest(tmp_path)
    rc = main(["train", recipe, f"model.name_or_path={tiny_dir}", *out, *SMALL, "train.max_steps=1", *args])
    assert rc == 2
    one_line(capsys, expected)
    assert tree_digest(tmp_path) == before and not (tmp_path / "out").exists()


def test_a_jsonl_line_that_is_not_an_object_is_skipped_and_counted():
    from lowmem_vt.data import examples_from_records

    records = [*generate_sat_records(2, size=28), [1, 2], "x", None]
    examples, report = examples_from_records(records, max_samples=10, shuffle_options=False, max_pixels=3136, seed=0)
    assert len(examples) == 2 and report.as_metrics()["data_skipped"] == 3


def test_output_dir_dot_with_overwrite_is_one_line(run_a, tiny_dir, tmp_path, capsys, monkeypatch, no_model_load):
    a = tmp_path / "A"
    shutil.copytree(run_a, a)
    monkeypatch.chdir(a)
    before = tree_digest(a)
    assert train(tiny_dir, ".", "--overwrite") == 2
    one_line(capsys, "is (or holds) the current directory and cannot be moved aside")
    assert tree_digest(a) == before


def test_output_dir_holding_other_files_is_refused(tiny_dir, tmp_path, capsys, no_model_load):
    (tmp_path / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert train(tiny_dir, tmp_path, *extra) == 2
        one_line(capsys, "holds files no run wrote (notes.txt)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_resume_onto_a_base_of_another_size_is_one_line(run_a, tmp_path, capsys):
    from lowmem_vt.tiny import build_tiny_model

    wider = build_tiny_model(tmp_path / "wider", hidden_size=32)
    a = tmp_path / "A"
    shutil.copytree(run_a, a)
    rc = main(["train", RECIPE, f"model.name_or_path={wider}", f"log.output_dir={a}", *SMALL, "train.max_steps=3",
               "--resume", "latest"])
    assert rc == 2
    one_line(capsys, "the checkpoint was trained on the base", "is another model")
    # a checkpoint that recorded no base (written before base.json): the adapter's shapes are checked against the base
    cp = a / "checkpoint-2"
    (cp / ckpt.BASE_FILE).unlink()
    record = json.loads((cp / ckpt.DONE_FILE).read_text())
    del record["files"][ckpt.BASE_FILE]
    (cp / ckpt.DONE_FILE).write_text(json.dumps(record))
    rc = main(["train", RECIPE, f"model.name_or_path={wider}", f"log.output_dir={a}", *SMALL, "train.max_steps=3",
               "--resume", "latest"])
    assert rc == 2
    one_line(capsys, "it was trained on another base")


def _checkpoint_copy(run_a, tmp_path, damage):
    cp = tmp_path / "cp"
    shutil.copytree(run_a / "checkpoint-2", cp)
    if damage == "recipe is a list":
        (cp / "recipe.yaml").write_text("- model\n- lora\n")
    elif damage == "recipe is bad YAML":
        (cp / "recipe.yaml").write_text("model: [\n")
    elif damage == "truncated adapter":
        f = cp / "adapter" / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    (cp / ckpt.DONE_FILE).unlink()  # as a checkpoint copied by hand: only the files themselves are checked
    return cp


@pytest.mark.parametrize("command", ["merge", "eval"])
@pytest.mark.parametrize("case", ["recipe is a list", "recipe is bad YAML", "truncated adapter", "cuda without a GPU",
                                  "vllm backend", "out is a file"])
def test_merge_and_eval_inputs_are_one_line(command, case, run_a, tiny_dir, tmp_path, capsys, no_model_load):
    if case == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    if case == "vllm backend" and command == "merge":
        pytest.skip("merge has no backend")
    from lowmem_vt.cvbench import generate_cvbench_records

    cp = _checkpoint_copy(run_a, tmp_path, case)
    data = write_parquet(generate_cvbench_records(2, size=56), tmp_path / "cv" / "test.parquet")
    (tmp_path / "file").write_text("mine")
    out = tmp_path / ("file" if case == "out is a file" else "o")
    args = ["--checkpoint", str(cp), "--model", str(tiny_dir), "--out", str(out)]
    if command == "eval":
        args += ["--data", str(data), "--no-progress", "--device", "cpu"]
    if case == "cuda without a GPU":
        args += ["--device", "cuda"]
    if case == "vllm backend":
        args += ["--backend", "vllm"]
    before = tree_digest(cp, tiny_dir, tmp_path / "file")
    assert main([command, *args]) == 2
    one_line(capsys, {"recipe is a list": "is not a recipe", "recipe is bad YAML": "is not a readable recipe",
                      "truncated adapter": "damaged", "cuda without a GPU": "no CUDA GPU is visible",
                      "vllm backend": "--backend vllm", "out is a file": "is a file"}[case])
    assert tree_digest(cp, tiny_dir, tmp_path / "file") == before and not (tmp_path / "o").exists()


def test_cvbench_file_that_is_not_utf8_is_one_line(tiny_dir, tmp_path, capsys, no_model_load):
    f = _write(tmp_path, "test.jsonl", b'{"idx": 0, "prompt": "caf\xe9"}\n')
    assert main(["eval", "--model", str(tiny_dir), "--data", str(f), "--device", "cpu", "--out", str(tmp_path / "o")]) == 2
    one_line(capsys, "not UTF-8 text")


@pytest.mark.parametrize("model, expected", [("/nonexistent/model", "looks like a local path but does not exist"),
                                             ("recipes/tiny-typo", "looks like a local path"),
                                             ("llama", "model_type 'llama'")])
def test_plan_checks_the_model(model, expected, tiny_dir, tmp_path, capsys):
    if model == "llama":
        model = tmp_path / "llama"
        shutil.copytree(tiny_dir, model)
        cfg = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    assert main(["plan", RECIPE, f"model.name_or_path={model}", "--gpu-gib", "24"]) == 2
    one_line(capsys, expected)


def test_build_tiny_never_writes_over_a_file_or_a_full_folder(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("{}")
    for target in ("f", "d"):
        assert main(["build-tiny", str(tmp_path / target)]) == 2
        one_line(capsys, "build-tiny")
    assert (tmp_path / "f").read_text() == "mine" and (tmp_path / "d" / "config.json").read_text() == "{}"


def test_usage_errors_are_one_line(capsys):
    for argv in (["eval", "--limit", "abc"], ["frobnicate"], [], ["merge"], ["plot", "a", "b"]):
        assert main(argv) == 2
        one_line(capsys, "(see lowmem-vt")
    # an override after an option (as in `--resume latest train.learning_rate=5e-5`) is still an override
    assert main(["plan", RECIPE, "--gpu-gib", "24", "model.name_or_path=/nowhere/model"]) == 2
    one_line(capsys, "'/nowhere/model' looks like a local path")


# ----------------------------------------------------------------------------------------------- smaller


def test_resume_latest_warns_when_the_newest_checkpoint_lacks_complete(tmp_path, caplog):
    from safetensors.torch import save_file

    class Ok:
        def save_pretrained(self, path):
            os.makedirs(path, exist_ok=True)
            save_file({"w": torch.ones(4)}, os.path.join(path, "adapter_model.safetensors"))

    ckpt.save_checkpoint(tmp_path, 1, peft_model=Ok(), state={"step": 1}, recipe_text="x", keep=3)
    shutil.copytree(tmp_path / "checkpoint-1", tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-2" / ckpt.DONE_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="lowmem_vt.checkpoint"):
        assert ckpt.resolve_resume("latest", tmp_path).name == "checkpoint-1"
    assert "skipping checkpoint checkpoint-2: it has no COMPLETE marker" in caplog.text


def test_a_second_sigterm_during_the_first_save_says_what_is_left(tiny_dir, tmp_path, capsys, monkeypatch):
    from lowmem_vt import trainer as trainer_mod

    real_save = ckpt.save_checkpoint
    real_step = trainer_mod.Trainer.step

    def step_then_sigterm(self):
        m = real_step(self)
        os.kill(os.getpid(), signal.SIGTERM)
        return m

    def save_then_sigterm(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # the second one, mid-save
        return real_save(*a, **k)

    monkeypatch.setattr(trainer_mod.Trainer, "step", step_then_sigterm)
    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_sigterm)
    out = tmp_path / "out"
    assert train(tiny_dir, out, steps=3, save=5) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped at once (a second SIGTERM), without saving" in err and "Ctrl-C" not in err
    assert "no checkpoint of this run was saved" in err and "--overwrite" in err and "--resume latest" not in err
    assert ckpt.list_checkpoints(out) == []


def test_overwrite_through_a_symlink_moves_the_run_not_the_link(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "metrics.jsonl").write_text('{"step": 1}\n')
    link = tmp_path / "link"
    link.symlink_to(real)
    lock = ckpt.claim_run_folder(link, resume=False, overwrite=True)
    lock.release()
    assert link.is_symlink() and os.readlink(link) == str(real)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("real.old-")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").is_file()
    assert real.is_dir() and not ckpt.run_contents(real)


# ----------------------------------------------------------------------------------------- issue #29
# One rule for every command: an override changes only what it names, eval and merge verify the base the way resume
# does, every user error is one line, and a run never follows a link out of its folder.


def test_29_a_section_override_changes_only_the_keys_it_names(tiny_dir, tmp_path, capsys):
    cfg = load_config(RECIPE, ["train={max_steps: 1}", "model={dtype: bfloat16}"])
    assert (cfg.train.max_steps, cfg.train.learning_rate, cfg.train.prompts_per_step, cfg.train.micro_batch_size) == (1, 5e-3, 8, 64)
    assert cfg.model.dtype == "bfloat16" and cfg.model.name_or_path == "tiny-base:artifacts/tiny-base-qwen2vl"
    # the run folder's recipe.yaml is what ran: the recipe's learning rate, not the default
    out = tmp_path / "out"
    assert main(["train", RECIPE, f"model.name_or_path={tiny_dir}", f"log.output_dir={out}", *SMALL,
                 "train={max_steps: 1, warmup_steps: 0}", "log.save_steps=5"]) == 0
    import yaml

    ran = yaml.safe_load((out / "recipe.yaml").read_text())
    assert ran["train"]["learning_rate"] == 5e-3 and ran["train"]["max_steps"] == 1 and ran["train"]["lr_scheduler"] == "constant"
    assert ran["model"]["name_or_path"] == str(tiny_dir) and (ran["lora"]["r"], ran["lora"]["alpha"]) == (16, 32)
    capsys.readouterr()
    for bad, words in (("model=null", "'model' is a section"), ("train=3", "'train' is a section"),
                       ("train={max_steps: {a: 1}}", "key 'train.max_steps'"), ("grpo={nope: 1}", "unknown key 'grpo.nope'")):
        assert train(tiny_dir, tmp_path / "refused", bad) == 2
        one_line(capsys, words)
    assert not (tmp_path / "refused").exists()


def _other_base(tiny_dir, tmp_path):
    """The tiny base with one weight changed: same config, same shapes, another model."""
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other-base"
    shutil.copytree(tiny_dir, other)
    weights = load_file(str(other / "model.safetensors"))
    name = next(k for k in weights if k.endswith("lm_head.weight"))
    weights[name] = weights[name] + 0.01
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    return other


@pytest.mark.parametrize("command", ["merge", "eval"])
def test_29_merge_and_eval_refuse_a_base_the_checkpoint_was_not_trained_on(command, run_a, tiny_dir, tmp_path, capsys,
                                                                           no_model_load):
    from lowmem_vt.cvbench import generate_cvbench_records

    other = _other_base(tiny_dir, tmp_path)
    data = write_parquet(generate_cvbench_records(2, size=56), tmp_path / "cv" / "test.parquet")
    extra = ["--data", str(data), "--no-progress", "--device", "cpu"] if command == "eval" else []
    cp = run_a / "checkpoint-2"
    before = tree_digest(cp, other)
    assert main([command, "--checkpoint", str(cp), "--model", str(other), "--out", str(tmp_path / "o"), *extra]) == 2
    one_line(capsys, "--model: the checkpoint was trained on the base", "is another model", "--allow-other-base")
    # the recipe's own base, changed since the run (a hand copy of the checkpoint naming the other base)
    moved = tmp_path / "cp"
    shutil.copytree(cp, moved)
    (moved / ckpt.DONE_FILE).unlink()
    recipe = (moved / "recipe.yaml").read_text()
    (moved / "recipe.yaml").write_text(recipe.replace(f"name_or_path: {tiny_dir}", f"name_or_path: {other}"))
    assert str(other) in (moved / "recipe.yaml").read_text()
    assert main([command, "--checkpoint", str(moved), "--out", str(tmp_path / "o"), *extra]) == 2
    one_line(capsys, "key 'model.name_or_path': the checkpoint was trained on the base", "--allow-other-base")
    assert tree_digest(cp, other) == before and not (tmp_path / "o").exists()


def test_29_allow_other_base_merges_and_evaluates_and_says_so(run_a, tiny_dir, tmp_path, capsys):
    from lowmem_vt.cvbench import generate_cvbench_records
    from lowmem_vt.merge import MERGE_RECORD

    other = _other_base(tiny_dir, tmp_path)
    cp = run_a / "checkpoint-2"
    assert main(["merge", "--checkpoint", str(cp), "--model", str(other), "--out", str(tmp_path / "merged"),
                 "--allow-other-base"]) == 0
    record = json.loads((tmp_path / "merged" / MERGE_RECORD).read_text())
    assert record["base"] == str(other) and "is another model" in record["warning"]
    data = write_parquet(generate_cvbench_records(2, size=56), tmp_path / "cv" / "test.parquet")
    assert main(["eval", "--checkpoint", str(cp), "--model", str(other), "--data", str(data), "--device", "cpu", "--limit", "2",
                 "--max-new-tokens", "2", "--no-progress", "--out", str(tmp_path / "ev"), "--allow-other-base"]) == 0
    settings = json.loads((tmp_path / "ev" / "results.json").read_text())["settings"]
    assert "--allow-other-base" in settings["warning"] and "is another model" in settings["warning"]
    # the base it was trained on: no warning anywhere
    assert main(["merge", "--checkpoint", str(cp), "--out", str(tmp_path / "merged-own")]) == 0
    assert "warning" not in json.loads((tmp_path / "merged-own" / MERGE_RECORD).read_text())


def test_29_an_unknown_family_is_one_line(tmp_path, capsys):
    assert main(["build-tiny", str(tmp_path / "t"), "--family", "llama_vl"]) == 2
    one_line(capsys, "model_type 'llama_vl' is not a model family")
    assert not (tmp_path / "t").exists()


def test_29_an_output_dir_that_cannot_be_created_is_one_line(tiny_dir, tmp_path, capsys, no_model_load):
    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc here")
    assert train(tiny_dir, "/proc/lowmem_vt_run") == 2
    one_line(capsys, "log.output_dir /proc/lowmem_vt_run")
    assert main(["build-tiny", "/proc/lowmem_vt_tiny"]) == 2
    one_line(capsys, "build-tiny /proc/lowmem_vt_tiny cannot be created")
    assert not os.path.exists("/proc/lowmem_vt_run") and not os.path.exists("/proc/lowmem_vt_tiny")


def test_29_every_user_error_class_derives_from_the_one_the_cli_catches(monkeypatch, capsys):
    """Every exception class of the package is a UserError (one line, status 2), or one of the few the CLI handles
    on its own terms; a raise of a class defined elsewhere in the package is of one of these."""
    import ast
    import importlib
    import inspect
    import pkgutil

    import lowmem_vt
    from lowmem_vt import cli
    from lowmem_vt.errors import UserError

    # not raised on what a user typed: the trainer's own stop (status 3, cmd_train) and its step-abort signal
    handled_apart = {"lowmem_vt.trainer.TrainingStopped", "lowmem_vt.trainer.StepInterrupted"}
    classes = {}
    for info in pkgutil.walk_packages(lowmem_vt.__path__, "lowmem_vt."):
        mod = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(mod, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("lowmem_vt"):
                classes[f"{obj.__module__}.{obj.__qualname__}"] = obj
    assert {"lowmem_vt.families.UnknownFamily", "lowmem_vt.config.ConfigError", "lowmem_vt.preflight.PreflightError"} <= set(classes)
    stray = sorted(name for name, cls in classes.items() if not issubclass(cls, UserError) and name not in handled_apart)
    assert not stray, f"exception classes the CLI would print as a traceback: {stray}; derive them from errors.UserError"
    # every `raise Name(...)` of a class that is not Python's own names one of them (none hides inside a function)
    import builtins

    names = {cls.__name__ for cls in classes.values()}
    for path in Path(lowmem_vt.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
                raised = node.exc.func.id
                if raised[:1].isupper() and not hasattr(builtins, raised):
                    assert raised in names, (path, raised)
    # and the CLI prints each as one line with status 2
    for name, cls in classes.items():
        if name in handled_apart:
            continue

        def raise_it(args, cls=cls):
            raise cls("what was wrong, where, and what to do")

        monkeypatch.setattr(cli, "cmd_plot", raise_it)
        assert cli.main(["plot", "x"]) == 2, name
        one_line(capsys, "error: what was wrong, where, and what to do")


def test_29_resume_latest_never_follows_a_checkpoint_linked_from_another_run(run_a, tiny_dir, tmp_path, capsys, no_model_load):
    a, b = tmp_path / "A", tmp_path / "B"
    shutil.copytree(run_a, a)
    shutil.copytree(run_a, b)  # a sibling run with identical settings: only the link check can tell
    (a / "checkpoint-7").symlink_to(b / "checkpoint-2")
    before = tree_digest(a, b)
    assert train(tiny_dir, a, "--resume", "latest", steps=9) == 2
    one_line(capsys, "checkpoint-7 is a symbolic link to", "outside the run folder")
    with pytest.raises(ckpt.CheckpointError, match="checkpoint-7 .* outside the run folder"):
        ckpt.resolve_resume("latest", a)
    (a / "checkpoint-7").unlink()
    (a / "metrics.jsonl").unlink()  # a log that is another run's: a resume would truncate it
    (a / "metrics.jsonl").symlink_to(b / "metrics.jsonl")
    assert train(tiny_dir, a, "--resume", "latest", steps=9) == 2
    one_line(capsys, "metrics.jsonl is a symbolic link to", "outside the run folder")
    assert tree_digest(b) == {k: v for k, v in before.items() if k.startswith(str(b))}


def test_29_a_checkpoint_whose_files_lead_outside_it_does_not_verify(run_a, tmp_path, capsys):
    cp = tmp_path / "cp"
    shutil.copytree(run_a / "checkpoint-2", cp)
    elsewhere = tmp_path / "elsewhere.pt"
    shutil.copy(cp / ckpt.STATE_FILE, elsewhere)  # the same bytes: the checksum alone would pass
    (cp / ckpt.STATE_FILE).unlink()
    (cp / ckpt.STATE_FILE).symlink_to(elsewhere)
    with pytest.raises(ckpt.CheckpointError, match="trainer_state.pt leads outside the checkpoint"):
        ckpt.verify_checkpoint(cp)
    # a checkpoint reached through a link the user names is followed (the link is theirs); its files stay inside it
    link = tmp_path / "link"
    link.symlink_to(run_a / "checkpoint-2")
    ckpt.verify_checkpoint(link)
    assert main(["merge", "--checkpoint", str(cp), "--out", str(tmp_path / "m")]) == 2
    one_line(capsys, "leads outside the checkpoint")


def test_29_an_image_url_is_not_fetched_and_says_so():
    from lowmem_vt.data import decode_image

    with pytest.raises(DataError, match=r"image 'http://127\.0\.0\.1:9/a\.png' is a URL; URLs are not fetched"):
        decode_image("http://127.0.0.1:9/a.png")
    with pytest.raises(DataError, match="is a URL"):
        decode_image({"path": "https://example.org/x.jpg"}, image_dir="/tmp")


def test_29_special_files_are_named_for_what_they_are(tiny_dir, tmp_path, capsys, no_model_load):
    from lowmem_vt.data import decode_image

    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)  # opening it for reading would wait for ever: never opened
    assert main(["train", "/dev/zero"]) == 2
    one_line(capsys, "recipe file /dev/zero is a character device, not a regular file")
    assert main(["train", str(fifo)]) == 2
    one_line(capsys, "is a named pipe, not a regular file")
    with pytest.raises(DataError, match="image file /dev/zero is a character device, not a regular file"):
        decode_image("/dev/zero")
    for path, words in (("/dev/zero", "data.path /dev/zero is a character device"), (fifo, "is a named pipe")):
        assert train(tiny_dir, tmp_path / "out", "data.source=sat", f"data.path={path}") == 2
        one_line(capsys, words)
    assert main(["eval", "--model", str(tiny_dir), "--data", "/dev/zero", "--device", "cpu", "--out", str(tmp_path / "o")]) == 2
    one_line(capsys, "CV-Bench data /dev/zero is a character device")
    assert main(["plot", "/dev/zero"]) == 2
    one_line(capsys, "/dev/zero is a character device")


def test_29_a_tab_in_an_override_is_named_as_a_tab(tiny_dir, tmp_path, capsys, no_model_load):
    assert train(tiny_dir, "out\trun") == 2
    line = one_line(capsys, "override 'log.output_dir'", "holds a tab character")
    assert "not a valid value" not in line and "starts with" not in line
    cfg = load_config(RECIPE, ['log.output_dir="out\trun"'])  # quoted, it is taken as written
    assert cfg.log.output_dir == "out\trun"


LOG_ONCE = r"""
import logging
from lowmem_vt.cli import _setup_logging
_setup_logging()
import datasets, huggingface_hub  # each gives its logger a stderr handler of its own at import
logging.getLogger("huggingface_hub.utils._http").warning("hub-retry-probe")
logging.getLogger("datasets.load").warning("datasets-probe")
logging.getLogger("lowmem_vt.trainer").warning("ours-probe")
"""


def test_a_library_warning_prints_once():
    """Without the hub (`train.py recipes/sat_lora.yaml` here), the hub's five retry warnings each printed twice:
    once by its own handler, once by ours through propagation."""
    res = subprocess.run([sys.executable, "-c", LOG_ONCE], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    for probe in ("hub-retry-probe", "datasets-probe", "ours-probe"):
        assert res.stderr.count(probe) == 1, res.stderr
    assert " WARNING lowmem_vt.trainer: ours-probe" in res.stderr  # ours keep the timestamped format
