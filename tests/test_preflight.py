"""Pre-flight: every problem that can be seen before loading the model is reported before loading it, as
one line (file / key / record, and what to do) with exit status 2; ``--debug`` shows the traceback."""

import json
import shutil

import pytest
import torch

from lowmem_vt.cli import main
from lowmem_vt.data import generate_sat_records, write_parquet


def _train(tiny_dir, tmp_path, *over):
    base = [f"model.name_or_path={tiny_dir}", f"log.output_dir={tmp_path / 'out'}", "log.progress_bar=false", "log.plot=false"]
    return main(["train", "recipes/demo_tiny.yaml", *base, *over])


def _one_line_error(capsys, *expected):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for e in expected:
        assert e in err, (e, err)
    return err


def _model_copy(tiny_dir, dst, *, drop_config=False, model_type=None):
    shutil.copytree(tiny_dir, dst)
    if drop_config:
        (dst / "config.json").unlink()
    if model_type:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["model_type"] = model_type
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _sat_file(tmp_path, kind):
    records = generate_sat_records(4, size=28)
    if kind == "no_question":
        return write_parquet([{k: v for k, v in r.items() if k != "question"} for r in records], tmp_path / "d.parquet")
    if kind == "empty":
        (tmp_path / "d.parquet").write_bytes(b"")
        return tmp_path / "d.parquet"
    if kind == "not_parquet":
        (tmp_path / "d.parquet").write_text("id,question\n1,left?\n")
        return tmp_path / "d.parquet"
    if kind == "bad_jsonl_line_2":
        ok = json.dumps({"question": "q", "answers": ["a", "b"], "correct_answer": "a", "image_bytes": "x.png"})
        (tmp_path / "d.jsonl").write_text(ok + "\n" + "{not json\n" + ok + "\n")
        return tmp_path / "d.jsonl"
    raise ValueError(kind)


CASES = {
    "model folder without config.json": (lambda t, d: [f"model.name_or_path={_model_copy(d, t / 'm', drop_config=True)}"],
                                         ["key 'model.name_or_path'", "no config.json"]),
    "model folder of another architecture": (lambda t, d: [f"model.name_or_path={_model_copy(d, t / 'm', model_type='llama')}"],
                                             ["model_type 'llama'", "Qwen2-VL"]),
    "path that does not exist": (lambda t, d: [f"model.name_or_path={t / 'models' / 'typo'}"], ["looks like a local path"]),
    "typo'd relative path beside an existing folder": (lambda t, d: ["model.name_or_path=recipes/tiny-typo"],
                                                       ["'recipes/tiny-typo' looks like a local path"]),
    "kernels: triton without CUDA": (lambda t, d: ["kernels=triton"], ["key 'kernels'", "CUDA"]),
    "output dir that is a file": (lambda t, d: [(t / "f").write_text("x") and f"log.output_dir={t / 'f'}"], ["is a file"]),
    "LoRA target matching nothing": (lambda t, d: ["lora.target_modules=[q_proj, qkv]"],
                                     ["key 'lora.target_modules[1]'", "'qkv' matches no linear", "known: down_proj"]),
    "unknown generated task": (lambda t, d: ["data.generated_tasks=[left_right, spin]"], ["data.generated_tasks[1]", "'spin'"]),
    "data file missing a column": (lambda t, d: ["data.source=sat", f"data.path={_sat_file(t, 'no_question')}"],
                                   ["d.parquet", "no column 'question'"]),
    "empty data file": (lambda t, d: ["data.source=sat", f"data.path={_sat_file(t, 'empty')}"], ["d.parquet is empty"]),
    "data file that is not parquet": (lambda t, d: ["data.source=sat", f"data.path={_sat_file(t, 'not_parquet')}"],
                                      ["not a readable parquet file"]),
    "bad JSONL line": (lambda t, d: ["data.source=sat", f"data.path={_sat_file(t, 'bad_jsonl_line_2')}"],
                       ["d.jsonl line 2: not valid JSON"]),
    "unreachable hub model": (lambda t, d: ["model.name_or_path=nobody-here/no-such-model"],
                              ["could not read the config of hub model 'nobody-here/no-such-model'"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_problem_is_one_line_before_the_model_loads(case, tiny_dir, tmp_path, capsys, monkeypatch, no_model_load):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make, expected = CASES[case]
    assert _train(tiny_dir, tmp_path, *make(tmp_path, tiny_dir)) == 2
    _one_line_error(capsys, *expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")
def test_cuda_device_without_cuda(tiny_dir, tmp_path, capsys, no_model_load):
    assert _train(tiny_dir, tmp_path, "train.device=cuda") == 2
    _one_line_error(capsys, "key 'train.device'", "train.device=cpu")


def test_vllm_backend_without_vllm_or_gpu(tiny_dir, tmp_path, capsys, no_model_load):
    assert _train(tiny_dir, tmp_path, "rollout.backend=vllm") == 2
    _one_line_error(capsys, "key 'rollout.backend'", "rollout.backend=engine")


def test_resume_without_a_checkpoint_is_one_line(tiny_dir, tmp_path, capsys, no_model_load):
    assert _train(tiny_dir, tmp_path, "--resume", "latest") == 2
    _one_line_error(capsys, "--resume latest: no usable checkpoint")


def test_debug_shows_the_traceback(tiny_dir, tmp_path, no_model_load):
    from lowmem_vt.preflight import PreflightError

    with pytest.raises(PreflightError, match="matches no linear"):
        _train(tiny_dir, tmp_path, "lora.target_modules=[qkv]", "--debug")


def test_eval_checks_the_model_folder_before_loading(tiny_dir, tmp_path, capsys, no_model_load):
    from lowmem_vt.cvbench import generate_cvbench_records

    data = write_parquet(generate_cvbench_records(4, size=56), tmp_path / "cv" / "test.parquet")
    model = _model_copy(tiny_dir, tmp_path / "m", drop_config=True)
    rc = main(["eval", "--model", str(model), "--data", str(data.parent), "--device", "cpu", "--no-progress", "--limit", "2"])
    assert rc == 2
    _one_line_error(capsys, "--model", "no config.json")


def test_bfloat16_with_the_triton_head_is_refused_below_sm80():
    from lowmem_vt.preflight import PreflightError, check_head_dtype

    with pytest.raises(PreflightError, match="model.dtype.*compute capability >= 8.0.*has 7.5"):
        check_head_dtype("triton", "bfloat16", (7, 5), "r.yaml")
    with pytest.raises(PreflightError, match="kernels: triton_streaming"):
        check_head_dtype("triton_streaming", "bfloat16", (7, 0), "r.yaml")
    check_head_dtype("triton", "float16", (7, 5), "r.yaml")  # the T4's dtype
    check_head_dtype("torch", "bfloat16", (7, 5), "r.yaml")  # cuBLAS is not asked for bf16 products by torch's head
    check_head_dtype("triton", "bfloat16", (8, 0), "r.yaml")
    check_head_dtype("triton_fused_linear", "bfloat16", (9, 0), "r.yaml")


def test_the_gpu_refusal_tests_model_folder_passes_preflight(recipe_factory, tmp_path, tiny_dir):
    """tests/test_gpu.py's planner-refusal test must reach the planner: its config-only 2B folder passes
    pre-flight (on CPU here; the planner itself runs only for CUDA devices)."""
    from lowmem_vt.preflight import PreflightError, check_recipe
    from test_gpu import config_only_2b_folder

    folder = config_only_2b_folder(tmp_path, tiny_dir)
    check_recipe(recipe_factory(**{"model.name_or_path": str(folder), "model.dtype": "bfloat16"}))
    (folder / "model.safetensors").unlink()  # and the check it passes can fail
    with pytest.raises(PreflightError, match="has no weights"):
        check_recipe(recipe_factory(**{"model.name_or_path": str(folder), "model.dtype": "bfloat16"}))
