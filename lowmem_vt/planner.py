"""Memory planner: the predicted GPU peak of each phase of a recipe step, before anything is loaded.

Parameter counts come from the model's own config, instantiated on the ``meta`` device (no memory, no
weights), so they are exact for any size of any family (``families``). Activation terms are bytes per token per layer,
calibrated against ``lowmem_vt.simulate`` (the step's own code on fake tensors): every phase within 5 % of
the simulation over LoRA / QLoRA x micro-batch 1-8 x completion 256-1024 (``bench/memory.py --simulate``).
Rollout and vision are analytic in both. What neither sees (the CUDA context is added as ``Plan.overhead``)
is listed in ``simulate.UNMODELLED``; ``bench/RESULTS.md`` keeps simulated and GPU-measured figures apart.

    lowmem-vt plan recipes/sat_lora.yaml --gpu-gib 8 [--simulate]
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .errors import UserError
from .config import RecipeConfig
from .engine_memory import engine_allocation_bytes, is_linear_attention, linear_state_bytes_per_row
from .families import family_for, published_config

GIB = 2**30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# NF4 with double quantisation: 4 bits + an 8-bit absmax per 64 weights + an fp32 scale per 256 blocks
NF4_BYTES_PER_PARAM = (4 + 8 / 64 + 32 / (64 * 256)) / 8
CUDA_CONTEXT_GIB = 0.5  # the CUDA context and allocator slack the framework keeps; measured on the GPU later


class PlanError(UserError, RuntimeError):
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
    feature_levels: int  # image-feature levels per image token (1 + DeepStack layers)
    qkv_bias: bool
    # hybrid decoders (Qwen3.5): how many layers are full attention (a KV cache) and how many Gated DeltaNet linear
    # attention (a conv and a recurrent state per sequence instead); every layer is full attention elsewhere
    attention_layers: int
    linear_layers: int
    linear_width: int  # a linear-attention layer's value heads x key dim (its delta rule's width), 0 without them
    linear_heads: int  # its value heads
    # q / k repeated to the value heads (value heads x key dim each) that the installed transformers' linear-attention
    # layer holds while its delta rule runs: 5.17's layer repeats them before the call; 0 when the rule repeats them
    # itself (5.18+) or every value head has its own key head
    linear_repeated_qk_width: int
    text_config: object  # the model's text config (the engine's memory arithmetic reads it)
    linear_shapes: dict  # (in, out) of each decoder linear, the family's (Qwen3.5's q_proj carries its output gate)


def model_shape(config, lora_r: int, target_modules: list[str]) -> ModelShape:
    """Exact parameter counts from a model config of any family, built on the meta device."""
    import torch

    family = family_for(config)
    with torch.device("meta"):
        model = family.model_class()(config)
    t, v = config.text_config, config.vision_config
    vision_ids = {id(p) for p in family.vision_tower(model).parameters()}
    layer_linears = {id(m): name for name, m in family.text_model(model).layers.named_modules()
                     if isinstance(m, torch.nn.Linear)}
    text_linear = other = vision = lora = 0
    seen = set()
    for mod in model.modules():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:  # tied head
                continue
            seen.add(id(p))
            n = p.numel()
            if id(p) in vision_ids:
                vision += n
                other += n
            elif id(mod) in layer_linears and pname == "weight":
                text_linear += n
            else:
                other += n
        if id(mod) in layer_linears and layer_linears[id(mod)].rsplit(".", 1)[-1] in target_modules:
            lora += lora_r * (mod.in_features + mod.out_features)
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    vision_sizes = family.vision_shape(v)
    linear_layers = sum(map(is_linear_attention, family.layer_types(t)))
    grouped = linear_layers and t.linear_num_value_heads > t.linear_num_key_heads
    repeated_qk = t.linear_num_value_heads * t.linear_key_head_dim if grouped and family.mixer_holds_repeated_qk() else 0
    return ModelShape(
        vocab=t.vocab_size, hidden=t.hidden_size, intermediate=t.intermediate_size, layers=t.num_hidden_layers,
        heads=t.num_attention_heads, kv_heads=t.num_key_value_heads, head_dim=head_dim,
        tied=bool(config.tie_word_embeddings), params_text_linear=text_linear, params_other=other, params_vision=vision,
        lora_params=lora, merge=family.merge_size(config), patch=family.patch_size(config),
        vision_embed=vision_sizes["embed"], vision_mlp=vision_sizes["mlp"], feature_levels=family.feature_levels(config),
        qkv_bias=family.qkv_bias(t), attention_layers=t.num_hidden_layers - linear_layers, linear_layers=linear_layers,
        linear_width=t.linear_num_value_heads * t.linear_key_head_dim if linear_layers else 0,
        linear_heads=t.linear_num_value_heads if linear_layers else 0, linear_repeated_qk_width=repeated_qk, text_config=t,
        linear_shapes=family.decoder_linear_shapes(t),
    )


@dataclass
class Plan:
    phases: dict[str, float] = field(default_factory=dict)  # GiB
    peaks: dict[str, float] = field(default_factory=dict)  # GiB allocated per step phase
    notes: list[str] = field(default_factory=list)
    overhead: float = 0.0  # GiB the allocator does not see (CUDA context)

    @property
    def allocated(self) -> float:
        """The largest phase peak as ``torch.cuda.max_memory_allocated`` would report it."""
        return max(self.peaks.values())

    @property
    def peak(self) -> float:
        """What the GPU must hold: the allocated peak plus the CUDA context."""
        return self.allocated + self.overhead

    def table(self) -> str:
        lines = ["| component | GiB |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in self.phases.items()]
        lines += [f"| CUDA context (not allocated by torch) | {self.overhead:.2f} |"]
        lines += ["", "| phase | predicted peak GiB allocated |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in self.peaks.items()]
        lines += [f"| **whole step + CUDA context** | **{self.peak:.2f}** |"]
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes])


def image_tokens_per_prompt(cfg: RecipeConfig, shape: ModelShape) -> int:
    """Worst case: every image of a question (``data.max_images_per_question``) as large as max_pixels allows."""
    return cfg.data.max_pixels // (shape.patch * shape.merge) ** 2 * cfg.data.max_images_per_question


def prompt_tokens(cfg: RecipeConfig, shape: ModelShape, text_tokens: int = 82) -> int:
    """Worst-case prompt length: the largest images max_pixels allows, plus the template and question (two
    more tokens per further image: its vision_start and vision_end)."""
    image = image_tokens_per_prompt(cfg, shape) + 2 * (cfg.data.max_images_per_question - 1)
    return min(cfg.grpo.max_prompt_length, image + text_tokens)


def kv_cache_bytes_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    return 2 * shape.attention_layers * shape.kv_heads * shape.head_dim * dtype_bytes


# Activation bytes per token of one layer, calibrated against ``lowmem_vt.simulate`` (bench/memory.py
# --simulate prints the comparison): a no-grad forward holds one MLP's silu(gate), up and their product
# (3I) and ~2H of attention temporaries; the backward of a recomputed layer holds ~6I (gate and up outputs
# with their LoRA sums, silu, the products and their gradients), ~10H (q/k/v, attention out, residuals and
# their gradients) and 6 LoRA [tokens, r] products. A 16-bit model adds its RMSNorms' fp32 copies: one
# (4H bytes) alive in the forward, two (8H bytes) in the backward.
FORWARD_PER_TOKEN = (3, 2, 0, 4)  # (x intermediate, x hidden, x lora r: in the dtype's bytes; fp32 bytes x hidden)
BACKWARD_PER_TOKEN = (6, 10, 6, 8)
# A Gated DeltaNet layer (Qwen3.5's linear attention) as transformers runs it without flash-linear-attention (the
# torch chunked delta rule, in float32, chunks of 64 tokens): its mixer holds per token (x, y) float32 vectors of
# (value heads x key dim: q, k, v and their normalised, scaled, decayed and beta-weighted copies; value heads x
# 64: the chunk's pairwise decays, its triangular system and attention), beside the hidden-size terms above;
# fitted to ``lowmem_vt.simulate`` on Qwen3.5-4B (micro-batch 8) and the tiny Qwen3.5 (micro-batch 8, 256
# tokens), whose proportions differ (key dim 128 and 16). With flash-linear-attention on a GPU the chunked kernel
# holds less: for that path these are upper bounds.
LINEAR_FORWARD_PER_TOKEN = (12.0, 3.2)
LINEAR_BACKWARD_PER_TOKEN = (24.0, 5.9)
DELTA_RULE_CHUNK = 64
# bitsandbytes 8-bit AdamW: two uint8 moments + an fp32 absmax per 256-value block each; paged: the state
# lives in CUDA managed memory, which the allocator does not count (listed as unmodelled)
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "adamw_8bit": 2 + 2 * 4 / 256, "paged_adamw_8bit": 0.0}
# fp32 [rows, vocab] tensors alive while sampling one token: logits, probs, top-p/k work, and the sampling log-prob
# recorder's scaled logits and the log-softmax it keeps until the next step (rollout.hf.SamplingLogprobs)
SAMPLING_BUFFERS = 8


def vision_activation_bytes(shape: ModelShape, patches: int, cfg: RecipeConfig) -> int:
    """Transient bytes of one no-grad vision-tower block over ``patches`` patches (analytic: norms, qkv,
    attention out, MLP)."""
    b = DTYPE_BYTES[cfg.model.dtype]
    return patches * (6 * shape.vision_embed + 2 * shape.vision_mlp) * b


def rollout_bytes(cfg: RecipeConfig, shape: ModelShape, prompt_len: int, completion_len: int) -> int:
    """Bytes the rollout allocates on top of the resident state (analytic): the KV cache at its full length
    plus the larger of the prefill's transient activations and one decode step's sampling buffers.

    ``hf`` generates one prompt's G samples per call (per-prompt seeds), growing a dynamic cache (one layer's
    K or V is copied as it grows); ``engine`` / ``vllm``: the engine's own accounting
    (``engine_memory.engine_allocation_bytes``: each prompt's KV once, shared by its G samples, the
    linear-attention layers' states per row, its state, the adapter's decode copies, one decode step's
    workspace), plus one prompt's prefill. A hybrid model's cache holds K/V for its full-attention layers only,
    and a conv and recurrent state per row for each linear-attention layer.
    """
    if cfg.rollout.backend == "auto":  # the self-check picks engine or hf before step 1: plan for the larger
        import dataclasses

        return max(rollout_bytes(dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, backend=name)), shape,
                                 prompt_len, completion_len) for name in ("engine", "hf"))
    b = DTYPE_BYTES[cfg.model.dtype]
    G = cfg.grpo.num_generations
    # the engine's prefill repeats q / k to the value heads itself, on every transformers, before the model's rule
    prefill_shape = shape if cfg.rollout.backend == "hf" else replace(shape, linear_repeated_qk_width=shape.linear_width)
    prefill_one = prompt_len * layer_bytes_per_token(prefill_shape, cfg, backward=False)
    if cfg.rollout.backend != "hf":
        e = engine_allocation_bytes(shape.text_config, cfg.model.dtype, cfg.train.prompts_per_step, prompt_len, G,
                                    completion_len, lora_r=cfg.lora.r, lora_targets=cfg.lora.target_modules,
                                    top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p, qkv_bias=shape.qkv_bias,
                                    shapes=shape.linear_shapes)
        return int(e.allocated + max(prefill_one, e.step_workspace))
    per_token = kv_cache_bytes_per_token(shape, b)
    rows, slots = G, prompt_len + completion_len
    growth = rows * slots * per_token // (2 * shape.attention_layers)
    prefill = G * prefill_one  # generate expands the prompt to its G rows before the prefill
    sampling = SAMPLING_BUFFERS * rows * shape.vocab * 4
    states = rows * shape.linear_layers * linear_state_bytes_per_row(shape.text_config, b) if shape.linear_layers else 0
    return int(rows * slots * per_token + growth + states + max(prefill, sampling))


def layer_bytes_per_token(s: ModelShape, cfg: RecipeConfig, backward: bool) -> float:
    """Peak activation bytes per token of one decoder layer: a no-grad forward, or a recomputed backward. A hybrid
    model's layers are of two kinds, held one at a time: the larger of the two."""
    b = DTYPE_BYTES[cfg.model.dtype]
    ci, ch, cr, norms = BACKWARD_PER_TOKEN if backward else FORWARD_PER_TOKEN
    fp32_norms = norms * s.hidden if b < 4 else 0
    attention = (ci * s.intermediate + ch * s.hidden + cr * cfg.lora.r) * b + fp32_norms
    if not s.linear_layers:
        return attention
    # the layer's repeated q / k, held beside the rule's float32 work; in a recomputed backward they are gone before
    # the gradients' peak
    repeated_qk = 0 if backward else 2 * s.linear_repeated_qk_width * b
    linear = linear_mixer_bytes_per_token(s, backward) + repeated_qk + (ch * s.hidden + cr * cfg.lora.r) * b + fp32_norms
    return max(attention, linear) if s.attention_layers else linear


def linear_mixer_bytes_per_token(s: ModelShape, backward: bool) -> float:
    """A Gated DeltaNet layer's token mixer, bytes per token (see LINEAR_FORWARD_PER_TOKEN)."""
    x, y = LINEAR_BACKWARD_PER_TOKEN if backward else LINEAR_FORWARD_PER_TOKEN
    return (x * s.linear_width + y * s.linear_heads * DELTA_RULE_CHUNK) * 4


def decoder_bytes_per_token(s: ModelShape, cfg: RecipeConfig) -> float:
    """Activation bytes per token of every decoder layer's backward at once (no gradient checkpointing)."""
    if not s.linear_layers:
        return s.layers * layer_bytes_per_token(s, cfg, backward=True)
    attention_only = ModelShape(**{**vars(s), "linear_layers": 0})
    b = DTYPE_BYTES[cfg.model.dtype]
    ci, ch, cr, norms = BACKWARD_PER_TOKEN
    linear = linear_mixer_bytes_per_token(s, True) + (ch * s.hidden + cr * cfg.lora.r) * b + (norms * s.hidden if b < 4 else 0)
    return s.attention_layers * layer_bytes_per_token(attention_only, cfg, backward=True) + s.linear_layers * linear


def loss_head_bytes(cfg: RecipeConfig, s: ModelShape, rows: int, S: int, T: int, backward: bool) -> int:
    """Bytes alive while the head runs on one micro-batch of rows x S tokens (T completion tokens each): the
    last hidden states, the completion positions gathered from them, and what the kernel backend holds."""
    from .kernels.head import TRITON_HEAD
    from .kernels.fused_linear import rows_per_chunk

    b = DTYPE_BYTES[cfg.model.dtype]
    n = rows * T
    held = rows * S * s.hidden * b + n * s.hidden * b
    head = TRITON_HEAD if cfg.kernels in ("auto", "triton") else cfg.kernels
    if head == "torch":  # fp32 head copy + the fp32 log_softmax of every chunk kept for backward
        return held + s.vocab * s.hidden * 4 + n * s.vocab * 4 * (2 if backward else 1)
    if head == "triton_fused_linear":  # one chunk's fp32 logits scratch; the GRPO op forms dh [N, H] fp32
        chunk = min(rows_per_chunk(s.vocab), n)
        extra = n * s.hidden * 4 + chunk * s.hidden * (b + 4) if backward else 0
        return held + chunk * s.vocab * 4 + extra
    # streaming: [N] fp32 vectors; the backward's dh [N, H] fp32 and its cast
    return held + (n * s.hidden * (4 + b) if backward else n * 16)


_shapes: dict = {}


def _shape(config, cfg: RecipeConfig) -> ModelShape:
    key = (config.to_json_string(), cfg.lora.r, tuple(cfg.lora.target_modules))
    if key not in _shapes:
        _shapes[key] = model_shape(config, cfg.lora.r, cfg.lora.target_modules)
    return _shapes[key]


def plan(cfg: RecipeConfig, config, prompt_len: int | None = None) -> Plan:
    """Predicted memory of one training step of ``cfg`` on a GPU, per phase (see module docstring).

    Peaks are what ``torch.cuda.max_memory_allocated`` reports; ``Plan.peak`` adds the CUDA context. The
    step as the trainer runs it on CUDA: the vision tower in host memory between its one call per step
    (``model.offload_vision``), checkpointed layer inputs in host memory (``model.offload_checkpointed_inputs``),
    LoRA computing in the base dtype, every completion at ``max_completion_length``.
    """
    s = _shape(config, cfg)
    b = DTYPE_BYTES[cfg.model.dtype]
    g, t = cfg.grpo, cfg.train
    p = Plan(overhead=CUDA_CONTEXT_GIB)
    text = s.params_text_linear * (NF4_BYTES_PER_PARAM if cfg.model.quantization == "nf4" else b)
    other = (s.params_other - s.params_vision) * b
    vision = s.params_vision * b
    lora = s.lora_params * 4
    grads = s.lora_params * 4
    optimizer_state = s.lora_params * OPTIMIZER_STATE_BYTES[t.optimizer]
    L = prompt_len if prompt_len is not None else prompt_tokens(cfg, s)
    T, G, mb, n_prompts = g.max_completion_length, g.num_generations, t.micro_batch_size, t.prompts_per_step
    image_tokens = min(image_tokens_per_prompt(cfg, s), L)
    # every prompt's image features (each level), kept for the whole step
    embeds = n_prompts * image_tokens * s.hidden * b * s.feature_levels
    resident = text + other + lora + optimizer_state + embeds
    p.phases["weights"] = (text + other + vision) / GIB
    p.phases["vision tower (host memory between its calls)"] = vision / GIB
    p.phases["LoRA weights (fp32)"] = lora / GIB
    p.phases["LoRA gradients (fp32)"] = grads / GIB
    p.phases["optimizer state"] = optimizer_state / GIB

    p.peaks["vision"] = (resident + vision + vision_activation_bytes(s, image_tokens * s.merge**2 * n_prompts, cfg)) / GIB
    roll = rollout_bytes(cfg, s, L, T)
    p.phases["rollout KV cache + decode buffers"] = roll / GIB
    p.peaks["rollout"] = (resident + roll) / GIB

    rows = min(mb, G * n_prompts)
    S = L + T
    tokens = rows * S
    mask = rows * S * S * (b + 1)  # sdpa's additive mask of the right-padded batch, and its boolean source
    # the larger of two moments: inside a decoder layer, or inside the loss head
    reference = max(tokens * layer_bytes_per_token(s, cfg, backward=False) + mask,
                    loss_head_bytes(cfg, s, rows, S, T, backward=False))
    p.peaks["reference pass"] = (resident + reference) / GIB
    if cfg.model.gradient_checkpointing:  # layer inputs live in host memory; one layer recomputed at a time
        acts = tokens * layer_bytes_per_token(s, cfg, backward=True) + mask
    else:
        acts = tokens * decoder_bytes_per_token(s, cfg) + mask
    policy = max(acts, loss_head_bytes(cfg, s, rows, S, T, backward=True))
    p.phases[f"activations of one micro-batch ({rows} x {S} tokens)"] = policy / GIB
    p.peaks["policy update"] = (resident + grads + policy) / GIB
    foreach = s.lora_params * 4 if t.optimizer == "adamw" else 0  # torch's foreach AdamW: one fp32 temporary per parameter
    p.peaks["optimizer step"] = (resident + grads + foreach) / GIB
    p.notes.append(f"prompt {L} tokens (image at max_pixels {cfg.data.max_pixels}), completion {T}, G {G}, "
                   f"micro-batch {mb}, {n_prompts} prompts per step")
    p.notes.append(f"LoRA trainable parameters: {s.lora_params / 1e6:.1f} M; model parameters: "
                   f"{(s.params_text_linear + s.params_other) / 1e9:.3f} B")
    if t.optimizer == "paged_adamw_8bit":
        p.notes.append(f"paged 8-bit AdamW state ({s.lora_params * (2 + 8 / 256) / GIB:.2f} GiB) in CUDA managed memory, "
                       "outside the allocator: the driver pages it in for the optimizer step")
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


def largest_completion(cfg: RecipeConfig, config, gpu_gib: float, num_generations: int, step: int = 64,
                       limit: int = 8192) -> int:
    """The largest max_completion_length (a multiple of ``step``, at most ``limit``) whose predicted peak fits
    ``gpu_gib`` with ``num_generations`` completions per prompt, everything else as the recipe says; 0 if none."""
    import copy

    def fits(T: int) -> bool:
        trial = copy.deepcopy(cfg)
        trial.grpo.num_generations, trial.grpo.max_completion_length = num_generations, T
        return plan(trial, config).peak <= gpu_gib

    lo, hi = 0, limit // step  # fits(lo * step) holds (or lo = 0); the peak grows with T
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid * step):
            lo = mid
        else:
            hi = mid - 1
    return lo * step


def check_fits(cfg: RecipeConfig, config, gpu_gib: float) -> Plan:
    """The plan, or PlanError naming the knob when the predicted peak exceeds ``gpu_gib``."""
    p = plan(cfg, config)
    if p.peak > gpu_gib:
        worst = max(p.peaks, key=p.peaks.get)
        fit = largest_fitting(cfg, config, gpu_gib)
        knob = {
            "vision": "train.prompts_per_step or data.max_pixels (one vision-tower call encodes every image of a step)",
            "rollout": "grpo.num_generations or grpo.max_completion_length (the KV cache)",
            "policy update": "train.micro_batch_size (activations), or model.gradient_checkpointing: true",
            "reference pass": "train.micro_batch_size",
            "optimizer step": "lora.r (the optimizer state), or train.optimizer: paged_adamw_8bit",
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

    from .tiny import resolve_model_path

    name = resolve_model_path(cfg.model.name_or_path)
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except OSError:
        pass
    # not cached: the published models' architectures are known (each family carries their config.json values)
    known = published_config(name)
    return known if known is not None else AutoConfig.from_pretrained(name)


def detected_gpu_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
