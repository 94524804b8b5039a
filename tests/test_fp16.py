"""float16 end to end, for GPUs without bfloat16 (the T4 of Colab): ``model.dtype: auto``, the loss scale,
and training the tiny model on CPU in float16 with float32's losses."""

import math

import pytest
import torch

from lowmem_vt.config import resolve_dtype
from lowmem_vt.grpo import LossCounts, loss_scale
from lowmem_vt.kernels.head import fused_grpo_loss
from lowmem_vt.model import image_embeddings
from lowmem_vt.rollout import SamplingParams
from lowmem_vt.trainer import Trainer

# the learning test's task (one answer token, accuracy reward): the advantages are nonzero from step 1
TASK = {
    "data.generated_tasks": "[color]",
    "data.generated_samples": 32,
    "rewards.funcs": "[accuracy]",
    "grpo.max_completion_length": 1,
    "grpo.num_generations": 16,
    "grpo.beta": 0.04,
    "train.prompts_per_step": 2,
    "train.micro_batch_size": 32,
    "train.learning_rate": 1e-3,
    "log.save_steps": 1000,
    "log.sample_every": 0,
}


def test_auto_dtype(monkeypatch):
    assert resolve_dtype("float32", "cuda") == "float32"  # explicit dtypes pass through
    assert resolve_dtype("auto", "cpu") == "bfloat16"  # as the GPU recipes were written
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, expected in (((7, 5), "float16"), ((8, 0), "bfloat16"), ((8, 9), "bfloat16"), ((9, 0), "bfloat16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert resolve_dtype("auto", "auto") == expected, capability
        assert resolve_dtype("auto", "cuda") == expected, capability
        assert resolve_dtype("auto", "cpu") == "bfloat16"


def test_recipes_and_notebook_use_auto(recipe_factory):
    import json

    from lowmem_vt.config import load_config

    for recipe in ("recipes/sat_lora.yaml", "recipes/sat_qlora.yaml"):
        assert "dtype: auto" in open(recipe).read(), recipe
        assert load_config(recipe).model.dtype in ("bfloat16", "float16")  # resolved when loaded
    cells = "".join("".join(c["source"]) for c in json.load(open("notebooks/sat_qlora_colab.ipynb"))["cells"])
    assert "model.dtype=float16" not in cells  # no override of its own: the recipe's auto decides


def test_loss_scale():
    counts = LossCounts(num_sequences=64, num_tokens=30_000.0, max_completion_length=700)
    assert loss_scale(torch.bfloat16, counts) == 1.0 and loss_scale(torch.float32, counts) == 1.0
    assert loss_scale(torch.float16, counts) == 2.0**16  # 64 x 700 = 44,800 -> 65,536
    # every token's weight (at least 1 / (completions x max length) for all loss types) times the scale is >= 1
    assert loss_scale(torch.float16, counts) / (64 * 700) >= 1.0
    assert math.log2(loss_scale(torch.float16, LossCounts(1, 1.0, 1))) == 0


@pytest.fixture(scope="module")
def trainers(tiny_dir, tmp_path_factory):
    """The same recipe in float32 and float16 (same seed, so the same adapter initialisation)."""
    from conftest import tiny_recipe

    out = {}
    for dtype in ("float32", "float16"):
        torch.manual_seed(0)
        out[dtype] = Trainer(tiny_recipe(tiny_dir, tmp_path_factory.mktemp(dtype), **TASK, **{"model.dtype": dtype}))
    return out


def test_float16_gradients_need_the_loss_scale(trainers):
    """The numeric check behind ``loss_scale``: LoRA gradients of one micro-batch normalised like a real
    batch (64 completions x 700 tokens), float16 with and without the scale against float32."""
    tr32, tr16 = trainers["float32"], trainers["float16"]
    assert tr16.lm.lm_head_weight.dtype == torch.float16
    with torch.no_grad():  # the same non-zero adapter in both, so that gradients reach A and B
        gen = torch.Generator().manual_seed(1)
        for (name, p32), (_, p16) in zip(tr32.lm.peft_model.named_parameters(), tr16.lm.peft_model.named_parameters()):
            if p32.requires_grad:
                assert p32.dtype == p16.dtype == torch.float32  # LoRA weights stay float32 over a float16 base
                if "lora_B" in name:
                    p32.copy_(torch.randn(p32.shape, generator=gen) * 0.05)
                p16.copy_(p32)
    batch = tr32._encode(*tr32._batch_indices(0))
    pixels = [p.pixel_values for p in batch.prompts], [p.image_grid_thw for p in batch.prompts]
    roll = tr32.rollout.generate(batch.prompts, image_embeddings(tr32.lm, *pixels), SamplingParams(4, 6, 1.0, seeds=batch.seeds))
    B = roll.completion_ids.shape[0]
    advantages = torch.randn(B, generator=torch.Generator().manual_seed(2))
    counts = LossCounts(num_sequences=64, num_tokens=44_800.0, max_completion_length=700)

    def lora_grads(tr, scale):
        for p in tr.params:
            p.grad = None
        seqs, T = tr._sequences(batch.prompts, roll, slice(0, B))
        hidden = tr.policy(seqs, image_embeddings(tr.lm, *pixels))
        loss, _, _ = fused_grpo_loss(hidden, tr.lm.lm_head_weight, roll.completion_ids[:, :T], roll.completion_mask[:, :T],
                                     advantages, None, None, beta=0.0, epsilon_low=0.2, epsilon_high=0.2, loss_type="bnpo",
                                     counts=counts, backend="torch")
        (loss * scale).backward()
        return torch.cat([p.grad.flatten() / scale for p in tr.params])

    reference = lora_grads(tr32, 1.0)
    errors = {}
    for scale in (1.0, loss_scale(torch.float16, counts)):
        g = lora_grads(tr16, scale)
        assert torch.isfinite(g).all(), scale
        errors[scale] = float((g - reference).norm() / reference.norm())
    print(f"float16 LoRA gradient error vs float32 (relative L2), by loss scale: {errors}")
    unscaled, scaled = errors[1.0], errors[loss_scale(torch.float16, counts)]
    assert scaled < 1e-2, errors
    assert unscaled > 10 * scaled, f"the scale should matter at this normalisation: {errors}"


def test_float16_trains_with_float32_losses(trainers):
    """Three trainer steps in float16 (loss scaled) track float32's: loss, KL and gradient norm within 1 %."""
    steps = {dtype: [tr.step() for _ in range(3)] for dtype, tr in trainers.items()}
    for i, (m32, m16) in enumerate(zip(steps["float32"], steps["float16"])):
        assert not m16["skipped_step"], f"step {i}: float16 step skipped (non-finite)"
        for key in ("loss", "kl", "grad_norm"):
            tol = 1e-2 * max(abs(m32[key]), 1e-3)
            assert abs(m16[key] - m32[key]) <= tol, f"step {i} {key}: float16 {m16[key]} vs float32 {m32[key]}"
    assert any(m["grad_norm"] > 0 for m in steps["float32"]), "the task should give nonzero gradients"
