"""GRPO loss head at the FLOP floor: per chunk of rows, two matmuls and one Triton row kernel.

The GRPO loss is the end of the graph, so its gradient with respect to the logits is closed-form and is
formed in the forward pass, chunk of rows by chunk of rows, as fused linear cross-entropy does:

1. ``logits = h_chunk @ W.T`` in fp32 (one cuBLAS matmul with fp32 output, into a scratch buffer);
2. one program per row streams its logits twice: log-sum-exp and the target logit, then the row's GRPO
   loss and d loss / d logp (``lowmem_vt.grpo``'s math: ``grpo_loss.grpo_token_terms``), then
   ``(onehot - softmax) / temperature`` written in W's dtype *over the row's own fp32 logits* (element v
   of the narrower dtype lies in bytes already read, so the scratch is one [rows, V] fp32 buffer);
3. ``dh_chunk = dlogp * (dlogits @ W)``: a second matmul, scaled per row in fp32 afterwards, so that fp16
   never holds the tiny products of the aggregation weight and the probabilities.

Two matmuls (2 x 2·N·V·H FLOP, the floor: the forward needs the logits, the backward dh), no
recomputation, no atomics, and deterministic. Rows whose aggregation weight is zero (completion padding)
are dropped before the first matmul. The scratch is at most ``SCRATCH_BYTES`` at any N: the number of rows
per chunk comes from that budget. dh (and dW when the head is trained) are held in fp32 from the forward
to the backward, which only scales them by the incoming gradient (the loss scale under fp16).

The reference-model pass (``fused_linear_logprobs``) runs step 1 and the first half of step 2 only.

The rest of the loss menu (``lowmem_vt.grpo``: cispo, sapo, luspo, vespo, the sequence level, the masks, the
sampler correction) runs ``fused_linear_logprobs`` as a log-prob head (``head._FusedLinearLogprobs``): steps 1-3
without the loss terms (the row kernel's ``DLOGITS`` alone), so its dh is d logp / d hidden; the terms kernel
(``policy_terms.py``) then computes the loss and d loss / d logp from the [B, T] log-probs and the backward scales
that dh by d loss / d logp (no matmul), a trained head's dW by a second pass of the GRPO op once d loss / d logp is
known. The sequence level's whole-sequence ratio is therefore formed after the forward pass, from every token's logp.
With ``with_entropy`` the row kernel's log-sum-exp loop also sums exp(z - max) * (z - max) (``ENTROPY``: one
multiply-add per logit in a loop bound by reading the row) and stores each row's entropy: no further matmul, no
further scratch.

Scratch (``SCRATCH_BYTES`` = 0.25 GiB, the same on both paths): 432 rows x V 151,936 (Qwen2-VL, 0.245 GiB), 256
rows x 248,320 (0.237 GiB), 256 rows x 262,144 (0.250 GiB); tests/test_kernels.py checks the three.

Memory beyond the outputs: the scratch (``rows_per_chunk(V) x V`` fp32, <= SCRATCH_BYTES) and [rows, H]
temporaries, freed on return. Allocations inside a custom op are invisible to a memory tracker running on
fake tensors (``torch.distributed._tools.mem_tracker.MemTracker`` sees only the outputs), so a simulated
peak must add SCRATCH_BYTES for this head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .chunked_logprobs import _online_entropy_step, check_shapes, check_targets, dlogits_scale
from .grpo_loss import grpo_token_terms

# Scratch for one chunk's fp32 logits (the bf16 / fp16 dlogits are written over them): 0.25 GiB gives
# 432 rows per chunk at Qwen2-VL's V = 151,936, each chunk two matmuls of ~0.2 TFLOP.
SCRATCH_BYTES = 2**28
ROW_ALIGN = 16  # rows per chunk rounded down to a multiple of this (tensor-core friendly matmul shapes)


@dataclass(frozen=True)
class RowTiles:
    """Launch shape of the row kernel: vocabulary columns per step and warps per row."""

    block_v: int = 2048
    num_warps: int = 8

    def as_list(self) -> list[int]:
        return [self.block_v, self.num_warps]

    @classmethod
    def from_list(cls, values: list[int]) -> "RowTiles":
        return cls(*values)


ROW_TILES = RowTiles()


def rows_per_chunk(vocab_size: int, scratch_bytes: int = SCRATCH_BYTES) -> int:
    """Rows of fp32 logits that fit ``scratch_bytes``, a multiple of ROW_ALIGN (at least ROW_ALIGN)."""
    rows = scratch_bytes // (4 * vocab_size)
    return max(ROW_ALIGN, rows // ROW_ALIGN * ROW_ALIGN)


# ----------------------------------------------------------------------------------------------------
# Triton row kernel
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _grpo_rows_kernel(
    logits_ptr, dlogits_ptr, targets_ptr, adv_ptr, old_logp_ptr, ref_logp_ptr, weights_ptr,
    lse_ptr, logp_ptr, loss_ptr, dlogp_ptr, k3_ptr, clipped_ptr, entropy_ptr,
    V, stride_logits, stride_dlogits, inv_temperature, dlogits_scale, beta, ratio_low, ratio_high,
    GRPO: tl.constexpr, HAS_OLD: tl.constexpr, HAS_KL: tl.constexpr, BLOCK_V: tl.constexpr,
    DLOGITS: tl.constexpr, ENTROPY: tl.constexpr,
):
    """One program per row of a chunk of fp32 logits [rows, V] (raw h @ W.T; the temperature is applied here).

    Always: lse and logp of the row's target. ENTROPY: the row's entropy (nats) from the same pass as the lse
    (``chunked_logprobs._online_entropy_step``). GRPO: the weighted loss, weighted d loss / d logp, k3, clip flag.
    DLOGITS (with GRPO, or alone for the log-prob head): dlogits = (onehot(target) - softmax) / temperature *
    dlogits_scale in dlogits_ptr's dtype (see ``dlogits_scale``), written over
    the same row (dlogits_ptr aliases logits_ptr: element v of dlogits ends at byte (v + 1) * size <= 4 v + 4,
    inside the fp32 elements already read, and later loads start past it). All other rows are [rows] fp32.
    """
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_V)
    logits_row = logits_ptr + row.to(tl.int64) * stride_logits
    target = tl.load(targets_ptr + row)

    running_max = float("-inf")
    running_sum = 0.0
    running_dot = 0.0  # ENTROPY: sum of exp(z - max) * (z - max)
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(logits_row + v0 + offs, mask=offs < V - v0, other=float("-inf")) * inv_temperature
        # every block holds at least one real column, so new_max is finite and exp(-inf - finite) = 0
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        exps = tl.exp(x - new_max)
        if ENTROPY:
            running_dot = _online_entropy_step(running_max, running_sum, running_dot, new_max,
                                               tl.sum(exps * tl.where(exps > 0.0, x - new_max, 0.0), axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(exps, axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    logp = tl.load(logits_row + target) * inv_temperature - lse
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, logp)
    if ENTROPY:
        tl.store(entropy_ptr + row, tl.log(running_sum) - running_dot / running_sum)

    if GRPO:
        # rows reach this kernel only with a nonzero aggregation weight (padding is dropped on the host)
        w = tl.load(weights_ptr + row)
        adv = tl.load(adv_ptr + row)
        old_logp = logp
        if HAS_OLD:
            old_logp = tl.load(old_logp_ptr + row)
        ref_logp = logp
        if HAS_KL:
            ref_logp = tl.load(ref_logp_ptr + row)
        loss, dloss, k3, is_clipped = grpo_token_terms(logp, old_logp, ref_logp, adv, w, beta, ratio_low, ratio_high,
                                                       HAS_OLD, HAS_KL)
        tl.store(loss_ptr + row, loss)
        tl.store(dlogp_ptr + row, dloss)
        if HAS_KL:
            tl.store(k3_ptr + row, k3)
        tl.store(clipped_ptr + row, is_clipped.to(tl.float32))

    if DLOGITS:
        # dlogits (bf16 / fp16: 2 bytes) is written over this row's fp32 logits (4 bytes), which other warps of
        # this program read: block j's store covers bytes [2 j B, 2 (j + 1) B), the fp32 columns [j B / 2,
        # (j + 1) B / 2) that block floor(j / 2) loads (B = BLOCK_V). Loop 1 synchronises every block (its
        # reductions), this loop has none, so without a barrier a warp could store block j before another warp
        # has loaded block floor(j / 2) (the same block when j = 0). The barrier between each block's loads and
        # its stores makes every warp load block j before any warp stores block j, and so, since floor(j / 2) <= j,
        # before any store overlaps what it reads: race-free for every BLOCK_V, num_warps and dtype, at the cost of
        # one bar.sync per block. (With a 4-byte dlogits each element would land on its own bytes; it is 2.)
        dlogits_row = dlogits_ptr + row.to(tl.int64) * stride_dlogits
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            col_mask = offs < V - v0
            x = tl.load(logits_row + cols, mask=col_mask, other=0.0) * inv_temperature
            unit = (tl.where(cols == target, 1.0, 0.0) - tl.exp(x - lse)) * (inv_temperature * dlogits_scale)
            tl.debug_barrier()
            tl.store(dlogits_row + cols, unit.to(dlogits_ptr.dtype.element_ty), mask=col_mask)


# ----------------------------------------------------------------------------------------------------
# chunk loop
# ----------------------------------------------------------------------------------------------------


def _mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b in fp32: cuBLAS with fp32 output (fp32 accumulation) for 16-bit inputs on CUDA."""
    if a.dtype != torch.float32 and a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)


def _logits_into(out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out[:rows] = h @ weight.T in fp32."""
    return _mm_fp32(h, weight.T, out=out)


def _dlogits_view(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[rows, V] view in ``dtype`` of the first bytes of each fp32 logits row (see the row kernel)."""
    V = logits.shape[1]
    return logits.view(dtype)[:, :V]


def _addmm_fp32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> None:
    """out += (a @ b) * factor, out fp32 and a, b 16-bit or fp32, in row slices of out within SCRATCH_BYTES."""
    step = max(1, SCRATCH_BYTES // (4 * out.shape[1]))
    for r0 in range(0, out.shape[0], step):
        out[r0 : r0 + step] += _mm_fp32(a[r0 : r0 + step], b) * factor


def _launch_rows(logits, dlogits, targets, adv, old_logp, ref_logp, weights, outs, temperature, beta, ratio_low,
                 ratio_high, grpo: bool, tiles: RowTiles, write_dlogits: bool | None = None, entropy: torch.Tensor | None = None):
    """The row kernel over one chunk; dlogits written with the GRPO terms unless ``write_dlogits`` says otherwise;
    each row's entropy into ``entropy`` when given."""
    lse, logp, loss, dlogp, k3, clipped = outs
    rows, V = logits.shape
    has_kl = grpo and ref_logp is not None and beta != 0.0
    _grpo_rows_kernel[(rows,)](
        logits, dlogits, targets, adv, old_logp if old_logp is not None else lse, ref_logp if has_kl else lse, weights,
        lse, logp, loss, dlogp, k3, clipped, lse if entropy is None else entropy,
        V, logits.stride(0), dlogits.stride(0), 1.0 / temperature, dlogits_scale(dlogits.dtype), float(beta), ratio_low, ratio_high,
        GRPO=grpo, HAS_OLD=old_logp is not None, HAS_KL=has_kl, BLOCK_V=tiles.block_v,
        DLOGITS=grpo if write_dlogits is None else write_dlogits, ENTROPY=entropy is not None, num_warps=tiles.num_warps,
    )


# ----------------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("lowmem_vt::fused_linear_logprobs", mutates_args=())
def fused_linear_logprobs_op(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float, chunk_rows: int, tiles: list[int],
    active: torch.Tensor | None = None, with_entropy: bool = False, compute_dh: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs of targets under softmax(hidden @ weight.T / temperature), as the no-grad reference pass and as the
    forward of the differentiable log-prob head (``head._FusedLinearLogprobs``).

    hidden [N, H], weight [V, H] (same dtype), targets [N]; active [N] (0 / 1) or None: rows where it is 0 (the
    completion padding) are skipped, not computed and masked. Returns (logp [N] fp32, lse [N] fp32, entropy [N] fp32
    with ``with_entropy`` else [0], dh [N, H] fp32 = d logp / d hidden with ``compute_dh`` else [0]); 0 on skipped
    rows. The entropy comes from the row kernel's log-sum-exp pass (no further matmul); dh from dlogits written over
    the chunk's logits and one more matmul per chunk (what the GRPO op does for its loss). No autograd of its own.
    """
    check_shapes(hidden, weight, targets)
    check_targets(targets, weight.shape[0])
    N, H = hidden.shape
    V = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    logp, lse = torch.zeros(N, **f32), torch.zeros(N, **f32)
    entropy = torch.zeros(N, **f32) if with_entropy else hidden.new_empty(0, dtype=torch.float32)
    dh = torch.zeros(N, H, **f32) if compute_dh else hidden.new_empty(0, dtype=torch.float32)
    rows = None if active is None else (active != 0).nonzero().squeeze(1)  # host sync: the padding is skipped
    n = N if rows is None else rows.numel()
    if n == 0:
        return logp, lse, entropy, dh
    if rows is None:  # every row: straight into the outputs
        t_rows, lse_rows, logp_rows, entropy_rows = targets, lse, logp, (entropy if with_entropy else None)
    else:  # the active rows: compact [n] vectors, scattered at the end
        t_rows, lse_rows, logp_rows = targets[rows], torch.empty(n, **f32), torch.empty(n, **f32)
        entropy_rows = torch.empty(n, **f32) if with_entropy else None
    scratch = hidden.new_empty(min(chunk_rows, n), V, dtype=torch.float32)
    row_tiles = RowTiles.from_list(tiles)
    for r0 in range(0, n, chunk_rows):
        r1 = min(r0 + chunk_rows, n)
        idx = slice(r0, r1) if rows is None else rows[r0:r1]
        logits = _logits_into(scratch[: r1 - r0], hidden[idx], weight)
        dlogits = _dlogits_view(logits, weight.dtype) if compute_dh else logits
        sl = slice(r0, r1)
        outs = (lse_rows[sl], logp_rows[sl]) + (lse_rows[sl],) * 4  # GRPO outputs unused
        _launch_rows(logits, dlogits, t_rows[sl], lse_rows, None, None, lse_rows, outs, temperature, 0.0, 1.0, 1.0,
                     grpo=False, tiles=row_tiles, write_dlogits=compute_dh,
                     entropy=None if entropy_rows is None else entropy_rows[sl])
        if compute_dh:  # d logp / d hidden = (onehot - softmax) / temperature @ W
            dh[idx] = _mm_fp32(dlogits, weight) * (1.0 / dlogits_scale(dlogits.dtype))
    if rows is not None:
        logp[rows], lse[rows] = logp_rows, lse_rows
        if with_entropy:
            entropy[rows] = entropy_rows
    return logp, lse, entropy, dh


@fused_linear_logprobs_op.register_fake
def _(hidden, weight, targets, temperature, chunk_rows, tiles, active=None, with_entropy=False, compute_dh=False):
    check_shapes(hidden, weight, targets)
    N, H = hidden.shape
    entropy = hidden.new_empty(N if with_entropy else 0, dtype=torch.float32)
    dh = hidden.new_empty((N, H) if compute_dh else (0,), dtype=torch.float32)
    return hidden.new_empty(N, dtype=torch.float32), hidden.new_empty(N, dtype=torch.float32), entropy, dh


@torch.library.custom_op("lowmem_vt::fused_linear_grpo_loss", mutates_args=())
def fused_linear_grpo_loss_op(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor,
    old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None, weights: torch.Tensor, seq_len: int,
    beta: float, ratio_low: float, ratio_high: float, temperature: float,
    chunk_rows: int, tiles: list[int], compute_dh: bool, compute_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Micro-batch GRPO loss and its input gradients in one pass; see the module docstring.

    hidden [N, H], weight [V, H] (same dtype), targets [N]; advantages [N // seq_len] fp32; old_logp,
    ref_logp, weights [N] fp32 (weights from ``aggregation_weights``; rows with weight 0 are skipped).
    Returns (loss [] fp32, logp [N], k3 [N], clipped [N] 0/1, dh [N, H] fp32 or [0], dW [V, H] fp32 or [0]):
    logp, k3 and clipped are 0 on skipped rows; dh, dW are d loss / d hidden, d loss / d weight for an
    incoming gradient of 1. Only the loss is differentiable; its backward scales dh and dW.
    """
    check_shapes(hidden, weight, targets)
    check_targets(targets, weight.shape[0])
    N, H = hidden.shape
    V = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    logp, k3, clipped = (torch.zeros(N, **f32) for _ in range(3))
    dh = torch.zeros(N, H, **f32) if compute_dh else hidden.new_empty(0, dtype=torch.float32)
    dw = torch.zeros(V, H, **f32) if compute_dw else hidden.new_empty(0, dtype=torch.float32)
    rows = (weights != 0).nonzero().squeeze(1)  # host sync: the padding is skipped, not computed and masked
    n = rows.numel()
    if n == 0:
        return torch.zeros((), **f32), logp, k3, clipped, dh, dw

    adv_rows = advantages.float()[rows // seq_len]
    old_rows = None if old_logp is None else old_logp[rows]
    ref_rows = None if ref_logp is None else ref_logp[rows]
    w_rows, t_rows = weights[rows], targets[rows]
    lse, logp_rows, loss_rows, dlogp, k3_rows, clip_rows = (torch.zeros(n, **f32) for _ in range(6))
    scratch = hidden.new_empty(min(chunk_rows, n), V, dtype=torch.float32)
    row_tiles = RowTiles.from_list(tiles)
    for r0 in range(0, n, chunk_rows):
        r1 = min(r0 + chunk_rows, n)
        idx = rows[r0:r1]
        h = hidden.index_select(0, idx)
        logits = _logits_into(scratch[: r1 - r0], h, weight)
        dlogits = _dlogits_view(logits, weight.dtype)
        sl = slice(r0, r1)
        _launch_rows(
            logits, dlogits, t_rows[sl], adv_rows[sl], None if old_rows is None else old_rows[sl],
            None if ref_rows is None else ref_rows[sl], w_rows[sl],
            (lse[sl], logp_rows[sl], loss_rows[sl], dlogp[sl], k3_rows[sl], clip_rows[sl]),
            temperature, beta, ratio_low, ratio_high, grpo=True, tiles=row_tiles,
        )
        # d loss / d logits = dlogp * dlogits / dlogits_scale, dlogp ~ 1 / tokens: the row factors multiply
        # fp32 values only (for dW, h is scaled by dlogp relative to the chunk's largest, then by that peak)
        unscale = 1.0 / dlogits_scale(dlogits.dtype)
        if compute_dh:
            dh.index_copy_(0, idx, _mm_fp32(dlogits, weight) * (dlogp[sl] * unscale).unsqueeze(1))
        if compute_dw:
            peak = dlogp[sl].abs().max().clamp(min=torch.finfo(torch.float32).tiny)
            _addmm_fp32(dw, dlogits.T, (h.float() * (dlogp[sl] / peak).unsqueeze(1)).to(h.dtype), peak * unscale)
    logp[rows], k3[rows], clipped[rows] = logp_rows, k3_rows, clip_rows
    return loss_rows.sum(), logp, k3, clipped, dh, dw


@fused_linear_grpo_loss_op.register_fake
def _(hidden, weight, targets, advantages, old_logp, ref_logp, weights, seq_len, beta, ratio_low, ratio_high,
      temperature, chunk_rows, tiles, compute_dh, compute_dw):
    check_shapes(hidden, weight, targets)
    N, H = hidden.shape
    rows = [hidden.new_empty(N, dtype=torch.float32) for _ in range(3)]
    dh = hidden.new_empty((N, H) if compute_dh else (0,), dtype=torch.float32)
    dw = hidden.new_empty((weight.shape[0], H) if compute_dw else (0,), dtype=torch.float32)
    return (hidden.new_empty((), dtype=torch.float32), *rows, dh, dw)


def _setup(ctx, inputs, output):
    hidden, weight = inputs[:2]
    _loss, logp, k3, clipped, dh, dw = output
    ctx.save_for_backward(dh, dw)
    ctx.dtypes = hidden.dtype, weight.dtype
    ctx.mark_non_differentiable(logp, k3, clipped, dh, dw)


def _backward(ctx, grad_loss, *_non_differentiable):
    dh, dw = ctx.saved_tensors
    h_dtype, w_dtype = ctx.dtypes
    grad_h = (dh * grad_loss).to(h_dtype) if ctx.needs_input_grad[0] else None
    grad_w = (dw * grad_loss).to(w_dtype) if ctx.needs_input_grad[1] else None
    return (grad_h, grad_w) + (None,) * 14


fused_linear_grpo_loss_op.register_autograd(_backward, setup_context=_setup)
