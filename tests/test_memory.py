"""Gradient checkpointing really takes effect (bf16/fp32 LoRA and NF4 QLoRA), counted as the bytes autograd
keeps for backward; and QLoRA loads and trains a step on the tiny model (bitsandbytes' CPU backend)."""

import math
import sys
from pathlib import Path

import pytest
import torch

from lowmem_vt.config import LoraConfig, ModelConfig
from lowmem_vt.data import examples_from_records, generate_sat_records
from lowmem_vt.inputs import InputBuilder, build_sequences
from lowmem_vt.model import image_embeddings, load_model, sequence_hidden

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from nf4 import nf4_on_cpu  # noqa: E402


needs_nf4 = pytest.mark.skipif(not (torch.cuda.is_available() or nf4_on_cpu()),
                               reason="bitsandbytes NF4 needs CUDA or its CPU backend, neither works here")


def _saved_bytes(tiny_dir, *, checkpointing: bool, quantization: str = "none") -> int:
    dtype = "bfloat16" if quantization == "nf4" else "float32"
    lm = load_model(ModelConfig(name_or_path=str(tiny_dir), dtype=dtype, gradient_checkpointing=checkpointing,
                                quantization=quantization), LoraConfig(r=4, alpha=8), torch.device("cpu"),
                    min_pixels=3136, max_pixels=112 * 112)
    ex, _ = examples_from_records(generate_sat_records(2, size=112, seed=0), max_samples=2, shuffle_options=False,
                                  max_pixels=112 * 112, seed=0)
    ib = InputBuilder(lm.tokenizer, lm.image_processor, lm.config, max_prompt_length=1024, min_pixels=3136, max_pixels=112 * 112)
    prompts = [ib.encode(e.image, e.question) for e in ex]
    embeds = image_embeddings(lm, [p.pixel_values for p in prompts], [p.image_grid_thw for p in prompts])
    comp = torch.randint(10, 90, (2, 64), generator=torch.Generator().manual_seed(0))
    seqs = build_sequences(prompts, [0, 1], comp, torch.ones(2, 64), lm.pad_token_id)
    kept = [0]

    def pack(t):
        kept[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = sequence_hidden(lm, seqs, embeds)
    hidden.float().sum().backward()  # the graph is usable: LoRA gets gradients
    grads = [p.grad for n, p in lm.peft_model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None for g in grads)
    return kept[0]


def test_checkpointing_keeps_far_fewer_activations(tiny_dir):
    full = _saved_bytes(tiny_dir, checkpointing=False)
    ckpt = _saved_bytes(tiny_dir, checkpointing=True)
    # measured: ~4.9 MB without, ~0.5 MB with (layer inputs only); before load_model put the modules in
    # train mode the checkpointed model kept ~5.1 MB, i.e. checkpointing silently did nothing
    assert ckpt < 0.25 * full, (ckpt, full)


@needs_nf4
def test_checkpointing_takes_effect_on_the_quantized_model(tiny_dir):
    full = _saved_bytes(tiny_dir, checkpointing=False, quantization="nf4")
    ckpt = _saved_bytes(tiny_dir, checkpointing=True, quantization="nf4")
    assert ckpt < 0.25 * full, (ckpt, full)


@needs_nf4
def test_qlora_loads_and_trains_a_step(recipe_factory):
    import bitsandbytes as bnb

    from lowmem_vt.trainer import Trainer

    cfg = recipe_factory(**{"model.quantization": "nf4", "model.dtype": "bfloat16", "train.max_steps": 1,
                            "train.prompts_per_step": 2, "grpo.num_generations": 4, "train.micro_batch_size": 4,
                            "grpo.max_completion_length": 4, "data.generated_samples": 8})
    tr = Trainer(cfg)
    layer = tr.lm.hf_model.model.language_model.layers[0]
    assert isinstance(layer.mlp.up_proj.base_layer, bnb.nn.Linear4bit)  # the LM is 4-bit under LoRA
    assert tr.lm.hf_model.model.visual.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16  # vision stays bf16
    assert all(p.dtype == torch.float32 for p in tr.params)  # LoRA weights train in fp32
    m = tr.step()
    assert m["grad_norm"] == m["grad_norm"] and not m["skipped_step"]


@needs_nf4
def test_qlora_trains_where_bitsandbytes_packs_nf4_for_cpu_inference(recipe_factory, monkeypatch):
    """Issue 11. On a CPU with AVX512-BF16, bitsandbytes 0.50 converts a Linear4bit's weight in place, for good,
    to a CPU-inference layout the first time it runs in eval mode without grad (our rollout does); the next
    training forward then fails. Forcing the module flag makes every CPU take that path, so this test fails on
    the old code whatever the CPU (the conversion itself is plain torch)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    from lowmem_vt.checkpoint import resolve_resume
    from lowmem_vt.trainer import Trainer

    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)  # read by Linear4bit.__init__
    over = {"model.quantization": "nf4", "model.dtype": "bfloat16", "train.max_steps": 3, "train.prompts_per_step": 2,
            "grpo.num_generations": 4, "train.micro_batch_size": 8, "grpo.max_completion_length": 4,
            "data.generated_samples": 8, "log.save_steps": 2}
    tr = Trainer(recipe_factory(**over))
    layers = [m for m in tr.lm.hf_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    m1 = tr.step()  # rollout (eval mode, no grad), reference pass, policy update
    assert math.isfinite(m1["grad_norm"]) and not m1["skipped_step"]
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)

    # a conversion made elsewhere (another tool, an older load) is undone before the layer trains
    q = layers[0]
    ref = q.weight.data.clone()
    q.weight.data, q.weight.quant_state = _convert_weight_packed_for_cpu(q.weight.data, q.weight.quant_state)
    assert q.weight.quant_state.packing_format_for_cpu
    m2 = tr.step()
    assert math.isfinite(m2["grad_norm"]) and not m2["skipped_step"]
    assert not q.weight.quant_state.packing_format_for_cpu and torch.equal(q.weight.data, ref)
    adapter = {n: p.detach().clone() for n, p in tr.lm.peft_model.named_parameters() if p.requires_grad}

    # a checkpoint saved while a weight is packed loads and trains on (bitsandbytes unpacks on save)
    q.weight.data, q.weight.quant_state = _convert_weight_packed_for_cpu(q.weight.data, q.weight.quant_state)
    path = tr.save()
    tr.close()  # releases the run folder's lock
    resumed = Trainer(recipe_factory(**over), resume=str(path))
    assert resumed.step_count == 2 and resolve_resume("latest", tr.out) == path
    for n, p in resumed.lm.peft_model.named_parameters():
        if n in adapter:
            torch.testing.assert_close(p.detach(), adapter[n], rtol=0, atol=0)
    m3 = resumed.step()
    assert math.isfinite(m3["grad_norm"]) and not m3["skipped_step"]
