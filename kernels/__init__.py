"""Triton kernels for the LM head + GRPO loss, each beside its PyTorch reference and autograd wrapper.

``chunked_logprobs`` / ``token_logprobs``: log-probs of chosen tokens from hidden states without the
[N, V] logits. ``fused_grpo_loss``: the GRPO + KL loss of ``lowmem_vt.grpo`` computed in the same passes.
Every entry point takes ``backend="triton" | "torch"``; ``resolve_backend`` turns a config's "auto" into one.

The Triton launches sit behind torch custom ops (``torch.ops.lowmem_vt.*``) with fake implementations, so
the loss head runs under ``FakeTensorMode`` (memory simulation: shapes only, nothing launched) and inside
``torch.compile`` graphs.
"""

from __future__ import annotations

import os

import torch

from .chunked_logprobs import (
    BACKWARD_TILES,
    FORWARD_TILES,
    Tiles,
    check_targets,
    chunked_logprobs,
    chunked_logprobs_reference,
    token_logprobs,
)
from .grpo_loss import fused_grpo_loss

BACKENDS = ("auto", "triton", "torch")


def resolve_backend(name: str, device: torch.device) -> str:
    """"auto" -> "triton" on CUDA, "torch" elsewhere. "triton" off CUDA only under TRITON_INTERPRET=1 (tests)."""
    device = torch.device(device)
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {BACKENDS}")
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend 'triton' needs a CUDA device, got {device}; use 'torch' or 'auto' there, or set "
            "TRITON_INTERPRET=1 (before triton is imported) to run the kernels in the slow Triton interpreter"
        )
    return name


__all__ = [
    "BACKENDS",
    "BACKWARD_TILES",
    "FORWARD_TILES",
    "Tiles",
    "check_targets",
    "chunked_logprobs",
    "chunked_logprobs_reference",
    "fused_grpo_loss",
    "resolve_backend",
    "token_logprobs",
]
