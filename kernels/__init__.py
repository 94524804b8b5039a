"""Triton kernels for the LM head + GRPO loss, each beside its PyTorch reference.

``fused_grpo_loss``: the GRPO + KL loss of ``lowmem_vt.grpo`` straight from hidden states and the LM head;
``token_logprobs``: log-probs of chosen tokens without gradient (reference / old-policy passes);
``chunked_logprobs``: differentiable log-probs without the [N, V] logits (streaming kernels).
Two Triton heads (``head.py`` names them and picks one for ``triton`` / ``auto``): ``fused_linear.py``
(two matmuls per row chunk, gradient formed in the forward) and the streaming ``chunked_logprobs.py`` +
``grpo_loss.py``. ``resolve_backend`` turns a config's ``kernels:`` into a backend.

The Triton launches sit behind torch custom ops (``torch.ops.lowmem_vt.*``) with fake implementations, so
the loss head runs under ``FakeTensorMode`` (memory simulation: shapes only, nothing launched) and inside
``torch.compile`` graphs.
"""

from __future__ import annotations

from .chunked_logprobs import (
    BACKWARD_TILES,
    FORWARD_TILES,
    Tiles,
    check_targets,
    chunked_logprobs,
    chunked_logprobs_reference,
)
from .fused_linear import ROW_TILES, SCRATCH_BYTES, RowTiles, rows_per_chunk
from .head import (
    ARCHS,
    BACKENDS,
    TRITON_HEAD,
    LaunchConfig,
    aggregation_weights,
    fits,
    fused_grpo_loss,
    launch_config,
    resolve_backend,
    token_logprobs,
)

__all__ = [
    "ARCHS",
    "BACKENDS",
    "BACKWARD_TILES",
    "FORWARD_TILES",
    "ROW_TILES",
    "SCRATCH_BYTES",
    "TRITON_HEAD",
    "LaunchConfig",
    "RowTiles",
    "Tiles",
    "aggregation_weights",
    "check_targets",
    "chunked_logprobs",
    "chunked_logprobs_reference",
    "fits",
    "fused_grpo_loss",
    "launch_config",
    "resolve_backend",
    "rows_per_chunk",
    "token_logprobs",
]
