"""What the tests build on the tiny random models: the model with a live LoRA adapter, a batch of SAT prompts of
different lengths and image sizes, their image features. ``tests/conftest.py`` builds each tiny model once per
session from these (``tiny_lm``, ``tiny35_lm``)."""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import torch

from lowmem_vt.config import LoraConfig, ModelConfig
from lowmem_vt.data import examples_from_records, generate_sat_records
from lowmem_vt.inputs import InputBuilder
from lowmem_vt.model import image_embeddings, load_model

# every linear of both of Qwen3.5's layer kinds: the full-attention and MLP linears, then the Gated DeltaNet's
QWEN35_LINEAR_TARGETS = ["in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"]
QWEN35_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", *QWEN35_LINEAR_TARGETS]


def lora_model(path: str | Path, lora: LoraConfig, max_pixels: int):
    """The tiny model at ``path`` in float32 on the CPU with ``lora`` whose B is drawn from N(0, 0.05) (seed 0), so the
    policy differs from the reference (B starts at zero in training)."""
    torch.manual_seed(0)
    lm = load_model(ModelConfig(name_or_path=str(path), dtype="float32"), lora, torch.device("cpu"), min_pixels=3136,
                    max_pixels=max_pixels)
    with torch.no_grad():
        for name, p in lm.peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return lm


def sat_prompts(lm, max_pixels: int, sizes: tuple[int, int] = (112, 56)) -> list:
    """Three encoded SAT prompts: two with ``sizes[0]``-px images, one counting question with a ``sizes[1]``-px image;
    three prompt lengths and two numbers of image tokens (checked)."""
    builder = InputBuilder(lm.tokenizer, lm.image_processor, lm.config, max_prompt_length=1024, min_pixels=3136,
                           max_pixels=max_pixels)
    recs = generate_sat_records(2, size=sizes[0], seed=0) + generate_sat_records(1, size=sizes[1], seed=1, tasks=["count"])
    examples, _ = examples_from_records(recs, max_samples=3, shuffle_options=True, max_pixels=max_pixels, seed=0)
    out = [builder.encode(e.image, e.question) for e in examples]
    assert len({p.length for p in out}) == 3 and len({p.num_image_tokens for p in out}) == 2
    return out


def prompt_embeddings(lm, prompts: list) -> list[torch.Tensor]:
    """Each prompt's image features [1, image tokens, H], one vision-tower call."""
    return image_embeddings(lm, [p.pixel_values for p in prompts], [p.image_grid_thw for p in prompts])


def with_eos(lm, eos: int):
    """The same model with another token id playing EOS (-1: no token ends a completion)."""
    return dataclasses.replace(lm, tokenizer=types.SimpleNamespace(eos_token_id=eos, pad_token_id=lm.pad_token_id))
