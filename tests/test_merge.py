"""Merging on the tiny model: merged logits equal the adapter's (B non-zero), the folder loads with transformers
alone, and evaluation gives the same answers for the checkpoint (base + adapter) and the merged model."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors import safe_open

from lowmem_vt.config import load_config, to_dict
from lowmem_vt.cvbench import generate_cvbench_records, record_to_item
from lowmem_vt.inputs import InputBuilder


@pytest.fixture(scope="module")
def checkpoint(tiny_lm, tiny_dir, tmp_path_factory):
    """A checkpoint folder as the trainer writes it (adapter/ + recipe.yaml) holding tiny_lm's adapter (B != 0)."""
    path = tmp_path_factory.mktemp("run") / "checkpoint-3"
    tiny_lm.peft_model.save_pretrained(str(path / "adapter"))
    cfg = load_config(None, [f"model.name_or_path={tiny_dir}", "model.dtype=float32", "lora.r=4", "lora.alpha=8",
                             "data.min_pixels=3136", f"data.max_pixels={112 * 112}"])
    (path / "recipe.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


@pytest.fixture(scope="module")
def merged(checkpoint, tmp_path_factory):
    from lowmem_vt.cli import main

    out = tmp_path_factory.mktemp("merged") / "model"
    assert main(["merge", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def items():
    return [record_to_item(r, i) for i, r in enumerate(generate_cvbench_records(4, size=112, seed=3))]


def _logits(model, prompt):
    out = model(input_ids=prompt.input_ids[None], pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw,
                mm_token_type_ids=prompt.mm_token_type_ids[None])
    return out.logits[0].float()


@torch.no_grad()
def test_merged_logits_equal_adapter_logits(tiny_lm, merged, items):
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(merged).eval()
    builder = InputBuilder(tiny_lm.tokenizer, tiny_lm.image_processor, tiny_lm.config, max_prompt_length=1024,
                           min_pixels=3136, max_pixels=112 * 112)
    tiny_lm.peft_model.eval()
    for item in items[:2]:
        prompt = builder.encode(item.load_image(), item.prompt)
        adapter = _logits(tiny_lm.hf_model, prompt)
        with tiny_lm.peft_model.disable_adapter():
            base = _logits(tiny_lm.hf_model, prompt)
        got = _logits(model, prompt)
        assert (adapter - base).abs().max() > 1e-2  # the adapter really changes the model
        torch.testing.assert_close(got, adapter, atol=2e-5, rtol=1e-5)


def test_merged_folder_is_a_plain_transformers_model(merged):
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "generation_config.json"} <= names
    assert "adapter_config.json" not in names
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "base_layer" in k]
    assert json.loads((merged / "preprocessor_config.json").read_text())["size"] == {"longest_edge": 112 * 112, "shortest_edge": 3136}
    code = (
        "import sys, torch\n"
        "from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil\n"
        f"m = Qwen2VLForConditionalGeneration.from_pretrained({str(merged)!r})\n"
        f"tok = AutoTokenizer.from_pretrained({str(merged)!r})\n"
        f"ip = Qwen2VLImageProcessorPil.from_pretrained({str(merged)!r})\n"
        "m(input_ids=torch.tensor([tok('left right')['input_ids']]))\n"
        "assert 'peft' not in sys.modules, 'loading the merged model imported peft'\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


def test_checkpoint_and_merged_model_answer_alike(checkpoint, merged, items):
    from lowmem_vt.eval import ModelResponder, evaluate, load_eval_model

    responses = {}
    for name, kw in {"checkpoint": dict(checkpoint=str(checkpoint), model=None),
                     "merged": dict(checkpoint=None, model=str(merged))}.items():
        lm, min_px, max_px = load_eval_model(**kw, device=torch.device("cpu"), dtype="float32", min_pixels=None, max_pixels=None)
        assert (min_px, max_px) == ((3136, 112 * 112) if name == "checkpoint" else (3136, 401408))
        respond = ModelResponder(lm, max_new_tokens=6, min_pixels=3136, max_pixels=112 * 112)
        rows, _ = evaluate(items, respond, batch_size=4, progress=False)
        responses[name] = [r.response for r in rows]
    assert responses["checkpoint"] == responses["merged"]


def test_merge_rejects_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    from lowmem_vt.cli import main

    assert main(["merge", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err


def test_qlora_checkpoint_merges_into_the_unquantized_16bit_base(checkpoint, tmp_path):
    import shutil

    from lowmem_vt.merge import merge_checkpoint

    qlora = tmp_path / "checkpoint-3"
    shutil.copytree(checkpoint, qlora)
    recipe = yaml.safe_load((qlora / "recipe.yaml").read_text())
    recipe["model"].update(quantization="nf4", dtype="bfloat16")
    (qlora / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = merge_checkpoint(qlora, tmp_path / "merged")  # on the CPU: no bitsandbytes, no 4-bit
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def _damaged(kind: str, checkpoint, tiny_dir, tmp_path) -> tuple[list[str], str]:
    """(merge arguments beyond --out, expected words of the error line) for one kind of bad input."""
    import shutil

    if kind == "base missing":  # the recipe's base folder moved away
        ckpt = tmp_path / "checkpoint-3"
        shutil.copytree(checkpoint, ckpt)
        recipe = yaml.safe_load((ckpt / "recipe.yaml").read_text())
        recipe["model"]["name_or_path"] = str(tmp_path / "gone" / "tiny-qwen2vl")
        (ckpt / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        return ["--checkpoint", str(ckpt)], "recipe.yaml: key 'model.name_or_path'.*does not exist"
    if kind in ("base without config", "base without weights"):
        base = tmp_path / "base"
        shutil.copytree(tiny_dir, base)
        (base / ("config.json" if kind == "base without config" else "model.safetensors")).unlink()
        words = "has no config.json" if kind == "base without config" else "has no weights"
        return ["--checkpoint", str(checkpoint), "--model", str(base)], f"--model: .*{words}"
    if kind == "base is an adapter":
        return ["--checkpoint", str(checkpoint), "--model", str(checkpoint / "adapter")], "--model: .*holds a LoRA adapter"
    if kind in ("base of another size", "base with fewer layers"):
        from lowmem_vt.tiny import build_tiny_model

        other = build_tiny_model(tmp_path / "other", **({"hidden_size": 32} if kind == "base of another size" else {"layers": 1}))
        words = ("the base's \\w+ has \\d+ inputs but the adapter's layer 0 .* has shape" if kind == "base of another size"
                 else "the base has 1 decoder layers but the adapter .* adapts layer 1")
        return ["--checkpoint", str(checkpoint), "--model", str(other)], f"--model: {words}.*trained on another base"
    if kind == "checkpoint is its adapter folder":
        return ["--checkpoint", str(checkpoint / "adapter")], "is the adapter folder of a checkpoint"
    if kind == "adapter without weights":
        ckpt = tmp_path / "checkpoint-3"
        shutil.copytree(checkpoint, ckpt)
        (ckpt / "adapter" / "adapter_model.safetensors").unlink()
        return ["--checkpoint", str(ckpt)], "has no adapter weights"
    if kind == "adapter config damaged":
        ckpt = tmp_path / "checkpoint-3"
        shutil.copytree(checkpoint, ckpt)
        (ckpt / "adapter" / "adapter_config.json").write_text('{"r": 4')
        return ["--checkpoint", str(ckpt)], "adapter_config.json is not a peft adapter config"
    raise KeyError(kind)


@pytest.mark.parametrize("kind", ["base missing", "base without config", "base without weights", "base is an adapter",
                                  "base of another size", "base with fewer layers",
                                  "checkpoint is its adapter folder", "adapter without weights", "adapter config damaged"])
def test_merge_checks_checkpoint_and_base_before_loading(kind, checkpoint, tiny_dir, tmp_path, capsys, monkeypatch):
    """Each is one `error:` line and exit status 2, before any model is loaded or anything is written."""
    import re

    import lowmem_vt.model
    from lowmem_vt.cli import main

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the problem was reported")

    monkeypatch.setattr(lowmem_vt.model, "load_model", no_loading)
    args, expected = _damaged(kind, checkpoint, tiny_dir, tmp_path)
    capsys.readouterr()  # what building the other base printed
    out = tmp_path / "merged"
    assert main(["merge", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(expected, err[0]), err
    assert not out.exists()
