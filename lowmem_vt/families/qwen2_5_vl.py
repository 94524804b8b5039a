"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): a ViT with window attention (full attention on a few
blocks), RMSNorm and a SwiGLU MLP, 14-px patches and 2x2 merge; the same Qwen2 decoder (q/k/v bias) and 3-axis
M-RoPE as Qwen2-VL. What reaches the language model is the same as for Qwen2-VL: one feature per merged
patch, in the image's row order (the tower undoes its window permutation itself)."""

from __future__ import annotations

from .base import (CLIP_MEAN, CLIP_STD, QWEN2_VL_SPECIAL_TOKENS, QwenVLFamily, image_processor_config, tiny_text_config,
                   vision_token_ids)


def qwen2_5_vl_7b_instruct_config():
    """The real Qwen/Qwen2.5-VL-7B-Instruct architecture, from its config.json (checked against the copy in the
    official Qwen/Qwen2.5-VL-7B-Instruct-AWQ repository and unsloth/Qwen2.5-VL-7B-Instruct; the vision values
    the file omits are transformers' Qwen2_5_VLVisionConfig defaults, which are the 7B's): 8.29 B parameters."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
            num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6, max_window_layers=28,
            sliding_window=32768, use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            bos_token_id=151643, eos_token_id=151645,
        ),
        vision_config=dict(
            depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, out_hidden_size=3584,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
            tokens_per_second=2, hidden_act="silu",
        ),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=False,
    )


class Qwen25VL(QwenVLFamily):
    model_type = "qwen2_5_vl"
    label = "Qwen2.5-VL"
    class_name = "Qwen2_5_VLForConditionalGeneration"
    tiny_special_tokens = QWEN2_VL_SPECIAL_TOKENS  # the same names in Qwen2.5-VL's tokenizer
    # the published models are instruct models: their text ends with <|im_end|>, padding is <|endoftext|>
    tiny_eos_token = "<|im_end|>"

    def vision_shape(self, vision_config) -> dict[str, int]:
        # SwiGLU: gate and up outputs, the activation and the product per patch, ~2x a GELU MLP's two
        return {"embed": vision_config.hidden_size, "mlp": 2 * vision_config.intermediate_size}

    def published_configs(self) -> dict:
        return {"Qwen/Qwen2.5-VL-7B-Instruct": qwen2_5_vl_7b_instruct_config}

    def tiny_config(self, tokenizer, hidden_size: int = 64, layers: int = 2):
        from transformers import Qwen2_5_VLConfig

        # window_size 56 px = 2x2 merged tokens: a 112-px image (4x4 merged tokens) is 4 windows, a 56-px one 1;
        # block 1 attends over the whole image, block 0 within windows
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=hidden_size, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=56, fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(text_config=tiny_text_config(tokenizer, hidden_size, layers), vision_config=vision,
                                tie_word_embeddings=False, **vision_token_ids(tokenizer))

    def image_processor_config(self, min_pixels: int = 3136, max_pixels: int = 401408) -> dict:
        """Qwen2.5-VL's preprocessor_config.json is Qwen2-VL's (CLIP normalisation, 14-px patches, 2x2 merge)."""
        return image_processor_config(14, CLIP_MEAN, CLIP_STD, min_pixels, max_pixels)
