"""The memory levers load_model applies on CUDA, checked on the tiny model on CPU: same numbers as without
them (the simulator, tests/test_simulate.py, checks what they save)."""

import pytest
import torch

from lowmem_vt.config import LoraConfig, ModelConfig
from lowmem_vt.data import examples_from_records, generate_sat_records
from lowmem_vt.inputs import InputBuilder, build_sequences
from lowmem_vt.model import image_embeddings, load_model, offload_checkpointed_inputs, offload_vision, sequence_hidden


def _load(tiny_dir, dtype="float32"):
    torch.manual_seed(0)
    lm = load_model(ModelConfig(name_or_path=str(tiny_dir), dtype=dtype), LoraConfig(r=4, alpha=8), torch.device("cpu"),
                    min_pixels=3136, max_pixels=112 * 112)
    with torch.no_grad():
        for name, p in lm.peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return lm


def _batch(lm):
    ex, _ = examples_from_records(generate_sat_records(2, size=112, seed=0), max_samples=2, shuffle_options=False,
                                  max_pixels=112 * 112, seed=0)
    ib = InputBuilder(lm.tokenizer, lm.image_processor, lm.config, max_prompt_length=1024, min_pixels=3136, max_pixels=112 * 112)
    prompts = [ib.encode(e.image, e.question) for e in ex]
    comp = torch.randint(10, 90, (2, 16), generator=torch.Generator().manual_seed(0))
    return prompts, build_sequences(prompts, [0, 1], comp, torch.ones(2, 16), lm.pad_token_id)


def _grads(lm, prompts, seqs):
    lm.peft_model.zero_grad(set_to_none=True)
    embeds = image_embeddings(lm, [p.pixel_values for p in prompts], [p.image_grid_thw for p in prompts])
    hidden = sequence_hidden(lm, seqs, embeds)
    (hidden.float() ** 2).mean().backward()
    return {n: p.grad.clone() for n, p in lm.peft_model.named_parameters() if p.requires_grad}, hidden.detach()


def test_offloaded_checkpoint_inputs_give_the_same_gradients(tiny_dir):
    lm = _load(tiny_dir)
    prompts, seqs = _batch(lm)
    before, hidden_before = _grads(lm, prompts, seqs)
    copies = []

    def host_copy(t):
        copies.append(t.shape)
        return t.detach().clone(), None

    offload_checkpointed_inputs(lm.hf_model, host_copy=host_copy)
    after, hidden_after = _grads(lm, prompts, seqs)
    assert len(copies) == lm.config.text_config.num_hidden_layers  # one host copy per layer input, none in backward
    torch.testing.assert_close(hidden_after, hidden_before)
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], msg=name)
    with torch.no_grad():  # no gradients, no checkpoint, no copies
        sequence_hidden(lm, seqs, image_embeddings(lm, [p.pixel_values for p in prompts], [p.image_grid_thw for p in prompts]))
    assert len(copies) == lm.config.text_config.num_hidden_layers


def _relative_error(grads, truth):
    diff = torch.cat([(grads[n] - truth[n]).flatten() for n in truth])
    return float(diff.norm() / torch.cat([t.flatten() for t in truth.values()]).norm())


def test_adapter_computes_in_the_base_dtype_with_fp32_weights_and_gradients(tiny_dir):
    lm = _load(tiny_dir, dtype="bfloat16")
    prompts, seqs = _batch(lm)
    layer = lm.hf_model.model.language_model.layers[0].mlp.up_proj
    seen = []
    handle = layer.lora_A["default"].register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    grads, hidden = _grads(lm, prompts, seqs)
    handle.remove()
    assert seen and all(d == (torch.bfloat16, torch.bfloat16) for d in seen)  # peft alone: fp32 input copies
    assert all(p.dtype == torch.float32 for n, p in lm.peft_model.named_parameters() if p.requires_grad)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    assert hidden.dtype == torch.bfloat16
    # against the fp32 model's gradients (same weights): the bf16 base model alone is far from them (~13 %
    # here, peft's fp32 adapter compute); computing the adapter in bf16 too stays of the same order (~21 %)
    truth, _ = _grads(_load(tiny_dir), prompts, seqs)
    from peft.tuners.lora import LoraLayer

    for module in lm.peft_model.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = True
            for linear in (*module.lora_A.values(), *module.lora_B.values()):
                linear.__class__ = torch.nn.Linear
    peft_fp32_adapter, _ = _grads(lm, prompts, seqs)
    ours, theirs = _relative_error(grads, truth), _relative_error(peft_fp32_adapter, truth)
    assert ours <= 2 * theirs + 0.05, (ours, theirs)


def test_vision_tower_off_the_device_gives_the_same_embeddings(tiny_dir):
    lm = _load(tiny_dir)
    prompts, _ = _batch(lm)
    pv, grids = [p.pixel_values for p in prompts], [p.image_grid_thw for p in prompts]
    before = image_embeddings(lm, pv, grids)
    offload_vision(lm, host_copy=lambda t: t.detach().clone())
    params = list(lm.hf_model.model.visual.parameters())
    hosts = [h for _, h in lm.vision_host]
    assert all(p.data_ptr() == h.data_ptr() for p, h in zip(params, hosts))
    seen = []
    handle = lm.hf_model.model.visual.register_forward_pre_hook(
        lambda m, a: seen.append(all(p.data_ptr() != h.data_ptr() for p, h in zip(params, hosts))))
    after = image_embeddings(lm, pv, grids)
    handle.remove()
    assert seen == [True]  # the call ran on device copies of the weights
    assert all(p.data_ptr() == h.data_ptr() for p, h in zip(params, hosts))  # and dropped them after
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory and side-stream copies need CUDA")
def test_levers_on_cuda_give_the_same_gradients(tiny_dir):
    cpu = _load(tiny_dir)
    prompts, seqs = _batch(cpu)
    expected, _ = _grads(cpu, prompts, seqs)
    torch.manual_seed(0)
    gpu = load_model(ModelConfig(name_or_path=str(tiny_dir), dtype="float32"), LoraConfig(r=4, alpha=8), torch.device("cuda"),
                     min_pixels=3136, max_pixels=112 * 112)
    assert gpu.vision_host is not None and gpu.vision_host[0][1].is_pinned()
    with torch.no_grad():
        for (name, p), q in zip(gpu.peft_model.named_parameters(), cpu.peft_model.parameters()):
            p.copy_(q)
    got, _ = _grads(gpu, prompts, seqs.to("cuda"))
    for name in expected:
        torch.testing.assert_close(got[name].cpu(), expected[name], rtol=1e-2, atol=1e-4, msg=name)  # cuDNN may run the conv in TF32
