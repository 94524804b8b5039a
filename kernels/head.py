"""The LM head + GRPO loss entry points: backend names, per-GPU launch tables, dispatch.

Backends (``kernels:`` in a recipe):

* ``torch``: the plain-PyTorch reference (``chunked_logprobs_reference`` then ``lowmem_vt.grpo``);
* ``triton_fused_linear``: per chunk of rows two cuBLAS matmuls and one Triton row kernel
  (``fused_linear.py``), the gradient formed in the forward pass;
* ``triton_streaming``: never forms logits; a streaming pass over W forward and, recomputing the logits,
  backward with atomics (``chunked_logprobs.py``, ``grpo_loss.py``);
* ``triton``: whichever Triton head ``TRITON_HEAD`` names; ``auto``: in a run, what the self-check picks
  (``lowmem_vt/selfcheck``: the fastest head that passes against ``torch`` on that GPU, else ``torch``);
  ``resolve_backend`` alone, which measures nothing (pre-flight, the planner), maps it to ``triton`` on CUDA.

Which loss runs where. The paper's loss (``lowmem_vt.grpo.is_paper_loss``: the token-level clipped surrogate +
k3 of grpo / dr_grpo / bnpo / dapo, nothing else of the menu) is fused whole: its d loss / d logp is formed inside
the heads' kernels (``grpo_loss.grpo_token_terms``). Every other configuration of the menu (cispo, sapo, luspo,
vespo, the sequence level, delta, the masks, the sampler correction, the bias-corrected KL) runs the head as a
*log-prob head with a custom backward* (``head_logprobs``) followed by the Triton terms kernel
(``policy_terms.policy_loss``): one program per completion computes every token's loss, its closed-form d loss /
d logp and the stats' terms from the [B, T] log-probs, so torch autograd sees two nodes (the terms op over the
head's op), never the [B, T] loss terms. The sequence level gets each sequence's whole ratio before any token's
gradient because the head's forward produces every token's log-prob first; the terms kernel then loops over each
completion's tokens three times (reduce, per token, the sequence's share), and the head's backward runs after it
with that d loss / d logp. Cost, against the fused paper loss:

* streaming head: none in matmuls (its backward always recomputed the logits tile by tile: 3 streaming passes);
  the terms kernel reads and writes ~90 bytes per token (0.7 MB at 8 x 1024 tokens);
* fused-linear head: the forward saves d logp / d hidden per row ([N, H] fp32, what the fused loss saves as
  dh) from the same 2 matmuls; the backward scales it by d loss / d logp (no matmul). Only a *trained* head
  (dW) pays a recompute: a second chunked pass (2 more matmuls) once d loss / d logp is known. The token-level
  variants are not fused into the row kernel (which would spare that recompute): under LoRA the head is frozen;
* the entropy mask (``top_entropy_quantile < 1``) needs each token's entropy (at the sampling temperature, no
  gradient): both heads compute it in the forward pass that computes the log-sum-exp (``head_logprobs(...,
  with_entropy=True)``; an ``ENTROPY`` constexpr, so the plain passes compile without it). Streaming head: per
  logits tile one more multiply-add and row sum in registers; each vocabulary split's entropy, max and log-sum go to
  a [3, splits, N] fp32 buffer that the finishing kernel merges (the chain rule). Fused-linear head: one multiply-add
  per logit in the row kernel's log-sum-exp loop, which reads the row anyway. No further matmul, kernel launch or
  scratch (tests/test_head_entropy.py counts them; tests/test_head_scratch.py measures the memory); its time only a
  GPU can show. The torch backend's entropy is ``chunked_entropy``, the reference. This replaced a separate
  ``chunked_entropy`` pass over the micro-batch: one more logits matmul and 2.2 GiB at V 151,936 (W's fp32 copy and
  fp32 [rows, V] temporaries, simulated), past the 0.25 GiB budget it was said to keep. The mask's threshold, a
  quantile over the micro-batch's tokens, is taken in torch and enters the terms kernel as a 0/1 token weight.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lowmem_vt.grpo import (
    LOSS_TYPES,
    NO_CORRECTION,
    PAPER,
    LossCounts,
    LossVariant,
    SamplerCorrection,
    aggregation_weights,
    grpo_loss,
    is_paper_loss,
    loss_stats,
)

from .chunked_logprobs import (
    BACKWARD_TILES,
    FORWARD_TILES,
    Tiles,
    _prepare,
    chunked_entropy,
    chunked_logprobs_reference,
    streaming_logprobs_op,
)
from .fused_linear import ROW_TILES, RowTiles, fused_linear_grpo_loss_op, fused_linear_logprobs_op, rows_per_chunk
from .grpo_loss import streaming_grpo_loss_op
from .policy_terms import policy_loss

BACKENDS = ("auto", "triton", "triton_fused_linear", "triton_streaming", "torch")
TRITON_BACKENDS = ("triton", "triton_fused_linear", "triton_streaming")

# The Triton head behind "triton" (and the one the planner assumes for "auto", where the self-check times both
# heads on the user's GPU and takes the faster that passes). Chosen on design, not on timing: no GPU has timed
# either head yet. The fused-linear head does 2 matmuls (~6.2 TFLOP at N = 8192, V = 151,936, H = 1536) where the
# streaming head does 3 plus ~1.2e10 fp32 atomic adds; bench/loss_head.py times both (fwd and bwd apart)
# and this line should then name the faster, with the figures beside it.
TRITON_HEAD = "triton_fused_linear"


# ----------------------------------------------------------------------------------------------------
# launch tables per architecture
# ----------------------------------------------------------------------------------------------------

# compute capability -> (GPUs, shared memory per block in bytes, the opt-in maximum)
ARCHS: dict[int, tuple[str, int]] = {
    75: ("T4", 64 * 1024),
    80: ("A100", 163 * 1024),
    86: ("RTX 3090", 99 * 1024),
    89: ("RTX 4090, L4", 99 * 1024),
    90: ("H100", 227 * 1024),
}


@dataclass(frozen=True)
class LaunchConfig:
    """Tiles of every kernel for one (architecture, dtype): streaming forward / backward, fused-linear rows."""

    forward: Tiles
    backward: Tiles
    rows: RowTiles


# Chosen on CPU by compiling candidates for each target (tests/test_kernel_resources.py compiles every entry
# for its architecture and checks the shared-memory limit; bench/RESULTS.md lists registers and spills):
# the largest tiles that fit with no or little spilling. Not timed. fp32 inputs (tl.dot in exact fp32)
# take twice the operand bytes. On sm_75 Triton lowers tl.dot to FMAs (no mma instructions in the PTX):
# small tiles, and the fused-linear head (cuBLAS matmuls on tensor cores) is the one to use there.
_WIDE = Tiles(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=3)
_WIDE_FP32 = Tiles(block_n=64, block_v=128, block_h=32, num_warps=8, num_stages=3)
_MID = Tiles(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=2)
_MID_FP32 = Tiles(block_n=64, block_v=128, block_h=32, num_warps=8, num_stages=2)
_TURING = Tiles(block_n=32, block_v=64, block_h=32, num_warps=4, num_stages=2)
_LAUNCH_TABLE: dict[tuple[int, bool], LaunchConfig] = {
    # (capability, fp32 inputs) -> config
    (90, False): LaunchConfig(_WIDE, _WIDE, ROW_TILES),
    (90, True): LaunchConfig(_WIDE_FP32, _WIDE_FP32, ROW_TILES),
    (80, False): LaunchConfig(_WIDE, _WIDE, ROW_TILES),
    (80, True): LaunchConfig(_WIDE_FP32, _WIDE_FP32, ROW_TILES),
    (86, False): LaunchConfig(_MID, _MID, ROW_TILES),
    (86, True): LaunchConfig(_MID_FP32, _MID_FP32, ROW_TILES),
    (89, False): LaunchConfig(_MID, _MID, ROW_TILES),
    (89, True): LaunchConfig(_MID_FP32, _MID_FP32, ROW_TILES),
    (75, False): LaunchConfig(_TURING, _TURING, ROW_TILES),
    (75, True): LaunchConfig(_TURING, _TURING, ROW_TILES),
}


def launch_config(cap: int, dtype: torch.dtype) -> LaunchConfig:
    """The tiles for compute capability ``cap`` (e.g. 90) and inputs of ``dtype``. Architectures not in
    ARCHS take the table of the largest listed one below them whose shared memory they surely have (an
    unknown newer GPU: the 99 KB tables)."""
    if cap not in ARCHS:
        cap = 75 if cap < 80 else 80 if cap < 86 else 86
    return _LAUNCH_TABLE[(cap, dtype == torch.float32)]


def _device_launch_config(weight: torch.Tensor) -> LaunchConfig:
    if weight.device.type != "cuda":  # the interpreter (tests) or fake tensors: the package defaults
        return LaunchConfig(FORWARD_TILES, BACKWARD_TILES, ROW_TILES)
    major, minor = torch.cuda.get_device_capability(weight.device)
    return launch_config(10 * major + minor, weight.dtype)


# ----------------------------------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------------------------------


def resolve_backend(name: str, device: torch.device) -> str:
    """"auto" -> "triton" on CUDA, "torch" elsewhere. Triton backends off CUDA only under TRITON_INTERPRET=1 (tests)."""
    device = torch.device(device)
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {BACKENDS}")
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name in TRITON_BACKENDS and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend {name!r} needs a CUDA device, got {device}; use 'torch' or 'auto' there, or set "
            "TRITON_INTERPRET=1 (before triton is imported) to run the kernels in the slow Triton interpreter"
        )
    return name


def _triton_head(backend: str) -> str:
    head = TRITON_HEAD if backend == "triton" else backend
    if head not in ("triton_fused_linear", "triton_streaming", "torch"):
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS[1:]}")
    return head


@torch.no_grad()
def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    backend: str = "triton",
    *,
    forward_tiles: Tiles | None = None,
    row_tiles: RowTiles | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per-token log-probs without gradient, for the reference-model pass and the old-policy log-probs.

    hidden: [B, T, H]; weight: [V, H]; targets: [B, T] long in [0, V). Returns [B, T] float32. Tiles and
    chunk_rows default to the launch table's choice for the device and dtype (``launch_config``; on CPU the package defaults).
    """
    B, T, H = hidden.shape
    flat_hidden = hidden.reshape(B * T, H)
    flat_targets = targets.reshape(B * T)
    head = _triton_head(backend)
    if head == "torch":
        logp = chunked_logprobs_reference(flat_hidden, weight, flat_targets, temperature)
        return logp.float().view(B, T)
    flat_hidden, flat_targets = _prepare(flat_hidden, weight, flat_targets)
    config = _device_launch_config(weight)
    if head == "triton_streaming":
        tiles = (forward_tiles or config.forward).as_list()
        logp, _, _ = streaming_logprobs_op(flat_hidden, weight, flat_targets, float(temperature), tiles, tiles)
    else:
        logp, _, _, _ = fused_linear_logprobs_op(
            flat_hidden, weight, flat_targets, float(temperature),
            chunk_rows or rows_per_chunk(weight.shape[0]), (row_tiles or config.rows).as_list(),
        )
    return logp.view(B, T)


class _FusedLinearLogprobs(torch.autograd.Function):
    """(logp [N], entropy [N] or [0]) of the fused-linear head, logp differentiable in hidden (and in weight, by a
    recompute pass); the entropy is not (it selects tokens).

    The forward is ``fused_linear_logprobs_op`` on the active rows with dh: d logp / d hidden per row ([N, H] fp32,
    saved) and, with ``with_entropy``, each row's entropy from the row kernel's log-sum-exp pass. The backward scales
    dh by the incoming d loss / d logp; dW, which sums over rows after the per-row factor, runs
    ``fused_linear_grpo_loss_op`` once more as a log-prob head: one "token" per row, advantage -grad and weight 1 on
    the active rows, so that its per-row d loss / d logp is grad.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, active, temperature, chunk_rows, tiles, with_entropy):
        logp, _lse, entropy, dh_unit = fused_linear_logprobs_op(
            hidden, weight, targets, temperature, chunk_rows, tiles, active, with_entropy, ctx.needs_input_grad[0],
        )
        ctx.save_for_backward(hidden, weight, targets, active, dh_unit)
        ctx.settings = (temperature, chunk_rows, tiles)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, targets, active, dh_unit = ctx.saved_tensors
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = (dh_unit * grad_logp.float().unsqueeze(1)).to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            temperature, chunk_rows, tiles = ctx.settings
            _, _, _, _, _, dw = fused_linear_grpo_loss_op(
                hidden, weight, targets, -grad_logp.float().contiguous(), None, None, active, 1, 0.0, 0.5, 2.0,
                temperature, chunk_rows, tiles, False, True,
            )
            grad_w = dw.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    backend: str = "triton",
    *,
    with_entropy: bool = False,
    forward_tiles: Tiles | None = None,
    backward_tiles: Tiles | None = None,
    row_tiles: RowTiles | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs differentiable in hidden and weight, by the named head, and optionally each token's entropy.

    hidden: [B, T, H]; weight: [V, H]; targets, mask: [B, T]. Returns (logp [B, T] float32, entropy [B, T] float32
    (nats, at ``temperature``, no gradient) or None). The Triton heads compute the entropy in their forward pass
    (no further matmul); the torch backend by ``chunked_entropy``, the reference. The fused-linear head skips rows
    whose mask is 0 (their logp and entropy are 0); see the module docstring for what each head costs here.
    """
    B, T, H = hidden.shape
    head = _triton_head(backend)
    flat_hidden, flat_targets = hidden.reshape(B * T, H), targets.reshape(B * T)
    entropy = None
    if head == "torch":
        logp = chunked_logprobs_reference(flat_hidden, weight, flat_targets, temperature)
        if with_entropy:
            entropy = chunked_entropy(flat_hidden, weight, temperature).view(B, T)
        return logp.view(B, T), entropy
    flat_hidden, flat_targets = _prepare(flat_hidden, weight, flat_targets)
    config = _device_launch_config(weight)
    if head == "triton_streaming":
        logp, _, entropy = streaming_logprobs_op(flat_hidden, weight, flat_targets, float(temperature),
                                                 (forward_tiles or config.forward).as_list(),
                                                 (backward_tiles or config.backward).as_list(), with_entropy)
    else:
        active = (mask.reshape(B * T) != 0).float().contiguous()
        logp, entropy = _FusedLinearLogprobs.apply(flat_hidden, weight, flat_targets, active, float(temperature),
                                                   chunk_rows or rows_per_chunk(weight.shape[0]),
                                                   (row_tiles or config.rows).as_list(), with_entropy)
    return logp.view(B, T), (entropy.view(B, T) if with_entropy else None)


def fused_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    *,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    loss_type: str,
    counts: LossCounts,
    temperature: float = 1.0,
    backend: str = "triton",
    variant: LossVariant = PAPER,
    correction: SamplerCorrection = NO_CORRECTION,
    sampling_logp: torch.Tensor | None = None,
    forward_tiles: Tiles | None = None,
    backward_tiles: Tiles | None = None,
    row_tiles: RowTiles | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """This micro-batch's share of the GRPO loss, computed from hidden states and the LM head.

    hidden: [B, T, H] (cast to weight's dtype); weight: [V, H]; targets: [B, T] long in [0, V), the sampled
    tokens; mask: [B, T] float; advantages: [B]; old_logp, ref_logp: [B, T] float32 or None (None old_logp:
    one update per rollout, ratio exp(logp - logp.detach())). Same meaning of beta, epsilon_low/high,
    loss_type, counts, variant, correction and sampling_logp ([B, T]) as ``lowmem_vt.grpo.grpo_loss``.

    Returns (loss: scalar fp32 tensor differentiable in hidden and weight, stats: the dict of 0-dim tensors of
    ``lowmem_vt.grpo.grpo_loss``, logp: [B, T] float32 detached; the fused-linear head leaves it 0 on padded
    tokens, which it skips). forward/backward_tiles (streaming head), row_tiles and chunk_rows (fused-linear
    head) default to the launch table's choice (``launch_config``; on CPU the package defaults). The paper's loss
    runs fused in the kernels, the rest of the menu through ``head_logprobs`` and the terms kernel (module docstring).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    B, T, H = hidden.shape
    for name, x in (("targets", targets), ("mask", mask), ("old_logp", old_logp), ("ref_logp", ref_logp),
                    ("sampling_logp", sampling_logp)):
        if x is not None and tuple(x.shape) != (B, T):
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected [B, T] = {[B, T]} like hidden {tuple(hidden.shape)}")
    if tuple(advantages.shape) != (B,):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}; expected [B] = [{B}]")
    head = _triton_head(backend)
    if head == "torch" or not is_paper_loss(loss_type, variant, correction):
        logp, entropy = head_logprobs(hidden, weight, targets, mask, temperature, head, with_entropy=variant.needs_entropy,
                                      forward_tiles=forward_tiles, backward_tiles=backward_tiles, row_tiles=row_tiles,
                                      chunk_rows=chunk_rows)
        # torch: the reference itself; a Triton head: the same loss by the terms kernel, no autograd over [B, T]
        loss_fn = grpo_loss if head == "torch" else policy_loss
        loss, stats = loss_fn(
            logp, mask, advantages, old_logp, ref_logp,
            beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high, loss_type=loss_type, counts=counts,
            variant=variant, correction=correction, sampling_logp=sampling_logp, entropy=entropy,
        )
        return loss, stats, logp.detach()

    flat_hidden, flat_targets = _prepare(hidden.reshape(B * T, H), weight, targets.reshape(B * T))
    weights = aggregation_weights(mask, loss_type, counts).float().reshape(B * T).contiguous()

    def flat(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.detach().float().reshape(B * T).contiguous()

    common = (
        flat_hidden, weight, flat_targets, advantages.detach().float().contiguous(), flat(old_logp), flat(ref_logp),
        weights, T, float(beta), 1.0 - float(epsilon_low), 1.0 + float(epsilon_high), float(temperature),
    )
    config = _device_launch_config(weight)
    if head == "triton_streaming":
        loss, logp, k3, clipped, _lse, _dlogp = streaming_grpo_loss_op(
            *common, (forward_tiles or config.forward).as_list(), (backward_tiles or config.backward).as_list(),
        )
    else:
        grad_on = torch.is_grad_enabled()
        loss, logp, k3, clipped, _dh, _dw = fused_linear_grpo_loss_op(
            *common, chunk_rows or rows_per_chunk(weight.shape[0]), (row_tiles or config.rows).as_list(),
            grad_on and flat_hidden.requires_grad, grad_on and weight.requires_grad,
        )
    return loss, loss_stats(k3.view(B, T), clipped.view(B, T), mask), logp.view(B, T)
