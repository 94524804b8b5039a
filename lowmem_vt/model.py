"""Loading a vision-language model (any family of ``families``) with LoRA/QLoRA, and the forward passes the
trainer needs.

The policy and the reference share one set of weights: the reference is the same model with the LoRA
adapter disabled. Image embeddings are computed once per step by ``image_embeddings`` (the vision tower is
frozen) and scattered into the token embeddings of every pass that needs them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import LoraConfig, ModelConfig, resolve_dtype
from .families import QwenVLFamily, family_for
from .inputs import SequenceBatch, completion_hidden

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class _ModelViews:
    """What the rollout, the evaluator and ``image_embeddings`` read off a loaded model; subclasses give
    ``hf_model`` (the family's ...ForConditionalGeneration) and ``tokenizer``."""

    @property
    def config(self):
        return self.hf_model.config

    @property
    def family(self) -> QwenVLFamily:
        return family_for(self.hf_model.config)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.family.lm_head(self.hf_model).weight

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id


@dataclass
class LoadedModel(_ModelViews):
    """The base model with its LoRA adapter (the policy; the reference is the adapter disabled)."""

    peft_model: torch.nn.Module  # PeftModel: the trainable policy
    tokenizer: object
    image_processor: object
    device: torch.device
    vision_calls: list  # [number of images encoded by the vision tower], shared counter
    vision_host: list | None = None  # [(parameter, host copy)] when the vision tower lives off the GPU

    @property
    def hf_model(self):
        """The ...ForConditionalGeneration holding the (injected) LoRA layers."""
        return self.peft_model.get_base_model()


@dataclass
class PlainModel(_ModelViews):
    """A model without an adapter: a base model or a merged one (evaluation)."""

    hf_model: torch.nn.Module
    tokenizer: object
    image_processor: object
    device: torch.device
    vision_calls: list  # [number of images encoded by the vision tower], shared counter


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA GPU is visible; use train.device=cpu or auto")
    return torch.device(name)


def resolve_attention(name: str, device: torch.device) -> str:
    if name == "auto":
        if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        return "sdpa"
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise RuntimeError("model.attn_implementation is flash_attention_2 but flash-attn is not installed (pip install lowmem-vt[gpu])")
    return name


def _count_vision_calls(hf_model) -> list:
    """A counter of images encoded by the vision tower, kept up to date by a forward pre-hook."""
    counter = [0]

    def count_images(_module, args, kwargs_):
        grid = kwargs_.get("grid_thw", args[1] if len(args) > 1 else None)
        counter[0] += int(grid.shape[0]) if grid is not None else 1

    family_for(hf_model.config).vision_tower(hf_model).register_forward_pre_hook(count_images, with_kwargs=True)
    return counter


def model_family(name_or_path: str) -> QwenVLFamily:
    """The family of a model folder or hub id, from its config (no weights read)."""
    from transformers import AutoConfig

    return family_for(AutoConfig.from_pretrained(name_or_path))


def load_plain_model(name_or_path: str, device: torch.device, *, dtype: str, min_pixels: int, max_pixels: int,
                     attn_implementation: str = "auto") -> PlainModel:
    """A base or merged model by hub id or local path, frozen, in eval mode."""
    family = model_family(name_or_path)
    model = family.model_class().from_pretrained(
        name_or_path, dtype=DTYPES[resolve_dtype(dtype, device.type)], attn_implementation=resolve_attention(attn_implementation, device))
    model.to(device).eval()
    model.requires_grad_(False)
    tokenizer, image_processor = load_tokenizer_and_processor(name_or_path, min_pixels, max_pixels, family)
    return PlainModel(model, tokenizer, image_processor, device, _count_vision_calls(model))


def load_tokenizer_and_processor(name_or_path: str, min_pixels: int, max_pixels: int, family: QwenVLFamily | None = None):
    """The model's tokenizer and its family's image processor with the pixel budget as default size."""
    from transformers import AutoTokenizer

    family = family or model_family(name_or_path)
    return AutoTokenizer.from_pretrained(name_or_path), family.image_processor(name_or_path, min_pixels, max_pixels)


def load_model(model_cfg: ModelConfig, lora_cfg: LoraConfig, device: torch.device, *, min_pixels: int, max_pixels: int,
               adapter_path: str | None = None, trainable: bool = True) -> LoadedModel:
    """Load the base model by hub id or local path (a tiny model's name resolved already: ``tiny.resolve_model_path``),
    freeze it, and add (or load) the LoRA adapter."""
    family = model_family(model_cfg.name_or_path)
    dtype = DTYPES[resolve_dtype(model_cfg.dtype, device.type)]
    kwargs = dict(dtype=dtype, attn_implementation=resolve_attention(model_cfg.attn_implementation, device))
    if model_cfg.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
            # the vision tower and the (tied) head stay in bf16: quantizing them saves little and costs accuracy
            # (transformers matches these from the start of the module name, or as a suffix: "visual" alone
            # matched nothing in 5.x and the vision tower was quantized; a test checks its dtype)
            llm_int8_skip_modules=list(family.keep_unquantized),
        )
        # bitsandbytes places the 4-bit weights itself; its CPU backend runs NF4 too (slowly: tests only)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = family.model_class().from_pretrained(model_cfg.name_or_path, **kwargs)
    if model_cfg.quantization == "none":
        model.to(device)
    else:
        keep_nf4_trainable(model)
    tokenizer, image_processor = load_tokenizer_and_processor(model_cfg.name_or_path, min_pixels, max_pixels, family)
    model.requires_grad_(False)
    peft_model = attach_adapter(model, model_cfg, lora_cfg, trainable=trainable, adapter_path=adapter_path)
    lm = LoadedModel(peft_model, tokenizer, image_processor, device, _count_vision_calls(peft_model.get_base_model()))
    if device.type == "cuda" and trainable:
        offload_vision(lm)
        if model_cfg.gradient_checkpointing:
            offload_checkpointed_inputs(lm.hf_model)
    return lm


def attach_adapter(model, model_cfg: ModelConfig, lora_cfg: LoraConfig, *, trainable: bool = True,
                   adapter_path: str | None = None):
    """The frozen base model with its LoRA adapter (new, or loaded from ``adapter_path``): a PeftModel."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    if adapter_path is not None:
        peft_model = PeftModel.from_pretrained(model, adapter_path, is_trainable=trainable)
    else:
        peft_cfg = PeftLoraConfig(
            r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
            target_modules=family_for(model.config).lora_target_regex(lora_cfg.target_modules), bias="none",
        )
        peft_model = get_peft_model(model, peft_cfg)
    # peft keeps LoRA weights in fp32 over a bf16 base (autocast_adapter_dtype): AdamW on bf16 would lose small updates
    compute_adapter_in_input_dtype(peft_model)
    if model_cfg.gradient_checkpointing and trainable:
        peft_model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # from_pretrained leaves every module in eval mode, and a decoder layer checkpoints only while
    # `self.training`: without this, checkpointing is silently off (measured: 10x the saved activations)
    peft_model.train(trainable)
    return peft_model


class _InputDtypeLinear(torch.nn.Linear):
    """A LoRA A/B linear whose fp32 weight is cast to the input's dtype for the matmul (autograd casts the
    gradient back to fp32, so the optimizer still updates fp32 weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)


def compute_adapter_in_input_dtype(peft_model) -> None:
    """LoRA computes in the base model's dtype instead of casting every input to fp32.

    peft casts each LoRA input to the adapter's fp32 and keeps that copy for the backward, and ``result +
    lora`` is promoted to fp32: ~1.2 GiB of the recompute temporaries at micro-batch 8 (simulated). The fp32
    weights stay the optimizer's master copy; only the [tokens, r] products are rounded to bf16.
    """
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = False
            for linear in (*module.lora_A.values(), *module.lora_B.values()):
                if type(linear) is torch.nn.Linear:
                    linear.__class__ = _InputDtypeLinear


def offload_vision(lm: LoadedModel, host_copy=None) -> None:
    """Keep the frozen vision tower's weights in (pinned) host memory; ``image_embeddings`` copies them in
    for its one call per step and drops the device copy after (1.24 GiB of bf16 weights for the 2B model,
    ~0.1 s of PCIe per step). ``host_copy`` makes the host tensor (the simulator passes its own)."""
    def pinned(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", copy=True).pin_memory()

    host_copy = host_copy or pinned
    lm.vision_host = [(p, host_copy(p.data)) for p in lm.family.vision_tower(lm.hf_model).parameters()]
    for p, host in lm.vision_host:
        p.data = host


class _OffloadedInput:
    """A checkpointed layer's input: handed to the forward once, then read back from its host copy by the
    backward's recompute. Nothing on the device keeps it alive in between."""

    def __init__(self, hidden: torch.Tensor, host_copy):
        self.device = hidden.device
        self.requires_grad = hidden.requires_grad
        self.hidden = hidden
        self.host, self.ready = host_copy(hidden)

    def get(self) -> torch.Tensor:
        if self.hidden is not None:
            hidden, self.hidden = self.hidden, None
            return hidden
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
        # the recompute must build the forward's graph (checkpoint matches the tensors it saves)
        return self.host.to(self.device, non_blocking=True, copy=True).requires_grad_(self.requires_grad)


_offload_streams: dict = {}


def _pinned_host_copy(t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
    """An asynchronous copy of ``t`` into pinned host memory on a side stream (overlaps the next layer)."""
    stream = _offload_streams.setdefault(t.device, torch.cuda.Stream(t.device))
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    stream.wait_stream(torch.cuda.current_stream(t.device))
    with torch.cuda.stream(stream):
        host.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    t.record_stream(stream)  # the allocator may reuse t's memory only after the copy
    return host, done


def offload_checkpointed_inputs(hf_model, host_copy=None) -> None:
    """Gradient checkpointing of the language model's layers with each layer's input kept in pinned host
    memory instead of on the GPU: 28 x tokens x hidden x 2 bytes (0.83 GiB at micro-batch 8 x 1294 tokens
    for the 2B model). The forward's copies run on a side stream; the backward reads one layer's input
    back right before recomputing it. ``host_copy(t) -> (host tensor, event or None)``."""
    from torch.utils.checkpoint import checkpoint

    host_copy = host_copy or _pinned_host_copy

    def run(fn, handle, *args):
        return fn(handle.get(), *args)

    def offloading_checkpoint(fn, hidden, *args):
        # transformers < 5.24 checkpoints a layer whenever the model is in train mode, under no_grad too (the
        # reference pass): there nothing is saved for a backward, so a host copy would only cost PCIe and pinned memory
        if not torch.is_grad_enabled():
            return fn(hidden, *args)
        return checkpoint(run, fn, _OffloadedInput(hidden, host_copy), *args, use_reentrant=False)

    for layer in family_for(hf_model.config).text_model(hf_model).layers:
        if not hasattr(layer, "_lowmem_checkpoint_func"):  # what restore_checkpointed_inputs puts back
            layer._lowmem_checkpoint_func = layer._gradient_checkpointing_func
        layer._lowmem_host_copy = host_copy  # the self-check round-trips a tensor through the same copy
        layer._gradient_checkpointing_func = offloading_checkpoint


def checkpoint_offload_host_copy(hf_model):
    """The host copy ``offload_checkpointed_inputs`` installed on the language model's layers, or None."""
    layers = family_for(hf_model.config).text_model(hf_model).layers
    return getattr(layers[0], "_lowmem_host_copy", None) if len(layers) else None


def restore_checkpointed_inputs(hf_model) -> None:
    """Undo ``offload_checkpointed_inputs``: layer inputs are kept on the device again (the self-check's fallback
    when the host round trip is not exact)."""
    for layer in family_for(hf_model.config).text_model(hf_model).layers:
        if hasattr(layer, "_lowmem_checkpoint_func"):
            layer._gradient_checkpointing_func = layer._lowmem_checkpoint_func
            del layer._lowmem_checkpoint_func, layer._lowmem_host_copy


def restore_vision(lm: LoadedModel) -> None:
    """Undo ``offload_vision``: the vision tower's weights live on the device again (the self-check's fallback)."""
    if lm.vision_host is None:
        return
    for p, host in lm.vision_host:
        p.data = host.to(lm.device, copy=True)
    lm.vision_host = None


@contextlib.contextmanager
def vision_on_device(lm):
    """The vision tower's weights on the device for the duration (a no-op when they live there)."""
    if getattr(lm, "vision_host", None) is None:
        yield
        return
    for p, host in lm.vision_host:
        p.data = host.to(lm.device, non_blocking=True, copy=True)
    try:
        yield
    finally:
        for p, host in lm.vision_host:
            p.data = host





def _unpack_cpu_nf4(module, _args) -> None:
    """Forward pre-hook: put a weight that was packed for CPU inference back in the standard NF4 layout."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    w = module.weight
    if getattr(w.quant_state, "packing_format_for_cpu", False):
        w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
        module.quant_state = w.quant_state


def keep_nf4_trainable(model: torch.nn.Module) -> int:
    """Keep every bitsandbytes ``Linear4bit`` in the layout the training path reads; returns how many.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) converts a ``Linear4bit``'s weight in place and for good to
    a packed CPU-inference layout the first time it runs in eval mode on an input without grad (our rollout,
    reference pass and evaluation all do). The training path cannot read that layout (it fails in
    ``matmul_4bit``), and CPUs without the instruction never convert, so results would depend on the CPU.
    The conversion is switched off, and a pre-hook undoes one made elsewhere before the layer runs.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            if module.weight.device.type == "cpu":  # only CPU weights are ever packed
                module.register_forward_pre_hook(_unpack_cpu_nf4)
            n += 1
    return n


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def image_embeddings(lm: LoadedModel, pixel_values: list[torch.Tensor], grids: list[torch.Tensor]) -> list[torch.Tensor]:
    """Vision-tower features of each prompt's images, [levels, tokens_i, H] in the model's dtype (see
    ``families.base``; a prompt's images one after another along the tokens). One tower call for every image."""
    pv = torch.cat(pixel_values).to(lm.device)
    grid = torch.cat(grids).to(lm.device)
    with vision_on_device(lm):
        feats = lm.family.image_features(lm.family.inner_model(lm.hf_model), pv, grid)
    out, at = [], 0
    for g in grids:  # regroup per prompt: its grid has one row per image
        n = g.shape[0]
        out.append((feats[at] if n == 1 else torch.cat(feats[at : at + n], dim=1)).detach())
        at += n
    return out


def sequence_hidden(lm: LoadedModel, batch: SequenceBatch, image_embeds: list[torch.Tensor]) -> torch.Tensor:
    """Final hidden states that predict each completion token: [B, T, H].

    ``batch`` is an inputs.SequenceBatch already on the device; ``image_embeds`` is indexed by its
    ``prompt_rows``. The LM head is applied separately (chunked, see kernels).
    """
    return completion_hidden(lm.family.inner_model(lm.hf_model), batch, image_embeds)


def save_adapter(lm: LoadedModel, path: str | Path) -> None:
    lm.peft_model.save_pretrained(str(path))
