"""What one model family is to the rest of the project: the seam every family-specific detail goes behind.

A family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) is chosen from ``config.model_type``. The input builder, the model
loader, the rollout backends, the planner, the simulator, preflight, merge and the tiny offline models ask
it, and name no model themselves. ``QwenVLFamily`` holds what the Qwen vision-language families share (the
image placeholder, M-RoPE positions of image blocks, the module names (inner model, language model, head),
LoRA targets, the layer kinds); a family module overrides what differs.

Image features travel as one tensor per prompt, ``[levels, tokens, H]`` in the model's dtype: level 0 takes
the place of the image tokens' embeddings; levels 1.. (DeepStack, Qwen3-VL) are added to the hidden states
after the first decoder layers, level k after layer k-1. A family without DeepStack has one level. The
tensor is computed once per step (the vision tower is frozen) and read by every pass that needs it.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..data import IMAGE_PLACEHOLDER


def mrope_positions(mm_token_type_ids: torch.Tensor, image_grid_thw: torch.Tensor, merge: int) -> tuple[torch.Tensor, int]:
    """M-RoPE positions [3, L] of one unpadded prompt and the next free position.

    Text tokens advance all three axes together; an image block of (t, h/merge, w/merge) tokens takes
    (t, row, col) offsets from the current position, after which the position advances by max(h, w)/merge.
    ``image_grid_thw`` [images, 3]: one row per image block, in order.
    """
    types = mm_token_type_ids.tolist()
    chunks = []
    pos = 0
    grids = iter(image_grid_thw.tolist())
    i = 0
    while i < len(types):
        j = i
        while j < len(types) and types[j] == types[i]:
            j += 1
        n = j - i
        if types[i] == 0:
            chunks.append(torch.arange(pos, pos + n).view(1, -1).expand(3, -1))
            pos += n
        else:
            t, h, w = next(grids)
            gh, gw = h // merge, w // merge
            if t * gh * gw != n:
                raise ValueError(f"image block of {n} tokens does not match grid {t}x{gh}x{gw}")
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
            chunks.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
            pos += max(gh, gw)
        i = j
    return torch.cat(chunks, dim=1).long(), pos


def decoder_linear_shapes(text_config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each decoder-layer linear LoRA can adapt, from a Qwen2/Qwen3-style text
    config (or anything with its size fields)."""
    c = text_config
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    H, I, attn, kv = c.hidden_size, c.intermediate_size, c.num_attention_heads * d, c.num_key_value_heads * d
    return {"q_proj": (H, attn), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (attn, H),
            "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}


class QwenVLFamily:
    """A Qwen vision-language family: a vision tower (``model.visual``) whose merged patch features replace the
    ``<|image_pad|>`` tokens of a Qwen2/Qwen3-style decoder (``model.language_model``) with 3-axis M-RoPE."""

    model_type: str = ""
    label: str = ""  # as users write it: "Qwen2-VL"
    class_name: str = ""  # the transformers class of the whole model
    image_placeholder: str = IMAGE_PLACEHOLDER  # one image in a prompt's text, before expansion
    # decoder-layer linears LoRA may adapt, and which of them carry a bias
    linear_names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # linears with one output per head (a handful): lora.r may exceed their side (their update's rank is capped at
    # it, for a few parameters), so the rank check skips them
    rank_exempt: tuple[str, ...] = ()
    # modules bitsandbytes must leave in 16 bit under QLoRA (the vision tower and the head)
    keep_unquantized = ("model.visual", "visual", "lm_head")
    # the offline tiny model: its tokenizer's special tokens, end and padding tokens
    tiny_special_tokens: tuple[str, ...] = ()
    tiny_eos_token: str = "<|endoftext|>"
    tiny_pad_token: str = "<|endoftext|>"
    # rollout.backend: vllm is wired for this family (its weight names and image-embedding inputs)
    vllm_rollout: bool = False

    # ------------------------------------------------------------------------------------- the model

    def model_class(self):
        import transformers

        return getattr(transformers, self.class_name)

    def inner_model(self, hf_model) -> torch.nn.Module:
        """The ...ForConditionalGeneration model's inner model: input embeddings, vision tower, language model."""
        return hf_model.model

    def lm_head(self, hf_model) -> torch.nn.Linear:
        """The output head (its weight [V, H]: what the loss heads read)."""
        return hf_model.lm_head

    def vision_tower(self, hf_model) -> torch.nn.Module:
        return self.inner_model(hf_model).visual

    def language_model(self, inner) -> torch.nn.Module:
        """The decoder (embed_tokens, layers, norm, rotary_emb) of an inner model (``inner_model``)."""
        return inner.language_model

    def text_model(self, hf_model) -> torch.nn.Module:
        """The decoder (embed_tokens, layers, norm, rotary_emb) of the ...ForConditionalGeneration model."""
        return self.language_model(self.inner_model(hf_model))

    def lora_target_regex(self, target_modules: list[str]) -> str:
        """LoRA on the language model's linears only (the vision tower stays frozen and adapter-free)."""
        names = "|".join(target_modules)
        return rf".*language_model\.layers\.\d+\.(self_attn|mlp)\.({names})"

    def decoder_linear_shapes(self, text_config) -> dict[str, tuple[int, int]]:
        return decoder_linear_shapes(text_config)

    def qkv_bias(self, text_config) -> bool:
        """Whether q/k/v carry a bias (Qwen2 decoders do)."""
        return True

    def layer_types(self, text_config) -> list[str]:
        """Each decoder layer's kind, ``"full_attention"`` (a KV cache) or ``"linear_attention"`` (a conv and a
        recurrent state: Qwen3.5); every layer is full attention unless the family says otherwise."""
        return ["full_attention"] * text_config.num_hidden_layers

    def mixer_holds_repeated_qk(self) -> bool:
        """Whether this transformers' linear-attention layers hold q and k repeated to the value heads while their
        delta rule runs (Qwen3.5 on transformers 5.17); no linear-attention layers here."""
        return False

    # ------------------------------------------------------------------------------------- inputs

    def image_token_id(self, config) -> int:
        return config.image_token_id

    def merge_size(self, config) -> int:
        return config.vision_config.spatial_merge_size

    def patch_size(self, config) -> int:
        return config.vision_config.patch_size

    def image_tokens(self, config, height: int, width: int, min_pixels: int, max_pixels: int) -> int:
        """Image tokens of one ``height`` x ``width`` image after the family's image processor resizes it into the
        pixel budget (sides multiples of patch x merge, area within [min_pixels, max_pixels])."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        side = self.patch_size(config) * self.merge_size(config)
        h, w = smart_resize(height, width, side, min_pixels, max_pixels)
        return (h // side) * (w // side)

    def positions(self, mm_token_type_ids: torch.Tensor, image_grid_thw: torch.Tensor, config) -> tuple[torch.Tensor, int]:
        """M-RoPE positions [3, L] of one unpadded prompt and the position of its first completion token."""
        return mrope_positions(mm_token_type_ids, image_grid_thw, self.merge_size(config))

    def image_processor(self, name_or_path: str, min_pixels: int, max_pixels: int):
        # the PIL image processor needs no torchvision (the fast one does); same outputs
        from transformers import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil.from_pretrained(name_or_path, size={"shortest_edge": min_pixels, "longest_edge": max_pixels})

    # ---------------------------------------------------------------------------- image features

    def feature_levels(self, config) -> int:
        """Image-feature levels per token: 1, plus one per DeepStack layer."""
        return 1

    def image_features(self, inner, pixel_values: torch.Tensor, grid: torch.Tensor) -> list[torch.Tensor]:
        """Features [levels, tokens_i, H] of each image, from one vision-tower call. ``inner``: the model's
        ``.model`` (vision tower + language model)."""
        out = inner.get_image_features(pixel_values, grid, return_dict=True)
        return [e[None] for e in out.pooler_output]

    def encoder_outputs(self, features: list[torch.Tensor]):
        """What ``generate(mm_encoder_outputs={"image": ...})`` takes for precomputed features [levels, tokens, H]
        of each image, so the vision tower is not run again."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=tuple(f[0] for f in features))

    def language_model_kwargs(self, image_mask: torch.Tensor, features: torch.Tensor) -> dict:
        """Extra arguments of the language model's forward for the image features [levels, N, H] of the image
        tokens ``image_mask`` [B, S] (level 0 is already in the input embeddings)."""
        return {}

    # ------------------------------------------------------------------------------------- engine

    # RMSNorm scales by (norm_offset + weight): 0 for Qwen2/Qwen3, 1 for zero-centred norms (Qwen3.5)
    norm_offset: float = 0.0

    def engine_layer(self, layer) -> SimpleNamespace:
        """A decoder layer's parts as the rollout engine runs them: its ``kind`` (``layer_types``), norms (scaled by
        ``norm_offset + weight``), projections, activation, scaling, the per-head q/k norms (None where the family
        has none) and ``output_gate`` (q_proj carries a sigmoid gate of the attention output per head: Qwen3.5).
        A ``"linear_attention"`` layer's parts are its family's (``qwen3_5.Qwen35.engine_layer``)."""
        a, m = layer.self_attn, layer.mlp
        return SimpleNamespace(kind="full_attention", norm1=layer.input_layernorm, norm2=layer.post_attention_layernorm,
                               norm_offset=self.norm_offset, q=a.q_proj, k=a.k_proj, v=a.v_proj, o=a.o_proj,
                               gate=m.gate_proj, up=m.up_proj, down=m.down_proj, act=m.act_fn, scaling=a.scaling,
                               q_norm=None, k_norm=None, output_gate=False)

    # ------------------------------------------------------------------------ planner / simulator

    def vision_shape(self, vision_config) -> dict[str, int]:
        """The vision tower's width and MLP width (the planner's analytic vision activations)."""
        raise NotImplementedError

    def prepare_for_fake_tensors(self, hf_model) -> None:
        """Make the model's forward run on fake tensors (the simulator), where an op's output shape may not depend
        on values; nothing to do where none does."""

    # ---------------------------------------------------------------------------- known configs

    def published_configs(self) -> dict:
        """Hub id -> a function returning that model's config, built from its published config.json values."""
        return {}

    # ------------------------------------------------------------------------------ tiny models

    def tiny_config(self, tokenizer, hidden_size: int = 64, layers: int = 2):
        """A tiny random config of this family whose special-token ids come from ``tokenizer``."""
        raise NotImplementedError

    def tiny_init(self, model) -> None:
        """Weights of a tiny random model the default init leaves too regular to test (nothing by default)."""

    def image_processor_config(self, min_pixels: int = 3136, max_pixels: int = 401408) -> dict:
        """The family's preprocessor_config.json."""
        raise NotImplementedError


# ------------------------------------------------------------------------------ tiny-model helpers

# The special tokens of Qwen2-VL's and Qwen2.5-VL's tokenizers that the tiny tokenizer needs (names as in the
# real ones)
QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# CLIP's normalisation (Qwen2-VL's and Qwen2.5-VL's preprocessor_config.json)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def tiny_text_config(tokenizer, hidden_size: int, layers: int, **extra) -> dict:
    """A tiny Qwen2-style decoder (4 heads, 2 kv heads) whose token ids come from ``tokenizer``."""
    heads, kv_heads = 4, 2
    head_dim = hidden_size // heads
    # M-RoPE splits head_dim/2 rotary frequencies between (temporal, height, width)
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def vision_token_ids(tokenizer) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def image_processor_config(patch: int, mean: list[float], std: list[float], min_pixels: int, max_pixels: int) -> dict:
    """A Qwen-VL preprocessor_config.json: ``patch``-px patches, 2x2 merge, the given normalisation."""
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean,
        "image_std": std,
        "do_convert_rgb": True,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "patch_size": patch,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }
