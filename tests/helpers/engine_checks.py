"""Checks of the rollout engine that every family's engine tests run: its rope-into-cache reference against the
model's own rotary embedding, and the storages a rollout allocates (what ``engine_memory`` predicts)."""

from __future__ import annotations

import torch

from lowmem_vt.rollout import SamplingParams
from lowmem_vt.rollout.engine import EngineRollout
from lowmem_vt.rollout.fused import rope_into_cache_reference


def check_rope_into_cache(text, apply_rotary_pos_emb, P: int, W: int, d: int, sample: list[int], start: int, slots: int,
                          stride: int) -> torch.Tensor:
    """P prompts x W decoding rows of random q / k / v (head dim ``d``) at positions 0, stride, 2 stride...; row r
    decodes sample ``sample[r]`` of its prompt, whose cache slots start at ``start``. Asserts every rotated query in
    the engine's grouped layout, and every K (rotated) and V written to its sample's slot, equal to HF's exactly.
    Returns the model's cos [3 or 1, rows, 1, rotary dims]."""
    kvh, heads = text.config.num_key_value_heads, text.config.num_attention_heads
    q, k, v = torch.randn(P * W, heads * d), torch.randn(P * W, kvh * d), torch.randn(P * W, kvh * d)
    positions = torch.arange(P * W).view(1, -1, 1).expand(3, -1, 1) * stride
    cos, sin = text.rotary_emb(q[:, None], positions)
    kv = torch.zeros(2, P, kvh, slots, d)
    sample = torch.tensor(sample)
    out = rope_into_cache_reference(q, k, v, cos[:, 0], sin[:, 0], kv[0], kv[1], torch.tensor([start]), sample, W)
    q_hf, k_hf = apply_rotary_pos_emb(q.view(P * W, 1, heads, d).transpose(1, 2), k.view(P * W, 1, kvh, d).transpose(1, 2),
                                      cos, sin)
    group = heads // kvh
    for p in range(P):
        for i in range(W):
            r = p * W + i
            for h in range(heads):
                assert torch.equal(out[p, h // group, i * group + h % group], q_hf[r, h, 0])
            assert torch.equal(kv[0, p, :, start + sample[r]], k_hf[r, :, 0])
            assert torch.equal(kv[1, p, :, start + sample[r]], v.view(P * W, kvh, d)[r])
    return cos


def rollout_storages(lm, prompts: list, num_generations: int, max_new_tokens: int):
    """The engine's decode state for ``prompts`` and its adapter's decode copies, as a rollout allocates them: (the
    state, {storage address: bytes} over both, each storage once)."""
    engine = EngineRollout(lm)
    params = SamplingParams(num_generations=num_generations, max_new_tokens=max_new_tokens)
    state = engine.new_state([p.length for p in prompts], [p.next_position for p in prompts], params)
    held = state.tensors() + engine.decode_weights().tensors()
    return state, {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
