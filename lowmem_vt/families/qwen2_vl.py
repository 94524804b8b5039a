"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): ViT with 14-px patches and 2x2 merge, Qwen2 decoder (q/k/v
bias), 3-axis M-RoPE with the sections side by side. The paper's model (Qwen/Qwen2-VL-2B)."""

from __future__ import annotations

from .base import (CLIP_MEAN, CLIP_STD, QWEN2_VL_SPECIAL_TOKENS, QwenVLFamily, image_processor_config, tiny_text_config,
                   vision_token_ids)

# Qwen2-VL's special tokens (names as in the real tokenizer). The base model ends text with <|endoftext|>.
SPECIAL_TOKENS = QWEN2_VL_SPECIAL_TOKENS


def qwen2_vl_2b_config():
    """The real Qwen/Qwen2-VL-2B architecture (values from its config.json): 2.21 B parameters."""
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
            num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            bos_token_id=151643, eos_token_id=151643, pad_token_id=151643,
        ),
        vision_config=dict(
            depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, in_channels=3,
        ),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=True,
    )


class Qwen2VL(QwenVLFamily):
    model_type = "qwen2_vl"
    label = "Qwen2-VL"
    class_name = "Qwen2VLForConditionalGeneration"
    tiny_special_tokens = SPECIAL_TOKENS
    vllm_rollout = True

    def vision_shape(self, vision_config) -> dict[str, int]:
        return {"embed": vision_config.embed_dim, "mlp": int(vision_config.embed_dim * vision_config.mlp_ratio)}

    def published_configs(self) -> dict:
        return {"Qwen/Qwen2-VL-2B": qwen2_vl_2b_config}

    def tiny_config(self, tokenizer, hidden_size: int = 64, layers: int = 2):
        from transformers import Qwen2VLConfig

        vision = dict(depth=2, embed_dim=32, hidden_size=hidden_size, num_heads=4, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        # untied: see tiny.build_tiny_model
        return Qwen2VLConfig(text_config=tiny_text_config(tokenizer, hidden_size, layers), vision_config=vision,
                             tie_word_embeddings=False, **vision_token_ids(tokenizer))

    def image_processor_config(self, min_pixels: int = 3136, max_pixels: int = 401408) -> dict:
        """Qwen2-VL's preprocessor_config.json (CLIP normalisation, 14-px patches, 2x2 merge)."""
        return image_processor_config(14, CLIP_MEAN, CLIP_STD, min_pixels, max_pixels)
