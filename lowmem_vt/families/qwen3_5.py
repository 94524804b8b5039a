"""Qwen3.5, dense (``Qwen3_5ForConditionalGeneration``): a hybrid decoder whose layers are of two kinds, listed in
``text_config.layer_types`` (three of every four ``linear_attention``, the fourth ``full_attention`` in the
published models):

- linear attention (``layer.linear_attn``, Gated DeltaNet): ``in_proj_qkv`` -> a causal depthwise conv (kernel
  ``linear_conv_kernel_dim``, SiLU) -> q, k (L2-normed per head), v; ``in_proj_a`` / ``in_proj_b`` give each value
  head's decay and write strength; a recurrent state [value heads, key dim, value dim] per sequence carries the
  past; a gated RMSNorm (gate ``in_proj_z``) and ``out_proj`` close it. Its decode state is the conv's last
  kernel-1 inputs plus that recurrent state, not a KV cache;
- full attention (``layer.self_attn``): Qwen3's per-head q/k RMSNorm, with an output gate (``q_proj`` is twice
  as wide: query and gate per head), head_dim 256, partial rotary (a quarter of head_dim), interleaved M-RoPE.

Every decoder RMSNorm is zero-centred: it scales by ``1 + weight`` (weights start at 0). The vision tower is
Qwen3-VL's (16-px patches, 2x2 merge, learned position embeddings) without DeepStack: one feature level. The
head is untied, over a 248,320-token vocabulary.

What differs for us: the LoRA targets (``linear_attn.in_proj_qkv/z/a/b``, ``out_proj`` besides the attention and
MLP linears), the linear shapes, the layer kinds the engine runs. Padding: the trainer's rows are right-padded,
so no pad token precedes a real one and none can reach a real token's conv window or recurrent state (the
model's own forward also zeroes padded positions before each linear-attention layer, but only when it is
given the 2-D mask; ``inputs.completion_hidden`` gives it).

``qwen3_5_moe`` (the mixture-of-experts models) is not handled: ``families.REFUSED`` says so in pre-flight.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from types import SimpleNamespace

import torch

from .base import QwenVLFamily, decoder_linear_shapes, image_processor_config, vision_token_ids
from .qwen3_vl import SPECIAL_TOKENS as QWEN3_VL_SPECIAL_TOKENS

# Qwen3.5's tokenizer names its vision tokens as Qwen3-VL's does; the models end text with <|im_end|> and pad with
# <|endoftext|>
SPECIAL_TOKENS = QWEN3_VL_SPECIAL_TOKENS

LINEAR_ATTENTION, FULL_ATTENTION = "linear_attention", "full_attention"


def linear_attention_shapes(text_config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of a Gated DeltaNet layer's linears."""
    c = text_config
    keys, values = c.linear_num_key_heads * c.linear_key_head_dim, c.linear_num_value_heads * c.linear_value_head_dim
    H = c.hidden_size
    return {"in_proj_qkv": (H, 2 * keys + values), "in_proj_z": (H, values), "in_proj_a": (H, c.linear_num_value_heads),
            "in_proj_b": (H, c.linear_num_value_heads), "out_proj": (values, H)}


def _qwen3_5_config(text: dict, vision: dict, tie: bool):
    """A published Qwen3.5 architecture: what every size shares (the 248,320-token vocabulary, 16 query / 4 kv heads
    of 256 with a quarter rotating, 16 key / 32 value heads of 128 in the linear-attention layers with a kernel-4
    conv, three linear-attention layers to one full-attention layer, 32 layers, interleaved M-RoPE [11, 11, 10] at
    theta 1e7) and the vision tower's patch 16, 2x2 merge, no DeepStack; ``text`` and ``vision``: the sizes."""
    from transformers import Qwen3_5Config

    text = dict(text, vocab_size=248320, num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=4, head_dim=256,
                linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
                linear_conv_kernel_dim=4, layer_types=[LINEAR_ATTENTION, LINEAR_ATTENTION, LINEAR_ATTENTION, FULL_ATTENTION] * 8,
                rms_norm_eps=1e-6, max_position_embeddings=262144, attention_bias=False, hidden_act="silu",
                eos_token_id=248044, tie_word_embeddings=tie,
                rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                 "mrope_section": [11, 11, 10], "mrope_interleaved": True})
    vision = dict(vision, num_heads=16, in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh")
    return Qwen3_5Config(text_config=text, vision_config=vision, image_token_id=248056, video_token_id=248057,
                         vision_start_token_id=248053, vision_end_token_id=248054, tie_word_embeddings=tie)


def qwen3_5_9b_config():
    """The real Qwen/Qwen3.5-9B(-Base) architecture, from its config.json (the values as copied into a public test
    fixture of that file, "the real Qwen3.5-9B config"; hidden 4096, intermediate 12288, untied head; vision depth
    27, width 1152, MLP 4304, out 4096): 9,409,813,744 parameters, the count published for Qwen3.5-9B-Base."""
    return _qwen3_5_config(dict(hidden_size=4096, intermediate_size=12288),
                           dict(depth=27, hidden_size=1152, intermediate_size=4304, out_hidden_size=4096), tie=False)


def qwen3_5_4b_config():
    """The real Qwen/Qwen3.5-4B(-Base) architecture, from its config.json (values as in a copy of that file in a
    public fine-tune's parser tests, and a second project's pinned 4B text signature: hidden 2560, intermediate
    9216, head tied to the embeddings; vision depth 24, width 1024, MLP 4096, out 2560): 4.54 B parameters."""
    return _qwen3_5_config(dict(hidden_size=2560, intermediate_size=9216),
                           dict(depth=24, hidden_size=1024, intermediate_size=4096, out_hidden_size=2560), tie=True)


@functools.cache
def _delta_rule_takes_grouped_heads(modeling) -> bool:
    """Whether ``modeling``'s chunked delta rule serves several value heads from one q/k head itself (transformers
    5.18+ repeats q/k inside it, while they are cast to float32) or expects q/k already repeated, as 5.17's does:
    its layer then repeats them before the call and holds both repeated copies, in the model's dtype, while the
    rule runs. A probe on the CPU (2 key heads, 4 value heads, 2 tokens): 5.17's rule fails to broadcast the key
    heads against the value heads' write strengths. Any failure reads as "expects them repeated", the side on which
    the planner counts more."""
    q, k = torch.rand(1, 2, 2, 4), torch.rand(1, 2, 2, 4)
    v, g, beta = torch.rand(1, 2, 4, 4), -torch.rand(1, 2, 4), torch.rand(1, 2, 4)
    try:
        with _no_fallback_warning():
            out, _ = modeling.torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
    except Exception:  # noqa: BLE001 (any failure: the rule cannot take grouped heads)
        return False
    return tuple(out.shape) == (1, 2, 4, 4)


@contextlib.contextmanager
def _no_fallback_warning():
    """Without transformers' one-time "`chunk_gated_delta_rule` is falling back to its reference PyTorch
    implementation" while the probe runs on CPU tensors: said during ``lowmem-vt plan``, it is wrong on a GPU with
    flash-linear-attention. Silenced on the logger's instance, not through the class's once-only cache, so that the
    run's own fallback (a GPU without flash-linear-attention, or the CPU) still warns."""
    logger = logging.getLogger("transformers.integrations.hub_kernels")
    own = logger.__dict__.get("warning_once")
    logger.warning_once = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if own is None:
            del logger.warning_once
        else:
            logger.warning_once = own


class Qwen35(QwenVLFamily):
    model_type = "qwen3_5"
    label = "Qwen3.5"
    class_name = "Qwen3_5ForConditionalGeneration"
    linear_names = (*QwenVLFamily.linear_names, "in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj")
    # the decay (a) and write-strength (b) projections give one value per value head (32 in the published models)
    rank_exempt = ("in_proj_a", "in_proj_b")
    tiny_special_tokens = SPECIAL_TOKENS
    tiny_eos_token = "<|im_end|>"
    norm_offset = 1.0

    def lora_target_regex(self, target_modules: list[str]) -> str:
        names = "|".join(target_modules)
        return rf".*language_model\.layers\.\d+\.(self_attn|linear_attn|mlp)\.({names})"

    def decoder_linear_shapes(self, text_config) -> dict[str, tuple[int, int]]:
        shapes = decoder_linear_shapes(text_config)
        H, d = text_config.hidden_size, text_config.head_dim
        shapes["q_proj"] = (H, 2 * text_config.num_attention_heads * d)  # query and output gate of each head
        return {**shapes, **linear_attention_shapes(text_config)}

    def qkv_bias(self, text_config) -> bool:
        return bool(text_config.attention_bias)

    def layer_types(self, text_config) -> list[str]:
        return list(text_config.layer_types)

    def mixer_holds_repeated_qk(self) -> bool:
        # the class's module, imported by model_class(); from sys.modules, not an import by computed name, which the
        # self-check's fingerprint walk could not follow (it would then fingerprint the whole package)
        return not _delta_rule_takes_grouped_heads(sys.modules[self.model_class().__module__])

    def engine_layer(self, layer) -> SimpleNamespace:
        """Full attention: the base parts with the q/k norms and ``output_gate`` (each head's q_proj output is its
        query then its gate, head_dim each; the attention output is multiplied by the gate's sigmoid). Linear attention: its norms and MLP, and the Gated DeltaNet's
        projections, conv, decay parameters (``A_log``, ``dt_bias``), gated norm and sizes."""
        if not hasattr(layer, "linear_attn"):
            parts = super().engine_layer(layer)
            parts.q_norm, parts.k_norm = layer.self_attn.q_norm, layer.self_attn.k_norm
            parts.output_gate = True
            return parts
        a, m = layer.linear_attn, layer.mlp
        return SimpleNamespace(kind=LINEAR_ATTENTION, norm1=layer.input_layernorm, norm2=layer.post_attention_layernorm,
                               norm_offset=self.norm_offset, in_qkv=a.in_proj_qkv, in_z=a.in_proj_z, in_a=a.in_proj_a,
                               in_b=a.in_proj_b, out=a.out_proj, conv=a.conv1d, A_log=a.A_log, dt_bias=a.dt_bias,
                               gated_norm=a.norm, key_heads=a.num_k_heads, value_heads=a.num_v_heads, key_dim=a.head_k_dim,
                               value_dim=a.head_v_dim, conv_kernel=a.conv_kernel_size, gate=m.gate_proj, up=m.up_proj,
                               down=m.down_proj, act=m.act_fn)

    def vision_shape(self, vision_config) -> dict[str, int]:
        return {"embed": vision_config.hidden_size, "mlp": vision_config.intermediate_size}

    def published_configs(self) -> dict:
        return {"Qwen/Qwen3.5-9B-Base": qwen3_5_9b_config, "Qwen/Qwen3.5-9B": qwen3_5_9b_config,
                "Qwen/Qwen3.5-4B-Base": qwen3_5_4b_config, "Qwen/Qwen3.5-4B": qwen3_5_4b_config}

    def tiny_config(self, tokenizer, hidden_size: int = 64, layers: int = 2):
        """Linear attention then full attention, alternating (the published 3:1 needs 4 layers per full one; 1:1
        keeps both kinds in a 2-layer model). head_dim 48 with partial rotary 0.25: 6 rotary frequencies,
        interleaved T H W over sections [2, 2, 2]. Two key heads serving four value heads, as the published models'
        16 serve 32."""
        from transformers import Qwen3_5Config

        heads, kv_heads, head_dim = 4, 2, 48
        text = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                    num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                    max_position_embeddings=4096, rms_norm_eps=1e-6, attention_bias=False,
                    layer_types=[FULL_ATTENTION if i % 2 else LINEAR_ATTENTION for i in range(layers)],
                    linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                    linear_num_value_heads=4,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                     "mrope_section": [2, 2, 2], "mrope_interleaved": True},
                    bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=hidden_size, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=16)
        return Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=False, **vision_token_ids(tokenizer))

    def tiny_init(self, model) -> None:
        """The zero-centred norms away from 0 (std 0.1): a path that scales by ``weight`` instead of ``1 + weight``,
        or a merge that resets them, moves every output. The pad token's embedding as random as the others (the
        published models' <|endoftext|> is a trained, non-zero row; ``nn.Embedding(padding_idx=...)`` zeroes it, and
        an all-zero pad input would pass through a linear-attention layer without a trace, hiding a padding fault)."""
        text = self.text_model(model)
        pad = model.config.text_config.pad_token_id
        with torch.no_grad():
            if pad is not None:
                text.embed_tokens.weight[pad].normal_(0.0, model.config.text_config.initializer_range)
            for name, p in text.named_parameters():
                if name.endswith("layernorm.weight") or name.endswith("_norm.weight") or name == "norm.weight":
                    p.normal_(0.0, 0.1)

    def image_processor_config(self, min_pixels: int = 3136, max_pixels: int = 401408) -> dict:
        """Qwen3.5's preprocessor_config.json is Qwen3-VL's: 16-px patches, 2x2 merge, mean and std 0.5."""
        return image_processor_config(16, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], min_pixels, max_pixels)
