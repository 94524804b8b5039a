"""The levers' check: what ``model.load_model`` switched on, and the dtype, each against its reference.

* vision-tower offload (``model.offload_vision``): every weight copied in from host memory as
  ``image_embeddings`` does (``model.vision_on_device``) equals its host copy bit for bit;
* checkpointed-input offload (``model.offload_checkpointed_inputs``): a layer input of the model's hidden size
  and dtype, sent through the installed host copy (pinned memory, side stream on CUDA) and read back as the
  backward's recompute does, equals the original bit for bit;
* NF4 (``model.quantization: nf4``): one 4-bit linear of the model against its dequantized weight;
* float16 (``model.dtype: float16``): the model's forward on prompts of the run's own data gives finite
  hidden states and logits (Qwen2-VL is known to overflow fp16: transformers #33294).

A failed offload is undone (``LEVER_UNDO``: the run goes on without it, using more GPU memory); NF4 and fp16
cannot be undone without reloading, so they stop the run (``LEVER_KEYS`` names the recipe key to change).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..inputs import build_sequences
from ..model import (
    _OffloadedInput,
    checkpoint_offload_host_copy,
    restore_checkpointed_inputs,
    restore_vision,
    sequence_hidden,
    vision_on_device,
)
from .head import _one_line
from .report import PathResult

VISION, CHECKPOINT, NF4, FP16 = "vision-tower offload", "checkpointed-input offload", "nf4 linear", "fp16 finite logits"
NF4_TOLERANCE = 2e-2  # max |y - x @ dequant(W).T| / max |.|: the two differ only by 16-bit rounding of the output
LEVER_KEYS = {NF4: ("model.quantization", "set model.quantization: none (bf16 weights, ~1.1 GiB more for the 2B model)"),
              FP16: ("model.dtype", "use model.dtype: bfloat16 on a GPU of compute capability >= 8.0, or float32")}


def _nf4_module(model):
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    return next((m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)), None)


def applicable(lm) -> list[str]:
    """The levers and dtype checks that apply to this loaded model."""
    names = []
    if getattr(lm, "vision_host", None) is not None:
        names.append(VISION)
    if checkpoint_offload_host_copy(lm.hf_model) is not None:
        names.append(CHECKPOINT)
    if _nf4_module(lm.hf_model) is not None:
        names.append(NF4)
    if lm.lm_head_weight.dtype == torch.float16:
        names.append(FP16)
    return names


def _vision(lm) -> PathResult:
    p = PathResult("levers", VISION)
    t0 = time.perf_counter()
    differ, total = [], 0
    with torch.no_grad(), vision_on_device(lm):
        for i, (param, host) in enumerate(lm.vision_host):
            total += host.numel() * host.element_size()
            if not torch.equal(param.data.to("cpu"), host.to("cpu")):
                differ.append(i)
    p.figures = {"weights_gib": total / 2**30, "seconds": time.perf_counter() - t0}
    p.ok = not differ
    if differ:
        p.reason = f"{len(differ)} of {len(lm.vision_host)} vision weights differ after the copy from host memory"
    return p


def _checkpoint(lm) -> PathResult:
    p = PathResult("levers", CHECKPOINT)
    host_copy = checkpoint_offload_host_copy(lm.hf_model)
    H = lm.config.text_config.hidden_size
    g = torch.Generator(device=lm.device).manual_seed(0)
    hidden = torch.randn(1, 256, H, device=lm.device, generator=g).to(lm.lm_head_weight.dtype)
    original = hidden.clone()
    t0 = time.perf_counter()
    handle = _OffloadedInput(hidden, host_copy)
    first = handle.get()
    back = handle.get()
    p.figures = {"tokens": 256, "seconds": time.perf_counter() - t0}
    p.ok = first is hidden and torch.equal(back, original) and back.device == original.device
    if not p.ok:
        p.reason = "a layer input read back from host memory differs from what was sent"
    return p


def _nf4(lm) -> PathResult:
    from bitsandbytes.functional import dequantize_4bit

    p = PathResult("levers", NF4)
    module = _nf4_module(lm.hf_model)
    dtype = getattr(module, "compute_dtype", None) or lm.lm_head_weight.dtype
    dev = module.weight.device
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(8, module.in_features, device=dev, generator=g).to(dtype)
    with torch.no_grad():
        y = module(x).float()  # first: on CPU a pre-hook restores the standard layout (model.keep_nf4_trainable)
        w = dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype)
        ref = F.linear(x, w, None if module.bias is None else module.bias.to(dtype)).float()
    err = float((y - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
    p.figures = {"shape": f"{module.out_features}x{module.in_features}", "dtype": str(dtype).replace("torch.", ""),
                 "rel_error": err, "tolerance": NF4_TOLERANCE}
    p.ok = bool(torch.isfinite(y).all()) and err <= NF4_TOLERANCE
    if not p.ok:
        p.reason = f"a 4-bit linear differs from its dequantized weight by {err:.3g} (> {NF4_TOLERANCE:g}) relative"
    return p


def _fp16(lm, prompts, embeds) -> PathResult:
    p = PathResult("levers", FP16)
    n = len(prompts)
    completion = torch.full((n, 4), lm.eos_token_id, dtype=torch.long)
    seqs = build_sequences(prompts, list(range(n)), completion, torch.ones(n, 4), lm.pad_token_id).to(lm.device)
    with torch.no_grad():
        hidden = sequence_hidden(lm, seqs, embeds)
        logits = hidden.float() @ lm.lm_head_weight.float().T
    finite = bool(torch.isfinite(hidden).all()) and bool(torch.isfinite(logits).all())
    largest = float(hidden.float().abs().nan_to_num(nan=float("inf")).max())
    p.figures = {"prompts": n, "max_abs_hidden": largest}
    p.ok = finite
    if not finite:
        p.reason = (f"the model's forward on {n} prompts of the run's data gives non-finite hidden states or logits in "
                    "float16 (Qwen2-VL overflows fp16: transformers #33294)")
    return p


CHECKS = {VISION: _vision, CHECKPOINT: _checkpoint, NF4: _nf4}


def check_levers(lm, names: list[str], prompts=None, embeds=None) -> list[PathResult]:
    results = []
    for name in names:
        try:
            if name == FP16:
                if not prompts:
                    results.append(PathResult("levers", name, ok=None, reason="no prompt of the run's data could be encoded"))
                    continue
                results.append(_fp16(lm, prompts, embeds))
            else:
                results.append(CHECKS[name](lm))
        except Exception as exc:  # noqa: BLE001
            results.append(PathResult("levers", name, ok=False, reason=f"raised {type(exc).__name__}: {_one_line(exc)}"))
    return results


def _undo_vision(lm) -> str:
    gib = sum(h.numel() * h.element_size() for _, h in lm.vision_host) / 2**30
    restore_vision(lm)
    return f"the vision tower's weights stay on the device instead (+{gib:.2f} GiB)"


def _undo_checkpoint(lm) -> str:
    restore_checkpointed_inputs(lm.hf_model)
    return "checkpointed layer inputs stay on the device instead (more memory in the policy update)"


LEVER_UNDO = {VISION: _undo_vision, CHECKPOINT: _undo_checkpoint}
