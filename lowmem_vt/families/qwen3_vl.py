"""Qwen3-VL, dense (``Qwen3VLForConditionalGeneration``): a ViT with 16-px patches (32 px per token after the 2x2
merge) and learned position embeddings interpolated to each image's grid; DeepStack: the features of a few
vision blocks, merged like the last one's, are added to the hidden states of the image tokens after the first
decoder layers (as many layers as DeepStack blocks); a Qwen3 decoder (no q/k/v bias, per-head RMSNorm on q and
k); M-RoPE with the (temporal, height, width) frequencies interleaved instead of side by side.

What differs for us: image features have 1 + len(deepstack_visual_indexes) levels (``families.base``), the
engine applies q/k norms, and the rotary embedding's interleaving lives in the model's own ``rotary_emb``
(the positions we build are the same three axes as Qwen2-VL's).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from .base import QwenVLFamily, image_processor_config, vision_token_ids

# Qwen3-VL's tokenizer: <|vision_pad|> besides the image and video pads; the instruct models end text with
# <|im_end|> and pad with <|endoftext|>. (Its <think> / </think> are single tokens, as in the tiny tokenizer.)
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def _qwen3_vl_config(text: dict, vision: dict, tie: bool):
    from transformers import Qwen3VLConfig

    text = dict(text, vocab_size=151936, head_dim=128, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-6,
                max_position_embeddings=262144, attention_bias=False, bos_token_id=151643, eos_token_id=151645,
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                 "mrope_interleaved": True})
    vision = dict(vision, num_heads=16, in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh")
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                         vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=tie)


def qwen3_vl_8b_instruct_config():
    """The real Qwen/Qwen3-VL-8B-Instruct architecture, from its config.json (values as in copies of that file
    published with fine-tunes of it, e.g. Steinate/Cortex, transformers 4.57): 8.77 B parameters."""
    return _qwen3_vl_config(
        dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36),
        dict(depth=27, hidden_size=1152, intermediate_size=4304, out_hidden_size=4096, deepstack_visual_indexes=[8, 16, 24]),
        tie=False)


def qwen3_vl_4b_instruct_config():
    """The real Qwen/Qwen3-VL-4B-Instruct architecture, from its config.json (values as in a copy of that file
    published with a fine-tune of unsloth/Qwen3-VL-4B-Instruct, transformers 4.57; its vocabulary is the
    151,936 of every Qwen3-VL): 4.44 B parameters, head tied to the embeddings."""
    return _qwen3_vl_config(
        dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36),
        dict(depth=24, hidden_size=1024, intermediate_size=4096, out_hidden_size=2560, deepstack_visual_indexes=[5, 11, 17]),
        tie=True)


class Qwen3VL(QwenVLFamily):
    model_type = "qwen3_vl"
    label = "Qwen3-VL"
    class_name = "Qwen3VLForConditionalGeneration"
    tiny_special_tokens = SPECIAL_TOKENS
    tiny_eos_token = "<|im_end|>"

    def qkv_bias(self, text_config) -> bool:
        return bool(text_config.attention_bias)

    def feature_levels(self, config) -> int:
        return 1 + len(config.vision_config.deepstack_visual_indexes)

    def image_features(self, inner, pixel_values: torch.Tensor, grid: torch.Tensor) -> list[torch.Tensor]:
        out = inner.get_image_features(pixel_values, grid, return_dict=True)
        sizes = [len(e) for e in out.pooler_output]
        # transformers 5.17 returns each DeepStack level as one tensor over all images, later releases split it
        deep = [d if isinstance(d, (list, tuple)) else torch.split(d, sizes) for d in out.deepstack_features]
        return [torch.stack([e, *(d[i] for d in deep)]) for i, e in enumerate(out.pooler_output)]

    def encoder_outputs(self, features: list[torch.Tensor]):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        out = BaseModelOutputWithPooling(pooler_output=tuple(f[0] for f in features))
        out.deepstack_features = [tuple(f[k] for f in features) for k in range(1, features[0].shape[0])]
        return out

    def language_model_kwargs(self, image_mask: torch.Tensor, features: torch.Tensor) -> dict:
        # the language model's public DeepStack arguments: level k + 1 is added after decoder layer k
        return {"visual_pos_masks": image_mask, "deepstack_visual_embeds": list(features[1:])}

    def engine_layer(self, layer) -> SimpleNamespace:
        parts = super().engine_layer(layer)
        parts.q_norm, parts.k_norm = layer.self_attn.q_norm, layer.self_attn.k_norm
        return parts

    def vision_shape(self, vision_config) -> dict[str, int]:
        return {"embed": vision_config.hidden_size, "mlp": vision_config.intermediate_size}

    def prepare_for_fake_tensors(self, hf_model) -> None:
        # the language model adds DeepStack features by indexing with the image mask, whose output size is the
        # mask's count: fake tensors have no values. The same sum as a scatter into zeros (shapes fixed; it holds
        # two more [B, S, H] transients than the indexing, for the moment of the addition)
        def deepstack_add(hidden, visual_pos_masks, visual_embeds):
            mask = visual_pos_masks.to(hidden.device)[..., None]
            return hidden + torch.zeros_like(hidden).masked_scatter(mask, visual_embeds.to(hidden.device, hidden.dtype))

        self.text_model(hf_model)._deepstack_process = deepstack_add

    def published_configs(self) -> dict:
        return {"Qwen/Qwen3-VL-8B-Instruct": qwen3_vl_8b_instruct_config,
                "Qwen/Qwen3-VL-4B-Instruct": qwen3_vl_4b_instruct_config}

    def tiny_config(self, tokenizer, hidden_size: int = 64, layers: int = 2):
        from transformers import Qwen3VLConfig

        heads, kv_heads = 4, 2
        head_dim = hidden_size // heads
        # head_dim/2 rotary frequencies, interleaved T H W T H W ...: sections of (temporal, height, width)
        half = head_dim // 2
        mrope = [half - 2 * (half // 3), half // 3, half // 3]
        text = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                    num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                    max_position_embeddings=4096, rms_norm_eps=1e-6, attention_bias=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope,
                                     "mrope_interleaved": True},
                    bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        # a 4x4 grid of learned position embeddings, interpolated to each image; DeepStack from both vision
        # blocks into both decoder layers
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=hidden_size, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=16,
                      deepstack_visual_indexes=[0, 1])
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **vision_token_ids(tokenizer))

    def image_processor_config(self, min_pixels: int = 3136, max_pixels: int = 401408) -> dict:
        """Qwen3-VL's preprocessor_config.json: 16-px patches, 2x2 merge, mean and std 0.5."""
        return image_processor_config(16, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], min_pixels, max_pixels)
