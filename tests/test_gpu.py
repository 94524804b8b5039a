"""Tests that need a CUDA GPU: QLoRA (NF4) on CUDA with the vision tower kept in bf16, and the planner's
refusal before anything is loaded. Marked ``gpu`` (``pytest -m gpu``, run by ``make gpu-check``); without a
GPU they are skipped with the reason."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_qlora_on_cuda_keeps_vision_bf16_and_trains(recipe_factory):
    """sat_qlora's settings on the tiny model: NF4 language model, bf16 vision tower and head, fp32 LoRA,
    paged 8-bit AdamW; three finite steps, the memory they leave allocated flat. The loss head is the torch
    reference here, so that a kernel fault (tested on its own) cannot hide what this test says about NF4; the
    whole-step stage runs both together."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is carried as a wheel (make gpu-wheels)")
    from lowmem_vt.model import vision_on_device
    from lowmem_vt.trainer import Trainer

    cfg = recipe_factory(**{"model.quantization": "nf4", "model.dtype": "bfloat16", "train.device": "cuda",
                            "train.optimizer": "paged_adamw_8bit", "kernels": "torch", "train.max_steps": 2,
                            "train.prompts_per_step": 2, "grpo.num_generations": 4, "train.micro_batch_size": 4,
                            "grpo.max_completion_length": 8, "data.generated_samples": 8})
    tr = Trainer(cfg)
    model = tr.lm.hf_model
    quantized = [m for m in model.model.language_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 7 * model.config.text_config.num_hidden_layers  # q/k/v/o/gate/up/down in every layer
    assert all(m.weight.device.type == "cuda" for m in quantized)
    visual = model.model.visual
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in visual.modules())
    assert {p.dtype for p in visual.parameters()} == {torch.bfloat16}
    # the frozen tower lives in pinned host memory between its once-per-step calls (model.offload_vision) ...
    assert all(p.device.type == "cpu" and p.is_pinned() for p in visual.parameters())
    with vision_on_device(tr.lm):  # ... and on the GPU for them
        assert all(p.device.type == "cuda" for p in visual.parameters())
    assert all(p.device.type == "cpu" for p in visual.parameters())
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert tr.params and all(p.dtype == torch.float32 and p.device.type == "cuda" for p in tr.params)
    assert isinstance(tr.optimizer, bnb.optim.PagedAdamW8bit)
    held = []
    for _ in range(3):
        m = tr.step()
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and not m["skipped_step"], m
        assert m["vision_forward_calls"] == cfg.train.prompts_per_step  # one vision pass per prompt per step
        assert 0 < m["peak_gpu_mem_gib"] < 4, m
        held.append(torch.cuda.memory_allocated())  # the step's own tensors are gone
    assert tr.optimizer.state  # the 8-bit states exist: the step reached the optimizer
    # nothing of a step outlives it: the three steps leave the same allocated, within 64 MiB (bench/step.py's bound)
    assert max(held) - min(held) < 2**26, held


def config_only_2b_folder(tmp_path, tiny_dir):
    """The real Qwen2-VL-2B config beside a weights file holding one placeholder tensor and the tiny model's
    tokenizer: pre-flight (config, model type, a weights file) passes, so a run reaches the planner; loading it
    would put a mostly random 2B model on the device."""
    import shutil

    from safetensors.torch import save_file

    from lowmem_vt.tiny import qwen2_vl_2b_config

    folder = tmp_path / "qwen2-vl-2b-config-only"
    qwen2_vl_2b_config().save_pretrained(folder)
    save_file({"placeholder": torch.zeros(1)}, str(folder / "model.safetensors"))
    for f in tiny_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "config.json":
            shutil.copy(f, folder / f.name)
    return folder


def test_planner_refuses_before_loading_on_cuda(recipe_factory, tmp_path, tiny_dir):
    """A run that cannot fit is refused by the planner from the config alone, after pre-flight and before the
    model loads: nothing is allocated on the GPU (a load would have allocated the 2B model's 4.4 GB)."""
    from lowmem_vt.planner import PlanError
    from lowmem_vt.trainer import Trainer

    model_dir = config_only_2b_folder(tmp_path, tiny_dir)
    cfg = recipe_factory(**{"model.name_or_path": str(model_dir), "model.dtype": "bfloat16", "train.device": "cuda",
                            "model.gradient_checkpointing": "false", "train.prompts_per_step": 4,
                            "grpo.num_generations": 64, "train.micro_batch_size": 256,
                            "grpo.max_completion_length": 16384})  # ~8.6 TB predicted: no GPU holds it
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with pytest.raises(PlanError) as err:
        Trainer(cfg)
    msg = str(err.value)
    assert "exceeds the GPU's" in msg and "train.micro_batch_size" in msg, msg
    assert torch.cuda.memory_allocated() == before
