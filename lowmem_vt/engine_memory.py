"""The rollout engine's memory arithmetic: what one rollout allocates, and the refusal before it is allocated.

One home below the engine (``rollout.engine``, which checks before it allocates), pre-flight (which checks a
recipe before the model loads) and the planner (whose rollout phase holds the engine's allocation): each
imports this module, none of them imports another for it.

The engine's cache layout (``CacheLayout``) lives here because the arithmetic is the layout's: per prompt,
``[prompt slots | completion slots]`` of the full-attention layers' K/V. A hybrid model's linear-attention
layers (Qwen3.5's Gated DeltaNet) hold no K/V: each decoding row holds a causal-conv state (the last
``kernel - 1`` inputs of the conv) and a recurrent state [value heads, key dim, value dim] in float32 per
such layer, a fixed size whatever the length.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError
from .families.base import decoder_linear_shapes

# The prompt part of the cache is rounded up to this many slots (aligned attention masks, few distinct shapes).
PROMPT_ALIGN = 64
# Completion steps per attention bucket: step j attends over the slots of the steps up to the end of its bucket.
# One graph per bucket; finished prompts leave the batch at bucket boundaries.
DECODE_BUCKET = 128
# The recurrent state of a linear-attention layer is kept in float32 whatever the model's dtype: it accumulates
# over the whole sequence (the published configs' mamba_ssm_dtype, and what the torch and fla kernels return).
RECURRENT_STATE_DTYPE = torch.float32


@dataclass(frozen=True)
class CacheLayout:
    """Where each K/V lives: per prompt, ``prompt_slots`` then ``samples * steps`` completion slots."""

    prompts: int
    samples: int  # G
    prompt_slots: int  # the longest prompt, rounded up to PROMPT_ALIGN; prompts are end-aligned here
    steps: int  # completion steps held: max_new_tokens rounded up to the bucket
    bucket: int

    @classmethod
    def of(cls, num_prompts: int, prompt_end: int, samples: int, max_new_tokens: int, bucket: int = DECODE_BUCKET):
        return cls(num_prompts, samples, math.ceil(prompt_end / PROMPT_ALIGN) * PROMPT_ALIGN,
                   math.ceil(max_new_tokens / bucket) * bucket, bucket)

    @property
    def slots(self) -> int:
        return self.prompt_slots + self.samples * self.steps

    def span(self, step: int) -> int:
        """Slots attention reads at completion step ``step``: up to the end of its bucket."""
        return self.prompt_slots + self.samples * (step // self.bucket + 1) * self.bucket


@dataclass
class EngineBytes:
    """What the engine allocates for one rollout, in bytes."""

    kv_cache: int  # the full-attention layers' K/V
    linear_state: int  # the linear-attention layers' conv and recurrent states, per decoding row (0 without them)
    state: int  # DecodeState's other tensors (ids, log-probs, indices)
    adapter: int  # the adapter's decode copies in the base dtype (concatenated A, block-diagonal B, bias)
    step_workspace: int  # estimate: the largest transients of one decode step (logits and sampling, mask)

    @property
    def allocated(self) -> int:
        """Held for the whole rollout (the tensors ``tests/test_rollout_engine.py`` measures)."""
        return self.kv_cache + self.linear_state + self.state + self.adapter

    @property
    def peak(self) -> int:
        return self.allocated + self.step_workspace


ATTENTION = ("q_proj", "k_proj", "v_proj")
# the decode step's fused groups: linears reading one input share two adapter matmuls and one base matmul
ATTENTION_GROUPS = (ATTENTION, ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
LINEAR_ATTENTION = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")
LINEAR_ATTENTION_GROUPS = (LINEAR_ATTENTION, ("out_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def is_linear_attention(layer_type: str) -> bool:
    return layer_type == "linear_attention"


def layer_types(text_config) -> list[str]:
    """Each decoder layer's kind, as the config names it ("full_attention" for a model that names none)."""
    types = getattr(text_config, "layer_types", None)
    return list(types) if types else ["full_attention"] * text_config.num_hidden_layers


def linear_attention_dims(text_config) -> dict[str, int]:
    """A Gated DeltaNet layer's sizes: key heads, value heads, key and value head dims, conv kernel, conv
    channels (q, k and v before the conv)."""
    c = text_config
    k_heads, v_heads = c.linear_num_key_heads, c.linear_num_value_heads
    dk, dv = c.linear_key_head_dim, c.linear_value_head_dim
    return {"k_heads": k_heads, "v_heads": v_heads, "k_dim": dk, "v_dim": dv, "kernel": c.linear_conv_kernel_dim,
            "conv_channels": 2 * k_heads * dk + v_heads * dv}


def linear_state_bytes_per_row(text_config, dtype_bytes: int) -> int:
    """One decoding row's state in one linear-attention layer: the conv's last ``kernel - 1`` inputs in the model
    dtype and the float32 recurrent state."""
    d = linear_attention_dims(text_config)
    recurrent = d["v_heads"] * d["k_dim"] * d["v_dim"] * torch.empty((), dtype=RECURRENT_STATE_DTYPE).element_size()
    return d["conv_channels"] * (d["kernel"] - 1) * dtype_bytes + recurrent


def engine_allocation_bytes(text_config, dtype: torch.dtype | str, num_prompts: int, prompt_length: int, num_generations: int,
                            max_new_tokens: int, lora_r: int = 0, lora_targets=(), decode_bucket: int = DECODE_BUCKET,
                            top_k: int = 0, top_p: float = 1.0, qkv_bias: bool = True,
                            shapes: dict[str, tuple[int, int]] | None = None) -> EngineBytes:
    """The engine's allocation for a rollout of ``num_prompts`` prompts of at most ``prompt_length`` tokens.

    ``text_config``: the model's text config (``config.text_config``); ``lora_targets``: the adapted linears'
    names (``q_proj`` ...); ``top_k`` / ``top_p``: the sampling truncation, whose buffers the step holds;
    ``qkv_bias``: q/k/v carry a bias (the family's ``qkv_bias``); ``shapes``: (in, out) of each decoder linear
    (the family's ``decoder_linear_shapes``: Qwen3.5's q_proj carries the output gate, twice as wide); None:
    a Qwen2-style decoder's. For the planner: call it with the worst-case prompt length.
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    b = torch.empty((), dtype=dtype).element_size()
    c = text_config
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    lay = CacheLayout.of(num_prompts, prompt_length, num_generations, max_new_tokens, decode_bucket)
    P, G, C, B, T = num_prompts, num_generations, lay.slots, num_prompts * num_generations, max_new_tokens
    kinds = layer_types(c)
    linear_layers = sum(map(is_linear_attention, kinds))
    attention_layers = len(kinds) - linear_layers
    kv = attention_layers * 2 * P * c.num_key_value_heads * C * d * b
    linear_state = linear_layers * B * linear_state_bytes_per_row(c, b) if linear_layers else 0
    state = 8 * (B + 1 + 1 + P + B + B + B + B + C) + B + G * C + B * T * (8 + 4)
    shapes = shapes or decoder_linear_shapes(c)
    adapter = 0
    for groups, layers in ((ATTENTION_GROUPS, attention_layers), (LINEAR_ATTENTION_GROUPS, linear_layers)):
        for group in groups:
            adapted = [n for n in group if n in lora_targets]
            if lora_r and adapted and layers:
                # B covers every output of the group (zero rows for linears without an adapter)
                R, outs = lora_r * len(adapted), sum(shapes[n][1] for n in group)
                bias = outs if group == ATTENTION and qkv_bias else 0  # q/k/v's bias is folded into the B matmul
                adapter += (R * shapes[adapted[0]][0] + outs * R + bias) * b * layers
    # logits in the model dtype, then float32 scaled logits, probabilities and the race; top-k's masked copy;
    # top-p's sorted values, their order (int64), probabilities and cumulative sum; the mask. Measured on fake
    # tensors (``plan --simulate`` runs the step): 14 / 18 / 31 / 34 bytes per row and token for none / top-k /
    # top-p / both, where this counts 14 / 18 / 31 / 35.
    per_logit = b + 3 * 4 + (4 if 0 < top_k < c.vocab_size else 0) + (17 if top_p < 1.0 else 0)
    mask = P * G * (c.num_attention_heads // c.num_key_value_heads) * C * b if attention_layers else 0
    workspace = B * c.vocab_size * per_logit + mask
    return EngineBytes(kv, linear_state, state, adapter, workspace)


class AllocationError(ConfigError):
    """An allocation that cannot fit the device, refused before it is attempted (a recipe's lengths and counts
    ask for more than the device has: the message names what to lower)."""


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device``: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":  # free, plus what the caching allocator holds unused
        return int(torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_engine_memory(text_config, dtype, prompts: int, prompt_length: int, num_generations: int, max_new_tokens: int,
                        device: torch.device, where: str, available: int | None = None,
                        shapes: dict[str, tuple[int, int]] | None = None) -> None:
    """AllocationError unless the engine rollout's allocation (its KV cache, linear-attention states, state and
    buffers) fits ``device``."""
    need = engine_allocation_bytes(text_config, dtype, prompts, prompt_length, num_generations, max_new_tokens,
                                   shapes=shapes).allocated
    have = available_memory(device) if available is None else available
    if have is not None and need > have:
        raise AllocationError(
            f"{where}: the engine rollout would allocate {need / 2**30:.1f} GiB ({prompts} prompts x {num_generations} "
            f"samples x {prompt_length} + {max_new_tokens} tokens of KV cache and buffers) but {device} has "
            f"{have / 2**30:.1f} GiB available; lower the completion length, the samples or the prompts per step"
        )
