"""Memory planner: the predicted GPU peak of each phase of a recipe step, before anything is loaded.

Parameter counts come from the model's own config, instantiated on the ``meta`` device (no memory, no
weights), so they are exact for any Qwen2-VL size. Activation terms are estimates from the shapes (bytes
per token per layer); ``bench/RESULTS.md`` is where predictions are compared with measured peaks.

    lowmem-vt plan recipes/sat_lora.yaml --gpu-gib 8
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import RecipeConfig

GIB = 2**30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# NF4 with double quantisation: 4 bits + an 8-bit absmax per 64 weights + an fp32 scale per 256 blocks
NF4_BYTES_PER_PARAM = (4 + 8 / 64 + 32 / (64 * 256)) / 8
CUDA_CONTEXT_GIB = 0.5  # the CUDA context and allocator slack the framework keeps; measured on the GPU later


class PlanError(RuntimeError):
    """The recipe cannot fit the GPU; the message names the knob to turn."""


@dataclass
class ModelShape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    params_text_linear: int  # language-model linear weights (what NF4 quantises)
    params_other: int  # embeddings, head, norms, biases, vision tower
    params_vision: int
    lora_params: int
    merge: int
    patch: int
    vision_embed: int
    vision_mlp: int


def model_shape(config, lora_r: int, target_modules: list[str]) -> ModelShape:
    """Exact parameter counts from a Qwen2VLConfig, built on the meta device."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config)
    t, v = config.text_config, config.vision_config
    text_linear = other = vision = lora = 0
    seen = set()
    for name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:  # tied head
                continue
            seen.add(id(p))
            n = p.numel()
            if "visual" in name:
                vision += n
                other += n
            elif isinstance(mod, torch.nn.Linear) and "language_model.layers" in name and pname == "weight":
                text_linear += n
            else:
                other += n
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(mod, torch.nn.Linear) and "language_model.layers" in name and leaf in target_modules:
            lora += lora_r * (mod.in_features + mod.out_features)
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return ModelShape(
        vocab=t.vocab_size, hidden=t.hidden_size, intermediate=t.intermediate_size, layers=t.num_hidden_layers,
        heads=t.num_attention_heads, kv_heads=t.num_key_value_heads, head_dim=head_dim,
        tied=bool(config.tie_word_embeddings), params_text_linear=text_linear, params_other=other, params_vision=vision,
        lora_params=lora, merge=config.vision_config.spatial_merge_size, patch=config.vision_config.patch_size,
        vision_embed=v.embed_dim, vision_mlp=int(v.embed_dim * v.mlp_ratio),
    )


@dataclass
class Plan:
    phases: dict[str, float] = field(default_factory=dict)  # GiB
    peaks: dict[str, float] = field(default_factory=dict)  # GiB per step phase
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return max(self.peaks.values())

    def table(self) -> str:
        lines = ["| component | GiB |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in self.phases.items()]
        lines += ["", "| phase | predicted peak GiB |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in self.peaks.items()]
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes])


def prompt_tokens(cfg: RecipeConfig, shape: ModelShape, text_tokens: int = 82) -> int:
    """Worst-case prompt length: the largest image max_pixels allows, plus the template and question."""
    per_token = (shape.patch * shape.merge) ** 2
    image = cfg.data.max_pixels // per_token
    return min(cfg.grpo.max_prompt_length, image + text_tokens)


def kv_cache_bytes_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * dtype_bytes


def vision_activation_bytes(shape: ModelShape, patches: int, cfg: RecipeConfig) -> int:
    """Transient bytes of one no-grad vision-tower block over ``patches`` patches (qkv, attention out, MLP)."""
    b = DTYPE_BYTES[cfg.model.dtype]
    return patches * (6 * shape.vision_embed + 2 * shape.vision_mlp) * b


def rollout_bytes(cfg: RecipeConfig, shape: ModelShape, prompt_len: int, completion_len: int) -> int:
    """Bytes the rollout allocates on top of the resident state: the KV cache and one decode step's buffers."""
    b = DTYPE_BYTES[cfg.model.dtype]
    G = cfg.grpo.num_generations
    # hf generates one prompt's G samples per call (per-prompt seeds); the engine and vLLM decode all rows at once
    rows = G if cfg.rollout.backend == "hf" else G * cfg.train.prompts_per_step
    kv = kv_cache_bytes_per_token(shape, b) * rows * (prompt_len + completion_len)
    decode_logits = rows * shape.vocab * 4 * 2  # fp32 logits + sampling workspace of one decode step
    return kv + decode_logits


def plan(cfg: RecipeConfig, config) -> Plan:
    """Predicted memory of one recipe step (see module docstring)."""
    s = model_shape(config, cfg.lora.r, cfg.lora.target_modules)
    b = DTYPE_BYTES[cfg.model.dtype]
    g, t = cfg.grpo, cfg.train
    p = Plan()
    if cfg.model.quantization == "nf4":
        weights = s.params_text_linear * NF4_BYTES_PER_PARAM + s.params_other * b
    else:
        weights = (s.params_text_linear + s.params_other) * b
    opt_bytes = 2 if t.optimizer in ("adamw_8bit", "paged_adamw_8bit") else 8
    lora_state = s.lora_params * (4 + 4 + opt_bytes)  # fp32 weights + grads + AdamW moments
    p.phases["weights"] = weights / GIB
    p.phases["LoRA params + grads + optimizer"] = lora_state / GIB
    p.phases["CUDA context"] = CUDA_CONTEXT_GIB
    base = p.phases["weights"] + p.phases["LoRA params + grads + optimizer"] + CUDA_CONTEXT_GIB

    L = prompt_tokens(cfg, s)
    T = g.max_completion_length
    G = g.num_generations
    # hf generates one prompt's G samples per call (per-prompt seeds); the engine and vLLM decode all rows at once
    rollout_rows = G if cfg.rollout.backend == "hf" else G * t.prompts_per_step
    kv = kv_cache_bytes_per_token(s, b) * rollout_rows * (L + T)
    decode_logits = rollout_rows * s.vocab * 4 * 2  # fp32 logits + sampling workspace of one decode step
    p.phases["rollout KV cache"] = kv / GIB
    p.peaks["rollout"] = base + (kv + decode_logits) / GIB

    mb = t.micro_batch_size
    tokens = mb * (L + T)
    H, I = s.hidden, s.intermediate
    if cfg.model.gradient_checkpointing:
        kept = s.layers * tokens * H * b  # each layer's input, saved at the checkpoint boundary
        # one layer recomputed in backward: q,k,v,o, attention out, norms (~8H) and the MLP (3I) per token
        recompute = tokens * (8 * H + 3 * I) * b
        acts = kept + recompute
    else:
        acts = s.layers * tokens * (8 * H + 3 * I) * b
    triton = cfg.kernels == "triton" or cfg.kernels == "auto"
    n_loss = mb * T
    loss_head = n_loss * H * 4 * 2 if triton else n_loss * s.vocab * 4 * 3  # fp32 logits, softmax, grad
    p.phases[f"checkpointed activations per micro-batch ({mb})"] = acts / GIB
    p.phases["loss head"] = loss_head / GIB
    p.peaks["reference pass"] = base + (tokens * (4 * H + 2 * I) * b + n_loss * (H * 4 if triton else s.vocab * 4)) / GIB
    p.peaks["policy update"] = base + (acts + loss_head) / GIB
    p.notes.append(f"prompt {L} tokens (image at max_pixels {cfg.data.max_pixels}), completion {T}, G {G}, micro-batch {mb}")
    p.notes.append(f"LoRA trainable parameters: {s.lora_params / 1e6:.1f} M; model parameters: "
                   f"{(s.params_text_linear + s.params_other) / 1e9:.3f} B")
    return p


def largest_fitting(cfg: RecipeConfig, config, gpu_gib: float) -> dict[str, int]:
    """The largest micro_batch_size, num_generations and max_completion_length that fit, each alone."""
    import copy

    out = {}
    for section, key, candidates in (
        ("train", "micro_batch_size", [1, 2, 4, 8, 16, 32, 64]),
        ("grpo", "num_generations", [2, 4, 8, 16, 32]),
        ("grpo", "max_completion_length", [128, 256, 512, 700, 1024, 2048, 4096]),
    ):
        best = 0
        for c in candidates:
            trial = copy.deepcopy(cfg)
            setattr(getattr(trial, section), key, c)
            if plan(trial, config).peak <= gpu_gib:
                best = c
        out[f"{section}.{key}"] = best
    return out


def check_fits(cfg: RecipeConfig, config, gpu_gib: float) -> Plan:
    """The plan, or PlanError naming the knob when the predicted peak exceeds ``gpu_gib``."""
    p = plan(cfg, config)
    if p.peak > gpu_gib:
        worst = max(p.peaks, key=p.peaks.get)
        fit = largest_fitting(cfg, config, gpu_gib)
        knob = {
            "rollout": "grpo.num_generations or grpo.max_completion_length (the KV cache)",
            "policy update": "train.micro_batch_size (activations), or model.gradient_checkpointing: true",
            "reference pass": "train.micro_batch_size",
        }[worst]
        raise PlanError(
            f"{cfg.source_file}: predicted peak {p.peak:.2f} GiB in the {worst} phase exceeds the GPU's {gpu_gib:.1f} GiB. "
            f"Turn down {knob}. Largest values that fit alone: "
            + ", ".join(f"{k}={v}" for k, v in fit.items())
            + (". Or use model.quantization: nf4." if cfg.model.quantization == "none" else ".")
            + "\n" + p.table()
        )
    return p


def config_for(cfg: RecipeConfig):
    """The model config without loading weights (hub id, local path, or the tiny model's)."""
    from transformers import AutoConfig

    from .model import resolve_model_path

    name = resolve_model_path(cfg.model.name_or_path)
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except OSError:
        pass
    if name.rstrip("/").endswith("Qwen2-VL-2B"):
        # not cached: the 2B architecture is known (tiny.qwen2_vl_2b_config mirrors its config.json)
        from .tiny import qwen2_vl_2b_config

        return qwen2_vl_2b_config()
    return AutoConfig.from_pretrained(name)


def register_cli(sub) -> None:
    p = sub.add_parser("plan", help="predicted GPU memory of a recipe, per phase, and what fits")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--gpu-gib", type=float, default=None, help="GPU memory to plan for (default: this GPU's, if any)")
    p.set_defaults(func=_cmd_plan)


def _cmd_plan(args) -> int:
    from .config import load_config

    cfg = load_config(args.recipe, args.overrides)
    config = config_for(cfg)
    p = plan(cfg, config)
    print(p.table())
    gib = args.gpu_gib if args.gpu_gib is not None else detected_gpu_gib()
    print(f"\npredicted peak: {p.peak:.2f} GiB")
    if gib is not None:
        try:
            check_fits(cfg, config, gib)
            print(f"fits in {gib:.1f} GiB; largest that fit: {largest_fitting(cfg, config, gib)}")
        except PlanError as exc:
            print(f"does NOT fit: {str(exc).splitlines()[0]}")
            return 1
    return 0


def detected_gpu_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
